"""The multi-head toy chapter's figures (every function draws; nothing here computes a result)."""
from __future__ import annotations

import numpy as np
import torch

from .. import toy_multihead as mh
from ..toy_model import Task, Toys


def example(task: Task) -> int:
    """A sequence to draw: the first with at least three numbers in each of the three segments."""
    s = mh.segments(task)
    ok = (s["before"].sum(1) >= 3) & (s["between"].sum(1) >= 3) & (s["after2"].sum(1) >= 3)
    return int(ok.float().argmax())


def figure_heads(m: Toys, task: Task, example: int = 0, role: dict | None = None,
                 function: dict | None = None, run: int = 0):
    """Layer-1 attention maps and layer-2 last-token attention, per head, on one sequence."""
    import matplotlib.pyplot as plt

    ex = task[example:example + 1]
    with torch.no_grad():
        _, tr = m(ex.x, ex.kind, trace=True)
    s = mh.segments(ex)
    p1, p2, T = int(s["p1"][0]), int(s["p2"][0]), ex.x.shape[1]
    colors = np.array(["#8C8C8C"] * T, dtype=object)
    colors[s["between"][0].numpy()] = "#DD8452"
    colors[s["after2"][0].numpy()] = "#C44E52"
    colors[[p1, p2]] = "#222222"
    fig, axes = plt.subplots(2, m.heads, figsize=(4.6 * m.heads, 8.4), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.4], "hspace": 0.45})
    for h in range(m.heads):
        for row, layer in ((0, "layer1"), (1, "layer2")):
            ax = axes[row, h]
            if row == 0:
                ax.imshow(tr["A1"][run, h, 0].float().numpy(), cmap="magma", vmin=0, vmax=1)
                ax.set_yticks([p1, p2], ["[SEP]", "[SEP2]"], fontsize=8)
            else:
                ax.bar(np.arange(T), tr["A2"][run, h, 0, -1].float().numpy(), color=colors)
                ax.set_ylim(0, 1)
            ax.set_xticks([p1, p2], ["[SEP]", "[SEP2]"], fontsize=8)
            title = f"{layer.replace('layer', 'layer ')}, head {h}" + (
                "" if row == 0 else ": last token")
            if role:
                title += f"\n{role[layer][h]['role']}"
            if function:
                title += f"\ncarries {function[layer][h]['carries']}"
            ax.set_title(title, fontsize=9)
    fig.text(0.5, 0.01, "layer 2 bars: grey before [SEP], orange between the separators, red after "
             "[SEP2], black separators", ha="center", fontsize=8)
    return fig


def figure_r2(runs: list[dict], threshold: float, r2_short: float, reference: float | None = None):
    """Every run's final held-out 1 - R^2 (log scale; filled: low loss) and the best reached
    during training (small black ticks), one column per (initial s_tag, head count); dashed:
    the low-loss threshold, dotted: the one-component shortcut and the construction."""
    import matplotlib.pyplot as plt

    groups = sorted({(r["s_tag_init"], r["heads"]) for r in runs}, key=lambda g: (-g[0], -g[1]))
    fig, ax = plt.subplots(figsize=(2.6 + 1.5 * len(groups), 4.0))
    rng = np.random.default_rng(0)                      # horizontal jitter only
    clip = lambda v: np.clip(np.nan_to_num(1 - np.asarray(v, float), nan=10.0), 1e-8, 10.0)  # noqa
    for i, (s, h) in enumerate(groups):
        g = [r for r in runs if r["s_tag_init"] == s and r["heads"] == h]
        x = i + rng.uniform(-0.18, 0.18, len(g))
        y, best = clip([r["r2"] for r in g]), clip([r["best_val_r2"] for r in g])
        low = np.array([bool(r["low_loss"]) for r in g])
        ax.scatter(x[low], y[low], color="#C44E52", s=36, zorder=3,
                   label="final, low loss" if i == 0 else None)
        ax.scatter(x[~low], y[~low], facecolor="none", edgecolor="#4C72B0", s=36, zorder=3,
                   label="final" if i == 0 else None)
        ax.scatter(x, best, marker="_", color="k", s=60, zorder=4,
                   label="best reached" if i == 0 else None)
    lines = [(1 - threshold, "--", f"low loss: R² > {threshold:.4f}"),
             (1 - r2_short, ":", f"one-component shortcut: R² = {r2_short:.3f}")]
    if reference is not None:
        lines.append((1 - reference, ":", "two-head construction, s_tag = 10"))
    for (v, ls, text), c in zip(lines, ("k", "grey", "#55A868")):
        ax.axhline(max(v, 1e-8), color=c, lw=0.9, ls=ls, label=text)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [f"s_tag {s:g}\n{h} head{'s' if h > 1 else ''}"
                                       for s, h in groups], fontsize=9)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylabel("held-out 1 − R²  (lower is better)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
