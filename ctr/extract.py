"""Stream per-layer attention internals out of one nnsight trace.

``layers(model, prompts)`` yields one ``LayerRecord`` per decoder layer, in order, while the
forward pass is paused: the caller reduces the layer (sink scores, VE, probes ...) and drops
it before the model computes the next one, so peak memory holds about one layer's attention
(SmolLM2 at T=1024: 38 MB per layer instead of 1.1 GB for all 30).

How: the nnsight trace runs in a worker thread; inside the trace each layer's values are
handed over a one-slot queue and the worker waits until the consumer asks for the next
layer. Breaking out of the loop cancels the forward pass.

What is read, per layer, inside ``<attention module>.source``: the eager attention call
(``attention_interface_N``; its inputs give V before grouped-query expansion, its output is
(per-head outputs, A)), plus the decoder layer's input and output (the residual stream).
The forward pass stops after the last layer: logits are never computed.
"""
from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import arch as _arch
from .models import Batch, Model


@dataclass
class LayerRecord:
    layer: int
    A: torch.Tensor          # (B, H, T, T) attention probabilities, rows = queries
    V: torch.Tensor          # (B, H, T, D) value vectors read by each query head (GQA expanded)
    head_out: torch.Tensor   # (B, T, H, D) per-head outputs sum_j A[i,j] V[j], before W_O
    resid_in: torch.Tensor   # (B, T, d_model) residual stream entering the layer
    resid_out: torch.Tensor  # (B, T, d_model) residual stream leaving the layer
    window: int | None       # sliding window of this layer (None = full causal)
    lengths: list[int]

    def prompt(self, b: int) -> "LayerRecord":
        """Prompt ``b`` alone, cut to its own length (padding removed)."""
        n = self.lengths[b]
        return LayerRecord(self.layer, self.A[b:b + 1, :, :n, :n], self.V[b:b + 1, :, :n],
                           self.head_out[b:b + 1, :n], self.resid_in[b:b + 1, :n],
                           self.resid_out[b:b + 1, :n], self.window, [n])


class ExtractionError(RuntimeError):
    pass


def attention_call_name(model: Model) -> str:
    """The op name of the eager attention call of ``model`` (``arch.attention_call``)."""
    a = _arch.arch_of(model.config)
    return _arch.attention_call(_arch.getpath(_arch.getpath(model.lm, a.layers)[0], a.attn))


class _Cancel(Exception):
    pass


def _trace(model: Model, batch: Batch, emit) -> None:
    a = _arch.arch_of(model.config)
    call = attention_call_name(model)
    windows = model.windows
    H, KV = model.n_heads, model.n_kv_heads
    envoys = _arch.getpath(model.lm, a.layers)
    last = len(envoys) - 1
    with model.lm.trace({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
                        use_cache=False):
        for l, layer in enumerate(envoys):   # modules must be read in forward order
            resid_in = layer.input
            op = getattr(_arch.getpath(layer, a.attn).source, call)
            args, kwargs = op.inputs
            out, A = op.output
            resid_out = layer.output
            emit(l, resid_in, args, kwargs, out, A, resid_out, windows[l], H, KV)
            if l == last:
                # Nothing after the last layer is read: skip the final norm and the LM head
                # (Gemma-3's 262k-token head costs more than all its layers at T=1024).
                raise _Cancel()


def _record(l, resid_in, args, kwargs, out, A, resid_out, window, H, KV, lengths) -> LayerRecord:
    if A is None or not isinstance(A, torch.Tensor) or A.dim() != 4:
        raise ExtractionError(f"layer {l}: the attention call returned no weights; is the model "
                              "running eager attention?")
    V = args[3] if len(args) > 3 else kwargs["value"]          # (B, KV, T, D)
    if V.shape[1] != H:
        V = V.repeat_interleave(H // V.shape[1], dim=1)         # = transformers' repeat_kv
    if isinstance(resid_out, tuple):                            # GPT-2 blocks return tuples
        resid_out = resid_out[0]
    return LayerRecord(l, A, V, out, resid_in, resid_out, window, lengths)


def layers(model: Model, prompts, max_tokens: int | None = None):
    """Yield a ``LayerRecord`` per layer for a batch of prompts (str, list of str, or Batch).

    Records are valid until the next one is requested; keep reductions, not records.
    """
    batch = prompts if isinstance(prompts, Batch) else model.encode(prompts, max_tokens=max_tokens)
    q: queue.Queue = queue.Queue(maxsize=1)
    resume = threading.Semaphore(0)
    cancel = threading.Event()

    def emit(*vals):
        q.put(("layer", _record(*vals, batch.lengths)))
        resume.acquire()
        if cancel.is_set():
            raise _Cancel()

    def worker():
        try:
            with torch.inference_mode():
                _trace(model, batch, emit)
            q.put(("done", None))
        except _Cancel:
            q.put(("done", None))
        except BaseException as e:   # handed to the consumer, raised there
            q.put(("error", e))

    th = threading.Thread(target=worker, name="ctr-trace", daemon=True)
    th.start()
    try:
        while True:
            kind, rec = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise rec
            yield rec
            del rec
            resume.release()
    finally:
        if th.is_alive():            # consumer stopped early: unblock the worker and let it end
            cancel.set()
            while th.is_alive():
                resume.release()
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            th.join()


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
