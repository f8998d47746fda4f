"""Benchmark: the full per-head analysis against a bare transformers eager forward, in one run.

    python -m ctr.bench [--model smollm2-135m] [--cases 1x150 8x150 1x1024] [--repeats 3]
                        [--threads N] [--device cpu] [--dtype float32]

Each case is B prompts of T tokens (IMDB reviews, truncated to T tokens, all of length T). The
same batch goes through (a) ``model.hf(input_ids, attention_mask)`` with eager attention,
nothing else, (a') the decoder alone without the LM head, and (b) ``analysis.heads`` with
``batch_size=B``: nnsight extraction + alpha + sinks + tags + VE + random baseline for every
head. ctr stops after the last layer (it never needs logits), so (a') is the like-for-like
baseline and (a) the one a user would time. Runs alternate (every case, a, a', b, ...) after
one warm-up round; the table gives medians of wall time and of process CPU time (user + sys,
all threads: less sensitive to other processes on the machine than wall time) and their ratios.
Timed runs have no memory sampler (its thread would compete for the GIL); one more run of each
measures peak memory: the process's peak resident set, sampled every 2 ms, and "extra", that
peak minus the resident set just before the run (the model's weights are shared by all three).
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


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process)."""
    gc.collect()
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def peak(fn, gpu: bool = False) -> tuple[int, int]:
    """(peak, peak - before) in bytes: the process's resident set, or with ``gpu`` the memory
    torch allocated on every GPU (its own counters; the weights are in "before")."""
    if not gpu:
        with PeakRSS() as m:
            fn()
        return m.peak, m.peak - m.base
    import torch
    ids = range(torch.cuda.device_count())
    for i in ids:
        torch.cuda.reset_peak_memory_stats(i)
    base = sum(torch.cuda.memory_allocated(i) for i in ids)
    fn()
    top = sum(torch.cuda.max_memory_allocated(i) for i in ids)
    return top, top - base


def _case(s: str) -> tuple[int, int]:
    try:
        b, t = s.lower().split("x")
        return int(b), int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is BxT, e.g. 8x150; got {s!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cases", type=_case, nargs="+", default=[(1, 150), (8, 150), (1, 1024)],
                   help="BxT: B prompts of T tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help='"cpu", "cuda", "auto" (every GPU)')
    p.add_argument("--dtype", default="float32", help='"float32", "bfloat16"')
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's); 1 is steadier on a shared machine")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from . import analysis, arch, data, models

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    m = models.load(args.model, device=args.device, dtype=args.dtype,
                    T=max(t for _, t in args.cases), batch=max(b for b, _ in args.cases))
    decoder = arch.getpath(m.hf, arch.arch_of(m.config).layers.rsplit(".", 1)[0])
    B_max, T_max = max(b for b, _ in args.cases), max(t for _, t in args.cases)
    pool = data.long_texts(B_max, min_words=2 * T_max, seed=0)
    print(f"model {args.model} ({args.dtype} on {m.placement}); torch threads {torch.get_num_threads()}; "
          f"{psutil.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
          f"repeats {args.repeats} (+1 warm-up)")

    runs = {}
    for B, T in args.cases:
        texts = pool[:B]
        batch = m.encode(texts, max_tokens=T)
        if batch.lengths != [T] * B:
            raise SystemExit(f"case {B}x{T}: prompts of {batch.lengths} tokens, not all {T}")

        def bare(batch=batch):
            with torch.inference_mode():
                m.hf(input_ids=batch.input_ids.to(m.device),
                     attention_mask=batch.attention_mask.to(m.device))

        def base(batch=batch):
            with torch.inference_mode():
                decoder(input_ids=batch.input_ids.to(m.device),
                        attention_mask=batch.attention_mask.to(m.device))

        def ctr(texts=texts, T=T, B=B):
            analysis.heads(m, texts, max_tokens=T, batch_size=B, progress=False)

        runs[B, T] = {"bare": bare, "base": base, "ctr": ctr}

    res = {(c, k): [] for c in runs for k in ("bare", "base", "ctr")}
    for i in range(args.repeats + 1):
        for c, fns in runs.items():
            for name, fn in fns.items():
                dt = timed(fn)
                if i:                      # the first round is the warm-up
                    res[c, name].append(dt)
    gpu = args.device != "cpu" and torch.cuda.is_available()
    mem = {(c, name): peak(fn, gpu) for c, fns in runs.items() for name, fn in fns.items()}
    where = "GPU" if gpu else "RSS"
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print()
    print("| B x T | HF forward s | decoder only s | ctr analysis s | time ratio vs forward "
          f"| vs decoder | CPU ratio vs forward | vs decoder | HF peak {where} MB "
          f"| ctr peak {where} MB "
          "| peak ratio | HF extra MB | ctr extra MB | extra ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    mb = 1 / 2**20
    for c in runs:
        w = {k: statistics.median(x[0] for x in res[c, k]) for k in ("bare", "base", "ctr")}
        cpu = {k: statistics.median(x[1] for x in res[c, k]) for k in ("bare", "base", "ctr")}
        (bp, be), (cp, ce) = mem[c, "bare"], mem[c, "ctr"]
        extra = f"{ce / be:.2f}" if be * mb >= 16 else "n/a (HF < 16 MB)"
        print(f"| {c[0]} x {c[1]} | {w['bare']:.2f} | {w['base']:.2f} | {w['ctr']:.2f} "
              f"| {w['ctr'] / w['bare']:.2f} | {w['ctr'] / w['base']:.2f} "
              f"| {cpu['ctr'] / cpu['bare']:.2f} | {cpu['ctr'] / cpu['base']:.2f} "
              f"| {bp * mb:.0f} | {cp * mb:.0f} | {cp / bp:.2f} | {be * mb:.0f} | {ce * mb:.0f} "
              f"| {extra} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
