"""The sinks chapter's measures and verdict rules.

Measures of one captured head (``sinks.Capture``): how much better its outputs cluster by sink
than its inputs (silhouette gain, bootstrap over tokens), and whether the two groups of caught
tokens are further apart along the difference of the two tags, written into the residual stream,
several layers deeper than before the head wrote them (Cohen's d, bootstrap and permutation).
Rules are functions of numbers, tested on fabricated results for every outcome.
"""
from __future__ import annotations

import numpy as np

from .. import stats
from .. import verdicts as V


def _silhouette(X, labels) -> float:
    from sklearn.metrics import silhouette_score

    if len(set(labels.tolist())) < 2 or min(np.unique(labels, return_counts=True)[1]) < 2:
        return float("nan")
    return float(silhouette_score(X, labels))


def _resample(labels: np.ndarray, rng) -> np.ndarray:
    """Token indices resampled with replacement within each group (group sizes kept)."""
    return np.concatenate([rng.choice(np.flatnonzero(labels == g), (labels == g).sum())
                           for g in np.unique(labels)])


def cluster_gain(X_in, X_out, labels, n_boot: int = 300, seed: int = 0) -> dict:
    """Silhouette of the outputs minus that of the inputs, with a bootstrap interval over tokens."""
    X_in, X_out = np.asarray(X_in), np.asarray(X_out)
    obs = _silhouette(X_out, labels) - _silhouette(X_in, labels)
    if not np.isfinite(obs):
        return {"gain": None, "lo": None, "hi": None}
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        i = _resample(labels, rng)
        vals.append(_silhouette(X_out[i], labels[i]) - _silhouette(X_in[i], labels[i]))
    lo, hi = np.nanquantile(vals, [0.025, 0.975])
    return {"gain": float(obs), "lo": float(lo), "hi": float(hi)}


def persistence(c, keep, labels: np.ndarray, second: int,
                n_boot: int = 1000, n_perm: int = 2000, seed: int = 0) -> dict:
    """Separation of the two groups of caught tokens along the difference of the two tags
    written into the residual stream, u = W_O,h (v_second - v_0): Cohen's d of the projections
    before the head (its input), after its layer, and deeper. The claim "clusters persist" is
    d_deeper - d_input > 0: the groups are further apart along the tags than before the head
    wrote them. Interval: bootstrap over tokens within groups; p: permutation of the labels."""
    u = c.W_O @ (c.V[second] - c.V[0]).float()
    u = u / u.norm()
    proj = {k: (getattr(c, k)[keep].float() @ u).numpy() for k in ("resid_in", "resid_after", "deeper")}
    g = labels == second

    def d(which, lab):
        x = proj[which]
        return stats.cohens_d(x[lab], x[~lab])

    out = {"d_input": d("resid_in", g), "d_after": d("resid_after", g), "d_deeper": d("deeper", g),
           "n_second": int(g.sum()), "n_bos": int((~g).sum())}
    if out["n_second"] < 2 or out["n_bos"] < 2:
        return {**out, "delta": None, "lo": None, "hi": None, "p": None}
    delta = lambda lab: d("deeper", lab) - d("resid_in", lab)  # noqa: E731
    out["delta"] = delta(g)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        i = _resample(labels, rng)
        x_in, x_dp, gi = proj["resid_in"][i], proj["deeper"][i], g[i]
        boot.append(stats.cohens_d(x_dp[gi], x_dp[~gi]) - stats.cohens_d(x_in[gi], x_in[~gi]))
    out["lo"], out["hi"] = (float(x) for x in np.nanquantile(boot, [0.025, 0.975]))
    out["p"] = stats.permutation(delta, g, n_perm, seed)["p"]
    return out


# --- rules (numbers in, verdict out) ------------------------------------------------------------

def rule_two_sinks(candidates: int) -> str:
    """A head whose sinks are the first token and a mid-prompt token exists: at least one (prompt, head) meets the rule."""
    return V.REPRODUCED if candidates >= 1 else V.NOT


def rule_clusters(qualifies: bool, lo, hi) -> str:
    """Outputs cluster by sink, inputs do not: on a head with two sinks, the silhouette of the
    outputs exceeds that of the inputs (interval above 0)."""
    return V.by_interval(lo, hi, low=0.0) if qualifies else V.UNTESTABLE


def rule_persist(qualifies: bool, lo, hi) -> str:
    """Clusters persist deeper: the groups are further apart along the tags deeper than in the
    head's input (d_deeper - d_input above 0)."""
    return V.by_interval(lo, hi, low=0.0) if qualifies else V.UNTESTABLE


def rule_own_sinks(heads_with_mid_sink: int, disjoint: bool, jaccard: float | None) -> str:
    """Each head picks its own sinks: two heads of one prompt have different mid-prompt sinks, or
    (sharing one) catch mostly different tokens (Jaccard of the caught tokens below 0.5). Needs
    two heads with a mid-prompt sink."""
    if heads_with_mid_sink < 2:
        return V.UNTESTABLE
    return V.REPRODUCED if disjoint or (jaccard is not None and jaccard < 0.5) else V.NOT


# --- the chapter's rows --------------------------------------------------------------------------

def claims(name: str, r: dict) -> list[dict]:
    """paper / ours / verdict rows for one model from its ``sinks.summary``."""
    ok = r["qualifies"]
    lo, hi = stats.wilson(r["candidates"], r["heads_seen"])
    g, p, o = r["cluster_gain"], r["persist"] or {}, r["other"]
    why = "no head has two sinks (the first token and a mid-prompt token)"
    rows = [
        V.row("two_sinks", name, "a head has two sinks: the first token and a mid-prompt token", "yes (Fig. 1)",
              f"{r['candidates']} of {r['heads_seen']} (prompt, head) pairs",
              V.interval(lo, hi, "{:.3f}", "share, 95% Wilson"),
              "at least one head meets the search rule", rule_two_sinks(r["candidates"])),
        V.row("clusters", name, "outputs cluster by sink, inputs do not", "yes (Fig. 2)",
              (f"silhouette {r['silhouette_input']:.2f} in, {r['silhouette_output']:.2f} out"
               if ok else why),
              V.interval(g.get("lo"), g.get("hi"), "{:+.2f}", "gain, 95% CI") if ok else "-",
              "on a head with two sinks: silhouette of the outputs minus the inputs' above 0 "
              "(bootstrap over tokens)", rule_clusters(ok, g.get("lo"), g.get("hi"))),
        V.row("persist", name, "the clusters persist deeper", "yes (Fig. 2)",
              (f"separation along the tags (Cohen's d): {p['d_input']:.2f} in the head's input, "
               f"{p['d_after']:.2f} after its layer, {p['d_deeper']:.2f} at layer "
               f"{r['deeper_layer']}; permutation p = {p['p']:.3g}"
               if ok and p.get("delta") is not None else why),
              V.interval(p.get("lo"), p.get("hi"), "{:+.2f}", "d deeper - d input, 95% CI")
              if ok else "-",
              "on a head with two sinks: d(deeper) - d(input) above 0 (bootstrap over tokens)",
              rule_persist(ok and p.get("delta") is not None, p.get("lo"), p.get("hi"))),
        V.row("own_sinks", name, "each head picks its own sinks", "yes (Fig. 2)",
              (f"L{r['layer']}H{r['head']} {r['sinks']} vs L{o['layer']}H{o['head']} {o['sinks']}; "
               + ("different mid-prompt sinks" if r["other_disjoint"] else
                  f"caught tokens overlap (Jaccard) {r['jaccard']:.2f}")
               if o else "no second head with a mid-prompt sink")
              + f"; {r['heads_with_mid_sink']} heads of the prompt have a mid-prompt sink", "-",
              "two heads of one prompt with different mid-prompt sinks, or caught-token Jaccard "
              "below 0.5; needs two heads with a mid-prompt sink",
              rule_own_sinks(r["heads_with_mid_sink"], r["other_disjoint"], r["jaccard"])),
    ]
    return rows
