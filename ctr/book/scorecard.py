"""The scorecard: every claim, the paper's number, ours, the rule, the interval and the verdict.

Each chapter closes with a table of claim rows (``ctr.verdicts.row``: id, model, claim, paper,
ours, interval, rule, verdict), decided by rule functions in that chapter's module and saved as
``claims`` in its results file. The scorecard only gathers the rows and combines the per-model
verdicts of a claim with ``ctr.verdicts.combine``:

- reproduced when every model that could test the claim reproduced it;
- not reproduced when none did;
- compatible (underpowered) when every tested model is reproduced or compatible;
- partly otherwise (mixed across models, or partly in a chapter);
- not testable here when no model could test it.

Claims of the chapters that go beyond the paper (``BEYOND``) are listed in a section of their own.
"""
from __future__ import annotations

import html

import pandas as pd

from .. import results
from .. import verdicts as V

CHAPTERS = ("sinks", "variance", "probes", "taxonomy", "qknorm", "toy_theory", "toy_multihead")
BEYOND = ("release",)
VERDICTS = V.VERDICTS
TITLES = {"sinks": "Sinks", "variance": "Variance", "probes": "Semantic probes",
          "taxonomy": "Reasoning taxonomy", "qknorm": "QK-norm", "toy_theory": "Toy theory",
          "toy_multihead": "Multi-head toy", "release": "Release, tested"}


def collect(results_dir, chapters=CHAPTERS) -> pd.DataFrame:
    """All chapters' claim rows. A missing results file, a file without claims, a row without
    one of the columns or with an unknown verdict is an error naming the chapter."""
    rows = []
    for ch in chapters:
        res = results.load(ch, results_dir)          # raises MissingResults, naming the chapter
        claims = res.get("claims")
        if not claims:
            raise ValueError(f"results file of chapter {ch!r} has no 'claims' rows; rerun it "
                             f"(make chapter NAME={ch})")
        for c in claims:
            missing = set(V.COLUMNS) - set(c)
            if missing:
                raise ValueError(f"chapter {ch!r}: a claim row lacks {sorted(missing)}; rerun it "
                                 f"(make chapter NAME={ch})")
            V.check(c["verdict"])
            rows.append({"chapter": ch, **{k: c[k] for k in V.COLUMNS}})
    return pd.DataFrame(rows, columns=["chapter", *V.COLUMNS])


def _per_model(g, key) -> str:
    return "; ".join(f"{m}: {x}" if m not in ("-", "") else str(x) for m, x in zip(g.model, g[key]))


def table(results_dir, chapters=CHAPTERS) -> pd.DataFrame:
    """One row per claim: claim, paper, ours / interval / verdict per model, rule, verdict."""
    rows = collect(results_dir, chapters)
    out = []
    for (ch, cid), g in rows.groupby(["chapter", "id"], sort=False):
        out.append({
            "chapter": ch, "id": cid, "claim": g.claim.iloc[0], "paper": str(g.paper.iloc[0]),
            "ours": _per_model(g, "ours"), "interval": _per_model(g, "interval"),
            "rule": g.rule.iloc[0],
            "per model": "; ".join(f"{m}: {v}" for m, v in zip(g.model, g.verdict)),
            "verdict": V.combine(g.verdict)})
    return pd.DataFrame(out, columns=["chapter", "id", "claim", "paper", "ours", "interval",
                                      "rule", "per model", "verdict"])


COLOURS = {V.REPRODUCED: "#d9f0d3", V.COMPATIBLE: "#e6f0fa", V.PARTLY: "#fee8c8",
           V.NOT: "#fcd5d5", V.UNTESTABLE: "#e5e5e5"}


# A claim the book adds is not "reproduced": it is supported (or not) by our own experiment.
BEYOND_WORDS = {V.REPRODUCED: "supported", V.NOT: "not supported"}


def to_html(t: pd.DataFrame, rule: bool = True, words: dict | None = None) -> str:
    """The table as HTML with a link to each chapter (pages sit side by side in the book);
    ``words``: how a verdict is shown (``BEYOND_WORDS`` for claims beyond the paper)."""
    words = words or {}
    cols = ["claim", "paper", "ours (95% interval)", *(["rule"] if rule else []), "verdict",
            "chapter"]
    head = "".join(f"<th>{h}</th>" for h in cols)
    body = []
    for _, r in t.iterrows():
        ours = html.escape(r.ours) + ("<br><small>" + html.escape(r.interval) + "</small>"
                                      if r.interval.strip("-; ") else "")
        body.append(
            f"<tr><td>{html.escape(r.claim)}</td><td>{html.escape(r.paper)}</td><td>{ours}</td>"
            + (f"<td><small>{html.escape(r.rule)}</small></td>" if rule else "")
            + f"<td style='background:{COLOURS[r.verdict]}' title='{html.escape(r['per model'])}'>"
            f"<b>{words.get(r.verdict, r.verdict)}</b><br><small>"
            f"{html.escape(_reword(r['per model'], words))}</small></td>"
            f"<td><a href='{r.chapter}.html'>{TITLES.get(r.chapter, r.chapter)}</a></td></tr>")
    return (f"<table class='table scorecard'><thead><tr>{head}</tr></thead><tbody>"
            f"{''.join(body)}</tbody></table>")


def _reword(text: str, words: dict) -> str:
    for v in sorted(words, key=len, reverse=True):      # "not reproduced" before "reproduced"
        text = text.replace(f": {v}", f": {words[v]}")
    return text
