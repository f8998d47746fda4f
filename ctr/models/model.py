"""The loaded model: ``Model`` (what the chapters need to know about it, and tokenisation with
the BOS policy) and ``wrap``, which makes one from a transformers causal LM.

BOS policy: each model gets what its own tokenizer does. Prompts are tokenised without special
tokens, and the tokenizer's BOS is prepended exactly when the tokenizer itself puts it first
(``tokenizer(text)`` with special tokens starts with it), which is what the model saw in
training. Measured, not assumed (``ctr.chapters.adapt``): Gemma-3's tokenizer adds ``<bos>``;
SmolLM2's and Qwen2.5's define a BOS (``<|im_start|>``, ``<|endoftext|>``) but never add it, so
their token 0 is the first text token. ``load(..., prepend_bos=True/False)`` overrides it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .. import arch as _arch
from ..definitions import check_max_tokens
from .registry import ModelError, PromptError


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
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (the first device of a device map)."""
        return self.hf.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype; activations are computed in it."""
        return self.hf.dtype

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
                "context": self.context_length, "BOS policy": self.bos_policy,
                "dtype": str(self.dtype).removeprefix("torch."), "device": self.placement}

    @property
    def placement(self) -> str:
        """"cpu", "cuda:0", or the devices of a device map ("cuda:0, cuda:1 (device map)")."""
        dm = getattr(self.hf, "hf_device_map", None)
        devs = sorted({f"cuda:{d}" if isinstance(d, int) else str(d) for d in dm.values()}) \
            if dm else []
        if len(devs) > 1:
            return f"{', '.join(devs)} (device map)"
        return str(self.device)

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
