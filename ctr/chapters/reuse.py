"""Numbers one chapter computes and another shows: reused from its results file when the
parameters match, computed with the same code otherwise (QK-norm and Scale use these)."""
from __future__ import annotations

import gc

from .. import data, results
from .. import models as M
from . import probes, variance


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


