"""Figures shared by the chapters (matplotlib; static PNGs in the book)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import PowerNorm

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def short(tok: str, n: int = 10) -> str:
    tok = tok.replace("\n", "\\n")
    return repr(tok[:n])[1:-1] if tok.strip() else repr(tok)


def attention_map(A: torch.Tensor, tokens: list[str], alpha: torch.Tensor | None = None,
                  sinks: list[int] = (), title: str = "", eps: float | None = None, fig=None,
                  spec=None):
    """A head's attention (rows = queries) with its sink scores as a bar strip on top."""
    A = A.float().numpy()
    T = A.shape[0]
    fig = fig or plt.figure(figsize=(5.2, 5.6))
    gs = (spec.subgridspec(2, 1, height_ratios=[1, 4], hspace=0.05) if spec is not None
          else fig.add_gridspec(2, 1, height_ratios=[1, 4], hspace=0.05))
    ax_a, ax = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    ax.imshow(A, cmap="magma", norm=PowerNorm(0.4, vmin=0, vmax=1), aspect="auto",
              interpolation="nearest")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ticks = sorted(set(sinks))
    ax.set_xticks(ticks, [f"{t}\n{short(tokens[t])}" for t in ticks], fontsize=7)
    if alpha is not None:
        a = np.nan_to_num(alpha.float().numpy(), nan=0.0)
        colors = ["#C44E52" if t in sinks else "#8C8C8C" for t in range(T)]
        ax_a.bar(np.arange(T), a, color=colors, width=1.0)
        if eps is not None:
            ax_a.axhline(eps, color="k", lw=0.8, ls="--")
            ax_a.text(T - 1, eps, f"eps={eps}", ha="right", va="bottom", fontsize=7)
        for t in sinks:
            ax_a.text(t, a[t], f"{a[t]:.2f}", ha="center", va="bottom", fontsize=7, color="#C44E52")
        ax_a.set_xlim(-0.5, T - 0.5)
        ax_a.set_ylim(0, max(1.0, a.max() * 1.25))
        ax_a.set_xticks([])
        ax_a.set_ylabel("alpha", fontsize=8)
    ax_a.set_title(title, fontsize=9)
    return fig


def pca2(X: torch.Tensor):
    from sklearn.decomposition import PCA

    p = PCA(n_components=2, random_state=0)
    return p.fit_transform(X.float().numpy()), p


def scatter(ax, Y: np.ndarray, labels: np.ndarray, names: dict, title: str = ""):
    for i, (lab, name) in enumerate(names.items()):
        m = labels == lab
        ax.scatter(Y[m, 0], Y[m, 1], s=22, color=PALETTE[i % len(PALETTE)], label=name,
                   alpha=0.85, edgecolors="none")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8, loc="best", frameon=False)


def arrows(ax, pca, vectors: dict):
    """Draw directions (e.g. tags) in a PCA plane from the data mean, scaled to stay inside the
    axes (only their direction in the plane is meaningful)."""
    d = {k: pca.components_ @ v.float().numpy() for k, v in vectors.items()}
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    o = np.array([0.0, 0.0])          # PCA centres the data: the mean is the origin
    room = 0.8 * min(x1 - 0, 0 - x0, y1 - 0, 0 - y0)
    longest = max(max(float(np.linalg.norm(v)) for v in d.values()), 1e-12)
    for i, (name, v) in enumerate(d.items()):
        tip = o + v / longest * room
        c = PALETTE[i % len(PALETTE)]
        ax.annotate("", xy=tip, xytext=o, arrowprops=dict(arrowstyle="->", color=c, lw=2))
        ax.text(*(tip * 1.05), name, fontsize=8, color=c, clip_on=True)
