"""Sinks with and without QK-norm (paper Sec. 6): the numbers, reused where they exist.

QK-norm is read from the modules (``Model.qk_norm``: the attention normalises queries and keys
with ``q_norm``/``k_norm``), never from a model's name. The sink and VE statistics are the
variance chapter's, and the truth probes the probes chapter's, on the same prompts: when their
results files hold a model with the same parameters they are reused, otherwise this module runs
the same code for that model.
"""
from __future__ import annotations

import gc

from .. import arch, data, results
from . import probes, variance
from .. import models as M


def detect(name: str) -> dict:
    m = M.load(name)
    where = arch.arch_of(m.config)
    a = getattr(arch.getpath(m.hf, where.layers)[0], where.attn)
    out = {"model": name, "architecture": m.architecture, "qk_norm": m.qk_norm,
           "evidence": (f"{type(a).__name__} has q_norm={type(a.q_norm).__name__}, "
                        f"k_norm={type(a.k_norm).__name__}") if m.qk_norm
           else f"{type(a).__name__} has no q_norm / k_norm"}
    del m
    gc.collect()
    return out


def _same(saved: dict, wanted: dict) -> bool:
    return all(saved.get(k) == v for k, v in wanted.items())


def sink_stats(name: str, results_dir, n_prompts: int, max_tokens: int, eps: float,
               min_queries: int, seed: int, batch_size: int = 8) -> tuple[dict, str]:
    """The variance chapter's summary for ``name``: (summary, where it came from)."""
    wanted = {"n_prompts": n_prompts, "max_tokens": max_tokens, "eps": eps,
              "min_queries": min_queries, "seed": seed}
    try:
        saved = results.load("variance", results_dir)
        if _same(saved["params"], wanted) and name in saved["models"]:
            return saved["models"][name], "variance chapter results"
    except results.MissingResults:
        pass
    m = M.load(name)
    texts = data.imdb_reviews(n_prompts, seed=seed, min_words=max_tokens)
    r = variance.run(m, texts, max_tokens=max_tokens, main_eps=eps, min_queries=min_queries,
                     seed=seed, batch_size=batch_size)
    del m
    gc.collect()
    return variance.summary(r), "computed here"


def truth_probes(name: str, results_dir, n: int, n_train: int, eps: float, seed: int,
                 batch_size: int = 32) -> tuple[dict, str]:
    """The probes chapter's cities accuracies for ``name`` (theta_tag / no_tag / activation, %)."""
    wanted = {"n": n, "n_train": n_train, "eps": eps, "seed": seed}
    try:
        saved = results.load("probes", results_dir)
        if _same(saved["params"], wanted) and name in saved["models"]:
            guard = saved["params"]["min_queries"]
            return saved["models"][name]["cities"]["by_guard"][str(guard)], "probes chapter results"
    except results.MissingResults:
        pass
    m = M.load(name)
    t = probes.probe_task(m, data.cities(n, n_train, seed), eps=eps, batch_size=batch_size)
    del m
    gc.collect()
    return {f"theta_{k}": 100 * v for k, v in t.main.chosen.items()}, "computed here"
