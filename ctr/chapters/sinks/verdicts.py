"""The sinks chapter's verdict rules (RULES.md, "Sinks (paper Fig. 1-2)") and its rows.

Each rule is a function of numbers (the measures are in ``sinks.measures``); ``claims`` turns
one model's ``sinks.summary`` into the paper / ours / verdict rows, each carrying the rule's
own words (``rules.text``), the settings it ran with and the choices the paper leaves open.
"""
from __future__ import annotations

import pandas as pd

from ... import rules, stats
from ... import verdicts as V
from . import measures as SM

MARGIN = 0.05   # RULES.md: this book's margin for a silhouette gain; the paper gives none

CHOICES = {
    "two_sinks": "mid-prompt p: max(4, T/10) <= p < 2T/3 (the rule's window); the share's "
                 "Wilson interval counts (prompt, head) pairs",
    "clusters": "z = the head output before W_O; the residual entering the layer, before "
                "its input norm; PCA centred, not scaled; Euclidean silhouette; tokens t > p "
                "labelled by argmax of A[t, 0], A[t, p] (ties: 0)",
    "persist": f"deeper = {SM.DEEPER}; {SM.PERSIST_LABELS}; one case per (prompt, layer, p)",
    "own_sinks": "different = the two heads' mid-prompt sinks have no position in common",
}


def rule_two_sinks(pairs: int) -> str:
    """Existence: reproduced if at least one (prompt, head) pair has sinks exactly {0, p} with p
    mid-prompt; not reproduced if none."""
    return V.REPRODUCED if pairs >= 1 else V.NOT


def rule_gain(m: dict, margin: float = MARGIN) -> str:
    """clusters and persist: not testable with no case (or fewer than 20 contributing prompts,
    RULES.md General); reproduced if the mean gain's bootstrap CI lies above ``margin`` (0.05);
    not reproduced if it lies below; compatible (underpowered) otherwise."""
    if not m.get("n_cases"):
        return V.UNTESTABLE
    return V.by_bootstrap(m["lo"], m["hi"], m["n_prompts"], low=margin, strict=True)


def rule_clusters(m: dict) -> str:
    """Mean (output minus input) silhouette gain over every two-sink (prompt, head):
    reproduced if its CI > 0.05; not reproduced if CI < 0.05; compatible otherwise; not
    testable with no such case or fewer than 20 contributing prompts."""
    return rule_gain(m)


def rule_persist(m: dict) -> str:
    """Mean (3 layers deeper minus layer input) silhouette gain over the (prompt, layer) cases
    with at least 2 two-sink heads at one p: reproduced if its CI > 0.05; not reproduced if
    CI < 0.05; compatible otherwise; not testable with no such case (or under 20 prompts)."""
    return rule_gain(m)


def rule_own_sinks(prompts_with: int) -> str:
    """Existence: reproduced if at least one prompt has two heads with different mid-prompt
    sinks; not reproduced if none."""
    return V.REPRODUCED if prompts_with >= 1 else V.NOT


# --- the rows -------------------------------------------------------------------------------

def _f(x, fmt="{:+.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _ci(m: dict, what: str) -> str:
    return V.interval(m.get("lo"), m.get("hi"), "{:+.3f}", f"{what}, 95% CI over prompts")


def _cases(m: dict) -> str:
    text = f"{m['n_cases']} cases in {m['n_prompts']} prompts"
    if m["n_prompts"] < stats.MIN_UNITS:
        text += (f" (fewer than the {stats.MIN_UNITS} contributing prompts a bootstrap "
                 "interval needs: not testable, RULES.md General)")
    return text


def settings(params: dict) -> str:
    s = f"eps {params['eps']}, min_queries {params['min_queries']}"
    if params.get("depth", 3) != 3:
        s += f", {params['depth']} layers deeper (the rule says 3)"
    return s


def claims(name: str, r: dict, params: dict) -> list[dict]:
    """paper / ours / verdict rows for one model from its ``sinks.summary`` (key "all")."""
    a, st = r["all"], settings(params)
    t, c, p, o = a["two_sinks"], a["clusters"], a["persist"], a["own_sinks"]
    row = lambda id, claim, paper, ours, interval, verdict, **kw: V.row(  # noqa: E731
        id, name, claim, paper, ours, interval, rules.text(id), verdict, settings=st,
        choice=CHOICES[id], **kw)
    tlo, thi = stats.wilson(t["pairs"], t["heads_seen"])
    olo, ohi = stats.wilson(o["prompts_with"], o["prompts"])
    cg, cp = c["gain"], c["profile"]
    pg, pp, one, tags = p["gain"], p["profile"], p["one_head"], p["along_tags"]
    ex = o["example"]
    return [
        row("two_sinks", "a head has two sinks: the first token and a mid-prompt token",
            "yes (Fig. 1)",
            f"{t['pairs']} of {t['heads_seen']} (prompt, head) pairs, in {t['prompts_with']} "
            f"of {t['prompts']} prompts",
            V.interval(tlo, thi, "{:.3f}", "share of pairs, 95% Wilson"),
            rule_two_sinks(t["pairs"])),
        row("clusters", "a two-sink head's outputs cluster by sink, its inputs do not",
            "yes (Fig. 2)",
            (f"mean gain {_f(cg['mean'])} over {_cases(cg)}: silhouette "
             f"{_f(cp['in']['mean'], '{:.3f}')} in, {_f(cp['out']['mean'], '{:.3f}')} out; "
             f"{c['skipped']} of {c['cases']} cases skipped (a group under {SM.MIN_GROUP} "
             "tokens)") if cg["n_cases"] else
            f"no case ({c['cases']} two-sink heads, {c['skipped']} skipped)",
            _ci(cg, "mean gain"), rule_clusters(cg)),
        row("persist", "the clusters persist deeper", "yes (Fig. 2)",
            (f"(prompt, layer) cases with at least 2 two-sink heads at one p: mean gain "
             f"{_f(pg['mean'])} over {_cases(pg)}; silhouette "
             f"{_f(pp['in']['mean'], '{:.3f}')} entering the layer, "
             f"{_f(pp['deeper']['mean'], '{:.3f}')} 3 layers deeper, "
             f"{_f(pp['last']['mean'], '{:.3f}')} at the last layer") if pg["n_cases"] else
            f"no (prompt, layer) case with at least 2 two-sink heads at one p "
            f"({p['cases']} found, {p['skipped']} skipped)",
            _ci(pg, "mean gain"), rule_persist(pg),
            note=(f"no verdict: one-head cases, mean gain {_f(one['mean'])} "
                  f"({_ci(one, 'mean gain')}, {_cases(one)}); along the head's own write "
                  "direction (kept by the residual connection by construction), Cohen's d "
                  f"deeper minus input {_f(tags['mean'])} ({_ci(tags, 'mean')})")
            if one["n_cases"] else "no one-head case either"),
        row("own_sinks", "each head picks its own sinks", "common (Fig. 2)",
            f"{o['prompts_with']} of {o['prompts']} prompts have two heads with different "
            "mid-prompt sinks" + (f" (e.g. prompt {ex['prompt']}: L{ex['a'][0]}H{ex['a'][1]} "
                                  f"at {ex['a'][2]}, L{ex['b'][0]}H{ex['b'][1]} at "
                                  f"{ex['b'][2]})" if ex else ""),
            V.interval(olo, ohi, "{:.3f}", "share of prompts, 95% Wilson"),
            rule_own_sinks(o["prompts_with"])),
    ]


def mean_text(m: dict) -> str:
    """A mean over cases with its 95% interval over prompts ("-" without a case)."""
    if m["mean"] is None:
        return "-"
    return f"{m['mean']:+.3f} [{_f(m['lo'])}, {_f(m['hi'])}]"


def cases_text(name: str, a: dict) -> str:
    """One model's paragraph on every case (``sinks.measures.aggregate``): the silhouettes
    entering the layer, in the output, 3 layers deeper and at the last layer, and the
    along-the-write-direction d; means with 95% intervals over prompts."""
    c, p = a["clusters"], a["persist"]
    cp, pp, d = c["profile"], p["profile"], p["along_tags_profile"]
    if not c["cases"]:
        return (f"**{name}.** No head has sinks exactly the first token and a mid-prompt "
                f"token in any of the {a['two_sinks']['prompts']} prompts: there is no case "
                "to measure.")
    return (f"**{name}.** Two-sink heads (clusters): {c['cases']} cases, {c['skipped']} "
            f"skipped; mean silhouette {mean_text(cp['in'])} entering the layer, "
            f"{mean_text(cp['out'])} in the output, {mean_text(cp['deeper'])} 3 layers "
            f"deeper, {mean_text(cp['last'])} at the last layer. Layers with at least 2 "
            f"two-sink heads at one p (persist): {p['cases']} cases, {p['skipped']} skipped; "
            f"mean silhouette {mean_text(pp['in'])} entering the layer, "
            f"{mean_text(pp['deeper'])} 3 layers deeper, {mean_text(pp['last'])} at the last "
            "layer. Along the head's own write direction (kept by the residual connection by "
            f"construction), Cohen's d of the two groups: {mean_text(d['in'])} entering the "
            f"layer, {mean_text(d['deeper'])} 3 layers deeper (one-head cases). Means with "
            "95% intervals over prompts.")


COLUMNS = {"claim": "claim", "model": "model", "paper": "paper", "ours": "ours",
           "interval": "interval", "verdict": "verdict", "rule": "rule (pre-registered)",
           "note": "also shown (no verdict)"}


def table(rows: list[dict]) -> pd.DataFrame:
    """The chapter's paper / ours / verdict table: 8 columns, headers in the reader's words."""
    df = pd.DataFrame(rows).reindex(columns=list(COLUMNS)).fillna("")
    return df.rename(columns=COLUMNS)


def choices(rows: list[dict]) -> str:
    """One Markdown line per claim: the settings and the choices the paper leaves open."""
    seen, out = set(), []
    for r in rows:
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(f"- **{r['id']}** ({r['settings']}): {r['choice']}.")
    return "\n".join(out)
