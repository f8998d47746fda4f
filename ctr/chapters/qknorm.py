"""Sinks with and without QK-norm (paper Sec. 6): the numbers, reused where they exist.

QK-norm is read from the modules (``Model.qk_norm``: the attention normalises queries and keys
with ``q_norm``/``k_norm``), never from a model's name. The sink and VE statistics are the
variance chapter's, and the truth probes the probes chapter's, on the same prompts: when their
results files hold a model with the same parameters they are reused, otherwise this module runs
the same code for that model. The rules that judge the paper's two claims are at the end.
"""
from __future__ import annotations

import gc

import numpy as np

from .. import arch, data, results, stats
from .. import verdicts as V
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
    """The variance chapter's summary for ``name``, intervals included: (summary, source)."""
    wanted = {"n_prompts": n_prompts, "max_tokens": max_tokens, "eps": eps,
              "min_queries": min_queries, "seed": seed}
    try:
        saved = results.load("variance", results_dir)
        if _same(saved["params"], wanted) and name in saved["models"]:
            return saved["models"][name], "variance chapter results"
    except results.MissingResults:
        pass
    from . import variance_verdicts
    m = M.load(name)
    texts = data.imdb_reviews(n_prompts, seed=seed, min_words=max_tokens)
    r = variance.run(m, texts, max_tokens=max_tokens, main_eps=eps, min_queries=min_queries,
                     seed=seed, batch_size=batch_size)
    del m
    gc.collect()
    s = variance.summary(r)
    s["intervals"] = variance_verdicts.intervals(r, seed=seed)
    return s, "computed here"


def truth_probes(name: str, results_dir, n: int, n_train: int, eps: float, seed: int,
                 batch_size: int = 32) -> tuple[dict, str, str]:
    """The probes chapter's cities result for ``name`` under the paper's protocol
    (min_queries = 1): (its summary, the probes chapter's verdict on it, source)."""
    from . import probes_verdicts
    wanted = {"n": n, "n_train": n_train, "eps": eps, "seed": seed}
    try:
        saved = results.load("probes", results_dir)
        if _same(saved["params"], wanted) and name in saved["models"]:
            s = saved["models"][name]["cities"]["paper"]
            return s, probes_verdicts.carried_by_tag(s), "probes chapter results"
    except results.MissingResults:
        pass
    m = M.load(name)
    t = probes.probe_task(m, data.cities(n, n_train, seed), eps=eps, batch_size=batch_size,
                          task="cities", seed=seed)
    del m
    gc.collect()
    s = t.summary()["paper"]
    return s, probes_verdicts.carried_by_tag(s), "computed here"


# --- the rules -----------------------------------------------------------------------------------

RATIO = 0.8     # "not reduced": at least 80% of the sinks per head of the models without QK-norm


def sinks_ratio(qk: list[float], others: list[list[float]], n_boot: int = 1000,
                seed: int = 0) -> tuple[float, float, float]:
    """Sinks per head of a QK-norm model over the mean of the models without it, on the same
    prompts (per-prompt values), with a 95% bootstrap interval over prompts."""
    units = np.c_[np.asarray(qk), np.mean(np.asarray(others), axis=0)]
    ratio = lambda u: u[:, 0].mean() / u[:, 1].mean()  # noqa: E731
    return (float(ratio(units)), *stats.bootstrap(units, ratio, n_boot, seed))


def rule_not_reduced(lo, hi, ratio: float = RATIO) -> str:
    """QK-norm does not reduce sink counts: the ratio's interval lies at or above 0.8."""
    return V.by_interval(lo, hi, ratio)


def rule_mechanism(beats_random: tuple, probe_verdict: str) -> str:
    """The mechanism is present under QK-norm: its tags explain more than random subspaces
    (interval above 0) and the truth of a statement is carried by a tag (the probes chapter's
    verdict under the paper's protocol)."""
    return V.all_of(V.by_interval(*beats_random, low=0.0), probe_verdict)
