"""The semantic-probes chapter's verdict rule and its claim rows (paper Sec. 4, Table 1).

One rule decides every row. It was written before any number of the new protocol was seen:
it reads a protocol summary (``TaskResult.summary()[protocol]``, percent) and asks three
questions: is there a head the selection rule accepts; does the chosen head's theta_tag beat
what selection alone gives (the label-shuffle null); and does it beat that head's own
theta_no_tag on the same prompts (exact McNemar)? The accuracy level itself is shown beside the
paper's, not judged: the paper's models are 10-100 times larger.
"""
from __future__ import annotations

import math

from .. import stats
from .. import verdicts as V

ALPHA = 0.05

RULE = ("reproduced: the chosen head's theta_tag beats its own theta_no_tag on the same test "
        "prompts (exact McNemar p < 0.05; also higher on average over the re-splits) and the mean "
        "theta_tag over the re-splits exceeds the 95th percentile of the label-shuffle null of the "
        "whole select-then-test pipeline. Not reproduced: no head satisfies the selection rule "
        "(training theta_tag above training theta_no_tag), or theta_tag does not exceed that null. "
        "Partly: theta_tag exceeds the null but theta_no_tag is significantly higher. Compatible "
        "(underpowered): theta_tag exceeds the null but McNemar cannot tell it from theta_no_tag. "
        "Not testable here: the final token attends to no sink in any head.")


def carried_by_tag(s: dict, alpha: float = ALPHA) -> str:
    """The rule (``RULE``) applied to one protocol summary of one model and task."""
    if not s.get("heads_with_sink"):
        return V.UNTESTABLE
    if s.get("layer") is None:
        return V.NOT                                   # no head satisfies the rule
    rs, null, mc = s.get("resplits") or {}, s.get("null") or {}, s["mcnemar"]
    tag = rs.get("theta_tag_mean", -math.inf)
    if not tag > null.get("theta_tag_p95", math.inf):
        return V.NOT                                   # no better than selecting from noise
    significant = mc["p"] < alpha
    if significant and mc["only_tag"] > mc["only_no_tag"] and tag > rs.get("theta_no_tag_mean", math.inf):
        return V.REPRODUCED
    if significant and mc["only_no_tag"] > mc["only_tag"]:
        return V.PARTLY                                # the rest of the head output carries more
    return V.COMPATIBLE


def head_name(layer, head) -> str:
    return f"L{layer}H{head}"


def ours_text(s: dict) -> str:
    """The measurement behind a verdict, in one line."""
    if s.get("layer") is None:
        b = s["best_tag"]
        return (f"no head satisfies the rule; best training theta_tag: {head_name(b['layer'], b['head'])}"
                f" (test theta_tag {b['theta_tag']:.1f}%)")
    rs, null, mc = s["resplits"], s["null"], s["mcnemar"]
    return (f"theta_tag {s['theta_tag']:.1f} / theta_no_tag {s['theta_no_tag']:.1f} / theta_activation "
            f"{s['theta_activation']:.1f}% at {head_name(s['layer'], s['head'])}; McNemar p = "
            f"{mc['p']:.2g}; {rs['n']} re-splits: theta_tag {rs['theta_tag_mean']:.1f} ± "
            f"{rs['theta_tag_sd']:.1f}%, theta_no_tag {rs['theta_no_tag_mean']:.1f}% ({stability(rs)}); "
            f"shuffle null 95th percentile {null['theta_tag_p95']:.1f}%")


def stability(rs: dict) -> str:
    """How often the re-splits chose the same head."""
    if not rs.get("n_selected"):
        return "no head on any re-split"
    return (f"modal head {head_name(*rs['modal_head'])} on {rs['modal_count']}/{rs['n']}, the main "
            f"split's head on {rs.get('same_as_main', 0)}/{rs['n']}")


def interval_text(s: dict) -> str:
    """95% Wilson interval of the chosen head's test theta_tag (independent test prompts)."""
    if s.get("layer") is None:
        return "-"
    n = s["n_test"]
    lo, hi = stats.wilson(round(s["theta_tag"] * n / 100), n)
    return V.interval(100 * lo, 100 * hi, "{:.1f}", "theta_tag 95% CI (Wilson)")


# id, task, protocol, paper key, claim
CLAIMS = (
    ("truth_tag_paper_protocol", "cities", "paper", "truth_probes",
     "the truth of 'The city of X is in Y.' is carried by a head's tag (Table 1), under the paper's "
     "protocol: sink score as written (min_queries=1)"),
    ("truth_tag_guarded", "cities", "guard", "truth_probes",
     "... carried by sinks that catch at least ceil(1/eps) queries (min_queries={g}): no such key "
     "follows the country, so the truth can reach z_tag only through attention weights"),
    ("truth_tag_position_controlled", "cities_suffix", "guard", "truth_probes",
     "... with a suffix (' Is this true? Answer:') after the statement, so that its full stop can be a "
     "sink that catches at least {g} queries (min_queries={g})"),
    ("sentiment_tag_paper_protocol", "sentiment", "paper", "sentiment_probes",
     "the sentiment of a sentence is carried by a head's tag, paper's protocol (min_queries=1)"),
    ("sentiment_tag_guarded", "sentiment", "guard", "sentiment_probes",
     "... carried by sinks that catch at least ceil(1/eps) queries (min_queries={g})"),
)


def paper_text(paper: dict, key: str, task: str) -> str:
    ms = paper[key]["models"].values()
    cols = [f"{name} {min(m[i] for m in ms):.1f}-{max(m[i] for m in ms):.1f}%"
            for i, name in enumerate(("theta_tag", "theta_no_tag", "theta_activation"))]
    text = ", ".join(cols) + f" ({len(ms)} models of 3-14B)"
    if task == "cities_suffix":
        text = "not run in the paper (its statements end the prompt); Table 1: " + text
    return text


def claim_rows(summ: dict, paper: dict, guard: int) -> list[dict]:
    """Every claim row of the chapter: summ = {model: {task: TaskResult.summary()}}."""
    rows = []
    for cid, task, prot, key, claim in CLAIMS:
        for model, tasks in summ.items():
            if task not in tasks:
                continue
            s = tasks[task][prot]
            rows.append(V.row(cid, model, claim.format(g=guard), paper_text(paper, key, task),
                              ours_text(s), interval_text(s), RULE, carried_by_tag(s)))
    return rows
