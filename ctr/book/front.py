"""The front page's numbers and tables (``book/index.ipynb`` only calls these).

``summary`` gives every value the reproducibility summary glues into its prose: the claim
counts from the scorecard, the models, the machine, the rules' version and the chapter time of
this build (read from ``timings.json`` when the page runs, so it is this build's).
"""
from __future__ import annotations

import os
import platform

import pandas as pd

from .. import results, rules
from . import scorecard


TOYS = ("toy_theory", "toy_multihead")   # chapters whose rows are settings, not models


def _counts_text(c: dict, words: dict | None = None) -> str:
    words = words or {}
    parts = [f"{n} {words.get(v, v)}" for v, n in c.items() if n]
    return ", ".join(parts) if parts else "none"


def timings(results_dir) -> dict:
    """Every chapter's last run time, read through ``results.load`` so the runner records the
    read and the page re-runs when another chapter's time changes."""
    try:
        return results.load("timings", results_dir)
    except results.MissingResults:
        return {}


def machine() -> str:
    import psutil
    import torch

    gpu = (f"{torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "no GPU")
    return (f"{os.cpu_count()} CPU cores and {psutil.virtual_memory().total / 2**30:.0f} GB of "
            f"memory, {gpu}")


def summary(card: pd.DataFrame, extra: pd.DataFrame, results_dir) -> dict:
    """Every value the reproducibility summary glues, as display strings."""
    # the language models behind the rows (a toy row names its setting in that column)
    lm = card[~card.chapter.isin(TOYS)]
    models = sorted({m["model"] for pm in lm.per_model for m in pm} - {"-", ""})
    by_ch = []
    for ch, g in card.groupby("chapter", sort=False):
        by_ch.append(f"{scorecard.TITLES.get(ch, ch)} {_counts_text(scorecard.counts(g))}")
    t = timings(results_dir)
    secs = sum(v["seconds"] for k, v in t.items() if k != "index")
    return {
        "n_claims": str(len(card)),
        "n_chapters": str(card.chapter.nunique()),
        "n_beyond": str(len(extra)),
        "counts": _counts_text(scorecard.counts(card)),
        "by_chapter": "; ".join(by_ch),
        "beyond_counts": _counts_text(scorecard.counts(extra), scorecard.BEYOND_WORDS),
        "models": ", ".join(models) if models else "none",
        "rules_commit": rules.commit(),
        "machine": machine(),
        "chapter_minutes": f"{secs / 60:.1f}",
        **sizes(results_dir),
    }


def sizes(results_dir) -> dict:
    """The paper's models (``ctr/paper_numbers.yaml``, counted from their configs) against the
    models of this build (the Scale chapter's parameter counts): how many, how large, how much
    smaller ours are."""
    from ..models import paper

    theirs = [paper.n_params(paper.config(n)) for n in paper.names()]
    out = {"paper_models": str(len(theirs)),
           "paper_sizes": f"{min(theirs) / 1e9:.0f}-{max(theirs) / 1e9:.0f}"}
    try:
        ours = [r["parameters"] for r in results.load("scale", results_dir)["rungs"]]
    except results.MissingResults:
        ours = []
    out["size_ratio"] = (f"{min(theirs) / max(ours):.0f}-{max(theirs) / min(ours):.0f} times"
                         if ours else "far")
    return out


def mechanism_caption(name: str, saved: dict) -> str:
    return (f"**The mechanism in one head, found by code in this build** ({name}, "
            f"L{saved['layer']}H{saved['head']}; the Sinks chapter says how it was chosen). "
            "Left: the head's attention, rows are queries; the bars on top are the sink scores "
            "$\\alpha_t$. Right: the head's outputs for the caught tokens, projected on their "
            "two principal components, coloured by the sink each token attends to most; "
            "arrows: the directions of the tags.")


def models_table() -> pd.DataFrame:
    """The embedded models, their provenance and licence, and whether they are installed."""
    from .. import models as M

    rows = [M.describe(n) for n in M.EMBEDDED]
    installed = set(M.available())
    for r in rows:
        r["installed here"] = "yes" if r["model"] in installed else \
            "no (optional: make models-extra)"
    return pd.DataFrame(rows).set_index("model")


def versions_line() -> str:
    import importlib.metadata as md

    import torch

    v = {k: md.version(k) for k in ("torch", "transformers", "nnsight", "jupyter-book",
                                     "papermill", "scikit-learn", "statsmodels", "numpy")}
    v["python"] = platform.python_version()
    return ("**Versions:** " + ", ".join(f"{k} {x}" for k, x in v.items())
            + f". **Machine:** {machine()}, torch threads {torch.get_num_threads()}.")


def timings_intro(results_dir) -> str:
    t = {k: v for k, v in timings(results_dir).items() if k != "index"}
    if not t:
        return "No chapter timings recorded yet."
    total = sum(v["seconds"] for v in t.values())
    return (f"**Run time per chapter** (papermill, wall clock; {total / 60:.1f} min before this "
            "page and the HTML build):")


def timings_table(results_dir) -> pd.DataFrame:
    t = timings(results_dir)
    return pd.DataFrame([{"chapter": k, "seconds": v["seconds"],
                          "parameters": ", ".join(f"{a}={b}" for a, b in v["params"].items())
                          or "defaults", "finished (UTC)": v["finished"]}
                         for k, v in t.items() if k != "index"]).set_index("chapter") \
        if t else pd.DataFrame()
