"""The multi-head toy chapter's figures (every function draws; nothing here computes a result)."""
from __future__ import annotations

import numpy as np
import torch

from . import toy_multihead as mh
from .toy_model import Task, Toys


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
