"""The sinks chapter's figures (and the front page's). Each draws every model in one figure
(a column or a row per model), so the chapter can number and caption it."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .. import plots


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


def _pca_row(axes, f):
    tok, c = f.cap.tokens, f.cap
    names = {p: f"attends most to {plots.short(tok[p])!s} ({p})" for p in f.shown}
    k = f.keep
    panels = {f"{f.model}: head input": (c.resid_in[k], "input"),
              "head output o = A V": (c.out[k], "output"),
              f"residual out of layer {c.deeper_layer}": (c.deeper[k], "deeper")}
    for ax, (title, (X, key)) in zip(axes, panels.items()):
        Y, p = plots.pca2(X)
        plots.scatter(ax, Y, f.labels, names, title=f"{title}\nsilhouette {f.silhouette[key]:.2f}")
        if key == "output":
            plots.arrows(ax, p, {f"tag {plots.short(tok[s])}": c.V[s] for s in f.shown})


def pca(found: dict):
    """Per model (rows): the caught tokens' head input, head output and deeper residual, PCA,
    coloured by the sink each token attends to most."""
    fig, axes = plt.subplots(len(found), 3, figsize=(13, 4.4 * len(found)), squeeze=False)
    for row, f in zip(axes, found.values()):
        _pca_row(row, f)
    fig.tight_layout()
    return fig


def persistence(found: dict):
    """Per model with two sinks: projections on the tag difference written into the residual
    stream, per group of caught tokens, before the head, after its layer and deeper."""
    fs = [f for f in found.values() if f.persist and f.persist.get("delta") is not None]
    fig, axes = plt.subplots(len(fs), 1, figsize=(8, 3.2 * len(fs)), squeeze=False)
    for ax, f in zip(axes[:, 0], fs):
        c, q = f.cap, f.search.main.second
        u = c.W_O @ (c.V[q] - c.V[0]).float()
        u = u / u.norm()
        g = f.labels == q
        where = {"head input": c.resid_in, f"after layer {f.search.main.layer}": c.resid_after,
                 f"after layer {c.deeper_layer}": c.deeper}
        rng = np.random.default_rng(0)
        for i, X in enumerate(where.values()):
            x = (X[f.keep].float() @ u).numpy()
            x = (x - x.mean()) / (x.std() or 1.0)
            for j, (sel, lab, col) in enumerate(((g, f"caught by {plots.short(c.tokens[q])}", 3),
                                                 (~g, f"caught by {plots.short(c.tokens[0])}", 0))):
                ax.scatter(x[sel], i + (0.12 if j else -0.12) + rng.uniform(-0.05, 0.05, sel.sum()),
                           s=9, color=plots.PALETTE[col], alpha=0.7, label=lab if i == 0 else None)
        ax.set_yticks(range(len(where)), list(where))
        ax.set_title(_name(f, f.search.main), fontsize=10)
        ax.set_xlabel("projection on $W_O$(tag of the mid-prompt sink $-$ tag of the first token), "
                      "standardised")
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def two_heads(found: dict):
    """Per model with a second head (rows): the chosen head and the second head, side by side."""
    fs = [f for f in found.values() if f.search.other is not None]
    fig = plt.figure(figsize=(11, 5.8 * len(fs)))
    gs = fig.add_gridspec(len(fs), 2, wspace=0.25, hspace=0.35)
    for r, f in enumerate(fs):
        tok = f.cap.tokens
        for c, (A, a, pk) in enumerate(((f.cap.A, f.alpha, f.search.main),
                                        (f.cap.A_other, f.alpha_other, f.search.other))):
            plots.attention_map(A, tok, a, pk.sinks, eps=f.eps, fig=fig, spec=gs[r, c],
                                title=f"{_name(f, pk)}: sinks "
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
