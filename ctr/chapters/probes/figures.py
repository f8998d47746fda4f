"""The semantic-probes chapter's figure: every model in one figure, so the chapter can number
and caption it."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ... import plots
from .tables import TASKS, protocol_name
from .verdicts import head_name


def heads(runs: dict, guard: int):
    """Training accuracy of θ_tag against θ_no_tag for every head: rows = tasks, columns =
    (model, protocol); the rule's head is starred. Heads above the diagonal carry more in their
    tag. ``runs`` = {model: {task: TaskResult}}."""
    cols = [(name, g) for name in runs for g in (1, guard)]
    tasks = list(next(iter(runs.values())))
    fig, axes = plt.subplots(len(tasks), len(cols), figsize=(2.9 * len(cols), 2.9 * len(tasks)),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    sc = None
    for j, (name, g) in enumerate(cols):
        for i, task in enumerate(tasks):
            ax, p = axes[i, j], runs[name][task].by_guard[g]
            L, H = p.train["tag"].shape
            sc = ax.scatter(100 * p.train["no_tag"].ravel(), 100 * p.train["tag"].ravel(),
                            c=np.repeat(np.arange(L) / max(L - 1, 1), H), cmap="viridis",
                            vmin=0, vmax=1, s=9, alpha=0.8, edgecolors="none")
            if p.head is not None:
                l, h = p.head
                ax.scatter([100 * p.train["no_tag"][l, h]], [100 * p.train["tag"][l, h]],
                           marker="*", s=160, color=plots.PALETTE[3], edgecolors="k",
                           linewidths=0.6, zorder=3, label=head_name(l, h))
                ax.legend(fontsize=7, loc="lower right", frameon=False)
            else:
                ax.text(0.97, 0.03, "no head\nsatisfies the rule", transform=ax.transAxes,
                        ha="right", fontsize=7)
            ax.plot([30, 100], [30, 100], color="k", lw=0.7, ls="--")
            ax.set(xlim=(30, 100), ylim=(30, 100), aspect="equal")
            if i == 0:
                prot = protocol_name("paper" if g == 1 else "guard", guard)
                ax.set_title(f"{name}\n{prot}", fontsize=8)
            if i == len(tasks) - 1:
                ax.set_xlabel("training θ_no_tag (%)", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{TASKS[task]}\ntraining θ_tag (%)", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.colorbar(sc, ax=axes, shrink=0.4, label="layer (first to last)")
    return fig
