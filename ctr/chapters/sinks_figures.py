"""The sinks chapter's figures (and the front page's): all read a ``sinks.Found``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .. import plots


def attention(f):
    p = f.search.main
    return plots.attention_map(f.cap.A, f.cap.tokens, f.alpha, f.shown, eps=f.eps,
                               title=f"{f.model}: L{p.layer}H{p.head}, prompt {p.prompt}")


def pca(f):
    """The caught tokens' head input, head output and deeper residual, PCA, coloured by sink."""
    tok, c = f.cap.tokens, f.cap
    names = {p: f"attends most to {plots.short(tok[p])!s} ({p})" for p in f.shown}
    k = f.keep
    panels = {f"head input (residual into layer {f.search.main.layer})": (c.resid_in[k], "input"),
              "head output o = A V": (c.out[k], "output"),
              f"residual out of layer {c.deeper_layer}": (c.deeper[k], "deeper")}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for ax, (title, (X, key)) in zip(axes, panels.items()):
        Y, p = plots.pca2(X)
        plots.scatter(ax, Y, f.labels, names, title=f"{title}\nsilhouette {f.silhouette[key]:.2f}")
        if key == "output":
            plots.arrows(ax, p, {f"tag {plots.short(tok[s])}": c.V[s] for s in f.shown})
    fig.tight_layout()
    return fig


def persistence(f):
    """Projections on the tag difference written into the residual stream, per group."""
    c, q = f.cap, f.search.main.second
    u = c.W_O @ (c.V[q] - c.V[0]).float()
    u = u / u.norm()
    g = f.labels == q
    fig, ax = plt.subplots(figsize=(8, 3.4))
    where = {"head input": c.resid_in, f"after layer {f.search.main.layer}": c.resid_after,
             f"after layer {c.deeper_layer}": c.deeper}
    for i, (name, X) in enumerate(where.items()):
        x = (X[f.keep].float() @ u).numpy()
        x = (x - x.mean()) / (x.std() or 1.0)
        for j, (sel, lab, col) in enumerate(((g, f"caught by {plots.short(f.cap.tokens[q])}", 3),
                                             (~g, "caught by BOS", 0))):
            ax.scatter(x[sel], np.full(sel.sum(), i) + (0.12 if j else -0.12)
                       + np.random.default_rng(i).uniform(-0.05, 0.05, sel.sum()),
                       s=9, color=plots.PALETTE[col], alpha=0.7, label=lab if i == 0 else None)
    ax.set_yticks(range(len(where)), list(where))
    ax.set_xlabel("projection on $W_O$(tag of the mid sink $-$ tag of BOS), standardised")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def two_heads(f):
    tok, p, o = f.cap.tokens, f.search.main, f.search.other
    fig = plt.figure(figsize=(11, 5.6))
    gs = fig.add_gridspec(1, 2, wspace=0.25)
    for spec, A, a, pk in ((gs[0], f.cap.A, f.alpha, p), (gs[1], f.cap.A_other, f.alpha_other, o)):
        plots.attention_map(A, tok, a, pk.sinks, eps=f.eps, fig=fig, spec=spec,
                            title=f"L{pk.layer}H{pk.head}: sinks "
                                  + ", ".join(f"{plots.short(tok[t])}@{t}" for t in pk.sinks))
    return fig


def mechanism(f):
    """One figure for the front page: the head's attention and its outputs clustered by sink."""
    tok, c, p = f.cap.tokens, f.cap, f.search.main
    fig = plt.figure(figsize=(11, 4.6))
    gs = fig.add_gridspec(1, 2, width_ratios=[1, 1.1], wspace=0.3)
    plots.attention_map(c.A, tok, f.alpha, f.shown, eps=f.eps, fig=fig, spec=gs[0],
                        title=f"catch: {f.model} L{p.layer}H{p.head}")
    ax = fig.add_subplot(gs[1])
    Y, pc = plots.pca2(c.out[f.keep])
    names = {t: f"caught by {plots.short(tok[t])} ({t})" for t in f.shown}
    plots.scatter(ax, Y, f.labels, names, title="tag: the head's outputs, PCA, by sink")
    plots.arrows(ax, pc, {f"tag {plots.short(tok[t])}": c.V[t] for t in f.shown})
    return fig
