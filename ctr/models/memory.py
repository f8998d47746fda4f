"""The memory plan: before any weight is loaded, how much memory a model needs for a chapter's
work (dtype, device, T tokens, batch of B prompts), how much is free, and what would fit.

``plan(name_or_config, device, dtype, T, batch)`` returns a ``Plan``; ``Plan.check()`` raises
``MemoryPlanError`` (a ``ModelError``) with one message: what is needed, what is free, which
dtype/device would fit. ``ctr.models.load`` calls it before loading (``check_memory=False`` skips).

The estimate, in bytes (s = bytes per element of the dtype; P parameters, counted exactly on
the meta device from the config; H query heads, D head dim, d model width, F MLP width):

- weights: P * s.
- load transient (CPU only): a checkpoint stored in another dtype is read whole before it is cast
  (measured here: Gemma-3-270m stored in fp32 and loaded in bf16 peaks at fp32 + bf16 weights),
  so P * s_stored more while loading.
- attention, one layer at a time (ctr streams layers and keeps reductions): eager attention holds
  two (B, H, T, T) tensors at its peak, the scores and the next step (masked scores in the model's
  dtype, then the float32 softmax), and ctr upcasts the layer's A to float32 for the sink scores:
  B H T^2 max(2 s, s + 4), plus the (B, 1, T, T) mask; other per-layer tensors (MLP, q/k/v,
  float64 head outputs for VE) B T (3 F s + 4 d s + 16 H D). The model's logits at every position
  are never formed (extraction stops after the last layer; the loss is computed in 128 MB chunks),
  so ``logits=True`` adds at most 128 MB.
- runtime, CPU: 0.40 GiB for a Python process with torch, transformers and nnsight and a wrapped
  model, plus ~1 KiB per vocabulary entry for the tokenizer, plus 0.10 GiB while a chapter runs
  (prompts, records, result rows). Measured here with SmolLM2-135M and Gemma-3-270m (peak resident
  set of a fresh process, ``/proc/self/status`` VmHWM); ``tests/test_memory.py`` checks the
  estimate against that measurement (within 25%).
- runtime, GPU: 0.5 GiB per GPU (cuBLAS workspace, allocator slack): an allowance, not measured
  here (this machine has no GPU). Free GPU memory is ``torch.cuda.mem_get_info``, read after the
  CUDA context exists, so the context is already outside it.

Free memory: ``psutil.virtual_memory().available`` on the CPU; the sum over GPUs for
``device="auto"`` (whose map puts the layers on every GPU there is).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import arch as _arch
from . import paper
from .registry import ModelError

GiB = 2 ** 30
RUNTIME_CPU = int(0.40 * GiB)
TOKENIZER_PER_ENTRY = 1024
RUN_CPU = int(0.10 * GiB)
RUNTIME_GPU = int(0.5 * GiB)
LOGIT_CHUNK = 2 ** 27                    # ctr.extract.run: 128 MB of float32 logits at a time
DTYPES = ("float32", "bfloat16", "float16")


class MemoryPlanError(ModelError):
    """The model would not fit; the message says what is needed, what is free, what would fit."""


def _bytes(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def _gb(b: float) -> str:
    return f"{b / 1e9:.1f} GB"


@dataclass
class Need:
    """Bytes, by what they are for; ``peak`` is what the plan compares with free memory."""
    weights: int
    transient: int       # a checkpoint read in another dtype while loading (CPU)
    attention: int       # one layer's eager attention and ctr's float32 copy of A
    other: int           # per-layer activations besides attention, logits chunks, run overhead
    runtime: int         # the process (CPU) or allowance per GPU, while loading and running

    @property
    def load(self) -> int:
        return self.runtime + self.weights + self.transient

    @property
    def run(self) -> int:
        return self.runtime + self.weights + self.attention + self.other

    @property
    def peak(self) -> int:
        return max(self.load, self.run)


def need(config, device: str = "cpu", dtype: str = "float32", T: int = 1, batch: int = 1,
         logits: bool = False, n_gpus: int = 1) -> Need:
    """The estimate (module docstring) for a model config; nothing is loaded."""
    s = _bytes(dtype)
    P = paper.n_params(config)
    H, D, d = _arch.n_heads(config), _arch.head_dim(config), _arch.d_model(config)
    F = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    V = getattr(config, "vocab_size", 0) or 0
    B = batch
    attention = B * H * T * T * max(2 * s, s + 4) + B * T * T * s
    other = B * T * (3 * F * s + 4 * d * s + 16 * H * D)
    if device == "cpu":
        other += RUN_CPU
    if logits:
        other += min(B * T * V * 4, LOGIT_CHUNK) + B * V * 4
    gpu = device != "cpu"
    stored = paper.checkpoint_dtype(config)
    transient = 0
    if not gpu and stored is not None and stored != getattr(torch, dtype):
        transient = P * torch.empty(0, dtype=stored).element_size()
    runtime = n_gpus * RUNTIME_GPU if gpu else RUNTIME_CPU + TOKENIZER_PER_ENTRY * V
    return Need(P * s, transient, attention, other, runtime)


def free_memory(device: str = "cpu") -> dict:
    """{"bytes": free bytes on the device, "gpus": [free per GPU], "source": how it was read}."""
    if device == "cpu":
        import psutil
        return {"bytes": psutil.virtual_memory().available, "gpus": [],
                "source": "available memory (psutil)"}
    if not torch.cuda.is_available():
        raise ModelError(f"device={device!r} needs a CUDA GPU and torch sees none here; use "
                         "device='cpu'")
    ids = range(torch.cuda.device_count()) if device == "auto" else \
        [torch.device(device).index or 0]
    gpus = [torch.cuda.mem_get_info(i)[0] for i in ids]
    return {"bytes": sum(gpus), "gpus": gpus,
            "source": f"free memory of {len(gpus)} GPU{'s' if len(gpus) > 1 else ''} "
                      "(torch.cuda.mem_get_info)"}


def machine(available: dict | None = None) -> dict:
    """What is free here: {"cpu": bytes, "cuda": [bytes per GPU]}; ``available`` overrides
    (tests inject a 24 GB machine or an 80 GB GPU this way)."""
    if available is not None:
        return {"cpu": available.get("cpu", 0), "cuda": list(available.get("cuda", []))}
    cuda = free_memory("auto")["gpus"] if torch.cuda.is_available() else []
    return {"cpu": free_memory("cpu")["bytes"], "cuda": cuda}


def _free_on(device: str, here: dict) -> int:
    if device == "cpu":
        return here["cpu"]
    if device == "auto":
        return sum(here["cuda"])
    i = torch.device(device).index or 0
    return here["cuda"][i] if i < len(here["cuda"]) else 0


@dataclass
class Plan:
    model: str
    device: str
    dtype: str
    T: int
    batch: int
    need: Need
    free: int
    source: str
    fits_with: list[tuple[str, str, int]] = field(default_factory=list)   # (device, dtype, peak)

    @property
    def fits(self) -> bool:
        return self.need.peak <= self.free

    def summary(self) -> str:
        n = self.need
        parts = [f"weights {_gb(n.weights)}"]
        if n.transient and n.load >= n.run:
            parts.append(f"reading a checkpoint stored in another dtype {_gb(n.transient)}")
        else:
            parts.append(f"attention at T={self.T} x batch {self.batch} {_gb(n.attention)}")
        parts.append(f"runtime {_gb(n.runtime + n.other)}")
        return (f"{self.model} in {self.dtype} on {self.device} needs about {_gb(n.peak)} "
                f"({', '.join(parts)}); free: {_gb(self.free)} ({self.source})")

    def message(self) -> str:
        if self.fits_with:
            alt = "; ".join(f'device="{d}", dtype="{t}" (needs {_gb(p)})'
                            for d, t, p in self.fits_with)
            would = f"It would fit with {alt}."
        else:
            would = ("No dtype fits on any device here; a GPU (or a machine) with more free "
                     "memory is needed, or a smaller T or batch.")
        return (f"{self.summary()}. Refused before loading: it would not fit. {would} "
                "(ctr.models.load(..., check_memory=False) tries anyway.)")

    def check(self) -> "Plan":
        if not self.fits:
            raise MemoryPlanError(self.message())
        return self


def plan(model, device: str = "cpu", dtype: str = "float32", T: int | None = None, batch: int = 1,
         logits: bool = False, available: dict | None = None, name: str | None = None) -> Plan:
    """The plan for ``model`` (a transformers config, or a name ``config_of`` resolves) on
    ``device`` ("cpu", "cuda", "cuda:N", "auto") in ``dtype``, for T tokens x ``batch`` prompts
    (T None: the weights and runtime only). ``available`` injects free memory
    ({"cpu": bytes, "cuda": [bytes per GPU]}) instead of reading the machine's."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ModelError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    config = config_of(model) if isinstance(model, str) else model
    name = name or (model if isinstance(model, str) else getattr(config, "name_or_path", "") or
                    config.model_type)
    here = machine(available)
    if device == "auto" and not here["cuda"]:
        device = "cpu"                    # accelerate's map without a GPU: everything on the CPU
    n_gpus = len(here["cuda"]) if device == "auto" else 1
    T = T or 1
    mine = need(config, device, dtype, T, batch, logits, max(n_gpus, 1))
    if device == "cpu":
        source = "available memory (psutil)" if available is None else "given"
    else:
        source = (f"free memory of {n_gpus} GPU(s) (torch.cuda.mem_get_info)"
                  if available is None else "given")
    p = Plan(name, device, dtype, T, batch, mine, _free_on(device, here), source)
    devices = ["cpu"] + (["cuda"] if here["cuda"] else []) + (["auto"] if len(here["cuda"]) > 1
                                                               else [])
    for dev in devices:
        for dt in ("float32", "bfloat16"):
            if (dev, dt) == (device, dtype):
                continue
            n = need(config, dev, dt, T, batch, logits, len(here["cuda"]) if dev == "auto" else 1)
            if n.peak <= _free_on(dev, here):
                p.fits_with.append((dev, dt, n.peak))
    return p


def config_of(name: str):
    """A model's config without its weights: tiny, embedded (cached config), a paper model, a
    local directory or a hub id (config.json only: from the cache offline, fetched online)."""
    from transformers import AutoConfig

    from .. import tiny
    from .registry import EMBEDDED, TINY, embedded_dir

    if name in TINY:
        return tiny.config("llama", layers=3) if name == "tiny-planted-llama" else \
            tiny.config(name.split("-", 2)[2])
    if name in EMBEDDED:
        return AutoConfig.from_pretrained(str(embedded_dir(name)))
    if name in paper.table():
        return paper.config(name)
    if name in {v["hub"] for v in paper.table().values()}:
        try:
            return AutoConfig.from_pretrained(name)       # the real one, when cached or online
        except OSError:
            return paper.config(name)                     # offline: the published numbers
    return AutoConfig.from_pretrained(name)
