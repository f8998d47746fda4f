"""What the release chapter's page shows: its three figures (every model in one figure, so the
page can number and caption it), its tables (at most 8 columns; headers in words) and its
sentences. Nothing here judges: the verdicts come from ``release.verdicts``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ... import plots, rules
from ... import verdicts as V

TITLES = {"mean_bos": "mean-ablate first-token tags", "zero_bos": "remove first-token tags",
          "zero_mid": "remove mid-prompt tags", "mean_mid": "mean-ablate mid-prompt tags"}
SWAPS = {"head_sink": "head: sinks", "head_ctrl": "head: non-sink control",
         "layer_sink": "layer: sinks", "layer_ctrl": "layer: non-sink control",
         "layer_all": "layer: every position"}
MEASURE = {"label": "fraction of the label gap moved", "answer": "fraction of the answer gap moved"}
WORDS = {V.REPRODUCED: "supported", V.NOT: "not supported"}   # beyond the paper


# --- figures --------------------------------------------------------------------------------------

def tag_share(abl: dict):
    """Per layer and model: the share of the head outputs' norm that is first-token and
    mid-prompt tag (clean pass); the ablated layers marked."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for i, (name, a) in enumerate(abl.items()):
        share = np.array(a.tag_share)
        x = np.arange(len(share)) / max(len(share) - 1, 1)
        col = plots.PALETTE[i]
        ax.plot(x, share[:, 0], marker="o", ms=3, color=col, label=f"{name}: first-token tags")
        ax.plot(x, share[:, 1], marker="s", ms=3, ls=":", color=col, label=f"{name}: mid-prompt tags")
        ax.plot(np.array(a.layers) / max(len(share) - 1, 1), share[a.layers].sum(1), ls="none",
                marker="v", ms=8, mfc="none", color=col, label=f"{name}: ablated layers")
    ax.set_xlabel("relative depth (layer / last layer)")
    ax.set_ylabel("share of head-output norm")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    return fig


def ablation(abl: dict, iv: dict):
    """Per model (rows) and condition (columns): the change in loss by layer, tags against
    the residual-space control, with 95% intervals over prompts."""
    conds = list(next(iter(abl.values())).conditions)
    fig, axes = plt.subplots(len(abl), len(conds), figsize=(3.1 * len(conds), 3.1 * len(abl)),
                             squeeze=False, sharex="row")
    for i, (name, a) in enumerate(abl.items()):
        x = np.array(a.layers)
        for j, c in enumerate(conds):
            ax = axes[i, j]
            for key, label, col in (("tag", "tags", plots.PALETTE[0]),
                                    ("ctrl", "control, same norm", "#888888")):
                p = np.array(iv[name][c][key])
                ax.errorbar(x, p[:, 0], yerr=[p[:, 0] - p[:, 1], p[:, 2] - p[:, 0]], marker="o",
                            ms=4, capsize=2, color=col, label=label)
            ax.axhline(0, color="k", lw=0.6)
            if not iv[name][c]["removed"]:
                ax.text(0.5, 0.6, "nothing removed\nat these layers", transform=ax.transAxes,
                        ha="center", fontsize=8)
            ax.set_title(f"{name}:\n{TITLES[c]}", fontsize=9)
            ax.set_xlabel("ablated layer")
            if j == 0:
                ax.set_ylabel("change in loss (nats)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def swap(swaps: dict, iv: dict):
    """Per (model, task) (columns) and measure (rows): the fraction of the gap each swap moves,
    with 95% intervals over pairs."""
    keys = list(swaps)
    fig, axes = plt.subplots(2, len(keys), figsize=(3.2 * len(keys), 7.2), squeeze=False,
                             sharey="row")
    for i, by in enumerate(MEASURE):
        for ax, key in zip(axes[i], keys):
            res = iv[key].get(by, {})
            conds = [c for c in SWAPS if c in res]
            for k, c in enumerate(conds):
                p = np.array(res[c], float)
                col = (plots.PALETTE[0] if c.endswith("sink") else
                       "#888888" if c.endswith("ctrl") else plots.PALETTE[2])
                ax.bar(k, p[0] if np.isfinite(p[0]) else 0, color=col)
                if np.isfinite(p).all():
                    ax.errorbar(k, p[0], yerr=[[p[0] - p[1]], [p[2] - p[0]]], color="k", capsize=3)
            if not conds:
                ax.text(0.5, 0.5, "no head chosen", transform=ax.transAxes, ha="center", fontsize=8)
            ax.set_xticks(range(len(conds)), [SWAPS[c] for c in conds] if i == 1 else [""] * len(conds),
                          rotation=60, ha="right", fontsize=8)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_title(f"{key[0]}, {key[1]}", fontsize=9)
        axes[i, 0].set_ylabel(MEASURE[by])
    fig.tight_layout()
    return fig


# --- tables ---------------------------------------------------------------------------------------

def _ci(p, f="{:+.4f}") -> str:
    p = np.asarray(p, float)
    return "-" if not np.isfinite(p).all() else f"{f.format(p[0])} [{f.format(p[1])}, {f.format(p[2])}]"


def _share(num, den, i) -> str:
    if num is None or den is None or not den[i] > 0:
        return "-"
    return f"{num[i] / den[i]:.2f}"


def sinks_table(abl: dict) -> pd.DataFrame:
    """Per model and ablated layer: the sinks the ablations act on."""
    return pd.DataFrame([{"model": name, "layer": l,
                          "first-token sinks per head": a.sinks[l]["bos_per_head"],
                          "mid-prompt sinks per head": a.sinks[l]["mid_per_head"],
                          "mid-prompt sinks whose mean spans 2+ prompts": a.sinks[l]["mean_over_2_prompts"]}
                         for name, a in abl.items() for l in a.layers])


def per_layer_table(abl: dict, iv: dict) -> pd.DataFrame:
    """One line per model, layer and ablation: the norm removed, the change in loss with the
    tags ablated and with the control, and their difference (95% intervals over prompts); and
    the norm of the actual change of what the attention writes into the residual stream, the
    control's over the tags' (1 where the layer adds W_O's output as it is; Gemma-3's
    post-attention norm divides by each token's RMS, which the rule's scale leaves out)."""
    rows = []
    for name, a in abl.items():
        for c in a.conditions:
            for i, l in enumerate(a.layers):
                none = (l, c) in a.skipped
                rows.append({"model": name, "layer": l, "ablation": TITLES[c],
                             "share of head-output norm removed": a.removed_share[c][i],
                             "change in loss, tags": "no such sink" if none else _ci(iv[name][c]["tag"][i]),
                             "... control": "-" if none else _ci(iv[name][c]["ctrl"][i]),
                             "tags minus control": "-" if none else _ci(iv[name][c]["diff"][i]),
                             "attention's write changed, control / tags":
                                 _share(a.actual_norm.get(f"{c}_ctrl"), a.actual_norm.get(c), i)})
    return pd.DataFrame(rows)


def swap_table(swaps: dict, iv: dict, heads: dict, pairs: dict) -> pd.DataFrame:
    """The swap's setting and no-op counts, one column per (model, task) (transposed)."""
    cols = {}
    for key, s in swaps.items():
        r, h = iv[key], heads[key]
        col = {"pairs": len(pairs[key]),
               "head": "-" if h["layer"] is None else f"L{h['layer']}H{h['head']}",
               "chosen by": h["from"], "guard (min_queries)": h["min_queries"],
               "clean accuracy": f"{r['accuracy']:.2f}",
               "label gap, logits": _ci(r["gap"], "{:.2f}")}
        for scope in ("head", "layer"):
            n = r.get("no_ops", {}).get(f"{scope}_sink")
            if n is not None:
                col[f"{scope} sinks: no-op directed pairs"] = f"{n['directed_no_op']} of {n['directed_pairs']}"
                col[f"{scope} sinks: no-op cells"] = f"{n['cells_no_op']} of {n['cells']}"
        if "head_sink" in s.mass:
            col["final token's attention on the head's sinks"] = f"{s.mass['head_sink'].mean():.2f}"
            col["... on its control tokens"] = f"{s.mass['head_ctrl'].mean():.2f}"
        cols[f"{key[0]}, {key[1]}"] = col
    return pd.DataFrame(cols)


def claims_table(rows: list[dict]) -> pd.DataFrame:
    """The verdict table: each rule's words beside its verdict (supported / not supported)."""
    out = []
    for r in rows:
        v = WORDS.get(r["verdict"], r["verdict"])
        out.append({"model": r["model"], "claim": r["claim"], "ours": r["ours"],
                    "95% CI": r["interval"],
                    "verdict": v + (f" ({r['note']})" if r.get("note") else ""),
                    "rule (RULES.md)": r["rule"]})
    return pd.DataFrame(out)


# --- sentences ------------------------------------------------------------------------------------

def fmt(p) -> str:
    """A value with its interval: "+0.012 (95% CI [+0.004, +0.020])"."""
    return f"{p[0]:+.3f} (95% CI [{p[1]:+.3f}, {p[2]:+.3f}])"


def largest(a, iv: dict, c: str):
    """The ablated layer where condition ``c`` changes the loss most: (layer, tag's (mean, lo,
    hi), control's (mean, lo, hi)) there."""
    tag = np.array(iv[c]["tag"])
    i = int(np.argmax(np.abs(tag[:, 0])))
    return a.layers[i], tag[i], np.array(iv[c]["ctrl"])[i]


def ablation_summary(abl: dict, iv: dict) -> str:
    """Per model: for each condition, the layer with the largest change and the mean over the
    ablated layers of tags minus control."""
    lines = []
    for name, a in abl.items():
        parts = []
        for c in a.conditions:
            if not iv[name][c]["removed"]:
                parts.append(f"{TITLES[c]}: nothing removed at the ablated layers")
                continue
            l, t, k = largest(a, iv[name], c)
            parts.append(f"{TITLES[c]}: largest at layer {l}, tags {fmt(t)} vs control {fmt(k)} "
                         f"nats; mean over the ablated layers of tags minus control "
                         f"{fmt(iv[name][c]['overall'])}")
        lines.append(f"**{name}** (clean loss {a.clean_loss.mean():.2f} nats). " + "; ".join(parts) + ".")
    return "\n\n".join(lines)


def swap_notes(swaps: dict, iv: dict) -> str:
    """A sentence for each (model, task, scope) whose sink swap was a no-op in every pair."""
    notes = []
    for (name, task), s in swaps.items():
        for scope, where in (("head", f"head L{s.layer}H{s.head}"), ("layer", f"layer {s.layer}")):
            n = iv[name, task].get("no_ops", {}).get(f"{scope}_sink")
            if n and n["directed_no_op"] == n["directed_pairs"]:
                notes.append(f"**{name}, {task}:** every swapped sink value of {where} is the same in "
                             "both prompts of every pair (compared value by value), so the swap "
                             "moves nothing: not testable here. Whatever "
                             "distinguishes the two final tokens' $z_{tag}$ there comes from how much "
                             "they attend to those sinks, not from the sinks' values.")
    return "\n\n".join(notes)


def rules_changed() -> str:
    """What changed in the rules of this chapter, naming the RULES.md version applied."""
    return (f"The verdicts below apply RULES.md, section \"Release, tested (beyond the paper)\", at "
            f"version {rules.commit()}. Four things changed from this chapter's first edition: "
            "(1) the control removes the same norm **in the residual stream** (after $W_O$ and, in "
            "Gemma-3, the post-attention norm's scale) along a random direction of the head's value "
            "space, drawn afresh at every token, where it used to match the norm in the head's value "
            "space; (2) for the first-token tags the primary reading is the **mean-ablation** (the "
            "information goes, the average stays), the removal is shown beside it; (3) the rule is "
            "**ordered, with a size floor** (0.01 nats; 0.05 of the gap for the swaps), so an "
            "effect whose interval lies above 0 but which is smaller than the floor is "
            "\"compatible (negligible effect)\", not \"supported\"; (4) a swap whose swapped sink "
            "values are the same in both prompts is a **no-op** and not testable here, where it "
            "used to count as \"not supported\".")


def closing(abl: dict, iv: dict, swap_iv: dict, rows: list[dict]) -> str:
    """The closing paragraph per model: decisive numbers and the verdicts."""
    out = []
    for name in abl:
        parts = [f"{TITLES[c]}: tags minus control {fmt(iv[name][c]['overall'])} nats"
                 if iv[name][c]["removed"] else f"{TITLES[c]}: nothing removed"
                 for c in abl[name].conditions]
        for (m, task), r in swap_iv.items():
            if m != name:
                continue
            for scope in ("head", "layer"):
                d = r.get("answer", {}).get(f"{scope}_diff")
                if d is not None and np.isfinite(d).all():
                    parts.append(f"{task}, {scope}: sinks minus control moved {fmt(d)} of the answer gap")
        verdicts = ", ".join(f"{r['id']}: {WORDS.get(r['verdict'], r['verdict'])}"
                             for r in rows if r["model"] == name)
        out.append(f"**{name}.** " + "; ".join(parts) + f". Verdicts: {verdicts}.")
    return "\n\n".join(out)


def run_line(m, a) -> str:
    """What the ablation run of one model printed: policy, layers, clean loss, time."""
    return (f"{m.name}: BOS policy: {m.bos_policy}\n"
            f"{m.name}: {m.n_layers} layers x {m.n_heads} heads; ablated layers {a.layers}; "
            f"clean loss {a.clean_loss.mean():.3f} nats on {a.n_positions or 'all'} positions per "
            f"prompt; first-token value spread across prompts (same token) {max(a.bos_spread):.1e}; "
            f"{a.seconds:.0f} s wall, {a.cpu:.0f} s CPU")


def swap_line(name: str, task: str, p, h: dict, s) -> str:
    """What the swap run of one model and task printed."""
    where = "no head chosen" if h["layer"] is None else f"L{h['layer']}H{h['head']}"
    return (f"{name}, {task}: {len(p)} pairs, {where} ({h['from']}: {h['seconds']:.0f} s wall, "
            f"{h['cpu_seconds']:.0f} s CPU); swaps {s.seconds:.0f} s wall, {s.cpu:.0f} s CPU")


def example_pairs(pairs: dict, name: str) -> str:
    """One cities pair and one sentiment pair of model ``name``, with where they differ."""
    p, q = pairs[name, "cities"], pairs[name, "sentiment"]
    return (f"One cities pair and one sentiment pair ({name}; the prompts differ from token "
            f"{p.differ_from[0]} and {q.differ_from[0]} of {p.lengths[0]} and {q.lengths[0]}):\n\n"
            f"```text\n{p.texts[0]}\n---\n{p.texts[1]}\n```\n\n"
            f"```text\n{q.texts[0]}\n---\n{q.texts[1]}\n```")
