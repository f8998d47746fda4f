"""The semantic-probes chapter's verdict rules and claim rows (paper Sec. 4, Table 1), as
RULES.md ("Semantic probes", "General") writes them.

- ``carried_by_tag``: every probe row (``*_tag_*``): (i) the main split, one-sided McNemar
  Holm-adjusted over the model's family; (ii) 6 of 10 re-splits; (iii) the re-split mean above
  the label-shuffle null's 95th percentile.
- ``tag_vs_activation``: Table 1's theta_tag >= theta_activation, per task, paper protocol,
  outside the Holm family.
- ``adjust``: Holm over one model's family of probe rows; ``constant_note``: the constant-value
  tag flag (RULES.md, General).

Each reads a protocol summary (``TaskResult.summary()[protocol]``, accuracies in percent).
"""
from __future__ import annotations

import math

from ... import rules, stats
from ... import verdicts as V
ALPHA = 0.05
PASS_SHARE = 0.6        # "at least 6 of 10 re-splits"

# Holm's family (per model): the rows whose step (i) p-value it adjusts
FAMILY = (("cities", "paper"), ("cities", "guard"), ("sentiment", "paper"),
          ("sentiment", "guard"), ("cities_suffix", "guard"))

CHOICE = ("a re-split with no selectable head fails (ii) and counts as theta_tag <= theta_no_tag "
          "(there every head's training theta_tag is at most its theta_no_tag); the re-split "
          "mean is over the re-splits that select a head")
CHOICE_ACT = ("the head is the probe rule's on each split; a re-split with no selectable head "
              "does not count for the tag; no head on the main split: not testable here")


def head_name(layer, head) -> str:
    """The chapter's one name for a head: L{layer}H{head}, 0-based; "-" for none."""
    return "-" if layer is None else f"L{layer}H{head}"


def pct(x, fmt: str = "{:.1f}") -> str:
    """A percentage for a table or a sentence; "-" for none."""
    return "-" if x is None else fmt.format(x)


def needed(n: int) -> int:
    """Re-splits that must pass: 6 of 10 (the same share of another count, rounded up)."""
    return math.ceil(PASS_SHARE * n - 1e-9)


def _resplits(s: dict) -> dict:
    rs = s.get("resplits")
    if not rs or s.get("null") is None:
        raise ValueError("the probe rule needs the re-splits and the label-shuffle null: run "
                         "probe_task with n_resplits=10 and n_null > 0")
    return rs


def step_p(s: dict, p_adj: float | None = None) -> float | None:
    """Step (i)'s p: Holm-adjusted when given or stored by ``adjust``, else the raw one-sided
    p (a row judged alone: a family of one)."""
    mc = s.get("mcnemar")
    if mc is None:
        return None
    return p_adj if p_adj is not None else mc.get("p_adj", mc["p_greater"])


def tag_conditions(s: dict, p_adj: float | None = None, alpha: float = ALPHA) -> dict:
    """The numbers and conditions of the *_tag_* rule, for the row and its tests."""
    if s.get("layer") is None:
        return {"no_head": True}
    rs, null, mc = _resplits(s), s["null"], s["mcnemar"]
    p = step_p(s, p_adj)
    mean = rs.get("theta_tag_mean")
    return {"no_head": False, "p_raw": mc["p_greater"], "p": p,
            "main": mc["only_tag"] > mc["only_no_tag"] and p < alpha,
            "n_pass": rs["n_pass"], "n": rs["n"], "resplits": rs["n_pass"] >= needed(rs["n"]),
            "majority_le": rs["n_tag_le_no_tag"] > rs["n"] / 2,
            "mean": mean, "null_p95": null["theta_tag_p95"],
            "above_null": mean is not None and mean > null["theta_tag_p95"]}


def carried_by_tag(s: dict, p_adj: float | None = None, alpha: float = ALPHA) -> str:
    """RULES.md ``*_tag_*``: head selection (the paper's): among heads with training theta_tag -
    theta_no_tag > 0, the largest gap, then the higher training theta_tag, then the lower (layer,
    head). Reproduced if (i) on the main split theta_tag > theta_no_tag with McNemar
    Holm-adjusted p < 0.05 (one-sided), (ii) on at least 6 of 10 re-splits theta_tag >
    theta_no_tag with McNemar p < 0.05 (head re-selected each time; raw p; no selectable head
    counts as a failure), and (iii) the re-split mean theta_tag exceeds the label-shuffle null's
    95th percentile. Not reproduced if no head satisfies the selection rule, or theta_tag <=
    theta_no_tag on a majority of re-splits, or the re-split mean theta_tag <= the null's 95th
    percentile. Compatible otherwise. ``p_adj``: step (i)'s adjusted p (default: the one
    ``adjust`` stored, else the raw p)."""
    c = tag_conditions(s, p_adj, alpha)
    if c["no_head"] or c["majority_le"] or not c["above_null"]:
        return V.NOT
    if c["main"] and c["resplits"]:
        return V.REPRODUCED
    return V.COMPATIBLE


def tag_vs_activation(s: dict, alpha: float = ALPHA) -> str:
    """RULES.md ``tag_vs_activation`` (paper protocol, outside the Holm family): not reproduced
    if theta_activation > theta_tag with one-sided McNemar p < 0.05 on the main split;
    reproduced if theta_tag >= theta_activation (ties count for the tag) on at least 6 of 10
    re-splits and not significantly below on the main split; compatible otherwise. No head on
    the main split: nothing to compare (not testable here)."""
    if s.get("layer") is None:
        return V.UNTESTABLE
    va, rs = s["tag_vs_activation"], _resplits(s)
    if va["only_activation"] > va["only_tag"] and va["p_less"] < alpha:
        return V.NOT
    if rs["n_tag_ge_activation"] >= needed(rs["n"]):
        return V.REPRODUCED
    return V.COMPATIBLE


def adjust(summ: dict) -> dict:
    """Holm over each model's family (``FAMILY``) of step (i)'s one-sided p-values; stores
    ``p_adj`` in each row's ``mcnemar`` (rows without a head have no p and stay outside).
    ``summ`` = {model: {task: TaskResult.summary()}}; changed in place and returned."""
    for tasks in summ.values():
        rows = [tasks[t][prot] for t, prot in FAMILY if t in tasks]
        adj = stats.holm([r["mcnemar"]["p_greater"] if r.get("mcnemar") else None for r in rows])
        for r, a in zip(rows, adj):
            if r.get("mcnemar"):
                r["mcnemar"]["p_adj"] = a
    return summ


def constant_note(s: dict) -> str | None:
    """RULES.md, constant-value tags: the chosen head's share of z_tag norm from a token-0 sink
    whose token is the same in every prompt; the flag where it is all of it."""
    c = s.get("constant_tag")
    if not c:
        return None
    tok = f"`{c['first_token']}`"
    if not c["same_first_token"]:
        return "token 0 differs between prompts: no constant-value tag"
    share = c["norm_share"]
    if c["constant"]:
        return (f"constant-value tag: the tag comes only from token 0 ({tok}, the same in every "
                f"prompt), so z_tag = A[T,0]·v_0 is one vector times one number and the probe "
                f"reads an attention weight, not a tag's content (100% of the z_tag norm)")
    if not share:
        return None
    return (f"{100 * share:.4g}% of the z_tag norm comes from token 0 ({tok}, the same in every "
            f"prompt); token 0 is the only sink in {100 * c['prompts_first_only']:.4g}% of the "
            f"test prompts")


def ours_text(s: dict, p_adj: float | None = None) -> str:
    """The measurement behind a *_tag_* verdict, in one line."""
    if s.get("layer") is None:
        b = s["best_tag"]
        return (f"no head satisfies the rule; best training θ_tag: "
                f"{head_name(b['layer'], b['head'])} (test θ_tag {b['theta_tag']:.1f}%)")
    c = tag_conditions(s, p_adj)
    mc, rs = s["mcnemar"], s["resplits"]
    return (f"θ_tag {s['theta_tag']:.1f} / θ_no_tag {s['theta_no_tag']:.1f}% at "
            f"{head_name(s['layer'], s['head'])} ({mc['only_tag']} / {mc['only_no_tag']} "
            f"discordant test prompts); (ii) {c['n_pass']} of {c['n']} re-splits pass; (iii) "
            f"re-split mean θ_tag {pct(c['mean'])}% vs null 95th percentile "
            f"{c['null_p95']:.1f}%; {stability(rs)}")


def act_text(s: dict) -> str:
    """The measurement behind a tag_vs_activation verdict, in one line."""
    if s.get("layer") is None:
        return "no head satisfies the probe rule on the main split"
    va, rs = s["tag_vs_activation"], s["resplits"]
    return (f"θ_tag {s['theta_tag']:.1f} / θ_activation {s['theta_activation']:.1f}% at "
            f"{head_name(s['layer'], s['head'])} ({va['only_tag']} / {va['only_activation']} "
            f"discordant, one-sided p (activation above) = {va['p_less']:.2g}); θ_tag ≥ "
            f"θ_activation on {rs['n_tag_ge_activation']} of {rs['n']} re-splits")


def stability(rs: dict) -> str:
    """How often the re-splits chose the same head (shown, no verdict)."""
    if not rs.get("n_selected"):
        return "no head on any re-split"
    return (f"modal head {head_name(*rs['modal_head'])} on {rs['modal_count']}/{rs['n']}, the "
            f"main split's head on {rs.get('same_as_main', 0)}/{rs['n']}")


def interval_text(s: dict, kind: str = "tag") -> str:
    """95% Wilson interval of the chosen head's test accuracy (independent test prompts)."""
    if s.get("layer") is None:
        return "-"
    n = s["n_test"]
    lo, hi = stats.wilson(round(s[f"theta_{kind}"] * n / 100), n)
    label = {"tag": "θ_tag", "activation": "θ_activation"}[kind]
    return V.interval(100 * lo, 100 * hi, "{:.1f}", f"{label} 95% CI (Wilson)")


# id, task, protocol, paper key, claim
CLAIMS = (
    ("cities_tag_paper", "cities", "paper", "truth_probes",
     "the truth of 'The city of X is in Y.' is carried by a head's tag (Table 1), under the "
     "paper's protocol: sink score as written (min_queries 1)"),
    ("cities_tag_guard", "cities", "guard", "truth_probes",
     "... carried by sinks that catch at least ceil(1/eps) queries (min_queries {g}): no such "
     "key follows the country, so the truth can reach z_tag only through attention weights"),
    ("cities_suffix_tag_guard", "cities_suffix", "guard", "truth_probes",
     "... with a suffix (' Is this true? Answer:') after the statement, so that its full stop "
     "can be a sink that catches at least {g} queries (min_queries {g})"),
    ("sentiment_tag_paper", "sentiment", "paper", "sentiment_probes",
     "the sentiment of a sentence is carried by a head's tag, paper's protocol (min_queries 1)"),
    ("sentiment_tag_guard", "sentiment", "guard", "sentiment_probes",
     "... carried by sinks that catch at least ceil(1/eps) queries (min_queries {g})"),
)
# Table 1's theta_tag >= theta_activation, per task; the rule's id is "tag_vs_activation"
ACT_CLAIMS = (
    ("tag_vs_activation_cities", "cities", "truth_probes",
     "θ_tag ≥ θ_activation in the chosen head (Table 1: 9 of 10 paper rows), cities, paper's "
     "protocol"),
    ("tag_vs_activation_sentiment", "sentiment", "sentiment_probes",
     "θ_tag ≥ θ_activation in the chosen head, sentiment, paper's protocol"),
)
ACT_RULE = "tag_vs_activation"


def paper_text(paper: dict, key: str, task: str, cols=(0, 1, 2)) -> str:
    """The paper's range over its models, per column (its numbers, labelled)."""
    ms = paper[key]["models"].values()
    names = ("θ_tag", "θ_no_tag", "θ_activation")
    text = ", ".join(f"{names[i]} {min(m[i] for m in ms):.1f}-{max(m[i] for m in ms):.1f}%"
                     for i in cols) + f" ({len(ms)} models of 3-14B)"
    if task == "cities_suffix":
        text = "not run in the paper (its statements end the prompt); Table 1: " + text
    return text


def settings(s: dict) -> str:
    return f"eps {s.get('eps', 0.2):g}, min_queries {s['min_queries']}"


def claim_rows(summ: dict, paper: dict, guard: int) -> list[dict]:
    """Every claim row of the chapter: summ = {model: {task: TaskResult.summary()}}. Holm is
    applied over each model's family first (``adjust``)."""
    adjust(summ)
    rows = []
    for cid, task, prot, key, claim in CLAIMS:
        for model, tasks in summ.items():
            if task not in tasks:
                continue
            s = tasks[task][prot]
            c = tag_conditions(s)
            extra = {"p_raw": c.get("p_raw"), "p_adj": c.get("p"), "choice": CHOICE,
                     "settings": settings(s)}
            note = constant_note(s)
            if note:
                extra["note"] = note
            rows.append(V.row(cid, model, claim.format(g=guard), paper_text(paper, key, task),
                              ours_text(s), interval_text(s), rules.text(cid),
                              carried_by_tag(s), **extra))
    for cid, task, key, claim in ACT_CLAIMS:
        for model, tasks in summ.items():
            if task not in tasks:
                continue
            s = tasks[task]["paper"]
            extra = {"choice": CHOICE_ACT, "settings": settings(s)}
            note = constant_note(s)
            if note:
                extra["note"] = note
            if s.get("tag_vs_activation"):
                extra["p_raw"] = s["tag_vs_activation"]["p_less"]
            ivl = ("-" if s.get("layer") is None else
                   f"{interval_text(s)}; {interval_text(s, 'activation')}")
            rows.append(V.row(cid, model, claim, paper_text(paper, key, task, (0, 2)),
                              act_text(s), ivl, rules.text(ACT_RULE), tag_vs_activation(s),
                              **extra))
    return rows
