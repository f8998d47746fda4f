"""Numbers one chapter computes and another shows (QK-norm and Scale): reused from the results
file of the chapter that computes them when its parameters match, otherwise computed here with
the same code and the same verdict rules.
"""
from __future__ import annotations

import gc

from .. import data, results
from .. import models as M
from . import probes
from . import variance


def _same(saved: dict, wanted: dict) -> bool:
    return all(saved.get(k) == v for k, v in wanted.items())


def sink_stats(name: str, results_dir, n_prompts: int, max_tokens: int, eps: float,
               min_queries: int, seed: int, batch_size: int = 8, device: str = "cpu",
               dtype: str = "float32") -> tuple[dict, str]:
    """The variance chapter's summary for ``name`` with its intervals (``s["intervals"]``, as
    ``variance.verdicts.intervals``): (summary, source)."""
    wanted = {"n_prompts": n_prompts, "max_tokens": max_tokens, "eps": eps,
              "min_queries": min_queries, "seed": seed}
    try:
        saved = results.load("variance", results_dir)
        if _same(saved["params"], wanted) and name in saved["models"]:
            return saved["models"][name], "variance chapter results"
    except results.MissingResults:
        pass
    from .variance import verdicts as variance_verdicts
    m = M.load(name, device=device, dtype=dtype, T=max_tokens, batch=batch_size)
    texts = data.imdb_reviews(n_prompts, seed=seed, min_words=max_tokens)
    r = variance.run(m, texts, max_tokens=max_tokens, main_eps=eps, min_queries=min_queries,
                     seed=seed, batch_size=batch_size)
    del m
    gc.collect()
    s = variance.summary(r)
    s["intervals"] = variance_verdicts.intervals(r, seed=seed)
    return s, "computed here"


def probe_family(name: str, results_dir, *, n: int, n_train: int, eps: float, seed: int,
                 suffix: str, n_resplits: int, n_null: int, batch_size: int = 32,
                 device: str = "cpu", dtype: str = "float32") -> tuple[dict, list[dict], str]:
    """The probes chapter's summary and claim rows for ``name`` (its whole Holm family: cities,
    sentiment and the position-controlled cities, each under the paper's protocol and the
    guard), so a row judged here is judged exactly as in that chapter:
    (summary by task, claim rows of this model, source)."""
    from .probes import verdicts as PV
    wanted = {"n": n, "n_train": n_train, "eps": eps, "seed": seed, "suffix": suffix,
              "n_resplits": n_resplits, "n_null": n_null}
    try:
        saved = results.load("probes", results_dir)
        if _same(saved["params"], wanted) and name in saved["models"]:
            rows = [c for c in saved["claims"] if c["model"] == name]
            return saved["models"][name], rows, "probes chapter results"
    except results.MissingResults:
        pass
    tasks = {"cities": data.cities(n, n_train, seed=seed),
             "sentiment": data.sentiment(n, n_train, seed=seed),
             "cities_suffix": data.cities_suffixed(n, n_train, seed=seed, suffix=suffix)}
    ch = probes.run([name], tasks, eps=eps, guard=probes.guard_for(eps), n_resplits=n_resplits,
                    n_null=n_null, batch_size=batch_size, seed=seed, device=device, dtype=dtype)
    summ = PV.adjust({name: {t: r.summary() for t, r in ch.runs[name].items()}})
    rows = PV.claim_rows(summ, results.paper(), probes.guard_for(eps))
    gc.collect()
    return summ[name], [c for c in rows if c["model"] == name], "computed here"
