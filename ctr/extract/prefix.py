"""Prefix key/value caching: a shared prompt prefix run once, each prompt's continuation run on a
copy of its cache, and the records put back whole (A with the prefix rows, V, head outputs,
residuals), equal to the un-cached run's."""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch

from ..models import Batch, Model
from .trace import ExtractionError, LayerRecord, _Cancel, _record, _trace


@dataclass
class Prefix:
    """A prompt prefix run once: its key/value cache and its own records (B = 1, P tokens)."""
    ids: list[int]
    cache: object = field(repr=False)              # transformers DynamicCache after the prefix
    records: list[LayerRecord] = field(repr=False)

    def __len__(self) -> int:
        return len(self.ids)


def _cache_kw(model: Model) -> str:
    params = inspect.signature(model.hf.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def common_prefix(batch: Batch) -> int:
    """Tokens every prompt of ``batch`` starts with, leaving at least one to each."""
    seqs = [batch.input_ids[i, :n].tolist() for i, n in enumerate(batch.lengths)]
    k, first = min(len(s) for s in seqs) - 1, seqs[0]
    for s in seqs[1:]:
        while k and s[:k] != first[:k]:
            k -= 1
    return k


def prefix(model: Model, ids) -> Prefix:
    """Run the token ids ``ids`` (a list, or a 1-D tensor; BOS included if the prompts have it)
    once and keep its key/value cache and records, for ``layers(..., prefix=...)``."""
    from transformers import DynamicCache

    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if not ids:
        raise ValueError("an empty prefix: pass at least one token id (or use no prefix)")
    cache, recs = DynamicCache(config=model.config), []
    x = torch.tensor([ids])

    def emit(*v):
        r = _record(model, *v, [len(ids)])
        recs.append(LayerRecord(r.layer, r.A.clone(), r.V.clone(), r.head_out.clone(),
                                r.resid_in.clone(), r.resid_out.clone(), r.window, r.lengths))
    with torch.inference_mode():
        try:
            _trace(model, {"input_ids": x, "attention_mask": torch.ones_like(x)}, emit,
                   use_cache=True, **{_cache_kw(model): cache})
        except _Cancel:
            pass
    return Prefix(ids, cache, recs)


def _continue(model: Model, batch: Batch, pre: Prefix, emit):
    """Each prompt's tokens after the prefix, on a copy of its cache; records put back whole."""
    P = len(pre)
    head = torch.tensor(pre.ids)
    for b, n in enumerate(batch.lengths):
        if n <= P or not torch.equal(batch.input_ids[b, :P], head):
            raise ExtractionError(f"prompt {b} does not start with the {P}-token prefix followed "
                                  "by at least one more token; run it without prefix=")
    B, T = batch.input_ids.shape
    Ts = T - P
    cache = copy.deepcopy(pre.cache)
    cache.batch_repeat_interleave(B)

    def assemble(l, resid_in, V, out, A, resid_out):
        r, p = _record(model, l, resid_in, V, out, A, resid_out, batch.lengths), pre.records[l]
        Af = r.A.new_zeros(B, r.A.shape[1], T, T)
        Af[:, :, :P, :P] = p.A                      # prefix rows: the same in every prompt
        Af[:, :, P:, T - r.A.shape[-1]:] = r.A      # keys held by the cache are the last ones
        emit(LayerRecord(l, Af, torch.cat([p.V.expand(B, -1, -1, -1), r.V[:, :, -Ts:]], 2),
                         _cat(p.head_out, r.head_out), _cat(p.resid_in, r.resid_in),
                         _cat(p.resid_out, r.resid_out), r.window, batch.lengths))

    _trace(model, {"input_ids": batch.input_ids[:, P:], "attention_mask": batch.attention_mask},
           assemble, use_cache=True, **{_cache_kw(model): cache})


def _cat(pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([pre.expand(x.shape[0], *pre.shape[1:]), x], 1)


