"""The one way into a model: read every layer's attention, write into it, and score the result.

One nnsight trace per call (``_trace``); everything else is what it is asked to read or write:

- ``layers(model, prompts)`` streams one ``LayerRecord`` per decoder layer while the forward pass
  is paused, so a caller holds one layer's attention at a time (SmolLM2 at T=1024: 38 MB per
  layer instead of 1.1 GB for all 30). The pause is a greenlet switch (nnsight's own mechanism),
  not a thread hand-off. The pass stops after the last layer: no logits are computed.
- ``run(model, prompts, edits=..., start=..., loss=..., positions=...)`` runs a forward pass that
  may be edited, with per-layer callbacks inside the trace, and returns the next-token
  cross-entropy per token (computed in chunks: the LM head is never applied to all positions at
  once) and the model's own logits at chosen positions.
- ``prefix(model, ids)`` runs a prompt prefix once; ``layers(..., prefix=p)`` then runs only each
  prompt's continuation, batched on copies of the prefix's key/value cache, and puts the prefix
  rows back, so records are those of the whole prompts (tests: equal to the un-cached run).

Writing: an edit is a callback ``f(rec) -> head outputs or None`` for one layer. It sees the
layer's A, V and per-head outputs (B, T, H, D) before W_O, and what it returns replaces the
output of the eager attention call (``op.output = ...`` inside the trace), so W_O, the residual
stream and every later layer see the edit. A value edit is ``rec.from_values(V2)`` = A V2, what
the attention call computes from values V2. ``start=(l, resid)`` skips layers 0..l-1 (nnsight
``skip``) and feeds ``resid`` into layer l: an edit at layer l changes nothing below it, so an
edited run can start from a clean run's residual stream (``Run.start(l)``).

What is read, per layer, inside ``<attention module>.source``: the eager attention call (its
inputs give V before grouped-query expansion, its output is (per-head outputs, A)), plus the
decoder layer's input and output (the residual stream).
"""
from __future__ import annotations

from ..models import Model
from .prefix import Prefix, _continue, common_prefix, prefix
from .run import Run, run
from .trace import (Edit, ExtractionError, LayerRecord, _batch, _record, _stream, _trace,
                    attention_call_name, one_thread)

__all__ = ["Edit", "ExtractionError", "LayerRecord", "Prefix", "Run", "attention_call_name",
           "common_prefix", "layers", "one_thread", "prefix", "run"]


def layers(model: Model, prompts, max_tokens: int | None = None, *, prefix: "Prefix | None" = None):
    """Yield a ``LayerRecord`` per layer for a batch of prompts (str, list of str, or Batch).

    Records are valid until the next one is requested; keep reductions, not records.
    ``prefix``: every prompt starts with ``prefix.ids``; only the rest is run (see ``prefix``).
    """
    batch = _batch(model, prompts, max_tokens)
    if prefix is not None:
        return _stream(model, lambda emit: _continue(model, batch, prefix, emit))

    def work(emit):
        _trace(model, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
               lambda *v: emit(_record(model, *v, batch.lengths)))
    return _stream(model, work)


