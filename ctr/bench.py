"""Benchmark: the full per-head analysis against a bare transformers eager forward, in one run.

    python -m ctr.bench [--model smollm2-135m] [--lengths 150 1024] [--repeats 3]

For each length T, the same natural text (IMDB reviews, truncated to T tokens) goes through
(a) ``model.hf(input_ids)`` with eager attention, nothing else, (a') the decoder alone without
the LM head (``model.hf.model``), and (b) ``analysis.heads``: nnsight extraction + alpha + sinks
+ tags + VE + random baseline for every head. ctr stops after the last layer (it never needs
logits), so (a') is the like-for-like baseline and (a) the one a user would time. Runs alternate
(a, a', b, ...) after one warm-up of each; the table gives medians and the ratios b / a, b / a'.
Timed runs have no memory sampler (its thread would compete for the GIL); one more run of each
measures peak memory: the process's peak resident set, sampled every 2 ms, and "extra", that
peak minus the resident set just before the run (the model's weights are shared by both).
Machines are noisy: read the ratios, which come from runs interleaved in one process.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time

import psutil


class PeakRSS:
    def __init__(self, interval: float = 0.002):
        self.proc, self.interval = psutil.Process(), interval

    def __enter__(self):
        gc.collect()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def timed(fn) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak(fn) -> tuple[int, int]:
    with PeakRSS() as m:
        fn()
    return m.peak, m.peak - m.base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[150, 1024])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from . import analysis, arch, data, models

    torch.set_grad_enabled(False)
    m = models.load(args.model)
    text = data.long_texts(1, min_words=2 * max(args.lengths), seed=0)[0]
    print(f"model {args.model}; torch threads {torch.get_num_threads()}; "
          f"{psutil.cpu_count()} CPUs; repeats {args.repeats} (+1 warm-up)")
    rows = []
    for T in args.lengths:
        batch = m.encode([text], max_tokens=T)
        assert batch.lengths == [T]

        def bare():
            with torch.inference_mode():
                m.hf(input_ids=batch.input_ids)

        decoder = arch.getpath(m.hf, arch.arch_of(m.config).layers.rsplit(".", 1)[0])

        def base():
            with torch.inference_mode():
                decoder(input_ids=batch.input_ids)

        def ctr():
            analysis.heads(m, batch_texts, max_tokens=T, progress=False)

        batch_texts = [text]
        res = {"bare": [], "base": [], "ctr": []}
        for i in range(args.repeats + 1):
            for name, fn in (("bare", bare), ("base", base), ("ctr", ctr)):
                dt = timed(fn)
                if i:                      # first round is the warm-up
                    res[name].append(dt)
        med = {k: [statistics.median(v)] for k, v in res.items()}
        for name, fn in (("bare", bare), ("base", base), ("ctr", ctr)):
            med[name].extend(peak(fn))
        rows.append((T, med))
    mb = 1 / 2**20
    print()
    print("| T | HF forward s | decoder only s | ctr analysis s | time ratio vs forward "
          "| vs decoder | HF peak RSS MB | ctr peak RSS MB | peak ratio | HF extra MB "
          "| ctr extra MB | extra ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for T, med in rows:
        b, d, c = med["bare"], med["base"], med["ctr"]
        print(f"| {T} | {b[0]:.2f} | {d[0]:.2f} | {c[0]:.2f} | {c[0] / b[0]:.2f} | {c[0] / d[0]:.2f} "
              f"| {b[1] * mb:.0f} | {c[1] * mb:.0f} | {c[1] / b[1]:.2f} | {b[2] * mb:.0f} "
              f"| {c[2] * mb:.0f} | "
              + (f"{c[2] / b[2]:.2f} |" if b[2] * mb >= 16 else "n/a (HF < 16 MB) |"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
