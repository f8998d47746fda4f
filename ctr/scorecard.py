"""The scorecard: every claim of the paper, its number, ours, and one verdict per claim.

Each chapter closes with a table of (claim id, model, claim, paper, ours, verdict) rows, decided
by rules written in that chapter, and saves it as ``claims`` in its results file. The scorecard
only gathers those rows and combines the per-model verdicts of a claim with one rule:

- **reproduced** when every model on which the claim could be tested reproduced it;
- **not reproduced** when none did (and none partly did);
- **partly** otherwise (mixed across models, or "partly" in a chapter);
- **not testable offline** when no model could test it (e.g. no base/reasoning pair installable).

Nothing here is typed by hand but these rules and, in ``paper_numbers.yaml``, the paper's numbers.
"""
from __future__ import annotations

import html

import pandas as pd

from . import results

CHAPTERS = ("sinks", "variance", "probes", "taxonomy", "qknorm", "toy_theory", "toy_multihead")
VERDICTS = ("reproduced", "partly", "not reproduced", "not testable offline")
TITLES = {"sinks": "Sinks", "variance": "Variance", "probes": "Semantic probes",
          "taxonomy": "Reasoning taxonomy", "qknorm": "QK-norm", "toy_theory": "Toy theory",
          "toy_multihead": "Multi-head toy"}


def normalise(v: str) -> str:
    v = str(v).strip().lower()
    if v.startswith("not testable"):
        return "not testable offline"
    if v.startswith("reproduced"):
        return "reproduced"
    if v.startswith("partly") or v.startswith("partially"):
        return "partly"
    if v.startswith("not reproduced"):
        return "not reproduced"
    raise ValueError(f"unknown verdict {v!r}; use one of {', '.join(VERDICTS)}")


def combine(verdicts) -> str:
    vs = [normalise(v) for v in verdicts]
    tested = [v for v in vs if v != "not testable offline"]
    if not tested:
        return "not testable offline"
    if all(v == "reproduced" for v in tested):
        return "reproduced"
    if all(v == "not reproduced" for v in tested):
        return "not reproduced"
    return "partly"


def collect(results_dir, chapters=CHAPTERS) -> pd.DataFrame:
    """All chapters' claim rows. A missing results file or a file without claims is an error."""
    rows = []
    for ch in chapters:
        res = results.load(ch, results_dir)          # raises MissingResults, naming the chapter
        claims = res.get("claims")
        if not claims:
            raise ValueError(f"results file of chapter {ch!r} has no 'claims' rows; rerun it "
                             f"(make chapter NAME={ch})")
        for c in claims:
            missing = {"id", "model", "claim", "paper", "ours", "verdict"} - set(c)
            if missing:
                raise ValueError(f"chapter {ch!r}: a claim row lacks {sorted(missing)}")
            rows.append({"chapter": ch, **{k: c[k] for k in ("id", "model", "claim", "paper", "ours", "verdict")}})
    return pd.DataFrame(rows)


def table(results_dir, chapters=CHAPTERS) -> pd.DataFrame:
    """One row per claim: claim, paper, ours (per model), verdict (combined), chapter."""
    rows = collect(results_dir, chapters)
    out = []
    for (ch, cid), g in rows.groupby(["chapter", "id"], sort=False):
        out.append({
            "chapter": ch, "id": cid, "claim": g.claim.iloc[0], "paper": str(g.paper.iloc[0]),
            "ours": "; ".join(f"{m}: {o}" if m not in ("-", "") else str(o)
                              for m, o in zip(g.model, g.ours)),
            "per model": "; ".join(f"{m}: {normalise(v)}" for m, v in zip(g.model, g.verdict)),
            "verdict": combine(g.verdict)})
    return pd.DataFrame(out)


COLOURS = {"reproduced": "#d9f0d3", "partly": "#fee8c8", "not reproduced": "#fcd5d5",
           "not testable offline": "#e5e5e5"}


def to_html(t: pd.DataFrame) -> str:
    """The table as HTML with a link to each chapter (pages sit side by side in the book)."""
    head = "".join(f"<th>{h}</th>" for h in ("claim", "paper", "ours", "verdict", "chapter"))
    body = []
    for _, r in t.iterrows():
        body.append(
            f"<tr><td>{html.escape(r.claim)}</td><td>{html.escape(r.paper)}</td>"
            f"<td>{html.escape(r.ours)}</td>"
            f"<td style='background:{COLOURS[r.verdict]}' title='{html.escape(r['per model'])}'>"
            f"<b>{r.verdict}</b></td>"
            f"<td><a href='{r.chapter}.html'>{TITLES.get(r.chapter, r.chapter)}</a></td></tr>")
    return (f"<table class='table'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
            f"</tbody></table>")
