"""The release chapter's verdicts: intervals over the independent units, and the rules.

These claims are the book's own, not the paper's, so the vocabulary's "reproduced" reads
"supported" and "not reproduced" reads "not supported" (the chapter says so). Units: prompts in
the ablation (tokens of one prompt are not independent), pairs in the swap (both directions of a
pair are one unit). Every interval is a seeded percentile bootstrap (``ctr.stats.bootstrap``).
"""
from __future__ import annotations

import math

import numpy as np

from .. import stats
from .. import verdicts as V
from .release import Ablation
from .release_swap import Swap

NOT_IN_PAPER = "not tested in the paper"


# --- rules (numbers in, verdict out) ------------------------------------------------------------

def above_zero(lo: float | None, hi: float | None) -> str:
    """"The quantity is positive": the whole interval above 0 supports it, an interval at or
    below 0 contradicts it (a change of exactly 0 is no effect), one across 0 is underpowered."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return V.UNTESTABLE
    if lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] is reversed")
    if lo > 0:
        return V.REPRODUCED
    if hi <= 0:
        return V.NOT
    return V.COMPATIBLE


def rule_hurts_more(lo: float | None, hi: float | None, removed: bool = True) -> str:
    """Removing the tags hurts next-token prediction more than the control: the mean over the
    ablated layers of (change in loss, tag) - (change in loss, control) is above 0. Not
    testable when the ablation removes nothing (no such sinks)."""
    return above_zero(lo, hi) if removed else V.UNTESTABLE


def rule_swap(gap_lo: float | None, frac: tuple, diff: tuple) -> str:
    """Swapping the sinks' values moves the answer toward the paired label (fraction of the
    label gap moved above 0) and more than swapping as many non-sink values (difference of the
    fractions above 0); two parts, "partly" when one holds. Not testable when no head was
    chosen or the model does not separate the pair's labels (mean gap's interval not above 0)."""
    if gap_lo is None or math.isnan(gap_lo) or gap_lo <= 0:
        return V.UNTESTABLE
    return V.all_of(above_zero(*frac), above_zero(*diff))


def rule_swap_answer(frac: tuple, diff: tuple) -> str:
    """Swapping the sinks' values carries part of the difference between the two prompts'
    answers (fraction of |LD_d - LD_r| moved toward the donor above 0) and more than as many
    non-sink values; two parts, "partly" when one holds."""
    return V.all_of(above_zero(*frac), above_zero(*diff))


# --- intervals ------------------------------------------------------------------------------------

def _mean(x):
    return float(np.mean(x))


def ablation_intervals(a: Ablation, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per condition: per layer (mean, lo, hi) of the tag's and the control's change in loss and
    of their difference; and over the ablated layers, the mean difference per prompt."""
    out = {}
    for c in a.conditions:
        tag, ctl = a.delta[c], a.delta[f"{c}_ctrl"]                       # (K, P)
        per = {k: [(float(x[i].mean()), *stats.bootstrap(x[i], _mean, n_boot, seed))
                   for i in range(len(a.layers))]
               for k, x in (("tag", tag), ("ctrl", ctl), ("diff", tag - ctl))}
        units = (tag - ctl).mean(0)                                        # (P,)
        share = a.removed_share[c]
        out[c] = {**per, "overall": (float(units.mean()), *stats.bootstrap(units, _mean, n_boot, seed)),
                  "removed": bool(np.nan_to_num(share).max() > 0)}
    return out


def _ratio(u: np.ndarray) -> float:
    g = u[:, -1].sum()
    return float(u[:, 0].sum() / g) if g > 0 else float("nan")


def _ratio_diff(u: np.ndarray) -> float:
    g = u[:, -1].sum()
    return float((u[:, 0].sum() - u[:, 1].sum()) / g) if g > 0 else float("nan")


def _boot(u: np.ndarray, stat, n_boot: int, seed: int) -> tuple[float, float, float]:
    """(point, lo, hi); no interval when the point itself is undefined (no gap to move: the
    resamples that happen to have one would give a biased interval)."""
    pt = stat(u)
    if not np.isfinite(pt):
        return float("nan"), float("nan"), float("nan")
    return (pt, *stats.bootstrap(u, stat, n_boot, seed))


def swap_intervals(s: Swap, n_boot: int = 1000, seed: int = 0) -> dict:
    """Bootstrapped over pairs: the label gap (LD of the label-1 prompt minus LD of the label-0
    prompt, the same in both directions), the answer gap |LD_1 - LD_0| and the clean accuracy
    (LD > 0 on label 1); then for each measure ("label", "answer") the fraction of the gap moved
    by each condition, and sink minus control for the head and for the layer."""
    labels = np.array([1, 0] * (len(s.ld) // 2))
    gap = s.ld[0::2] - s.ld[1::2]                                          # (pairs,)
    out = {"accuracy": float(((s.ld > 0) == (labels == 1)).mean()),
           "gap": (float(gap.mean()), *stats.bootstrap(gap, _mean, n_boot, seed)),
           "answer_gap": (float(np.abs(gap).mean()), *stats.bootstrap(np.abs(gap), _mean, n_boot, seed))}
    if not s.swapped:
        return out
    pair = np.array(s.directed)[:, 0] // 2
    P = len(gap)
    for by in ("label", "answer"):
        first = next(iter(s.swapped))
        weight = np.bincount(pair, s.moved(first, by)[1], P)                # gaps, per pair

        def moved(c):
            return np.bincount(pair, s.moved(c, by)[0], P)
        res = {}
        for c in s.swapped:
            res[c] = _boot(np.c_[moved(c), weight], _ratio, n_boot, seed)
        for scope in ("head", "layer"):
            a, b = f"{scope}_sink", f"{scope}_ctrl"
            if a in s.swapped and b in s.swapped:
                res[f"{scope}_diff"] = _boot(np.c_[moved(a), moved(b), weight], _ratio_diff, n_boot, seed)
        out[by] = res
    return out


# --- the chapter's rows ---------------------------------------------------------------------------

ABLATION_CLAIMS = {
    "zero_bos": ("tags_lm_bos", "removing the first token's tags (z_tag; BOS where the model "
                 "has one) from every head of a layer hurts next-token prediction more than "
                 "removing the same norm in a random subspace"),
    "zero_mid": ("tags_lm_mid", "removing the mid-prompt tags (z_tag) of every head of a layer "
                 "hurts next-token prediction more than removing the same norm in a random subspace"),
    "mean_mid": ("tags_lm_specific", "the prompt-specific part of mid-prompt tags matters: "
                 "mean-ablating them hurts more than the same-norm random control"),
}


def ablation_claims(name: str, a: Ablation, iv: dict) -> list[dict]:
    rows = []
    for c in a.conditions:
        cid, claim = ABLATION_CLAIMS[c]
        pt, lo, hi = iv[c]["overall"]
        tag = float(a.delta[c].mean())
        ctl = float(a.delta[f"{c}_ctrl"].mean())
        ours = (f"loss change, tag minus control, mean over layers {a.layers}: {pt:+.4f} nats "
                f"(tag {tag:+.4f}, control {ctl:+.4f})")
        rows.append(V.row(cid, name, claim, NOT_IN_PAPER, ours, V.interval(lo, hi, "{:+.4f}"),
                          "supported when the 95% interval of (tag - control) lies above 0",
                          rule_hurts_more(lo, hi, iv[c]["removed"])))
    return rows


SWAP_CLAIMS = {
    "label": ("", "moves the answer toward the paired prompt's label"),
    "answer": ("_answer", "carries part of the difference between the two prompts' answers"),
}


def swap_claims(name: str, s: Swap, iv: dict) -> list[dict]:
    rows = []
    gap_lo = iv["gap"][1]
    for by, (suffix, effect) in SWAP_CLAIMS.items():
        for scope, what in (("head", "the probe-selected head"), ("layer", "every head of its layer")):
            cid = f"swap_{s.task}_{scope}{suffix}"
            claim = (f"{s.task}: swapping the sinks' values in {what} for the paired prompt's "
                     f"{effect}, more than swapping non-sink values")
            res = iv.get(by, {})
            sink, diff = res.get(f"{scope}_sink"), res.get(f"{scope}_diff")
            where = "-" if s.layer is None else (f"L{s.layer}H{s.head}" if scope == "head" else f"L{s.layer}")
            if sink is None or diff is None:
                rows.append(V.row(cid, name, claim, NOT_IN_PAPER, f"no head chosen ({s.source})", "-",
                                  "not testable without a probe-selected head", V.UNTESTABLE))
                continue
            ctl = res[f"{scope}_ctrl"]
            g = iv["gap"] if by == "label" else iv["answer_gap"]
            ours = (f"{where}: fraction of the {'label' if by == 'label' else 'answer'} gap moved "
                    f"{sink[0]:+.3f} (non-sink control {ctl[0]:+.3f}); mean gap {g[0]:.2f} logits")
            interval = (f"{V.interval(sink[1], sink[2], '{:+.3f}')}; minus control "
                        f"{V.interval(diff[1], diff[2], '{:+.3f}')}")
            if by == "label":
                rule = ("supported when the fraction and (fraction - control) both have 95% "
                        "intervals above 0; not testable when the label gap's interval is not above 0")
                verdict = rule_swap(gap_lo, sink[1:], diff[1:])
            else:
                rule = "supported when the fraction and (fraction - control) both have 95% intervals above 0"
                verdict = rule_swap_answer(sink[1:], diff[1:])
            rows.append(V.row(cid, name, claim, NOT_IN_PAPER, ours, interval, rule, verdict))
    return rows
