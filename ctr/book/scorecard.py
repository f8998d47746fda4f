"""The scorecard: every claim, the paper's number, ours, the pre-registered rule and the verdict.

Each chapter closes with claim rows (``ctr.verdicts.row``), decided by rule functions in its
modules that apply ``RULES.md`` as written, and saves them as ``claims`` in its results file.
The scorecard only gathers them:

- one line per claim (chapter, id) of the pre-registered rows, its verdict over the models by
  ``ctr.verdicts.combine`` (RULES.md, "Across models") and how many models agree with it;
- the rows marked "alternative reading, not pre-registered" apart, never merged into a claim's
  verdict nor counted;
- the claims of the chapters beyond the paper (``BEYOND``) in a section of their own, read as
  supported / not supported;
- a flag on every row whose chapter ran with parameters other than its defaults;
- ``export``: the same as CSV and JSON for readers who want the numbers, not the page.

``to_html`` draws the compact table (one line per claim; per-model details fold open);
``verdict_map`` the figure of the front page.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from .. import results
from .. import verdicts as V

CHAPTERS = ("sinks", "variance", "probes", "taxonomy", "qknorm", "toy_theory", "toy_multihead")
BEYOND = ("release",)
VERDICTS = V.VERDICTS
TITLES = {"sinks": "Sinks", "variance": "Variance", "probes": "Semantic probes",
          "taxonomy": "Reasoning taxonomy", "qknorm": "QK-norm", "toy_theory": "Toy theory",
          "toy_multihead": "Multi-head toy", "release": "Release, tested"}
SCOPE = ("Scope of every interval: the prompts (or training seeds) of the named model only. "
         "No interval covers the choice of model, its size, or the 4-bit quantisation of the "
         "embedded weights; each claim says how many of the models that ran agree with it.")

SHORT = {V.REPRODUCED: "R", V.COMPATIBLE: "C", V.PARTLY: "P", V.NOT: "N", V.UNTESTABLE: "-"}
COLOURS = {V.REPRODUCED: "#d9f0d3", V.COMPATIBLE: "#e6f0fa", V.PARTLY: "#fee8c8",
           V.NOT: "#fcd5d5", V.UNTESTABLE: "#e5e5e5"}
# A claim the book adds is not "reproduced": it is supported (or not) by our own experiment.
BEYOND_WORDS = {V.REPRODUCED: "supported", V.NOT: "not supported"}

OPTIONAL = ("reading", "headline", "settings", "choice", "p_raw", "p_adj", "parts", "note")


def collect(results_dir, chapters=CHAPTERS) -> pd.DataFrame:
    """All chapters' claim rows. A missing results file, a file without claims, a row without
    one of the columns or with an unknown verdict is an error naming the chapter. Each row
    carries the parameters its chapter ran with that are not the defaults (recorded by the
    book's runner in the results file: ``values.nondefault``)."""
    from .values import nondefault

    rows = []
    for ch in chapters:
        res = results.load(ch, results_dir)          # raises MissingResults, naming the chapter
        claims = res.get("claims")
        if not claims:
            raise ValueError(f"results file of chapter {ch!r} has no 'claims' rows; rerun it "
                             f"(make chapter NAME={ch})")
        flag = nondefault(ch, results_dir)
        for c in claims:
            missing = set(V.COLUMNS) - set(c)
            if missing:
                raise ValueError(f"chapter {ch!r}: a claim row lacks {sorted(missing)}; rerun it "
                                 f"(make chapter NAME={ch})")
            V.check(c["verdict"])
            extra = {k: c.get(k) for k in OPTIONAL}
            extra["reading"] = extra["reading"] or V.PREREGISTERED
            rows.append({"chapter": ch, **{k: c[k] for k in V.COLUMNS}, **extra,
                         "nondefault": flag})
    return pd.DataFrame(rows, columns=["chapter", *V.COLUMNS, *OPTIONAL, "nondefault"])


def _headline(r) -> str:
    """One short line for a model's result: the row's headline, else the start of 'ours'."""
    if isinstance(r.get("headline"), str) and r["headline"]:
        return r["headline"]
    first = str(r["ours"]).split(";")[0].strip()
    return first if len(first) <= 70 else first[:67].rstrip() + "..."


def _claims(rows: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (ch, cid), g in rows.groupby(["chapter", "id"], sort=False):
        per = g.to_dict(orient="records")
        overall = V.combine(g.verdict)
        flags = {}
        for r in per:
            flags.update(r["nondefault"] or {})
        out.append({
            "chapter": ch, "id": cid, "claim": g.claim.iloc[0], "paper": str(g.paper.iloc[0]),
            "rule": g.rule.iloc[0], "reading": g.reading.iloc[0], "verdict": overall,
            "agree": V.agree(g.verdict, overall), "models": len(g),
            "per_model": [{"model": r["model"], "verdict": r["verdict"], "ours": r["ours"],
                           "headline": _headline(r), "interval": r["interval"],
                           **{k: r[k] for k in ("settings", "choice", "p_raw", "p_adj", "parts",
                                                "note") if r[k] is not None}}
                          for r in per],
            "nondefault": flags})
    return pd.DataFrame(out, columns=["chapter", "id", "claim", "paper", "rule", "reading",
                                      "verdict", "agree", "models", "per_model", "nondefault"])


def table(results_dir, chapters=CHAPTERS) -> pd.DataFrame:
    """One row per pre-registered claim: claim, paper, rule, verdict over the models, how many
    models agree, the per-model details, and the parameters that differ from the defaults."""
    rows = collect(results_dir, chapters)
    return _claims(rows[rows.reading == V.PREREGISTERED])


def alternatives(results_dir, chapters=CHAPTERS) -> pd.DataFrame:
    """The rows marked "alternative reading, not pre-registered", one per (chapter, id)."""
    rows = collect(results_dir, chapters)
    return _claims(rows[rows.reading == V.ALTERNATIVE])


def counts(card: pd.DataFrame) -> dict:
    """How many claims got each verdict (every verdict of the vocabulary, zeros included)."""
    c = card.verdict.value_counts()
    return {v: int(c.get(v, 0)) for v in VERDICTS}


# --- HTML -----------------------------------------------------------------------------------------

def _e(x) -> str:
    return html.escape(str(x))


def _word(v: str, words: dict | None) -> str:
    return (words or {}).get(v, v)


def badge(verdict: str, words: dict | None = None) -> str:
    return (f"<span class='ctr-badge' style='background:{COLOURS[verdict]}'>"
            f"{_e(_word(verdict, words))}</span>")


def _pfmt(p) -> str:
    return "-" if p is None else (f"{p:.2g}" if p < 0.01 else f"{p:.3f}")


def _details(r, words) -> str:
    """The folded part of a claim: per model the full result, interval, p-values, parts,
    settings and notes; then the pre-registered rule's words."""
    items = []
    for m in r.per_model:
        bits = [f"<b>{_e(m['model'])}</b>: {badge(m['verdict'], words)} {_e(m['ours'])}"]
        if str(m["interval"]).strip("-; "):
            bits.append(f"interval: {_e(m['interval'])}")
        if "p_raw" in m or "p_adj" in m:
            bits.append(f"p raw {_pfmt(m.get('p_raw'))}, Holm-adjusted {_pfmt(m.get('p_adj'))}")
        if m.get("parts"):
            bits.append("parts: " + "; ".join(f"{_e(k)}: {_e(_word(v, words))}"
                                              for k, v in m["parts"].items()))
        for k in ("settings", "choice", "note"):
            if m.get(k):
                bits.append(f"{k}: {_e(m[k])}")
        items.append("<li>" + "<br>".join(bits) + "</li>")
    flag = ""
    if r.nondefault:
        flag = ("<p class='ctr-nondefault'>Run with non-default parameters: "
                + _e(", ".join(f"{k}={v}" for k, v in r.nondefault.items()))
                + " (<code>make book</code> restores the defaults).</p>")
    return (f"<details><summary>details and rule</summary>{flag}<ul>{''.join(items)}</ul>"
            f"<p><b>Rule</b> ({_e(r.reading)}): {_e(r.rule)}</p></details>")


def to_html(card: pd.DataFrame, words: dict | None = None, details: bool = True,
            link: str = "{chapter}.html") -> str:
    """The compact table, grouped by chapter (a heading row links the chapter): claim, the
    paper's number, ours per model (one line each, led by that model's verdict letter), the
    claim's verdict and how many models agree. With ``details`` each claim's full per-model
    results and its rule fold open under it (the scorecard); without, the front page's table."""
    head = "".join(f"<th>{h}</th>" for h in ("claim", "paper", "ours, per model", "verdict"))
    body, prev = [], None
    for r in card.itertuples():
        if r.chapter != prev:
            body.append(f"<tr class='ctr-chapter'><td colspan='4'><a href='"
                        f"{link.format(chapter=r.chapter)}'>{_e(TITLES.get(r.chapter, r.chapter))}"
                        "</a></td></tr>")
            prev = r.chapter
        ours = "<br>".join(
            f"<span class='ctr-dot' style='background:{COLOURS[m['verdict']]}' "
            f"title='{_e(_word(m['verdict'], words))}'>{SHORT[m['verdict']]}</span> "
            f"{_e(m['model'])}: {_e(m['headline'])}" for m in r.per_model)
        flag = " <span class='ctr-nondefault' title='non-default parameters'>&#9888;</span>" \
            if r.nondefault else ""
        claim = _e(r.claim) + flag + (_details(r, words) if details else "")
        body.append(
            f"<tr><td>{claim}</td><td>{_e(r.paper)}</td><td>{ours}</td>"
            f"<td>{badge(r.verdict, words)}<br><small>{r.agree} of {r.models} "
            f"{'model agrees' if r.models == 1 else 'models agree'}</small></td></tr>")
    return (f"<table class='table ctr-scorecard'><thead><tr>{head}</tr></thead><tbody>"
            f"{''.join(body)}</tbody></table>")


# --- files -----------------------------------------------------------------------------------------

def records(card: pd.DataFrame, section: str) -> list[dict]:
    """Flat rows (one per claim and model) for CSV / JSON."""
    out = []
    for r in card.itertuples():
        for m in r.per_model:
            out.append({"section": section, "chapter": r.chapter, "id": r.id, "claim": r.claim,
                        "paper": r.paper, "model": m["model"], "ours": m["ours"],
                        "headline": m["headline"], "interval": m["interval"],
                        "p_raw": m.get("p_raw"), "p_adj": m.get("p_adj"),
                        "settings": m.get("settings"), "model_verdict": m["verdict"],
                        "claim_verdict": r.verdict, "agree": r.agree, "models": r.models,
                        "reading": r.reading, "rule": r.rule,
                        "nondefault": json.dumps(r.nondefault) if r.nondefault else ""})
    return out


def export(out_dir, sections: dict, rules_commit: str, **more) -> dict:
    """Write ``scorecard.csv`` (every claim x model: ids, numbers, intervals, p-values, rules,
    verdicts) and the chapter's results file ``scorecard.json`` (the same rows, the scope, the
    rules' version and ``more``) into ``out_dir`` through ``results`` (staged under the runner,
    like every results file); ``sections``: {name: card}. Returns the two paths."""
    flat = [x for name, card in sections.items() for x in records(card, name)]
    csv = results.save_text("scorecard.csv", pd.DataFrame(flat).to_csv(index=False), out_dir)
    js = results.save("scorecard", {"rules_commit": rules_commit, "scope": SCOPE,
                                    "rows": flat, **more}, out_dir)
    return {"csv": csv, "json": js}


# --- the verdict map --------------------------------------------------------------------------------

def verdict_map(card: pd.DataFrame, words: dict | None = None, ax=None):
    """One row per claim, one column per model and one for the claim's verdict, coloured by
    verdict, grouped by chapter (matplotlib). Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    models = []
    for r in card.itertuples():
        for m in r.per_model:
            if m["model"] not in models:
                models.append(m["model"])
    cols = models + ["claim"]
    n = len(card)
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.0, 0.8 + 0.24 * n))
    fig = ax.figure
    grid = [[(1, 1, 1)] * len(cols) for _ in range(n)]
    text = [[""] * len(cols) for _ in range(n)]
    for i, r in enumerate(card.itertuples()):
        have = {m["model"]: m["verdict"] for m in r.per_model}
        for j, mo in enumerate(models):
            if mo in have:
                grid[i][j], text[i][j] = to_rgb(COLOURS[have[mo]]), SHORT[have[mo]]
        grid[i][-1], text[i][-1] = to_rgb(COLOURS[r.verdict]), SHORT[r.verdict]
    ax.imshow(grid, aspect="auto", interpolation="nearest")
    for i in range(n):
        for j in range(len(cols)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7)
    labels = [f"{r.claim[:55]}{'...' if len(r.claim) > 55 else ''}" for r in card.itertuples()]
    ax.set_yticks(range(n), labels, fontsize=7)
    shown = ["(no model)" if c == "-" else c for c in cols]   # a row no model could test
    ax.xaxis.tick_top()
    ax.set_xticks(range(len(cols)), shown, fontsize=8, rotation=45, ha="left",
                  rotation_mode="anchor")
    ax.axvline(len(models) - 0.5, color="black", lw=1.2)
    prev = None
    for i, ch in enumerate(card.chapter):
        if ch != prev:
            if prev is not None:
                ax.axhline(i - 0.5, color="black", lw=1.0)
            ax.text(len(cols) - 0.4, i - 0.45, TITLES.get(ch, ch), fontsize=7, va="top",
                    ha="left", style="italic")
            prev = ch
    ax.set_xlim(-0.5, len(cols) - 0.5)
    ax.legend(handles=[Patch(color=COLOURS[v], label=_word(v, words)) for v in VERDICTS],
              loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
