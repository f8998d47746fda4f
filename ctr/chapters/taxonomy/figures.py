"""The reasoning-taxonomy chapter's figure: every model in one figure, so the chapter can number
and caption it."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from ... import plots
from .verdicts import KINDS, kinds

COLOURS = dict(zip(KINDS, (plots.PALETTE[0], plots.PALETTE[7], plots.PALETTE[2],
                           plots.PALETTE[5], plots.PALETTE[3])))


def kinds_bars(runs: dict):
    """Kinds of sink tokens per model: over all sink instances (left) and over the instances
    that are not the first token (right). ``runs`` = {model: taxonomy.Result}."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 1.2 + 0.5 * len(runs)), sharey=True,
                             layout="constrained")
    for ax, first, title in zip(axes, (True, False),
                                ("all sink instances", "instances beyond the first token")):
        k = (pd.DataFrame({name: kinds(r, first=first) for name, r in runs.items()})
             .reindex(list(KINDS)).fillna(0.0))
        k.T.plot.barh(stacked=True, ax=ax, color=[COLOURS[c] for c in KINDS], legend=False)
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, ncol=len(KINDS),
               loc="outside upper center", frameon=False)
    return fig
