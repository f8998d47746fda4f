"""The release chapter's verdicts: intervals over the independent units, and the rules of
RULES.md, section "Release, tested (beyond the paper)".

These claims are the book's own, not the paper's, so the vocabulary's "reproduced" reads
"supported" and "not reproduced" reads "not supported" (the scorecard maps them). Units: prompts
in the ablation (tokens of one prompt are not independent), pairs in the swap (both directions
of a pair are one unit). Every interval is the percentile bootstrap of ``ctr.stats`` (2,000
resamples, seed 0); fewer than 20 contributing units is not testable here.

The ordered rule (``ordered``), in this order: nothing removed -> not testable here; CI > 0 and
estimate >= floor -> supported; CI > 0 and estimate < floor -> compatible (negligible effect);
CI < floor -> not supported; otherwise compatible. The floor is 0.01 nats for the ablations and,
for the swaps, 0.05 of the gap (our reading of "with a floor of 0.05 of the gap": the 0.01-nat
threshold of the ordered rule becomes 0.05 of the gap, in both places it appears).
"""
from __future__ import annotations

import math

import numpy as np

from ... import rules, stats
from ... import verdicts as V
from . import Ablation
from .swap import Swap

NOT_IN_PAPER = "not tested in the paper"
FLOOR_NATS = 0.01      # RULES.md, tags_lm_*: the size floor, in nats
FLOOR_GAP = 0.05       # RULES.md, swap_*: the size floor, as a fraction of the gap


# --- rules (numbers in, verdict out) ------------------------------------------------------------

_bad = V._bad     # None or NaN


def ordered(est, lo, hi, floor: float, n_units: int, unit: str = "nats",
            removed: bool = True) -> tuple[str, str | None]:
    """RULES.md's ordered rule, in this order: nothing removed -> not testable here; fewer than
    20 contributing units -> not testable here (General); CI > 0 and estimate >= ``floor`` ->
    supported; CI > 0 and estimate < ``floor`` -> compatible, noted "negligible effect";
    CI < ``floor`` -> not supported; otherwise compatible. Returns (verdict, note or None)."""
    if not removed:
        return V.UNTESTABLE, "nothing removed"
    if n_units < stats.MIN_UNITS:
        return V.UNTESTABLE, f"fewer than {stats.MIN_UNITS} contributing units ({n_units})"
    if _bad(est) or _bad(lo) or _bad(hi):
        return V.UNTESTABLE, "no interval"
    if lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] is reversed")
    if lo > 0 and est >= floor:
        return V.REPRODUCED, None
    if lo > 0:
        return V.COMPATIBLE, f"negligible effect (< {floor:g} {unit})"
    if hi < floor:
        return V.NOT, None
    return V.COMPATIBLE, None


def rule_tags(est, lo, hi, n_units: int, removed: bool = True) -> tuple[str, str | None]:
    """tags_lm_bos, tags_lm_mid, tags_lm_specific: the ordered rule on (change in loss with the
    tags ablated) minus (with the residual-space control), per prompt, mean over the ablated
    layers, floor 0.01 nats; nothing removed -> not testable here."""
    return ordered(est, lo, hi, FLOOR_NATS, n_units, "nats", removed)


def rule_swap(est, lo, hi, n_units: int, no_op: bool) -> tuple[str, str | None]:
    """swap_*: not testable here when the swap is a no-op (every swapped sink value identical in
    the paired prompts); otherwise the ordered rule on (fraction of the gap moved by the sink
    swap) minus (by the non-sink control), floor 0.05 of the gap."""
    if no_op:
        return V.UNTESTABLE, "the swap is a no-op: every swapped sink value is the same in both prompts"
    if _bad(est):
        return V.UNTESTABLE, "no gap to move (the summed gap is not positive)"
    return ordered(est, lo, hi, FLOOR_GAP, n_units, "of the gap")


# --- intervals ------------------------------------------------------------------------------------

def _mean(x):
    return float(np.mean(x))


def _iv(x, n_boot, seed) -> tuple[float, float, float]:
    return (float(np.mean(x)), *stats.bootstrap(x, _mean, n_boot, seed))


def ablation_intervals(a: Ablation, n_boot: int = stats.N_BOOT, seed: int = 0) -> dict:
    """Per condition: per layer (mean, lo, hi) of the tag's and the control's change in loss and
    of their difference; over the layers where the condition removed something, the mean
    difference per prompt ("overall"); whether anything was removed; the contributing prompts."""
    out = {}
    for c in a.conditions:
        tag, ctl = a.delta[c], a.delta[f"{c}_ctrl"]                       # (K, P)
        per = {k: [_iv(x[i], n_boot, seed) for i in range(len(a.layers))]
               for k, x in (("tag", tag), ("ctrl", ctl), ("diff", tag - ctl))}
        on = a.removed(c)
        overall, n = _overall(tag - ctl, on, n_boot, seed)
        out[c] = {**per, "overall": overall, "removed": bool(on.any()),
                  "layers_removed": [l for l, o in zip(a.layers, on) if o], "n_units": n}
        alt = a.delta.get(f"{c}_ctrl_actual")
        if alt is not None:          # the alternative control (not pre-registered)
            out[c]["ctrl_actual"] = [_iv(alt[i], n_boot, seed) for i in range(len(a.layers))]
            out[c]["overall_actual"] = _overall(tag - alt, on, n_boot, seed)[0]
    return out


def _overall(diff: np.ndarray, on: np.ndarray, n_boot: int, seed: int):
    """Per prompt, the mean over the layers ``on`` of ``diff`` (K, P): (mean, lo, hi), units."""
    units = diff[on].mean(0) if on.any() else np.zeros(0)
    units = units[np.isfinite(units)]
    return (_iv(units, n_boot, seed) if len(units) else (math.nan,) * 3), len(units)


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


def swap_intervals(s: Swap, n_boot: int = stats.N_BOOT, seed: int = 0) -> dict:
    """Bootstrapped over pairs: the label gap (LD of the label-1 prompt minus LD of the label-0
    prompt), the answer gap |LD_1 - LD_0| and the clean accuracy (LD > 0 on label 1); for each
    measure ("label", "answer") the fraction of the gap moved by each condition and sink minus
    control for the head and the layer; per scope, the pairs and cells that were no-ops and the
    contributing pairs (those where the sink swap changed at least one value)."""
    labels = np.array([1, 0] * (len(s.ld) // 2))
    gap = s.ld[0::2] - s.ld[1::2]                                          # (pairs,)
    out = {"accuracy": float(((s.ld > 0) == (labels == 1)).mean()),
           "gap": _iv(gap, n_boot, seed), "answer_gap": _iv(np.abs(gap), n_boot, seed)}
    if not s.swapped:
        return out
    pair = np.array(s.directed)[:, 0] // 2
    P = len(gap)
    out["no_ops"] = {}
    for c in s.swapped:
        changed = s.n_cells_changed[c]
        live = np.bincount(pair, changed > 0, P) > 0
        out["no_ops"][c] = {"directed_pairs": len(changed), "directed_no_op": int((changed == 0).sum()),
                            "cells": int(s.n_cells[c].sum()),
                            "cells_no_op": int(s.n_cells[c].sum() - changed.sum()),
                            "contributing_pairs": int(live.sum())}
    for by in ("label", "answer"):
        weight = np.bincount(pair, s.moved(next(iter(s.swapped)), by)[1], P)   # gaps, per pair

        def moved(c):
            return np.bincount(pair, s.moved(c, by)[0], P)
        res = {c: _boot(np.c_[moved(c), weight], _ratio, n_boot, seed) for c in s.swapped}
        for scope in ("head", "layer"):
            a, b = f"{scope}_sink", f"{scope}_ctrl"
            if a in s.swapped and b in s.swapped:
                res[f"{scope}_diff"] = _boot(np.c_[moved(a), moved(b), weight], _ratio_diff, n_boot, seed)
        out[by] = res
    return out


# --- the chapter's rows ---------------------------------------------------------------------------

ABLATION_CLAIMS = {
    "mean_bos": ("tags_lm_bos", "what the first token's tags carry (each head's A[t,0] v_0, "
                 "mean-ablated over the other prompts) is used for next-token prediction: "
                 "removing it hurts more than removing the same norm along a random direction"),
    "zero_mid": ("tags_lm_mid", "the mid-prompt tags (z_tag of every head of a layer) are used "
                 "for next-token prediction: removing them hurts more than removing the same "
                 "norm along a random direction"),
    "mean_mid": ("tags_lm_specific", "the prompt-specific part of the mid-prompt tags is used: "
                 "replacing each sink's value by that sink token's mean value hurts more than "
                 "removing the same norm along a random direction"),
}
BESIDE = {"mean_bos": "zero_bos"}   # shown in the same row, no verdict of its own
CONSTANT = ("constant-value tag: every prompt starts with the same token, so v_0 is one vector "
            "and x(t) = A[t,0] v_0 varies only through the attention weight; all (100%) of the "
            "ablated tag's norm comes from such a sink")


def _num(p, fmt="{:+.4f}") -> str:
    return "-" if _bad(p[0]) else f"{fmt.format(p[0])} [{fmt.format(p[1])}, {fmt.format(p[2])}]"


def ablation_claims(name: str, a: Ablation, iv: dict) -> list[dict]:
    """One row per RULES.md id (tags_lm_bos, tags_lm_mid, tags_lm_specific) of one model."""
    rows = []
    settings = (f"eps {a.eps}, min_queries {a.min_queries}; {a.clean_loss.size} prompts; "
                f"{a.n_positions or 'all'} scored positions per prompt; layers {a.layers}")
    for c, (cid, claim) in ABLATION_CLAIMS.items():
        if c not in a.conditions:
            continue
        r = iv[c]
        pt, lo, hi = r["overall"]
        verdict, note = rule_tags(pt, lo, hi, r["n_units"], r["removed"])
        if r["removed"]:
            on = a.removed(c)
            tag, ctl = float(a.delta[c][on].mean()), float(a.delta[f"{c}_ctrl"][on].mean())
            ours = (f"change in loss, tag minus control, mean over layers {r['layers_removed']}: "
                    f"{pt:+.4f} nats (tag {tag:+.4f}, control {ctl:+.4f})")
        else:
            ours = f"nothing removed at layers {a.layers} (no such sink, or no variation to remove)"
        if c.endswith("_bos") and a.same_first_token and r["removed"]:
            # RULES.md, General, constant-value tags: v_0 is one vector in every prompt
            note = "; ".join(filter(None, [note, CONSTANT]))
        z = BESIDE.get(c)
        if z in a.conditions:
            ours += (f"; zero-ablation beside it (no verdict): {_num(iv[z]['overall'])} nats"
                     if iv[z]["removed"] else "; zero-ablation beside it: nothing removed")
        rows.append(V.row(cid, name, claim, NOT_IN_PAPER, ours, V.interval(lo, hi, "{:+.4f}"),
                          rules.text(cid), verdict, settings=settings,
                          **({"note": note} if note else {})))
        if "overall_actual" in r:
            pt, lo, hi = r["overall_actual"]
            verdict, note = rule_tags(pt, lo, hi, r["n_units"], r["removed"])
            ours = (f"change in loss, tag minus the control matched on the attention's actual "
                    f"write, mean over layers {r['layers_removed']}: {pt:+.4f} nats"
                    if r["removed"] else "nothing removed")
            rows.append(V.row(f"{cid}_alt", name, claim, NOT_IN_PAPER, ours,
                              V.interval(lo, hi, "{:+.4f}"), ALT_CONTROL_RULE, verdict,
                              settings=settings, reading=V.ALTERNATIVE,
                              **({"note": note} if note else {})))
    return rows


ALT_CONTROL_RULE = (
    "alternative reading, not pre-registered: the ordered rule of tags_lm_bos with the control "
    "matched on the actual change of what the attention writes into the residual stream (the "
    "rule's control, scaled per token so that after W_O and the whole post-attention norm, its "
    "per-token RMS included, the change equals the tag's, summed over the heads)")


SWAP_CLAIMS = {
    "label": ("", "moves the answer toward the paired prompt's label"),
    "answer": ("_answer", "carries part of the difference between the two prompts' answers"),
}


def swap_claims(name: str, s: Swap, iv: dict) -> list[dict]:
    """Rows swap_<task>_<head|layer>[_answer] of one model and task."""
    rows = []
    settings = f"eps {s.eps}, min_queries {s.min_queries}; {len(s.ld) // 2} pairs"
    for by, (suffix, effect) in SWAP_CLAIMS.items():
        for scope, what in (("head", "the probe-selected head"), ("layer", "every head of its layer")):
            cid = f"swap_{s.task}_{scope}{suffix}"
            claim = (f"{s.task}: swapping the sinks' values in {what} for the paired prompt's "
                     f"{effect}, more than swapping as many non-sink values")
            res = iv.get(by, {})
            sink, diff = res.get(f"{scope}_sink"), res.get(f"{scope}_diff")
            if sink is None or diff is None:
                rows.append(V.row(cid, name, claim, NOT_IN_PAPER, f"no head chosen ({s.source})", "-",
                                  rules.text(cid), V.UNTESTABLE, settings=settings,
                                  note="nothing to swap"))
                continue
            where = f"L{s.layer}H{s.head}" if scope == "head" else f"L{s.layer}"
            noop = iv["no_ops"][f"{scope}_sink"]
            g = iv["gap"] if by == "label" else iv["answer_gap"]
            ctl = res[f"{scope}_ctrl"]
            no_op = noop["directed_no_op"] == noop["directed_pairs"]
            counts = (f"no-ops: {noop['directed_no_op']} of {noop['directed_pairs']} directed pairs, "
                      f"{noop['cells_no_op']} of {noop['cells']} swapped cells")
            if no_op:
                ours = f"{where}: every swapped sink value is the same in both prompts ({counts})"
            elif _bad(diff[0]):
                ours = f"{where}: mean {by} gap {g[0]:.2f} logits, no gap to move ({counts})"
            else:
                ours = (f"{where}: fraction of the {by} gap moved, sinks minus non-sink control "
                        f"{diff[0]:+.3f} (sinks {sink[0]:+.3f}, control {ctl[0]:+.3f}); mean gap "
                        f"{g[0]:.2f} logits; {noop['contributing_pairs']} contributing pairs; {counts}")
            verdict, note = rule_swap(diff[0], diff[1], diff[2], noop["contributing_pairs"], no_op)
            interval = V.interval(diff[1], diff[2], "{:+.3f}")
            rows.append(V.row(cid, name, claim, NOT_IN_PAPER, ours, interval, rules.text(cid),
                              verdict, settings=settings, **({"note": note} if note else {})))
            alt = rule_swap_label_alt(verdict, iv["gap"])
            if by == "label" and alt is not None:
                rows.append(V.row(f"{cid}_alt", name, claim, NOT_IN_PAPER, ours, interval, ALT_RULE,
                                  alt[0], settings=settings, note=alt[1], reading=V.ALTERNATIVE))
    return rows


ALT_RULE = ("alternative reading, not pre-registered: as swap_*, and also not testable here when "
            "the label gap's 95% interval is not above 0 (the model does not separate the labels, "
            "and a fraction of a gap that may be 0 measures nothing)")


def rule_swap_label_alt(verdict: str, gap: tuple) -> tuple[str, str] | None:
    """Our reading of swap_* for the label measure (not pre-registered): not testable here
    when the label gap's 95% interval is not above 0. Returns (verdict, note) where it differs
    from the pre-registered verdict, else None."""
    lo, hi = gap[1], gap[2]
    if verdict == V.UNTESTABLE or (not _bad(lo) and lo > 0):
        return None
    return V.UNTESTABLE, f"the label gap's 95% CI [{lo:+.3f}, {hi:+.3f}] logits is not above 0"
