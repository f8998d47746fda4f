"""A size ladder (beyond the paper): the paper's headline numbers against model size, from the
embedded models installed here (135M, 270M and, with ``make models-extra``, 0.5B and 1.5B),
with the paper's 3B-14B values as reference points.

Per model: sinks per head and both VE averages (variance chapter), the share of heads whose
first token is a sink, and the cities truth probe under the paper's protocol (probes chapter),
each with its interval. The default models' numbers are reused from those chapters' results when
the parameters match (``reuse``); the others are computed here with the same code.
"""
from __future__ import annotations

import gc

import numpy as np

from .. import models as M
from .. import stats
from . import reuse


def parameters(name: str, device: str = "cpu", dtype: str = "float32") -> int:
    """Number of parameters of a loaded model (embeddings included, tied weights once)."""
    m = M.load(name, device=device, dtype=dtype)
    n = sum(p.numel() for p in {id(p): p for p in m.hf.parameters()}.values())
    del m
    gc.collect()
    return int(n)


def measure(name: str, results_dir, *, n_prompts: int, max_tokens: int, eps: float,
            min_queries: int, n: int, n_train: int, seed: int, n_boot: int = 1000,
            n_resplits: int = 10, n_null: int = 100, suffix: str = " Is this true? Answer:",
            device: str = "cpu", dtype: str = "float32") -> dict:
    """One model's rung of the ladder (numbers and 95% intervals; sources named). The probe
    verdict is the probes chapter's ``cities_tag_paper`` row, Holm over its whole family."""
    s, src1 = reuse.sink_stats(name, results_dir, n_prompts, max_tokens, eps, min_queries, seed,
                               device=device, dtype=dtype)
    summ, rows, src2 = reuse.probe_family(name, results_dir, n=n, n_train=n_train, eps=eps,
                                          seed=seed, suffix=suffix, n_resplits=n_resplits,
                                          n_null=n_null, device=device, dtype=dtype)
    pr = summ.get("cities", {}).get("paper", {})
    pv = next((r["verdict"] for r in rows if r["id"] == "cities_tag_paper"), "-")
    bp = s["by_prompt"]
    iv = s["intervals"]

    def boot(x):
        return stats.bootstrap(np.asarray(x), np.mean, n_boot, seed)

    n_test = pr.get("n_test", n - n_train)
    tag = pr.get("theta_tag") if pr.get("layer") is not None else None
    return {
        "model": name, "parameters": parameters(name, device, dtype),
        "sinks_per_head": (s["sinks_per_head"], *boot(bp["sinks_per_head"])),
        "ve_zero": tuple(iv["ve_zero"]), "ve_excluded": tuple(iv["ve_excluded"]),
        "bos_share": (s["share_heads_bos_sink"], *boot(bp["bos_sink"])),
        "theta_tag": (tag, *(100 * x for x in stats.wilson(round(tag * n_test / 100), n_test)))
        if tag is not None else (None, None, None),
        "theta_no_tag": pr.get("theta_no_tag") if tag is not None else None,
        "probe_verdict": pv, "sources": f"sinks/VE: {src1}; probes: {src2}"}


# Paper reference points: nominal size in billions (from the model's name) and the paper's value.
def paper_points(paper: dict) -> dict[str, list[tuple[str, float, float]]]:
    size = lambda name: float(name.replace("-", " ").split()[-1].rstrip("B"))  # noqa: E731
    sinks = [(p["base"], size(p["base"]), p["base_sinks"]) for p in paper["reasoning"]["pairs"]]
    sinks += [(p["reasoning"], size(p["reasoning"]), p["reasoning_sinks"])
              for p in paper["reasoning"]["pairs"]]
    sinks += [(k, size(k), v["sinks_per_head"]) for k, v in paper["qk_norm"]["models"].items()]
    sw = {m: next(x for x in pts if x["eps"] == 0.2) for m, pts in paper["eps_sweep"]["models"].items()}
    sinks += [(f"{m} (threshold table)", size(m), x["sinks"]) for m, x in sw.items()]
    ve = [(m, size(m), x["ve"]) for m, x in sw.items()]
    ve += [(k, size(k), v["ve"]) for k, v in paper["qk_norm"]["models"].items()]
    tag = [(k, size(k), v[0]) for k, v in paper["truth_probes"]["models"].items()]
    tag += [(k, size(k), v["truth_probes"][0]) for k, v in paper["qk_norm"]["models"].items()]
    return {"sinks_per_head": sinks, "ve": ve, "theta_tag": tag}


def figure(rungs: list[dict], paper: dict):
    import matplotlib.pyplot as plt

    from .. import plots

    pts = paper_points(paper)
    x = np.array([r["parameters"] / 1e9 for r in rungs])
    every_x = list(x) + [p[1] for v in pts.values() for p in v]
    xlim = (min(every_x) / 1.6, max(every_x) * 1.6)     # one x-axis for all four panels
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    axes = axes.ravel()
    panels = [("sinks per head", "sinks_per_head", "sinks_per_head"),
              ("mean VE (paper-like)", "ve_zero", "ve"),
              ("cities theta_tag %, paper's protocol", "theta_tag", "theta_tag"),
              ("share of heads with a sink at token 0", "bos_share", None)]
    for ax, (title, key, pkey) in zip(axes, panels):
        y = np.array([np.nan if r[key][0] is None else r[key][0] for r in rungs], float)
        lo = np.array([np.nan if r[key][1] is None else r[key][1] for r in rungs], float)
        hi = np.array([np.nan if r[key][2] is None else r[key][2] for r in rungs], float)
        ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o-", color=plots.PALETTE[0], capsize=3,
                    label="ours (95% CI)")
        if key == "ve_zero":
            ax.plot(x, [r["ve_excluded"][0] for r in rungs], "s:", color=plots.PALETTE[0],
                    alpha=0.6, label="ours, heads with sinks")
        for r, xi, yi in zip(rungs, x, y):
            ax.annotate(r["model"], (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if pkey:
            ax.scatter([p[1] for p in pts[pkey]], [p[2] for p in pts[pkey]], marker="s",
                       color="#999999", label="the paper's models")
        ax.set_xscale("log")
        ax.set_xlim(*xlim)
        ax.set_xlabel("parameters (billions)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _fmt(t, f="{:.2f}") -> str:
    return "-" if t[0] is None else f"{f.format(t[0])} [{f.format(t[1])}, {f.format(t[2])}]"


def table(rungs: list[dict]):
    """The ladder as a table: one row per model, each number with its 95% interval."""
    import pandas as pd

    return pd.DataFrame([{
        "model": r["model"], "parameters (M)": round(r["parameters"] / 1e6),
        "sinks per head": _fmt(r["sinks_per_head"]), "VE, paper-like": _fmt(r["ve_zero"]),
        "VE, heads with sinks": _fmt(r["ve_excluded"]),
        "first token is a sink (share of heads)": _fmt(r["bos_share"]),
        "cities theta_tag %": _fmt(r["theta_tag"], "{:.1f}"),
        "theta_no_tag %": "-" if r["theta_no_tag"] is None else f"{r['theta_no_tag']:.1f}",
        "probes verdict (cities_tag_paper)": r["probe_verdict"]} for r in rungs])
