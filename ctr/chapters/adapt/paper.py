"""The adapt page's "paper models" section: for each chapter, the command that runs it on the
paper's own models on one GPU, the memory the plan expects (``ctr.models.memory``, from configs
built offline), the time expected from this build's CPU runs, and which verdicts become testable.

Expected time, scaled from the chapter's measured CPU time on the embedded models (this build's
``timings.json``): a chapter's work is the model's forward passes plus ctr's per-head reductions.
- The forward part scales with the forward FLOPs per token, 2 P' + 4 L T H D (P' the parameters
  without the embedding and LM head; eager attention forms the whole T x T map), summed over the
  chapter's models, and runs on the GPU S times faster than here. S is an assumption, not a
  measurement (no GPU here): 100 to 500, i.e. 15 to 80 TFLOP/s of effective bf16 throughput
  against the ~0.16 TFLOP/s in float32 that ``make bench`` measures on this machine's 2 cores.
- The reductions (sink scores on the device; tag bases, VE and the random baseline per head on
  the CPU) scale with L H D and stay on the CPU: 22% of ctr's time at 8 x 150 tokens, ~0% at
  T = 1024 (``make bench``: analysis 2.14 s against the decoder's 1.66 s, and 3.06 s against 3.04).
- The rest of a chapter (bootstraps, figures) is counted as forward work, which understates it
  where it is large.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from ... import arch
from ...models import memory, paper

SPEEDUP = (100, 500)                 # one GPU against this CPU, forward work (an assumption)
GiB = memory.GiB
GPUS = {"24 GB GPU": 24 * GiB, "40 GB GPU": 40 * GiB, "80 GB GPU": 80 * GiB}


def _reduction_share(T: int) -> float:
    """Share of ctr's CPU time spent on per-head reductions (``make bench``, SmolLM2)."""
    return 0.22 if T <= 256 else 0.0


@dataclass(frozen=True)
class Run:
    chapter: str
    models: tuple[str, ...]          # keys of paper.table()
    T: int
    batch: int
    params: str                      # the chapter's parameters besides models/device/dtype
    testable: str
    logits: bool = False
    pairs: bool = False              # the chapter takes pairs=[[base, reasoning], ...]


RUNS = (
    Run("sinks", ("Llama-3.1-8B",), 128, 8, "",
        "the four Sec. 3 claims (two sinks, clusters, persistence, own sinks) in a paper model"),
    Run("variance", ("Llama-3.1-8B", "DeepSeek-R1-Distill-Llama-8B", "Qwen2.5-7B"), 150, 8, "",
        "Fig. 3 (sinks per head, VE) on the paper's models, and the eps sweep against the "
        "rebuttal table's own numbers for Llama-3.1-8B and DeepSeek-R1-Distill-Llama-8B"),
    Run("probes", ("Qwen2.5-3B", "Qwen2.5-7B", "Qwen2.5-14B", "Llama-3-8B", "Llama-3.1-8B"),
        128, 32, "", "Table 1 and the sentiment table model by model (θ_tag, θ_no_tag, "
        "θ_activation), on the paper's five models"),
    Run("taxonomy", ("Llama-3.1-8B", "DeepSeek-R1-Distill-Llama-8B", "Qwen2.5-14B",
                     "DeepSeek-R1-Distill-Qwen-14B"), 1024, 1, "n_prompts=200",
        "Sec. 5's reasoning claim (more sinks per head and more high-VE heads after "
        "distillation), not testable here without a base/reasoning pair", pairs=True),
    Run("qknorm", ("Qwen3-8B", "Qwen2.5-7B"), 150, 8, "",
        "QK-norm against no QK-norm within one family (Qwen3-8B against Qwen2.5-7B) and Sec. 6's "
        "numbers (1.03 sinks per head, VE 0.26); here only Gemma-3 has QK-norm"),
    Run("release", ("Llama-3.1-8B",), 150, 64, "",
        "beyond the paper: removing and swapping tags in a paper-scale model", logits=True),
    Run("scale", ("Qwen2.5-3B", "Qwen2.5-7B", "Qwen2.5-14B"), 150, 8, "",
        "the size trend along the paper's own Qwen2.5 ladder"),
)


def flops_per_token(config, T: int) -> float:
    """Forward FLOPs per token without the LM head: 2 P' + 4 L T H D (see the module doc)."""
    V, d = getattr(config, "vocab_size", 0), arch.d_model(config)
    tied = getattr(config, "tie_word_embeddings", False)
    body = paper.n_params(config) - V * d * (1 if tied else 2)
    return 2 * body + 4 * arch.n_layers(config) * T * arch.n_heads(config) * arch.head_dim(config)


def _heads_dims(config) -> int:
    return arch.n_layers(config) * arch.n_heads(config) * arch.head_dim(config)


def expected_seconds(cpu_seconds: float, here: list, there: list, T: int) -> tuple[float, float]:
    """(fast, slow) GPU seconds for ``there`` (paper configs) from ``cpu_seconds`` measured on
    ``here`` (the embedded models' configs) with the same prompts."""
    red = _reduction_share(T)
    fwd = cpu_seconds * (1 - red) * sum(flops_per_token(c, T) for c in there) / \
        sum(flops_per_token(c, T) for c in here)
    cpu = cpu_seconds * red * sum(map(_heads_dims, there)) / sum(map(_heads_dims, here))
    return fwd / SPEEDUP[1] + cpu, fwd / SPEEDUP[0] + cpu


def command(r: Run) -> str:
    ids = [paper.hub_id(m) for m in r.models]
    if r.pairs:
        pairs = ",".join(f"[{a},{b}]" for a, b in zip(ids[::2], ids[1::2]))
        what = f"pairs=[{pairs}]"
    else:
        what = f"models=[{','.join(ids)}]"
    extra = f" {r.params}" if r.params else ""
    return f'make chapter NAME={r.chapter} ONLINE=1 PARAMS="device=cuda dtype=bfloat16 {what}{extra}"'


def wrap(cmd: str, width: int = 79) -> str:
    """A shell command in lines of at most ``width``, broken after a space or a comma with a
    backslash: inside double quotes the shell removes backslash-newline, and continuation lines
    are not indented, so PARAMS reaches make unchanged."""
    lines, cur = [], ""
    for tok in re.findall(r"[^ ,]+[ ,]?|[ ,]", cmd):
        if cur and len(cur) + len(tok) > width - 1:
            lines.append(cur + "\\")
            cur = ""
        cur += tok
    return "\n".join(lines + [cur])


def commands() -> str:
    """Every chapter's command, as a Markdown bash block (wrapped at 79 columns)."""
    return "```bash\n" + "\n".join(wrap(command(r)) for r in RUNS) + "\n```"


_gb = memory._gb


def chapters(timings: dict, embedded: list[str]) -> pd.DataFrame:
    """One row per chapter: its paper models, the largest one's memory on one GPU (bf16, the
    chapter's T and batch), the smallest GPU it fits, the expected time, what becomes testable.
    The commands are ``commands()``."""
    here = [memory.config_of(n) for n in embedded]
    rows = []
    for r in RUNS:
        cfgs = [paper.config(m) for m in r.models]
        needs = [memory.need(c, "cuda", "bfloat16", r.T, r.batch, r.logits).peak for c in cfgs]
        big = max(needs)
        fits = next((g for g, free in GPUS.items() if big <= free), "none of these")
        t = timings.get(r.chapter) or {}
        if t.get("seconds") and not t.get("smoke"):
            lo, hi = expected_seconds(t["seconds"], here, cfgs, r.T)
            when = f"{_minutes(lo)} to {_minutes(hi)} (here: {t['seconds']:.0f} s on the CPU)"
        else:
            when = "run the chapter here first (no full CPU run to scale from)"
        rows.append({"chapter": r.chapter, "paper models": ", ".join(r.models),
                     "T x batch": f"{r.T} x {r.batch}",
                     "memory (largest model)": _gb(big), "fits": fits,
                     "expected time": when, "becomes testable": r.testable})
    return pd.DataFrame(rows)


def timings(results_dir) -> dict:
    """This build's chapter times (the runner's ``timings.json``), or {} before any chapter ran.
    Read by path on purpose, not through ``results.load``: this page runs before the scorecard
    and the front page, whose times change after it, so a traced read would re-run it on every
    build. The times it reads are those in the file when it runs: this build's for every chapter
    that ran before it."""
    import json
    from pathlib import Path

    path = Path(results_dir) / "timings.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _minutes(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min"


def memory_table(T: int = 1024, batch: int = 1, cpu_free: int | None = None) -> pd.DataFrame:
    """Paper models x dtype x device: what the plan needs and whether it fits (this machine's
    free memory for the CPU, or ``cpu_free``; GPUs of 24, 40 and 80 GB)."""
    cpu = cpu_free if cpu_free is not None else memory.machine()["cpu"]
    free = {f"CPU here ({cpu / 1e9:.0f} GB free)": cpu, **GPUS}
    rows = []
    for name in paper.names():
        cfg = paper.config(name)
        for dtype in ("float32", "bfloat16"):
            row = {"model": name, "dtype": dtype}
            for dev, f in free.items():
                n = memory.need(cfg, "cpu" if dev.startswith("CPU") else "cuda", dtype, T,
                                batch).peak
                row[dev] = f"{_gb(n)} {'fits' if n <= f else 'refused'}"
            rows.append(row)
    return pd.DataFrame(rows)
