"""The variance chapter's figures. Each draws every model in one figure (the paper's models,
where shown, are labelled as the paper's), so the chapter can number and caption it."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ... import plots
from . import SATURATION_EPS, layer_mean, per_head

GREY = "#bbbbbb"


def fig3(runs: dict, summ: dict, paper: dict):
    """Paper Fig. 3: sinks per head (every prompt, layer and head) and the per-head VE (mean over
    the prompts in which the head has a sink; heads with at least 5 such prompts), with the same
    heads' random-subspace VE, the paper-like mean and the paper's range."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    sinks, ves = [], []
    for n, r in runs.items():
        e = r.eps.index(r.main_eps)
        sinks.append(pd.DataFrame({"model": n, "sinks": r.n_sinks[..., e].ravel()}))
        P = r.ve.shape[0]
        has = ~np.isnan(r.ve[..., e]).reshape(P, -1)
        ve = per_head(r.ve[..., e].reshape(P, -1), has)
        rnd = per_head(r.ve_random.reshape(P, -1), has)
        ves.append(pd.DataFrame({"model": n, "VE": ve, "random": rnd}).dropna())
    order = list(runs)
    sns.violinplot(data=pd.concat(sinks), x="model", y="sinks", ax=ax1, cut=0, order=order,
                   density_norm="width", inner="quartile", color="#9ecae1")
    ax1.set_title(f"sinks per head (eps {next(iter(runs.values())).main_eps})")
    v = pd.concat(ves)
    sns.boxplot(data=v, x="model", y="VE", ax=ax2, color="#fdd0a2", fliersize=2, order=order)
    sns.stripplot(data=v, x="model", y="random", ax=ax2, color="k", size=2, alpha=0.5,
                  order=order)
    ax2.plot([], [], "k.", label="random subspace, same heads")
    for i, n in enumerate(runs):
        ax2.plot([i - 0.4, i + 0.4], [summ[n]["ve_mean_zero"]] * 2, color=plots.PALETTE[3], lw=2,
                 ls="--", label="paper-like mean (sinkless heads as 0)" if i == 0 else None)
    ax2.axhspan(*paper["variance"]["ve_typical"], color="#74c476", alpha=0.2,
                label="the paper: typically 20-40%")
    ax2.axhline(paper["variance"]["ve_max"], color="#74c476", ls=":", label="the paper: up to 70%")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("per-head VE")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax2.set_title("VE of the tags, one point per head with sinks")
    fig.tight_layout()
    return fig


def by_layer(runs: dict, summ: dict):
    """Mean VE per layer (relative depth): heads with sinks, the paper-like average, random."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for i, (n, s) in enumerate(summ.items()):
        L = len(s["ve_by_layer"])
        x = np.arange(L) / max(L - 1, 1)
        c = plots.PALETTE[i]
        ax.plot(x, [np.nan if v is None else v for v in s["ve_by_layer"]], marker="o", ms=3,
                color=c, label=f"{n} (heads with sinks)")
        ax.plot(x, s["ve_zero_by_layer"], marker="s", ms=3, ls=":", color=c,
                label=f"{n} (paper-like)")
        ax.plot(x, layer_mean(runs[n].ve_random), ls="--", color=c, alpha=0.6,
                label=f"{n} (random subspace)")
    ax.set_xlabel("relative depth (layer / last layer)")
    ax.set_ylabel("mean VE over heads and prompts")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def sweep(summ: dict, paper: dict):
    """The threshold sweep: VE (both averages) and sinks per head against eps, beside the
    paper's table; VE against sinks per head (the saturating curve); and the squared VE against
    sinks per head, where random subspaces give the straight line S / d_head, with the three
    thresholds of the rule's D marked."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (a_ve, a_n), (a_curve, a_sq) = axes
    for i, (n, s) in enumerate(summ.items()):
        c, sw = plots.PALETTE[i], s["sweep"]
        eps = [p["eps"] for p in sw]
        S = [p["sinks"] for p in sw]
        a_ve.plot(eps, [p["ve_zero"] for p in sw], "o-", color=c, label=f"{n}, paper-like")
        a_ve.plot(eps, [np.nan if p["ve"] is None else p["ve"] for p in sw], "o:", color=c,
                  alpha=0.7, label=f"{n}, heads with sinks")
        a_n.plot(eps, S, "o-", color=c, label=n)
        a_curve.plot(S, [p["ve_zero"] for p in sw], "o-", color=c, label=f"{n}, paper-like")
        E = [p["ve_sq_zero"] for p in sw]
        a_sq.plot(S, E, "o-", color=c, label=n)
        at = [k for k, p in enumerate(sw) if p["eps"] in SATURATION_EPS]
        a_sq.plot([S[k] for k in at], [E[k] for k in at], "s", ms=9, mfc="none", color="k")
        xs = np.linspace(0, max(S), 20)
        a_sq.plot(xs, xs / s["head_dim"], ls="--", color=c, alpha=0.6,
                  label=f"random subspaces, d_head {s['head_dim']}")
    for j, (pm, pts) in enumerate(paper["eps_sweep"]["models"].items()):
        c = plots.PALETTE[4 + j]
        kw = dict(marker="s", ls="--", color=c, label=f"{pm} (the paper)")
        a_ve.plot([p["eps"] for p in pts], [p["ve"] for p in pts], **kw)
        a_n.plot([p["eps"] for p in pts], [p["sinks"] for p in pts], **kw)
        a_curve.plot([p["sinks"] for p in pts], [p["ve"] for p in pts], **kw)
    ticks = (0.03, 0.05, 0.1, 0.2, 0.4)
    for ax in (a_ve, a_n):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("threshold $\\epsilon$")
    a_ve.set_ylabel("average VE")
    a_n.set_ylabel("average number of sinks per head")
    a_curve.set_xlabel("average number of sinks per head")
    a_curve.set_ylabel("average VE (paper-like)")
    a_sq.set_xlabel("average number of sinks per head")
    a_sq.set_ylabel("average squared VE (sinkless heads as 0)")
    a_sq.set_title("squares: eps 0.03, 0.1, 0.4 (the rule's D)", fontsize=9)
    for ax in axes.ravel():
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def orthogonality(summ: dict, paper: dict):
    """Per model: shares of tag pairs in the paper's ten bins, pairs of different heads of a
    layer and of one head, with the null (random value-space vectors through the same maps),
    and the paper's eight models."""
    bins = paper["tag_orthogonality"]["bins"]
    labels = [f"[{a}, {b})" for a, b in zip(bins[:-2], bins[1:-1])] + [f"[{bins[-2]}, {bins[-1]}]"]
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, len(summ), figsize=(5.6 * len(summ), 4.4), squeeze=False,
                             sharey=True)
    for i, (ax, (n, s)) in enumerate(zip(axes[0], summ.items())):
        for counts in paper["tag_orthogonality"]["counts"].values():
            ax.plot(x, np.asarray(counts) / sum(counts), color=GREY, lw=1, marker=".")
        ax.plot([], [], color=GREY, label="the paper's eight models")
        for key, ls, what in (("cross", "-", "different heads"), ("within", ":", "one head")):
            h, h0 = (np.asarray(s[f"{k}_{key}_hist"], float) for k in ("pairs", "null"))
            if h.sum():
                ax.plot(x, h / h.sum(), color=plots.PALETTE[i], ls=ls, lw=2, marker="o",
                        label=f"{what} ({int(h.sum()):,} pairs)")
                ax.plot(x, h0 / h0.sum(), color="k", ls=ls, lw=1,
                        label=f"null, {what}")
        ax.set_xticks(x, labels, rotation=40, fontsize=7)
        ax.set_title(n, fontsize=10)
        ax.set_xlabel("cosine between two mapped tags (the paper's bins)")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("share of pairs")
    fig.tight_layout()
    return fig
