"""The QK-norm chapter's figure: every model in one figure, the paper's Qwen3 rows on top."""
from __future__ import annotations

import matplotlib.pyplot as plt

from ... import plots


def comparison(det: dict, stats: dict, paper: dict):
    """Left: sinks per head (QK-norm models in red), the paper's Qwen3 values dotted. Right: the
    median per-head VE and the median of (VE - VE of a random subspace of the same dimension),
    each with its 95% interval over prompts; the paper's Qwen3 mean VE dotted."""
    names = list(det)
    colours = [plots.PALETTE[3] if det[n]["qk_norm"] else plots.PALETTE[0] for n in names]
    pq = paper["qk_norm"]["models"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar(names, [stats[n]["sinks_per_head"] for n in names], color=colours)
    for k, v in pq.items():
        axes[0].axhline(v["sinks_per_head"], ls=":", color="k", lw=0.8)
    axes[0].text(len(names) - 0.5, max(v["sinks_per_head"] for v in pq.values()),
                 " Qwen3 (paper)", fontsize=8, va="bottom", ha="right")
    axes[0].set_ylabel("sinks per head")
    axes[0].set_title("red: QK-norm, blue: none", fontsize=10)
    x = list(range(len(names)))
    med = [stats[n]["intervals"]["ve_median"] for n in names]
    br = [stats[n]["intervals"]["beats_random_median"] for n in names]
    axes[1].bar([i - 0.2 for i in x], [m[0] for m in med], width=0.4, color=colours,
                yerr=[[m[0] - m[1] for m in med], [m[2] - m[0] for m in med]], capsize=3,
                label="tags: median per-head VE")
    axes[1].bar([i + 0.2 for i in x], [b[0] for b in br], width=0.4, color="#cccccc",
                yerr=[[b[0] - b[1] for b in br], [b[2] - b[0] for b in br]], capsize=3,
                label="median of VE minus a random subspace's")
    for v in pq.values():
        axes[1].axhline(v["ve"], ls=":", color="k", lw=0.8)
    axes[1].set_xticks(x, names)
    axes[1].set_ylabel("VE")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig
