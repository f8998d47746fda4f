"""The variance chapter's verdicts: intervals over prompts and the rules that judge them.

The units that are independent are the prompts (heads, layers and tag pairs of one prompt are
not), so every interval is a percentile bootstrap over prompts (``ctr.stats.bootstrap``). Each
rule is a function of numbers only, so the tests can hand it fabricated results; ``claims``
applies them to one model's run and returns the chapter's paper / ours / verdict rows.
"""
from __future__ import annotations

import numpy as np

from .. import stats
from .. import verdicts as V
from .variance import Result, sweep_means

MIN_PAIRS = 100          # fewer tag pairs than this: no verdict on orthogonality
NEAR0 = (4, 5)           # the paper's bins [-0.05, 0) and [0, 0.05)
ALIGNED = 9              # the paper's bin [0.6, 1]


# --- rules (numbers in, verdict out) ------------------------------------------------------------

def rule_sinks_1_2(lo: float, hi: float) -> str:
    """Most heads have one or two sinks: the share of heads with 1-2 sinks lies above 1/2."""
    return V.by_interval(lo, hi, 0.5, 1.0)


def rule_ve_typical(ve: tuple, beats_random: tuple) -> str:
    """Tags typically explain 20-40%: the paper-like mean VE lies in [0.2, 0.4], and the tags
    explain more than random subspaces of the same dimension (difference above 0)."""
    return V.all_of(V.by_interval(*ve, 0.2, 0.4), V.by_interval(*beats_random, low=0.0))


def rule_sweep(lo: float, hi: float) -> str:
    """VE falls as eps grows: the slope of the paper-like mean VE against log(eps) is below 0."""
    return V.by_interval(lo, hi, high=0.0)


def rule_orthogonal(pairs: int, near0: tuple, aligned: tuple, min_pairs: int = MIN_PAIRS) -> str:
    """Tag cosines concentrate in [-0.05, 0.05): a majority of pairs there, and at most 1% in
    [0.6, 1] (the paper's largest share there is 0.17%). No verdict on fewer than 100 pairs."""
    if pairs < min_pairs:
        return V.UNTESTABLE
    return V.all_of(V.by_interval(*near0, 0.5, 1.0), V.by_interval(*aligned, 0.0, 0.01))


def rule_tag_token_signed(lo: float, hi: float, paper_range=(-0.17, 0.02)) -> str:
    """The paper's measurement: the mean cosine lies in the range of its ten models."""
    return V.by_interval(lo, hi, *paper_range)


def rule_tag_token_abs(lo: float, hi: float, bound: float = 0.17) -> str:
    """Orthogonal, not cancelling: the mean |cosine| stays below 0.17, the largest magnitude the
    paper calls close to orthogonal."""
    return V.by_interval(lo, hi, 0.0, bound)


# --- intervals over prompts ----------------------------------------------------------------------

def _ratio(u):
    return u[:, 0].sum() / u[:, 1].sum() if u[:, 1].sum() else np.nan


def intervals(r: Result, n_boot: int = 1000, seed: int = 0) -> dict:
    """Point values and 95% bootstrap intervals (over prompts) of what the rules judge."""
    e = r.eps.index(r.main_eps)
    n, ve = r.n_sinks[..., e], r.ve[..., e]
    has = ~np.isnan(ve)
    P = n.shape[0]
    units = {
        "share_1_2": ((n >= 1) & (n <= 2)).reshape(P, -1).mean(1),
        "ve_zero": np.nan_to_num(ve).reshape(P, -1).mean(1),
        "ve_excluded": np.c_[np.nansum(np.where(has, ve, 0), axis=(1, 2)), has.sum(axis=(1, 2))],
        "beats_random": np.c_[np.nansum(np.where(has, ve - r.ve_random, 0), axis=(1, 2)),
                              has.sum(axis=(1, 2))],
        "near0_cross": np.c_[r.pairs_cross[:, NEAR0].sum(1), r.pairs_cross.sum(1)],
        "aligned_cross": np.c_[r.pairs_cross[:, ALIGNED], r.pairs_cross.sum(1)],
        "near0_within": np.c_[r.pairs_within[:, NEAR0].sum(1), r.pairs_within.sum(1)],
        "aligned_within": np.c_[r.pairs_within[:, ALIGNED], r.pairs_within.sum(1)],
    }
    with np.errstate(all="ignore"):
        units["tag_token"] = np.nanmean(r.tag_token, axis=1)
        units["tag_token_abs"] = np.nanmean(r.tag_token_abs, axis=1)
    sw = sweep_means(r)
    x = np.log(np.asarray(r.eps))

    def slope(curves):
        m = np.nanmean(curves, 0)
        return np.polyfit(x, m, 1)[0] if np.isfinite(m).all() else np.nan

    stat = {k: (_ratio if u.ndim == 2 else (lambda v: np.nanmean(v))) for k, u in units.items()}
    out = {}
    for k, u in units.items():
        point = stat[k](u)
        out[k] = (float(point), *stats.bootstrap(u, stat[k], n_boot, seed))
    for k in ("ve_zero", "ve_excluded"):
        out[f"slope_{k}"] = (float(slope(sw[k])), *stats.bootstrap(sw[k], slope, n_boot, seed))
    return out


def paper_slope(points: list[dict]) -> float:
    """The same slope on the paper's threshold table (its VE against log eps)."""
    return float(np.polyfit(np.log([p["eps"] for p in points]), [p["ve"] for p in points], 1)[0])


# --- the chapter's rows --------------------------------------------------------------------------

def claims(name: str, s: dict, iv: dict, paper: dict) -> list[dict]:
    """paper / ours / verdict rows for one model: ``s`` = ``variance.summary``, ``iv`` =
    ``intervals`` of the same run, ``paper`` = ``results.paper()``."""
    ci = V.interval
    rows = []
    pt, lo, hi = iv["share_1_2"]
    rows.append(V.row("sinks_1_2", name, "most heads have 1-2 sinks", "most heads (Fig. 3)",
                      f"{pt:.0%} of heads; {s['sinks_per_head']:.2f} sinks per head",
                      ci(lo, hi), "share of heads with 1-2 sinks above 1/2",
                      rule_sinks_1_2(lo, hi)))
    vz, br = iv["ve_zero"], iv["beats_random"]
    sweep = {m: next(p["ve"] for p in pts if p["eps"] == 0.2)
             for m, pts in paper["eps_sweep"]["models"].items()}
    rows.append(V.row(
        "ve_20_40", name, "1-2 tags typically explain 20-40% of a head's output",
        "20-40% (Fig. 3); mean VE at eps 0.2: "
        + ", ".join(f"{m} {v:.3f}" for m, v in sweep.items()),
        f"mean VE {vz[0]:.2f} (sinkless heads as 0); heads with sinks: mean "
        f"{iv['ve_excluded'][0]:.2f}, median {s['ve_median'] or float('nan'):.2f}; "
        f"tags minus random subspaces {br[0]:+.2f}",
        f"{ci(vz[1], vz[2])}; minus random {ci(br[1], br[2])}",
        "mean VE (sinkless heads as 0) in [0.2, 0.4] and tags above random subspaces",
        rule_ve_typical(vz[1:], br[1:])))
    sl = iv["slope_ve_zero"]
    ps = {m: paper_slope(p) for m, p in paper["eps_sweep"]["models"].items()}
    rows.append(V.row(
        "sweep", name, "as eps grows, fewer sinks and a slowly falling average VE",
        "slope of mean VE vs ln eps: " + ", ".join(f"{m} {v:+.3f}" for m, v in ps.items()),
        f"slope {sl[0]:+.3f} (sinkless heads as 0); heads with sinks only: "
        f"{iv['slope_ve_excluded'][0]:+.3f}", ci(sl[1], sl[2], "{:+.3f}"),
        "slope of the paper-like mean VE against ln(eps) below 0 (the sink count falls by "
        "definition: the sink sets are nested)", rule_sweep(sl[1], sl[2])))
    pc = paper["tag_orthogonality"]["counts"]
    shares = [(c[4] + c[5]) / sum(c) for c in pc.values()]
    top = [c[9] / sum(c) for c in pc.values()]
    rnd = stats.share_near_zero_random(s["d_model"])
    paper_text = (f"{min(shares):.2f}-{max(shares):.2f} of pairs in [-0.05, 0.05), at most "
                  f"{max(top):.2%} in [0.6, 1] (eight models)")
    for key, what in (("cross", "different heads of one layer"), ("within", "one head")):
        n0, al = iv[f"near0_{key}"], iv[f"aligned_{key}"]
        npairs = s[f"pairs_{key}"]
        rows.append(V.row(
            f"tag_orth_{key}", name,
            f"tags are nearly orthogonal (pairs of {what}, mapped through W_O)", paper_text,
            (f"{npairs} pairs: {n0[0]:.2f} in [-0.05, 0.05), {al[0]:.2%} in [0.6, 1]; random "
             f"directions in {s['d_model']} dimensions: {rnd:.2f}") if npairs else "no pairs",
            f"{ci(n0[1], n0[2])}; [0.6, 1]: {ci(al[1], al[2], '{:.3f}')}" if npairs else "-",
            "majority of pairs in [-0.05, 0.05) and at most 1% in [0.6, 1]; no verdict on "
            f"fewer than {MIN_PAIRS} pairs", rule_orthogonal(npairs, n0[1:], al[1:])))
    lo_p, hi_p = paper["tag_vs_token"]["range"]
    tt, ta = iv["tag_token"], iv["tag_token_abs"]
    rows.append(V.row(
        "tag_token", name, "a tag's mean cosine with the tokens it tags is near 0",
        f"[{lo_p}, {hi_p}] over ten models", f"{tt[0]:+.3f}", ci(tt[1], tt[2], "{:+.3f}"),
        f"mean cosine in the paper's range [{lo_p}, {hi_p}]", rule_tag_token_signed(tt[1], tt[2])))
    rows.append(V.row(
        "tag_token_abs", name, "tags are orthogonal to the tokens they tag (not cancelling)",
        f"|mean| at most {max(abs(lo_p), abs(hi_p))} (ten models)",
        f"mean |cos| {ta[0]:.3f}; random directions {stats.mean_abs_cos_random(s['d_model']):.3f}",
        ci(ta[1], ta[2], "{:.3f}"), "mean |cosine| below 0.17",
        rule_tag_token_abs(ta[1], ta[2])))
    return rows
