"""The variance chapter's verdicts: intervals over prompts and the rules that judge them.

The rules are RULES.md's, section "Variance (paper Fig. 3 and the rebuttal tables)". The units
that are independent are the prompts (heads, layers and tag pairs of one prompt are not), so
every interval is a percentile bootstrap over prompts (``ctr.stats.bootstrap``, 2,000
resamples, seed 0), and a bootstrap over fewer than 20 contributing prompts is not testable
here. Each rule is a function of numbers only, so the tests can hand it fabricated results;
``claims`` applies them to one model's run and returns the chapter's paper / ours / verdict
rows, each with the rule's own words (``ctr.rules``).
"""
from __future__ import annotations

import numpy as np

from ... import rules, stats
from ... import verdicts as V
from . import (SATURATION_EPS, Result, fall, per_head, prompt_means, saturation,
                       sweep_means)

MIN_PAIRS = 100          # fewer tag pairs than this: not testable
NEAR0 = [4, 5]           # the paper's bins [-0.05, 0) and [0, 0.05)
ALIGNED = 9              # the paper's bin [0.6, 1]
TAG_TOKEN = 0.174        # the paper's largest magnitude, -0.1738
NO_VERDICT = "no verdict (descriptive)"


# --- rules (numbers in, verdict out) ------------------------------------------------------------

def _one_sided(lo, hi, n_prompts, x: float, above: bool) -> str:
    """"CI > x" (above) or "CI < x": reproduced when the whole interval lies strictly on that
    side of x, not reproduced when it lies strictly on the other, compatible otherwise (an
    interval that touches x, e.g. [0, 0], is on neither side); fewer than 20 prompts: not
    testable."""
    if above:
        return V.by_bootstrap(lo, hi, n_prompts, low=x, strict=True)
    return V.by_bootstrap(lo, hi, n_prompts, high=x, strict=True)


def rule_sinks_1_2(lo, hi, n_prompts) -> str:
    """sinks_1_2: reproduced if the CI of the share of heads with 1-2 sinks lies above 0.5; not
    reproduced if below; compatible otherwise; fewer than 20 prompts: not testable."""
    return _one_sided(lo, hi, n_prompts, 0.5, above=True)


def rule_in_range(lo, hi, n_prompts) -> str:
    """ve_20_40, part "in range": reproduced if the median per-head VE's CI lies inside
    [0.2, 0.4]; not reproduced if entirely outside; compatible otherwise."""
    return V.by_bootstrap(lo, hi, n_prompts, 0.2, 0.4)


def rule_beats_random(lo, hi, n_prompts) -> str:
    """ve_20_40, part "beats random": reproduced if the CI of the median over heads of the
    per-head mean (VE - random-subspace VE) is above 0; not reproduced if below 0."""
    return _one_sided(lo, hi, n_prompts, 0.0, above=True)


def rule_ve_20_40(in_range: str, beats_random: str) -> str:
    """ve_20_40: the two parts combined by the General rule (``V.parts``)."""
    return V.parts(in_range, beats_random)


def rule_sweep(lo, hi, n_prompts) -> str:
    """sweep: saturates. Reproduced if D's CI > 0; not reproduced if D's CI < 0; compatible
    otherwise (D on the squared VE; see ``variance.saturation``)."""
    return _one_sided(lo, hi, n_prompts, 0.0, above=True)


def rule_near0(lo, hi, n_prompts) -> str:
    """tag_orth_*, part "near 0": reproduced if r's CI > 0.5, not reproduced if CI < 0.5."""
    return _one_sided(lo, hi, n_prompts, 0.5, above=True)


def rule_rarely_aligned(lo, hi, n_prompts) -> str:
    """tag_orth_*, part "rarely aligned": reproduced if a's CI < 0.01, not if CI > 0.01."""
    return _one_sided(lo, hi, n_prompts, 0.01, above=False)


def rule_orthogonal(pairs: int, near0: str, aligned: str, min_pairs: int = MIN_PAIRS) -> str:
    """tag_orth_cross and tag_orth_within: fewer than 100 pairs: not testable; otherwise the two
    parts ("near 0", "rarely aligned") combined by the General rule."""
    return V.UNTESTABLE if pairs < min_pairs else V.parts(near0, aligned)


def rule_tag_token(lo, hi, n_prompts, bound: float = TAG_TOKEN) -> str:
    """tag_token: reproduced if the mean cosine's CI lies inside [-0.174, 0.174]; not
    reproduced if entirely outside; compatible otherwise."""
    return V.by_bootstrap(lo, hi, n_prompts, -bound, bound)


# --- the paper's numbers, recomputed from ctr/paper_numbers.yaml ------------------------------

def paper_saturation(paper: dict) -> dict:
    """Per model of the paper's threshold table: q on its (norm-form) VE and the fall f."""
    out = {}
    for m, pts in paper["eps_sweep"]["models"].items():
        at = {p["eps"]: p for p in pts}
        ve = [at[e]["ve"] for e in SATURATION_EPS]
        out[m] = {"q": saturation(ve, [at[e]["sinks"] for e in SATURATION_EPS])[1],
                  "f": fall(ve[0], ve[2])}
    return out


def paper_orthogonality(paper: dict) -> dict:
    """Per model of the paper's tag-pair histogram: the share in [-0.05, 0.05), the share two
    isotropic directions at the model's width would have, their ratio r, and a (share in
    [0.6, 1])."""
    cfg = paper["paper_model_configs"]["models"]
    out = {}
    for m, c in paper["tag_orthogonality"]["counts"].items():
        c = np.asarray(c, float)
        near, rnd = c[NEAR0].sum() / c.sum(), stats.share_near_zero_random(cfg[m]["d_model"])
        out[m] = {"near0": near, "random": rnd, "r": near / rnd, "a": c[ALIGNED] / c.sum()}
    return out


# --- intervals over prompts ----------------------------------------------------------------------

def _ratio2(u):
    """(sum u0 / sum u1) / (sum u2 / sum u3): a share over the share of the null."""
    s = u.sum(0)
    return s[0] / s[1] / (s[2] / s[3]) if s[1] and s[2] and s[3] else np.nan


def _median_over_heads(N: int, col: int):
    def stat(u):
        has = u[:, :N] > 0
        keep = ~np.isnan(per_head(u[:, N:2 * N], has))       # heads entering this resample
        x = per_head(u[:, col * N:(col + 1) * N], has)[keep]
        return float(np.median(x)) if len(x) else np.nan
    return stat


def intervals(r: Result, n_boot: int = stats.N_BOOT, seed: int = 0) -> dict:
    """Point values and 95% bootstrap intervals over prompts: ``out[key] = (point, lo, hi)``;
    ``out["n"][key]`` = the contributing prompts, ``out["wilson"]`` = the keys whose degenerate
    interval was replaced by Wilson's (RULES.md, Intervals)."""
    e = r.eps.index(r.main_eps)
    n, ve = r.n_sinks[..., e], r.ve[..., e]
    has = ~np.isnan(ve)
    P = n.shape[0]
    N = has[0].size
    nz = lambda x: np.where(has, x, 0.0)                                      # noqa: E731
    units, stat, count = {}, {}, {}
    units["share_1_2"] = np.c_[((n >= 1) & (n <= 2)).reshape(P, -1).sum(1), np.full(P, N)]
    units["ve_zero"] = nz(ve).reshape(P, -1).mean(1)
    units["ve_excluded"] = np.c_[nz(ve).sum((1, 2)), has.sum((1, 2))]
    units["beats_random"] = np.c_[nz(ve - r.ve_random).sum((1, 2)), has.sum((1, 2))]
    # per-head VE: columns [has | VE | VE - random], heads entering by the 5-prompt floor
    u = np.c_[has.reshape(P, -1), nz(ve).reshape(P, -1), nz(ve - r.ve_random).reshape(P, -1)]
    units["ve_median"], units["beats_random_median"] = u, u
    stat["ve_median"], stat["beats_random_median"] = _median_over_heads(N, 1), _median_over_heads(N, 2)
    heads = ~np.isnan(per_head(ve.reshape(P, -1), has.reshape(P, -1)))
    count["ve_median"] = count["beats_random_median"] = int(has.reshape(P, -1)[:, heads].any(1).sum())
    if all(x in r.eps for x in SATURATION_EPS):
        sw, i = sweep_means(r), [r.eps.index(x) for x in SATURATION_EPS]
        units["D"] = np.c_[sw["ve_sq_zero"][:, i], sw["sinks"][:, i]]
        stat["D"] = lambda u: saturation(u[:, :3].mean(0), u[:, 3:].mean(0))[0]   # noqa: E731
        count["D"] = P
    for key in ("cross", "within"):
        h, h0 = getattr(r, f"pairs_{key}"), getattr(r, f"null_{key}")
        units[f"near0_{key}"] = np.c_[h[:, NEAR0].sum(1), h.sum(1)]
        units[f"a_{key}"] = np.c_[h[:, ALIGNED], h.sum(1)]
        units[f"r_{key}"] = np.c_[h[:, NEAR0].sum(1), h.sum(1), h0[:, NEAR0].sum(1), h0.sum(1)]
        stat[f"r_{key}"] = _ratio2
        for k in ("near0", "a", "r"):
            count[f"{k}_{key}"] = int((h.sum(1) > 0).sum())
    tt = {k: prompt_means(getattr(r, k)) for k in ("tag_token", "tag_token_abs",
                                                   "tag_token_null_abs", "tag_token_out")}
    ok = ~np.isnan(tt["tag_token"])
    for k, x in tt.items():
        units[k] = x[~np.isnan(x)]
    units["tag_token_ratio"] = np.c_[tt["tag_token_abs"], tt["tag_token_null_abs"]][ok]
    out = {"n": {}, "wilson": []}
    for k, x in units.items():
        f = stat.get(k, stats.ratio_of_sums if x.ndim == 2 else np.mean)
        point = f(x) if len(x) else np.nan
        lo, hi = stats.bootstrap(x, f, n_boot, seed)
        out["n"][k] = count.get(k, int(len(x) if x.ndim == 1 else (x[:, -1] > 0).sum()))
        if k in ("share_1_2", "a_cross", "a_within"):          # shares: RULES.md's Wilson fix
            w = stats.undegenerate(point, lo, hi, out["n"][k])
            if w["wilson"]:
                lo, hi = w["lo"], w["hi"]
                out["wilson"].append(k)
        out[k] = (float(point), lo, hi)
    return out


# --- the chapter's rows --------------------------------------------------------------------------

def _ci(iv, key, fmt="{:.2f}"):
    pt, lo, hi = iv[key]
    flag = " (Wilson: the bootstrap interval was degenerate)" if key in iv.get("wilson", ()) else ""
    return V.interval(lo, hi, fmt) + flag


def _num(x, fmt="{:.2f}") -> str:
    return "-" if x is None or not np.isfinite(x) else fmt.format(x)


def _gqa_note(s: dict) -> str | None:
    g = s["heads"] // max(s["kv_heads"], 1)
    if g <= 1:
        return None
    return (f"{s['heads']} query heads share {s['kv_heads']} key-value heads ({g} per group): "
            "cross-head pairs at a sink shared within a group are one value vector seen through "
            "different W_O slices")


def claims(name: str, s: dict, iv: dict, paper: dict) -> list[dict]:
    """paper / ours / verdict rows for one model: ``s`` = ``variance.summary``, ``iv`` =
    ``intervals`` of the same run, ``paper`` = ``results.paper()``."""
    settings = f"eps {s['eps']}, min_queries {s['min_queries']}"
    at02 = {m: next(p for p in pts if p["eps"] == 0.2) for m, pts in paper["eps_sweep"]["models"].items()}
    nn = iv["n"]
    rows = []

    def row(id, claim, paper_text, ours, interval, verdict, **kw):
        rows.append(V.row(id, name, claim, paper_text, ours, interval, rules.text(id), verdict,
                          settings=settings, **kw))

    pt, lo, hi = iv["share_1_2"]
    row("sinks_1_2", "most heads have 1-2 sinks",
        "most heads (Fig. 3); sinks per head at eps 0.2 (rebuttal table): "
        + ", ".join(f"{m} {p['sinks']:.3f}" for m, p in at02.items()),
        f"{pt:.0%} of heads; {s['sinks_per_head']:.2f} sinks per head", _ci(iv, "share_1_2"),
        rule_sinks_1_2(lo, hi, nn["share_1_2"]))

    med, br = iv["ve_median"], iv["beats_random_median"]
    parts = {"in range": rule_in_range(*med[1:], nn["ve_median"]),
             "beats random": rule_beats_random(*br[1:], nn["beats_random_median"])}
    row("ve_20_40", "1-2 tags typically explain 20-40% of a head's output",
        "20-40% (Fig. 3: box plots over heads with sinks); mean VE at eps 0.2, sinkless heads as "
        "0 (rebuttal table): " + ", ".join(f"{m} {p['ve']:.3f}" for m, p in at02.items()),
        (f"median per-head VE {med[0]:.2f} over {s['ve_heads']} heads (a sink in at least "
         f"{s['ve_min_prompts']} prompts); median of VE minus random {br[0]:+.2f}; "
         if s["ve_heads"] else f"no head has a sink in {s['ve_min_prompts']} prompts; ")
        + f"paper-like mean {iv['ve_zero'][0]:.2f} (sinkless heads as 0; no verdict)",
        f"median {_ci(iv, 've_median')}; minus random {_ci(iv, 'beats_random_median', '{:+.2f}')}",
        rule_ve_20_40(*parts.values()), parts=parts)

    ps = paper_saturation(paper)
    paper_sw = ("from the rebuttal table, norm-form VE: " + "; ".join(
        f"{m} q {v['q']:.2f}, f {v['f']:.2f}" for m, v in ps.items()))
    if s.get("saturation") and "D" in iv:
        sat, d = s["saturation"], iv["D"]
        row("sweep", "as eps falls, sinks are added and VE rises, but the gain saturates", paper_sw,
            f"D {d[0]:+.4f} (squared VE); q {_num(sat['q'])}; norm-form VE: q "
            f"{_num(sat['q_norm'])}, f {_num(sat['f'])}", _ci(iv, "D", "{:+.4f}"),
            rule_sweep(*d[1:], nn["D"]))
    else:
        row("sweep", "as eps falls, sinks are added and VE rises, but the gain saturates", paper_sw,
            "the sweep lacks eps " + ", ".join(map(str, SATURATION_EPS)), "-", V.UNTESTABLE)

    po = paper_orthogonality(paper)
    rs, aa = [v["r"] for v in po.values()], [v["a"] for v in po.values()]
    paper_orth = (f"r {min(rs):.2f}-{max(rs):.2f} against isotropic directions at model width, "
                  f"a at most {max(aa):.2%} (eight models, from the rebuttal histogram)")
    for key, what in (("cross", "tags of different heads of one layer"),
                      ("within", "distinct tags of one head")):
        npairs, rr, a = s[f"pairs_{key}"], iv[f"r_{key}"], iv[f"a_{key}"]
        parts = {"near 0": rule_near0(*rr[1:], nn[f"r_{key}"]),
                 "rarely aligned": rule_rarely_aligned(*a[1:], nn[f"a_{key}"])}
        h0 = np.asarray(s[f"null_{key}_hist"], float)
        ours = (f"{npairs:,} pairs: {s[f'pairs_{key}_near_0']:.2f} in [-0.05, 0.05), null "
                f"{s[f'null_{key}_near_0']:.2f}: r {rr[0]:.2f}; a {a[0]:.2%} (null "
                f"{h0[ALIGNED] / h0.sum():.2%})") if npairs else "no pairs"
        kw = {"note": _gqa_note(s)} if key == "cross" and _gqa_note(s) else {}
        row(f"tag_orth_{key}", f"distinct tags are nearly orthogonal ({what}, in the residual "
            "stream)", paper_orth, ours,
            f"r {_ci(iv, f'r_{key}')}; a {_ci(iv, f'a_{key}', '{:.4f}')}" if npairs else "-",
            rule_orthogonal(npairs, *parts.values()), parts=parts, **kw)

    tv = paper["tag_vs_token"]["models"]
    tt, ta, tn, ratio = (iv[k] for k in ("tag_token", "tag_token_abs", "tag_token_null_abs",
                                         "tag_token_ratio"))
    out = iv["tag_token_out"][0]
    row("tag_token", "a tag is nearly orthogonal to the residual of the tokens it tags",
        f"mean cosine {min(tv.values()):+.4f} to {max(tv.values()):+.4f} (ten models, rebuttal)",
        f"mean cosine {tt[0]:+.3f} (residual entering the layer); mean |cos| {ta[0]:.3f}, "
        f"{ratio[0]:.1f} times the null's {tn[0]:.3f} (no verdict); leaving the layer "
        f"{out:+.3f}" if np.isfinite(tt[0]) else "no tagged token",
        _ci(iv, "tag_token", "{:+.3f}"), rule_tag_token(*tt[1:], nn["tag_token"]),
        note="the residual entering the layer: the representation the tag is added to")
    return rows


def descriptive(name: str, s: dict, paper: dict) -> list[dict]:
    """The rows RULES.md leaves without a verdict (up_to_70), in the claims table's columns with
    the verdict cell saying so; kept out of ``claims`` (and so out of the scorecard)."""
    ours = (f"largest per-head VE {s['ve_max']:.2f}, 95th percentile {s['ve_p95']:.2f} "
            f"({s['ve_heads']} heads)") if s["ve_max"] is not None else "no head with sinks"
    return [{"id": "up_to_70", "model": name, "claim": "tags explain up to 70% of a head's output",
             "paper": f"up to {paper['variance']['ve_max']:.0%} (Fig. 3)", "ours": ours,
             "interval": "-", "rule": rules.text("up_to_70"), "verdict": NO_VERDICT,
             "settings": f"eps {s['eps']}, min_queries {s['min_queries']}"}]


def table(rows: list[dict]):
    """The chapter's closing table: claim, model, the paper's number, ours, the interval, the
    verdict (with its parts' verdicts), the rule's words and the row's note."""
    import pandas as pd

    def verdict(x):
        parts = "; ".join(f"{k}: {v}" for k, v in (x.get("parts") or {}).items())
        return f"{x['verdict']} ({parts})" if parts else x["verdict"]

    return pd.DataFrame([{"claim": x["claim"], "model": x["model"], "paper": x["paper"],
                          "ours": x["ours"], "95% interval": x["interval"],
                          "verdict": verdict(x), "rule (RULES.md)": x["rule"],
                          "note": x.get("note") or ""} for x in rows])
