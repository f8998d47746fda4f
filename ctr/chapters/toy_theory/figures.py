"""The toy-theory chapter's figures (every function draws; nothing here computes a result).
``figure_runs`` serves the multi-head chapter too."""
from __future__ import annotations

import numpy as np
import torch

from .. import toy_theory as toy
from ..toy_model import Task, Toys


# --- toy theory -----------------------------------------------------------------------------------

LEGEND = ("blue: numbers before [SEP]; red: numbers after [SEP]; black: [SEP]; dashed: uniform "
          "weight over the numbers after [SEP]")


def example(task: Task) -> int:
    """A sequence to draw: the first with [SEP] between a quarter and half of the way in."""
    T = task.x.shape[1]
    return int(((task.sep >= T // 4) & (task.sep <= T // 2)).float().argmax())


def draw_mechanism(fig, spec, model: Toys, ex: Task, title: str = "", run: int = 0):
    """Three stacked panels for one sequence and one run: layer-1 attention (catch), the tag
    coordinate tau of every token (tag), the last token's layer-2 attention (release)."""
    p, T = int(ex.sep[0]), ex.x.shape[1]
    with torch.no_grad():
        _, tr = model(ex.x, ex.kind, trace=True)
    after, before = torch.arange(T) > p, torch.arange(T) < p
    o1 = tr["o1_heads"][run].sum(0)[0].float()                             # (T, D)
    theta = o1[after].mean(0) - o1[before].mean(0)
    tau = (o1 @ (theta / theta.norm().clamp_min(1e-12))).numpy()
    colors = np.where(after.numpy(), "#C44E52", "#4C72B0").astype(object)
    colors[p] = "#222222"
    gs = spec.subgridspec(3, 1, height_ratios=[1.5, 1, 1], hspace=0.55)
    a1 = fig.add_subplot(gs[0])
    a1.imshow(tr["A1"][run, 0, 0].float().numpy(), cmap="magma", vmin=0, vmax=1)
    a1.set_title(f"{title}\nlayer 1: attention" if title else "layer 1: attention", fontsize=10)
    a1.set_xticks([p], ["[SEP]"], fontsize=9)
    a1.set_yticks([p], ["[SEP]"], fontsize=9)
    a2 = fig.add_subplot(gs[1])
    a2.bar(np.arange(T), tau, color=colors)
    a2.axhline(0, color="k", lw=0.5)
    a2.set_title("tag tau per token", fontsize=10)
    a2.set_xticks([])
    a3 = fig.add_subplot(gs[2])
    a3.bar(np.arange(T), tr["A2"][run, 0, 0, -1].float().numpy(), color=colors)
    a3.axhline(1 / (T - 1 - p), color="k", lw=0.8, ls="--")
    a3.set_ylim(0, 1)
    a3.set_title("layer 2: last token", fontsize=10)
    a3.set_xticks([p], ["[SEP]"], fontsize=9)
    return a1, a2, a3


def figure_construction(s_grid, errors: dict, task: Task, s_shown=(3.0, 20.0)):
    """Left: each construction's largest error against s_tag (errors: {label: sweep rows}).
    Right: the width-2 construction's mechanism on one sequence at two values of s_tag."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10.5, 5.6))
    gs = fig.add_gridspec(1, 1 + len(s_shown), width_ratios=[1.7] + [1] * len(s_shown),
                          wspace=0.35)
    ax = fig.add_subplot(gs[0])
    for (label, rows), mk in zip(errors.items(), "os^"):
        ax.semilogy(s_grid, [r["max_abs_error"] for r in rows], mk + "-", label=label)
    ax.axhline(1e-4, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="s_tag", ylabel="largest |ŷ − y|, held-out sequences",
           title="constructions: error vs s_tag")
    ax.legend(fontsize=8)
    i0 = example(task)
    for i, s in enumerate(s_shown):
        draw_mechanism(fig, gs[1 + i], toy.construction("width2", s), task[i0:i0 + 1],
                       f"width 2, s_tag = {s:g}")
    fig.text(0.5, -0.02, LEGEND, ha="center", fontsize=9)
    return fig


def figure_emergence(trained: dict, i: int, task: Task, epochs_shown):
    """Top: losses and the three measurements per epoch of run i. Below, one column per shown
    epoch: the mechanism on one held-out sequence."""
    import matplotlib.pyplot as plt

    run, curves = trained["runs"][i], toy.emergence_curves(trained, i, task)
    fig = plt.figure(figsize=(10, 10))
    gs = fig.add_gridspec(2, len(epochs_shown), height_ratios=[1, 2.6], hspace=0.3, wspace=0.35)
    top = gs[0, :].subgridspec(1, 2, wspace=0.25)
    ax = fig.add_subplot(top[0])
    ep = np.arange(1, len(run["loss"]) + 1)
    ax.semilogy(ep, run["loss"], label="train")
    ax.semilogy(ep, run["test_loss"], label="held-out")
    ax.set(xlabel="epoch", ylabel="MSE", title="loss")
    ax.legend(fontsize=9)
    ax2 = fig.add_subplot(top[1])
    e0 = np.arange(len(curves["alpha_sep"]))
    ax2.plot(e0, curves["alpha_sep"], label="catch: alpha of [SEP]")
    ax2.plot(e0, curves["tag_separated"], label="tag: share separated")
    ax2.plot(e0, 1 - curves["tv_layer2"], label="release: 1 - TV")
    ax2.set(xlabel="epoch", ylim=(-0.05, 1.05), title="mechanism (held-out)")
    ax2.legend(fontsize=8, loc="lower right")
    for e in epochs_shown:
        for a in (ax, ax2):
            a.axvline(e, color="grey", lw=0.6, ls=":")
    i0 = example(task)
    epochs = toy.replay(trained, i)
    for c, e in enumerate(epochs_shown):
        draw_mechanism(fig, gs[1, c], epochs, task[i0:i0 + 1], f"epoch {e}", run=e)
    fig.text(0.5, 0.06, LEGEND, ha="center", fontsize=9)
    return fig


def figure_runs(groups: dict, column: str = "R2", flag: str = "mechanism", r2_min=0.9,
                reference=None, ylabel=None, labels=None):
    """One marker per run, one column per group (DataFrames with `column` and `flag`); filled:
    runs whose `flag` is true. column "R2" is drawn as held-out 1 - R^2 (= MSE / variance of y,
    log scale, lower is better) with the success line; reference: {label: value} drawn as
    dotted lines (e.g. a construction's 1 - R^2); labels: the legend's (flag, no flag)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.4 + 1.55 * len(groups), 3.8))
    rng = np.random.default_rng(0)                      # horizontal jitter only
    for i, (name, g) in enumerate(groups.items()):
        y = g[column].to_numpy(float)
        if column == "R2":
            y = np.clip(np.nan_to_num(1 - y, nan=10.0), 1e-10, 10.0)
        x = i + rng.uniform(-0.15, 0.15, len(y))
        on = g[flag].to_numpy(bool)
        yes, no = labels or (flag, f"no {flag}")
        ax.scatter(x[on], y[on], color="#C44E52", s=36, label=yes if i == 0 else None)
        ax.scatter(x[~on], y[~on], facecolor="none", edgecolor="#4C72B0", s=36,
                   label=no if i == 0 else None)
    if column == "R2":
        ax.set_yscale("log")
        ax.axhline(1 - r2_min, color="k", lw=0.8, ls="--")
        ax.text(-0.45, 1 - r2_min, f"success: R² > {r2_min}", va="bottom", ha="left", fontsize=8)
    for label, v in (reference or {}).items():
        ax.axhline(v, color="grey", lw=0.8, ls=":")
        ax.text(-0.45, v, label, va="bottom", ha="left", fontsize=8, color="grey")
    ax.set_xticks(range(len(groups)), list(groups), fontsize=9)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylabel(ylabel or ("held-out 1 − R²  (lower is better)" if column == "R2" else column))
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def figure_sensitivity(rows: list[dict], paper: dict, inits=(1.0, 6.0, 10.0)):
    """Success rate against the initial s_tag, one line per training setting (rows from
    toy_theory.verdicts.sensitivity), the paper's counts on top (paper: {init: (k, n)})."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    styles = {"batch": "-", "weight": "--", "length": ":"}
    for r in rows:
        rate = [r["counts"][s][0] / r["counts"][s][1] if r["counts"][s][1] else np.nan
                for s in inits]
        default = r["setting"] == "default"
        ls = next((v for k, v in styles.items() if r["setting"].startswith(k)), "-")
        ax.plot(inits, rate, ls, marker="o", ms=4, lw=2.6 if default else 1.3,
                color="#C44E52" if default else None, zorder=3 if default else 2,
                label=r["setting"] + (" (trend rises)" if r["rises"] else ""))
    ax.plot(inits, [paper[s][0] / paper[s][1] for s in inits], "k*", ms=13, zorder=4,
            label="the paper")
    ax.set(xlabel="s_tag initial value", ylabel="success rate (held-out R² > 0.9)",
           xticks=list(inits), ylim=(-0.03, 1.03))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
