"""Benchmark against the peer a reader will know: TransformerLens (4.x, ``TransformerBridge``).

    make bench-peers          # builds .venv-peers (transformer-lens 4.3.0), then runs this
    python -m ctr.bench_peers [--model smollm2-135m] [--cases 8x150 1x1024] [--repeats 3]

Each case is B prompts of T tokens (IMDB reviews truncated to T, all of length T). Four methods
on the same batch, interleaved in one process after a warm-up round (as ``ctr.bench``):

- ``forward``: the bare transformers eager forward, ``model.hf(input_ids, attention_mask)``;
- ``ctr``: ``ctr.analysis.heads`` (nnsight extraction, streamed layer by layer, sinks, tags, VE
  and the random-subspace baseline of every head);
- ``tl-filtered``: ``bridge.run_with_cache(ids, names_filter=<hook_pattern, hook_v>)``, then the
  same sinks/VE computation as ctr on what it cached (head outputs O = A V);
- ``tl-full``: ``run_with_cache`` unfiltered (every hook), then the same computation.

ctr's model and TransformerLens' are separate copies of the same weights (the bridge wraps the
model it loads), so neither method runs through the other's hooks.

TransformerLens boots from the converted local model (``TransformerBridge.boot_transformers`` on
``~/.cache/ctr/models/<model>``, offline), eager attention, float32. Before timing, the two are
checked to give identical sink sets and VE (and random baselines) for every (prompt, layer, head).
Times: medians of wall and of process CPU time (less sensitive to other processes than wall
time) and their ratios to ctr. Memory: one fresh process per (method, case) that loads only what
the method needs: "peak" is the process's high-water mark (VmHWM: loading and a first run),
"extra" the peak of a second run minus the resident set just before it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

from .bench import _case   # the same "BxT" argument as ctr.bench (psutil is in both environments)

METHODS = ("forward", "ctr", "tl-filtered", "tl-full")


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def summary_from_cache(cache, windows, n_heads: int, eps: float = 0.2, min_queries: int = 1,
                       seed: int = 0) -> dict:
    """ctr's per-head computation on a TransformerLens-style cache ({"blocks.l.attn.hook_pattern":
    (B, H, T, T), "blocks.l.attn.hook_v": (B, T, KV, D)}), one (prompt, layer) at a time with
    ctr's generators: {(prompt, layer): layer_summary output}."""
    import torch

    from . import analysis
    from . import definitions as D

    out = {}
    for layer, window in enumerate(windows):
        A = cache[f"blocks.{layer}.attn.hook_pattern"]
        v = cache[f"blocks.{layer}.attn.hook_v"]                             # (B, T, KV, D)
        V = v.repeat_interleave(n_heads // v.shape[2], dim=2).transpose(1, 2)  # (B, H, T, D)
        O = A @ V                                                           # head outputs
        a = D.alpha(A, window, min_queries)
        for b in range(A.shape[0]):
            g = torch.Generator().manual_seed((seed * 65536 + b) * 65536 + layer)
            out[b, layer] = analysis.layer_summary(None, V[b].float(), O[b].float(), window, eps,
                                                   min_queries, g, alpha=a[b])
    return out


def compare(df, summ) -> dict:
    """Sink sets and VE of ``analysis.heads`` rows against ``summary_from_cache``."""
    import math

    same, dve, drnd = 0, 0.0, 0.0
    for r in df.itertuples():
        s = summ[r.prompt, r.layer]
        pos = [int(t) for t in s["S"][r.head].nonzero().flatten()]
        same += pos == list(r.sink_positions)
        for x, y, acc in ((r.ve, float(s["ve"][r.head]), "ve"),
                          (r.ve_random, float(s["ve_random"][r.head]), "rnd")):
            if not (math.isnan(x) and math.isnan(y)):
                d = abs(x - y) if not (math.isnan(x) or math.isnan(y)) else math.inf
                if acc == "ve":
                    dve = max(dve, d)
                else:
                    drnd = max(drnd, d)
    return {"heads": len(df), "same_sinks": same, "max_ve_diff": dve, "max_random_diff": drnd}


def _texts(B: int, T: int) -> list[str]:
    from . import data
    return data.long_texts(B, min_words=2 * T, seed=0)


def _setup(model_name: str, methods, B: int, T: int):
    """The methods' callables on one batch. TransformerLens-only processes load no ctr model:
    the tokens come from the tokenizer (ctr's BOS policy) and the windows from the config."""
    import torch
    from transformers import AutoConfig

    from . import analysis, arch, models

    torch.set_grad_enabled(False)
    path = str(models.embedded_dir(model_name))
    texts = _texts(B, T)
    if {"forward", "ctr"} & set(methods):
        m = models.load(model_name)
    else:                                      # the tokenizer alone, wrapped without weights
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        m = models.Model(model_name, type("Bare", (), {"config": AutoConfig.from_pretrained(
            path)})(), tok, None, models.tokenizer_adds_bos(tok))
    batch = m.encode(texts, max_tokens=T)
    if batch.lengths != [T] * B:
        raise SystemExit(f"case {B}x{T}: prompts of {batch.lengths} tokens, not all {T}")
    windows, H = arch.windows(m.config), arch.n_heads(m.config)
    bridge = None
    if any(x.startswith("tl") for x in methods):
        from transformer_lens.model_bridge import TransformerBridge
        bridge = TransformerBridge.boot_transformers(path, device="cpu", dtype=torch.float32)
    keep = lambda n: n.endswith("attn.hook_pattern") or n.endswith("attn.hook_v")   # noqa: E731

    def tl(filtered: bool):
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(batch.input_ids,
                                             names_filter=keep if filtered else None)
        return summary_from_cache(cache, windows, H)

    def forward():
        with torch.inference_mode():
            m.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    fns = {"forward": forward,
           "ctr": lambda: analysis.heads(m, texts, max_tokens=T, batch_size=B, progress=False),
           "tl-filtered": lambda: tl(True), "tl-full": lambda: tl(False)}
    return m, {k: fns[k] for k in methods}


def _one(model_name: str, method: str, B: int, T: int) -> dict:
    """Fresh process: load, run once (the process's peak, VmHWM, includes loading and the first
    run), then reset the high-water mark and run again: ``extra`` is that run's peak minus the
    resident set before it (steady state, after any lazy set-up of the first run)."""
    import gc

    _, fns = _setup(model_name, [method], B, T)
    fns[method]()
    gc.collect()
    peak = _status("VmHWM")
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # reset the high-water mark
    fns[method]()
    return {"peak": max(peak, _status("VmHWM")), "extra": _status("VmHWM") - before}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cases", type=_case, nargs="+", default=[(8, 150), (1, 1024)])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=2, metavar=("METHOD", "BxT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        B, T = _case(args.one[1])
        print(json.dumps(_one(args.model, args.one[0], B, T)))
        return 0
    from .bench import timed

    print(f"model {args.model}; transformer-lens {_version('transformer-lens')}, transformers "
          f"{_version('transformers')}, torch {_version('torch')}; load average "
          f"{os.getloadavg()[0]:.1f}; repeats {args.repeats} (+1 warm-up)")
    runs = {}
    for B, T in args.cases:
        m, fns = _setup(args.model, METHODS, B, T)
        df = fns["ctr"]()
        for filtered in ("tl-filtered", "tl-full"):
            c = compare(df, fns[filtered]())
            print(f"{B}x{T} {filtered}: identical sinks in {c['same_sinks']}/{c['heads']} heads; "
                  f"max |VE diff| {c['max_ve_diff']:.1e}; random baseline {c['max_random_diff']:.1e}")
            if c["same_sinks"] != c["heads"] or c["max_ve_diff"] > 1e-5:
                raise SystemExit("ctr and TransformerLens disagree: not timing")
        runs[B, T] = fns
    res = {(c, k): [] for c in runs for k in METHODS}
    for i in range(args.repeats + 1):
        for c, fns in runs.items():
            for k, fn in fns.items():
                dt = timed(fn)
                if i:
                    res[c, k].append(dt)
    load_after = os.getloadavg()[0]
    mem = {}
    for c in runs:
        for k in METHODS:
            out = subprocess.run([sys.executable, "-m", "ctr.bench_peers", "--model", args.model,
                                  "--one", k, f"{c[0]}x{c[1]}"], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            mem[c, k] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"load average after: {load_after:.1f}\n")
    print(table(runs, res, mem))
    return 0


def _version(dist: str) -> str:
    import importlib.metadata as md
    return md.version(dist)


def table(runs, res, mem) -> str:
    mb = 1 / 2 ** 20
    lines = ["| B x T | method | wall s | CPU s | wall / ctr | CPU / ctr | peak RSS MB "
             "| extra MB |", "|---|---|---|---|---|---|---|---|"]
    for c in runs:
        w = {k: statistics.median(x[0] for x in res[c, k]) for k in METHODS}
        cpu = {k: statistics.median(x[1] for x in res[c, k]) for k in METHODS}
        for k in METHODS:
            pk, extra = mem[c, k]["peak"], mem[c, k]["extra"]
            lines.append(f"| {c[0]} x {c[1]} | {k} | {w[k]:.2f} | {cpu[k]:.2f} "
                         f"| {w[k] / w['ctr']:.2f} | {cpu[k] / cpu['ctr']:.2f} | {pk * mb:.0f} "
                         f"| {extra * mb:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
