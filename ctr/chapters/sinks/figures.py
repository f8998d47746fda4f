"""The sinks chapter's figures (and the front page's). Each draws every model in one figure
(a column or a row per model), so the chapter can number and caption it."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ... import plots


def _name(f, pk) -> str:
    return f"{f.model}: L{pk.layer}H{pk.head}"


def attention(found: dict):
    """The chosen head of each model: attention with the sink scores on top."""
    fig = plt.figure(figsize=(5.4 * len(found), 5.8))
    gs = fig.add_gridspec(1, len(found), wspace=0.3)
    for spec, f in zip(gs, found.values()):
        p = f.search.main
        plots.attention_map(f.cap.A, f.cap.tokens, f.alpha, f.shown, eps=f.eps, fig=fig,
                            spec=spec, title=f"{_name(f, p)}, prompt {p.prompt}")
    return fig


def _sil(x) -> str:
    return "-" if x is None or x != x else f"{x:.2f}"


def _pca_row(axes, f):
    tok, c = f.cap.tokens, f.cap
    names = {p: f"attends most to {plots.short(tok[p])!s} ({p})" for p in f.shown}
    k = f.keep
    panels = {f"{f.model}: head input": (c.resid_in[k], "input"),
              "head output z": (c.out[k], "output"),
              f"residual out of layer {c.deeper_layer}": (c.deeper[k], "deeper"),
              f"residual out of layer {f.n_layers - 1} (last)": (c.last[k], "last")}
    for ax, (title, (X, key)) in zip(axes, panels.items()):
        Y, p = plots.pca2(X)
        plots.scatter(ax, Y, f.labels, names,
                      title=f"{title}\nsilhouette (3 PCs) {_sil(f.silhouette[key])}")
        if key == "output":
            plots.arrows(ax, p, {f"tag {plots.short(tok[s])}": c.V[s] for s in f.shown})


def pca(found: dict):
    """Per model (rows): the shown head's case tokens (t > p) in its input, its output, the
    residual stream 3 layers deeper and at the last layer; PCA, coloured by dominant sink."""
    fig, axes = plt.subplots(len(found), 4, figsize=(16, 4.2 * len(found)), squeeze=False)
    for row, f in zip(axes, found.values()):
        _pca_row(row, f)
    fig.tight_layout()
    return fig


# (cases, per-case key, the aggregate's mean: section and key, label)
GAINS = (("clusters", "gain", ("clusters", "gain"),
          "clusters: output $-$ input\n(one case per two-sink head)"),
         ("persist", "persist_gain", ("persist", "gain"),
          "persist: 3 layers deeper $-$ input\n(one case per layer with 2+ heads)"),
         ("clusters", "persist_gain", ("persist", "one_head"),
          "persist, one head per case\n(shown, no verdict)"))


def gains(found: dict, margin: float = 0.05):
    """Per model with a case (rows): every case's silhouette gain (3 PCs), its mean and 95%
    interval over prompts (black), the book's margin (dashed) and 0 (grey)."""
    fs = list(found.values())
    h = [2.9 if f.cases and f.cases["clusters"]["cases"] else 0.6 for f in fs]
    fig, axes = plt.subplots(len(fs), 1, figsize=(9, sum(h)), squeeze=False,
                             gridspec_kw={"height_ratios": h})
    rng = np.random.default_rng(0)
    for ax, f in zip(axes[:, 0], fs):
        cases = (f.cases or {}).get("cases", {})
        if not cases.get("clusters"):
            _empty(ax, f"{f.model}: no two-sink head, no case")
            continue
        for i, (kind, key, (sec, agg), _) in enumerate(GAINS):
            x = np.array([c[key] for c in cases.get(kind, []) if c.get(key) is not None])
            if not len(x):
                ax.text(0, i, "no case", va="center", fontsize=8, color="0.4")
                continue
            ax.scatter(x, i + rng.uniform(-0.2, 0.2, len(x)), s=12, alpha=0.5,
                       color=plots.PALETTE[i], edgecolors="none")
            m = f.cases[sec][agg]
            if m["lo"] is not None:
                ax.errorbar(m["mean"], i, xerr=[[m["mean"] - m["lo"]], [m["hi"] - m["mean"]]],
                            fmt="o", color="k", capsize=4, ms=5, zorder=5)
        ax.axvline(0, color="0.6", lw=0.8)
        ax.axvline(margin, color="k", lw=0.8, ls="--")
        ax.set_yticks(range(len(GAINS)), [g[3] for g in GAINS], fontsize=8)
        ax.set_ylim(len(GAINS) - 0.5, -0.5)
        ax.set_title(f.model, fontsize=10)
        ax.set_xlabel("silhouette gain (first 3 principal components)")
    fig.tight_layout()
    return fig


def _empty(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10)
    ax.set_axis_off()


def two_heads(found: dict):
    """Per model (rows): the two heads of its pair, side by side, on the pair's prompt."""
    fs = list(found.values())
    fig = plt.figure(figsize=(11, sum(5.8 if f.pair else 1.0 for f in fs)))
    gs = fig.add_gridspec(len(fs), 2, wspace=0.25, hspace=0.35,
                          height_ratios=[5.8 if f.pair else 1.0 for f in fs])
    for r, f in enumerate(fs):
        if not f.pair:
            _empty(fig.add_subplot(gs[r, :]), f"{f.model}: no two heads with a mid-prompt sink")
            continue
        tok = f.pair["tokens"]
        for c, (A, a, pk) in enumerate(zip(f.pair["A"], f.pair["alpha"], f.search.pair)):
            plots.attention_map(A, tok, a, pk.sinks, eps=f.eps, fig=fig, spec=gs[r, c],
                                title=f"{_name(f, pk)}, prompt {pk.prompt}: sinks "
                                      + ", ".join(f"{plots.short(tok[t])}@{t}" for t in pk.sinks))
    return fig


def mechanism(f):
    """One figure for the front page: the head's attention and its outputs clustered by sink."""
    tok, c, p = f.cap.tokens, f.cap, f.search.main
    fig = plt.figure(figsize=(11, 4.6))
    gs = fig.add_gridspec(1, 2, width_ratios=[1, 1.1], wspace=0.3)
    plots.attention_map(c.A, tok, f.alpha, f.shown, eps=f.eps, fig=fig, spec=gs[0],
                        title=f"catch: {_name(f, p)}")
    ax = fig.add_subplot(gs[1])
    Y, pc = plots.pca2(c.out[f.keep])
    names = {t: f"caught by {plots.short(tok[t])} ({t})" for t in f.shown}
    plots.scatter(ax, Y, f.labels, names, title="tag: the head's outputs, PCA, by sink")
    plots.arrows(ax, pc, {f"tag {plots.short(tok[t])}": c.V[t] for t in f.shown})
    return fig
