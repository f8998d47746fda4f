"""Reading a model inside one nnsight trace: the per-layer record, the trace itself, and the
stream that pauses the forward pass between layers (a greenlet switch). ``ctr.extract``'s
docstring says what the engine does; this module is its core."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from greenlet import getcurrent, greenlet

from .. import arch as _arch
from ..models import Batch, Model


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

    def cpu(self) -> "LayerRecord":
        """This record on the CPU in float32 (A, V, head outputs, residuals), for code that writes
        into CPU arrays or numpy. Costs one copy of the layer's A (B x H x T x T floats); the
        sink scores are cheaper on the model's device (``definitions.alpha`` reads any dtype)."""
        def f(x):
            return None if x is None else x.detach().to("cpu", torch.float32)
        parts = [x for x in (self.A, self.V, self.head_out, self.resid_in, self.resid_out)
                 if x is not None]
        if all(x.device.type == "cpu" and x.dtype == torch.float32 for x in parts):
            return self        # the book's own runs: no copy
        return LayerRecord(self.layer, f(self.A), f(self.V), f(self.head_out), f(self.resid_in),
                           f(self.resid_out), self.window, self.lengths)

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
    # Inputs go where the model reads them (the first device of a device map; accelerate's hooks
    # move activations between the layers' devices). Records stay on the layer's device.
    dev = model.device
    inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if start is not None:
        start = (start[0], start[1].to(dev))
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
                    out = new.to(device=out.device, dtype=out.dtype)
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
