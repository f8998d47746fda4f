"""Edited runs: a forward pass with per-layer edits inside the trace, optionally started from a
given layer's residual stream, scored by next-token cross-entropy (in chunks) and the model's
own logits at chosen positions."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..models import Model
from .trace import Edit, ExtractionError, LayerRecord, _batch, _Cancel, _record, _trace


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
        # float32 logits whatever the model's dtype: the loss is a difference of large numbers
        z = post(lm_head(hidden[bi.to(hidden.device), ti.to(hidden.device)])).float()
        ce = torch.nn.functional.cross_entropy(z, ids[bi, ti + 1].to(z.device), reduction="none")
        out[bi, ti] = ce.cpu()
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
    else:
        if vocab is not None:
            logits = logits[..., torch.as_tensor(vocab, device=logits.device)]
        logits = logits.float().cpu()        # float32 on the CPU, whatever the model's dtype
    return Run(ce, logits, resid, batch.lengths)


def _check_head(model, hidden, logits, pos):
    """Our chunked head must give the model's own logits (where the model computed them)."""
    h = hidden[:, -1:] if pos is None else \
        torch.take_along_dim(hidden, pos[..., None].to(hidden.device), dim=1)
    ours = _postprocess(model.config)(model.hf.get_output_embeddings()(h))
    tol = 1e-4 * max(1.0, float(logits.abs().max()))
    if not torch.allclose(ours, logits, atol=tol, rtol=1e-4):
        raise ExtractionError(
            f"{model.architecture}: its causal-LM head post-processes logits in a way ctr does not "
            "reproduce, so the chunked loss would be wrong; extend ctr.extract.run._postprocess")


