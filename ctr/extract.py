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

import copy
import inspect
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from greenlet import getcurrent, greenlet

from . import arch as _arch
from .models import Batch, Model


@dataclass
class LayerRecord:
    layer: int
    A: torch.Tensor          # (B, H, T, T) attention probabilities, rows = queries
    V: torch.Tensor          # (B, H, T, D) value vectors read by each query head (GQA expanded)
    head_out: torch.Tensor   # (B, T, H, D) per-head outputs sum_j A[i,j] V[j], before W_O
    resid_in: torch.Tensor   # (B, T, d_model) residual stream entering the layer
    resid_out: torch.Tensor | None   # (B, T, d_model) leaving it (None inside an edit)
    window: int | None       # sliding window of this layer (None = full causal)
    lengths: list[int]

    def prompt(self, b: int) -> "LayerRecord":
        """Prompt ``b`` alone, cut to its own length (padding removed)."""
        n = self.lengths[b]
        out = None if self.resid_out is None else self.resid_out[b:b + 1, :n]
        return LayerRecord(self.layer, self.A[b:b + 1, :, :n, :n], self.V[b:b + 1, :, :n],
                           self.head_out[b:b + 1, :n], self.resid_in[b:b + 1, :n], out,
                           self.window, [n])

    def from_values(self, V: torch.Tensor) -> torch.Tensor:
        """Per-head outputs (B, T, H, D) the attention call computes from values V (B, H, T, D)."""
        return torch.matmul(self.A, V.to(self.A.dtype)).transpose(1, 2).contiguous()


Edit = Callable[[LayerRecord], "torch.Tensor | None"]


class ExtractionError(RuntimeError):
    pass


class _Cancel(Exception):
    pass


def attention_call_name(model: Model) -> str:
    """The op name of the eager attention call of ``model`` (``arch.attention_call``)."""
    a = _arch.arch_of(model.config)
    if getattr(a, "call", ""):
        return a.call
    return _arch.attention_call(_arch.getpath(_arch.getpath(model.lm, a.layers)[0], a.attn))


def _batch(model: Model, prompts, max_tokens=None) -> Batch:
    return prompts if isinstance(prompts, Batch) else model.encode(prompts, max_tokens=max_tokens)


def _expand(V: torch.Tensor, H: int) -> torch.Tensor:
    return V if V.shape[1] == H else V.repeat_interleave(H // V.shape[1], dim=1)  # = repeat_kv


def _trace(model: Model, inputs: dict, emit, *, edits: Mapping[int, Edit] | None = None,
           start: tuple[int, torch.Tensor] | None = None, head: bool = False, lengths=(),
           **kw):
    """One nnsight trace. ``emit(l, resid_in, V_kv, out, A, resid_out)`` per layer (inside the
    trace); ``edits`` replace per-head outputs; with ``head`` returns (final hidden states, the
    model's logits at ``logits_to_keep``), else stops after the last layer."""
    if id(model.hf) in _PAUSED:
        raise ExtractionError(f"{model.name} is paused in an unfinished layers() stream, and one "
                              "model runs one trace at a time: finish (or break out of) that "
                              "loop first, or use another copy of the model")
    a = _arch.arch_of(model.config)
    call = attention_call_name(model)
    H, windows = model.n_heads, model.windows
    envoys = _arch.getpath(model.lm, a.layers)
    base = _arch.getpath(model.lm, a.layers.rsplit(".", 1)[0])
    last, first = len(envoys) - 1, (start[0] if start else 0)
    edits = edits or {}
    box = {}
    with model.lm.trace(inputs, use_cache=kw.pop("use_cache", False), **kw):
        for l, layer in enumerate(envoys):   # modules must be read in forward order
            if l < first:
                layer.skip(start[1])         # layer l - 1 "returns" the given residual stream
                continue
            resid_in = layer.input
            op = getattr(_arch.getpath(layer, a.attn).source, call)
            args, kwargs = op.inputs
            out, A = op.output
            V = args[3] if len(args) > 3 else kwargs["value"]          # (B, KV, T, D)
            if l in edits:
                if A is None or A.dim() != 4:
                    _no_weights(l)
                rec = LayerRecord(l, A, _expand(V, H), out, resid_in, None, windows[l],
                                  list(lengths))
                new = edits[l](rec)
                if new is not None:
                    if new.shape != out.shape:
                        raise ExtractionError(f"the edit of layer {l} returned shape "
                                              f"{tuple(new.shape)}; per-head outputs are "
                                              f"{tuple(out.shape)} (B, T, H, D)")
                    out = new.to(out.dtype)
                    op.output = (out, A)
            resid_out = layer.output
            emit(l, resid_in, V, out, A, resid_out)
            if l == last and not head:
                # Nothing after the last layer is read: skip the final norm and the LM head
                # (Gemma-3's 262k-token head costs more than all its layers at T=1024).
                raise _Cancel()
        box["hidden"] = base.output[0]                 # (B, T, d_model) after the final norm
        box["logits"] = model.lm.output.logits         # (B, K, vocab) at logits_to_keep only
    return box["hidden"], box["logits"]


def _no_weights(l):
    raise ExtractionError(f"layer {l}: the attention call returned no weights; is the model "
                          "running eager attention?")


def _record(model, l, resid_in, V, out, A, resid_out, lengths) -> LayerRecord:
    if A is None or not isinstance(A, torch.Tensor) or A.dim() != 4:
        _no_weights(l)
    if isinstance(resid_out, tuple):
        resid_out = resid_out[0]
    return LayerRecord(l, A, _expand(V, model.n_heads), out, resid_in, resid_out,
                       model.windows[l], lengths)


# --- streaming ----------------------------------------------------------------------------------

_PAUSED: set[int] = set()       # id(model.hf) of models whose trace is paused in a stream


def _stream(model: Model, work):
    """Run ``work(emit)`` and yield what it emits, pausing it in between. The trace runs in a
    greenlet of this thread, so a hand-off is a switch; torch's grad / inference mode (thread
    state) is the consumer's while it holds a record."""
    consumer = getcurrent()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    paused = {}

    def emit(rec):
        paused["at"] = getcurrent()
        _PAUSED.add(id(model.hf))
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                cmd = consumer.switch(("layer", rec))
        finally:
            _PAUSED.discard(id(model.hf))
        if cmd == "cancel":
            raise _Cancel()

    def body():
        try:
            with torch.inference_mode():
                work(emit)
        except _Cancel:
            pass
        return ("done", None)

    g = greenlet(body, parent=consumer)
    msg = g.switch()
    try:
        while msg[0] == "layer":
            yield msg[1]
            msg = paused["at"].switch("next")
    finally:
        if not g.dead:                       # consumer stopped early: unwind the forward pass
            paused["at"].switch("cancel")


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


# --- prefix caching -----------------------------------------------------------------------------

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


# --- edited runs, loss and logits ---------------------------------------------------------------

@dataclass
class Run:
    loss: torch.Tensor | None      # (B, T-1) next-token cross-entropy; NaN past a prompt's end
    logits: torch.Tensor | None    # (B, K, V') the model's logits at ``positions`` (V' = vocab)
    resid: dict[int, torch.Tensor]  # layer -> (B, T, d_model) residual entering it (keep_resid)
    lengths: list[int]

    def start(self, layer: int) -> tuple[int, torch.Tensor]:
        """``start=`` for a run that begins at ``layer`` from this run's residual stream."""
        if layer not in self.resid:
            raise KeyError(f"layer {layer}'s residual was not kept: run with keep_resid=True")
        return layer, self.resid[layer]


def _postprocess(config):
    """What the causal-LM forward applies after the LM head (checked against the model)."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)                 # Cohere: multiplies
    div = getattr(config, "logits_scaling", None)                # Granite: divides

    def f(z):
        if scale is not None:
            z = z * scale
        if div is not None:
            z = z / div
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        return z
    return f


def _loss(model: Model, hidden, ids, lengths, mask, rows: int | None) -> torch.Tensor:
    """Next-token cross-entropy (B, T-1) from the final hidden states, in chunks of rows."""
    B, T = ids.shape
    lm_head, post = model.hf.get_output_embeddings(), _postprocess(model.config)
    valid = torch.arange(T - 1).unsqueeze(0) < (torch.tensor(lengths) - 1).unsqueeze(1)
    if mask is not None:
        valid = valid & mask.bool()
    out = torch.full((B, T - 1), float("nan"))
    b, t = torch.nonzero(valid, as_tuple=True)
    rows = rows or max(1, 2 ** 25 // lm_head.weight.shape[0])   # 128 MB of logits at a time
    for i in range(0, len(b), rows):
        bi, ti = b[i:i + rows], t[i:i + rows]
        z = post(lm_head(hidden[bi, ti])).float()
        out[bi, ti] = torch.nn.functional.cross_entropy(z, ids[bi, ti + 1], reduction="none")
    return out


def run(model: Model, prompts, *, edits: Mapping[int, Edit] | None = None,
        start: tuple[int, torch.Tensor] | None = None, loss: bool | torch.Tensor = True,
        positions=None, vocab=None, keep_resid: bool | list[int] = False,
        on_layer: Callable[[LayerRecord], None] | None = None, max_tokens: int | None = None,
        chunk_rows: int | None = None) -> Run:
    """One forward pass, possibly edited; returns its next-token loss and logits.

    ``edits``: {layer: f}, f(rec) returns new per-head outputs (B, T, H, D) or None (no change).
    ``start``: (l, resid (B, T, d_model)): skip layers below l, feed ``resid`` into layer l.
    ``loss``: True, False, or a bool mask (B, T-1) of the positions to score.
    ``positions``: "last" (each prompt's final token), or a LongTensor (B,) or (B, K): the
    model's own logits there, restricted to the token ids ``vocab`` if given.
    ``keep_resid``: keep the residual entering every layer (True) or these layers, for ``start``.
    ``on_layer(rec)``: called inside the trace with every (edited) layer's record.
    """
    batch = _batch(model, prompts, max_tokens)
    B, T = batch.input_ids.shape
    if start is not None:
        l0, r0 = start
        if not 0 <= l0 < model.n_layers or tuple(r0.shape) != (B, T, model.d_model):
            raise ValueError(f"start=(layer, resid) needs 0 <= layer < {model.n_layers} and resid "
                             f"of shape {(B, T, model.d_model)}; got layer {l0}, {tuple(r0.shape)}")
    bad = set(edits or {}) - set(range(start[0] if start else 0, model.n_layers))
    if bad:
        raise ValueError(f"edits for layers {sorted(bad)}: not run (n_layers {model.n_layers}, "
                         f"start {start[0] if start else 0})")
    keep = set(range(model.n_layers)) if keep_resid is True else set(keep_resid or ())
    resid: dict[int, torch.Tensor] = {}

    def emit(*v):
        if v[0] in keep:
            resid[v[0]] = v[1].clone()
        if on_layer is not None:
            on_layer(_record(model, *v, batch.lengths))

    pos = None
    if positions is not None:
        pos = (torch.tensor(batch.lengths) - 1 if isinstance(positions, str) and positions == "last"
               else torch.as_tensor(positions))
        if pos.dim() == 1:
            pos = pos.unsqueeze(1)
        if pos.shape[0] != B or pos.min() < 0 or pos.max() >= T:
            raise ValueError(f"positions must be (B,) or (B, K) token indices below {T}, B = {B}")
    want_loss = loss is not False
    head = want_loss or pos is not None
    kw = {"logits_to_keep": pos if pos is not None else 1} if head else {}
    with torch.inference_mode():
        try:
            hidden, logits = _trace(model, {"input_ids": batch.input_ids,
                                            "attention_mask": batch.attention_mask}, emit,
                                    edits=edits, start=start, head=head, lengths=batch.lengths,
                                    **kw)
        except _Cancel:
            hidden = logits = None
        ce = None
        if want_loss:
            _check_head(model, hidden, logits, pos)
            ce = _loss(model, hidden, batch.input_ids, batch.lengths,
                       loss if isinstance(loss, torch.Tensor) else None, chunk_rows)
    if pos is None:
        logits = None
    elif vocab is not None:
        logits = logits[..., torch.as_tensor(vocab)]
    return Run(ce, logits, resid, batch.lengths)


def _check_head(model, hidden, logits, pos):
    """Our chunked head must give the model's own logits (where the model computed them)."""
    h = hidden[:, -1:] if pos is None else torch.take_along_dim(hidden, pos[..., None], dim=1)
    ours = _postprocess(model.config)(model.hf.get_output_embeddings()(h))
    tol = 1e-4 * max(1.0, float(logits.abs().max()))
    if not torch.allclose(ours, logits, atol=tol, rtol=1e-4):
        raise ExtractionError(
            f"{model.architecture}: its causal-LM head post-processes logits in a way ctr does not "
            "reproduce, so the chunked loss would be wrong; extend ctr.extract._postprocess")


@contextmanager
def one_thread():
    """Run many small tensor ops on one thread: with two, each op waits at a barrier for the
    other thread (much longer when another process holds the second core), and one thread makes
    the numbers independent of the machine's core count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
