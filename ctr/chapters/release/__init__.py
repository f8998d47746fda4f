r"""Release, tested (beyond the paper), part 1: does next-token prediction need the tags?

The paper shows that tags exist and can be read by a probe; it never removes one. Here, for one
layer at a time, the tag part of every head's output is removed (or mean-ablated) and the change
in next-token cross-entropy is measured, against a control that removes the same norm in the
residual stream along a random direction of each head's value space (``release.means``: what
each ablation removes, and the control). Sinks as in the variance chapter: a key is a sink of
head (l, h) in a prompt when its alpha exceeds eps (0.2) and at least ``min_queries`` queries
see it (the tail guard).

Conditions (``CONDITIONS``), each with its control ("<name>_ctrl"):

- ``mean_bos``: the first-token tags mean-ablated (each head's x_p(t) = A[t,0] v_0, where
  position 0 is a sink, replaced by its mean over the other prompts at t): the information the
  tag carries goes, its average stays. The primary reading of RULES.md's tags_lm_bos;
- ``zero_bos``: the first-token tags removed (shown beside it, no verdict);
- ``zero_mid``: the mid-prompt tags removed (tags_lm_mid);
- ``mean_mid``: each mid-prompt sink's value replaced by that sink token's mean value over its
  occurrences as a sink of the head in the prompt set (tags_lm_specific): the part specific to
  this prompt goes; a token that is a sink of the head in one prompt only loses nothing.

Position 0 holds BOS where the model's BOS policy prepends one, else the first text token.

Cost: an ablated pass changes nothing below its layer, so it starts from the clean run's
residual stream there (``extract.run(start=...)``), and the loss may be scored on a seeded
subset of positions shared by every condition (Gemma-3's 262k-token head dominates a pass).
The swap experiment (part 2) is in ``release.swap`` (prompts: ``release.prompts``), the
verdict rules in ``release.verdicts``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm   # text bars: they go to the log, never into the HTML

from ... import definitions as D
from ... import extract
from ...models import Model
from .means import (LayerStats, _Accumulator, attention_write,  # noqa: F401
                            first_token_removed, matched_control, means_at, removed_part,
                            residual_control,
                            residual_gram, residual_norm, select, sink_summary)

# condition -> (ablation, which sinks); each also runs with its random control ("<name>_ctrl")
CONDITIONS = {"mean_bos": ("mean", "bos"), "zero_bos": ("zero", "bos"),
              "zero_mid": ("zero", "mid"), "mean_mid": ("mean", "mid")}
NOTHING = 1e-6   # a removed norm below this share of the head outputs' norm is numerically nothing
# conditions that also run the alternative control (not pre-registered), "<name>_ctrl_actual":
# the rule's control scaled per token to the tag's actual change of the attention's write
ACTUAL_CONTROL = ("mean_bos",)


def cpu_seconds() -> float:
    """CPU time of this process (user + system), all threads."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sink_mask(A: torch.Tensor, lengths, window: int | None, eps: float,
              min_queries: int) -> torch.Tensor:
    """Sinks (B, H, T) of every head of one layer, each prompt on its own length (on the CPU).
    A (B, H, T, T) right-padded attention; padding columns are never sinks."""
    B, H, T, _ = A.shape
    S = torch.zeros(B, H, T, dtype=torch.bool)
    for n in sorted(set(lengths)):
        idx = [b for b, m in enumerate(lengths) if m == n]
        a = D.alpha(A[idx][:, :, :n, :n].float(), window, min_queries)      # (b, H, n)
        S[idx, :, :n] = D.sinks(a, eps).cpu()
    return S


def removed_by(st: LayerStats, idx, ids: torch.Tensor, rec, ablation: str, which: str,
               heads=None) -> torch.Tensor:
    """What one condition removes from the head outputs of the prompts ``idx`` (ids (B, T)
    their token ids) at a layer whose clean-pass record is ``rec``: (B, T, H, D) float64."""
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation={ablation!r}: use 'zero' (remove z_tag) or 'mean'")
    T = rec.head_out.shape[1]
    S = select(st.S[idx][:, :, :T], which)
    if heads is not None:
        keep = torch.zeros(S.shape[1], dtype=torch.bool)
        keep[list(heads)] = True
        S = S & keep.view(1, -1, 1)
    dev = rec.A.device
    if ablation == "mean" and which == "bos":
        return first_token_removed(st, rec.A, rec.V, S.to(dev), rec.lengths)
    if ablation == "mean" and which != "mid":
        raise ValueError("mean-ablation is defined for the first token ('bos') or the "
                         "mid-prompt sinks ('mid'), one at a time")
    M = means_at(st, idx, ids[:, :T], S).to(dev) if ablation == "mean" else None
    return removed_part(rec.A, rec.V, S.to(dev), M)


def make_edit(st: LayerStats, idx, ids: torch.Tensor, ablation: str, which: str,
              control: bool = False, generator: torch.Generator | None = None,
              heads=None, log: dict | None = None, gram: torch.Tensor | None = None,
              write=None):
    """The edit (for ``extract.run(edits={l: ...})``) of one condition on the prompts ``idx``
    (ids (B, T) their token ids): new head outputs = old - removed. ``control``: remove instead
    the residual-space control (``residual_control``; needs ``gram``, the layer's
    ``residual_gram``); ``control="actual"``: the alternative control matched on the actual
    change of the attention's write (``matched_control``; needs ``write`` too).
    ``heads``: only these heads (default all). ``log`` collects the norms
    removed in the head outputs ("removed", "output") and in the residual stream ("resid",
    where ``gram`` is given), and, with ``write`` (``attention_write``), the actual change of
    what the attention adds to the residual stream ("actual")."""
    if control and gram is None:
        raise ValueError("the control needs the layer's residual_gram(W_O, post-attention scale)")
    if control == "actual" and write is None:
        raise ValueError("the actual-matched control needs the layer's attention_write")

    def edit(rec):
        T = rec.head_out.shape[1]
        removed = removed_by(st, idx, ids, rec, ablation, which, heads)
        if control == "actual":
            removed = matched_control(removed, rec.head_out, write, gram, generator)
        elif control:
            removed = residual_control(removed, gram, generator)
        if log is not None:
            valid = (torch.arange(T).unsqueeze(0) < torch.tensor(rec.lengths).unsqueeze(1)).to(removed.device)
            log["removed"] = log.get("removed", 0.0) + float(removed.norm(dim=-1)[valid].sum())
            log["output"] = log.get("output", 0.0) + float(rec.head_out.double().norm(dim=-1)[valid].sum())
            if gram is not None:
                log["resid"] = log.get("resid", 0.0) + float(residual_norm(removed, gram)[valid].sum())
        new = (rec.head_out.double() - removed).to(rec.head_out.dtype)
        if log is not None and write is not None:
            change = (write(new) - write(rec.head_out)).norm(dim=-1)
            log["actual"] = log.get("actual", 0.0) + float(change[valid.to(change.device)].sum())
        return new
    return edit


def loss_mask(lengths, T: int, n_positions: int | None, seed: int = 0) -> torch.Tensor | None:
    """A fixed seeded subset of ``n_positions`` scored positions per prompt (B, T-1), shared by
    every condition; None scores every position."""
    if n_positions is None:
        return None
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), T - 1, dtype=torch.bool)
    for b, n in enumerate(lengths):
        pick = torch.randperm(n - 1, generator=g)[:n_positions]
        mask[b, pick] = True
    return mask


def even_layers(L: int, k: int | None) -> list[int]:
    """``k`` layers evenly spaced from the first to the last (None or k >= L: all)."""
    if k is None or k >= L:
        return list(range(L))
    if k < 1:
        raise ValueError(f"ablate {k} layers? give at least 1 (or None for every layer)")
    return sorted({int(round(x)) for x in np.linspace(0, L - 1, k)})


@dataclass
class Ablation:
    model: str
    layers: list[int]
    conditions: list[str]            # tag conditions; each has "<name>_ctrl"
    delta: dict[str, np.ndarray]     # condition -> (K, P) per-prompt mean change in loss
    removed_share: dict[str, np.ndarray]   # condition -> (K,) sum ||removed|| / sum ||o||
    clean_loss: np.ndarray           # (P,) mean loss of the clean run on the scored positions
    skipped: list = field(default_factory=list)   # (layer, condition) with no such sink: not run
    tag_share: list = field(default_factory=list)  # every layer: [first-token, mid] sum ||z_tag|| /
    #                                                sum ||o|| over heads, tokens, prompts (clean)
    sinks: dict = field(default_factory=dict)   # per layer: bos, mid sinks per head, mean support
    bos_spread: list = field(default_factory=list)
    resid_norm: dict = field(default_factory=dict)   # condition -> (K,) sum of the residual-
    #                                                  stream norms removed (tag = its control)
    actual_norm: dict = field(default_factory=dict)  # condition -> (K,) sum of the norms of the
    #                                                  actual change of the attention's write
    n_layers: int = 0
    n_positions: int | None = None
    eps: float = D.EPS
    min_queries: int = 16
    same_first_token: bool = False   # every prompt starts with the same token (e.g. BOS)
    seconds: float = 0.0
    cpu: float = 0.0

    def removed(self, c: str) -> np.ndarray:
        """(K,) bool: the layers where condition ``c`` removed something (more than ``NOTHING``
        of the head outputs' norm)."""
        return np.nan_to_num(self.removed_share[c]) > NOTHING


def ablate(model: Model, texts: list[str], max_tokens: int = 150, eps: float = D.EPS,
           min_queries: int = 16, layers: list[int] | None = None, top: int = 0,
           conditions=tuple(CONDITIONS), n_positions: int | None = None, seed: int = 0,
           batch_size: int = 32, progress: bool = True) -> Ablation:
    """Each condition and its control at each of ``layers`` (default all), on every prompt;
    with ``top``, also at the ``top`` layers whose tags (first-token and mid-prompt together)
    hold the largest share of the head outputs' norm in the clean pass (chosen before any
    ablation is run, on the size of the tags, not on what removing them does)."""
    D.check_eps(eps)
    D.check_min_queries(min_queries)
    bad = set(conditions) - set(CONDITIONS)
    if bad:
        raise ValueError(f"unknown conditions {sorted(bad)}; known: {', '.join(CONDITIONS)}")
    t0, c0 = time.time(), cpu_seconds()
    batch = model.encode(texts, max_tokens=max_tokens)
    P, L, H, Dh = len(texts), model.n_layers, model.n_heads, model.head_dim
    layers = list(range(L)) if layers is None else sorted(layers)
    mask = loss_mask(batch.lengths, batch.input_ids.shape[1], n_positions, seed)
    chunks = [list(range(i, min(i + batch_size, P))) for i in range(0, P, batch_size)]
    acc = {l: _Accumulator(P, H, batch.input_ids.shape[1], Dh) for l in range(L)}
    norms = np.zeros((L, 3))                   # per layer: sum ||z_tag|| (first, mid), sum ||o||
    clean, resid = [], {}
    for idx in chunks:
        sub = batch.select(idx)

        def collect(rec, idx=idx, sub=sub):
            S = sink_mask(rec.A, rec.lengths, rec.window, eps, min_queries)
            acc[rec.layer].add(idx, sub.input_ids, S, rec.V, rec.A, rec.lengths)
            Sd = S.to(rec.A.device)
            valid = (torch.arange(rec.A.shape[-1]).unsqueeze(0)
                     < torch.tensor(rec.lengths).unsqueeze(1)).to(rec.A.device)
            for j, which in enumerate(("bos", "mid")):
                norms[rec.layer, j] += float(removed_part(rec.A, rec.V, select(Sd, which))
                                             .norm(dim=-1)[valid].sum())
            norms[rec.layer, 2] += float(rec.head_out.double().norm(dim=-1)[valid].sum())
        r = extract.run(model, sub, loss=_sub(mask, idx, sub), keep_resid=True, on_layer=collect)
        clean.append(r.loss)
        resid[idx[0]] = r
    stats = {l: acc[l].done() for l in range(L)}
    tag_share = norms[:, :2] / np.maximum(norms[:, 2:], 1e-300)              # (L, 2)
    if top:
        layers = sorted(set(layers) | set(np.argsort(-tag_share.sum(1), kind="stable")[:top].tolist()))
    base = [c for n in conditions for c in (n, f"{n}_ctrl")]
    names = [c for n in conditions
             for c in (n, f"{n}_ctrl") + ((f"{n}_ctrl_actual",) if n in ACTUAL_CONTROL else ())]
    delta = {c: np.zeros((len(layers), P)) for c in names}
    share = {c: np.zeros(len(layers)) for c in names}
    rnorm = {c: np.zeros(len(layers)) for c in names}
    actual = {c: np.zeros(len(layers)) for c in names}
    bar = tqdm(total=len(layers) * len(names) * len(chunks), desc=f"{model.name}: ablations",
               unit="pass", disable=not progress)
    skipped = []
    for i, l in enumerate(layers):
        gram = residual_gram(model.out_proj(l), model.post_attn_scale(l), H)
        write = attention_write(model, l)
        for c in names:
            ablation, which = CONDITIONS[c.removesuffix("_actual").removesuffix("_ctrl")]
            control = "actual" if c.endswith("_actual") else c.endswith("_ctrl")
            if not select(stats[l].S, which).any():
                # no such sink in any prompt: the edit removes exactly nothing (tested), so the
                # pass would give the clean loss; it is not run
                skipped.append((l, c))
                bar.update(len(chunks))
                continue
            # the alternative control draws the same directions as the rule's control
            ci = base.index(c.removesuffix("_actual"))
            gen = torch.Generator().manual_seed(seed * 1_000_003 + 1009 * l + ci)
            log: dict = {}
            for j, idx in enumerate(chunks):
                sub = batch.select(idx)
                f = make_edit(stats[l], idx, sub.input_ids, ablation, which, control,
                              gen, log=log, gram=gram, write=write)
                r = extract.run(model, sub, loss=_sub(mask, idx, sub), edits={l: f},
                                start=resid[idx[0]].start(l))
                delta[c][i, idx] = _per_prompt(r.loss - clean[j])
                bar.update(1)
            share[c][i] = log["removed"] / log["output"]
            rnorm[c][i] = log["resid"]
            actual[c][i] = log["actual"]
    bar.close()
    clean_loss = np.concatenate([_per_prompt(x) for x in clean])
    return Ablation(model.name, layers, list(conditions), delta, share, clean_loss, skipped,
                    tag_share.tolist(), sinks=sink_summary(stats, layers, batch.input_ids),
                    bos_spread=[stats[l].bos_spread for l in range(L)], resid_norm=rnorm,
                    actual_norm=actual,
                    n_layers=L, n_positions=n_positions, eps=eps, min_queries=min_queries,
                    same_first_token=bool(batch.input_ids[:, 0].unique().numel() == 1),
                    seconds=time.time() - t0,
                    cpu=cpu_seconds() - c0)


def _sub(mask, idx, sub):
    return True if mask is None else mask[idx][:, :sub.input_ids.shape[1] - 1]


def _per_prompt(x: torch.Tensor) -> np.ndarray:
    return torch.nanmean(x.float().double().cpu(), dim=1).numpy()


def summary(a: Ablation) -> dict:
    """JSON-ready: per condition and layer, the mean change in loss over prompts."""
    return {"model": a.model, "layers": a.layers, "n_layers": a.n_layers,
            "conditions": a.conditions, "n_positions": a.n_positions,
            "clean_loss": float(a.clean_loss.mean()), "eps": a.eps, "min_queries": a.min_queries,
            "same_first_token": a.same_first_token,
            "delta": {c: a.delta[c].mean(1).tolist() for c in a.delta},
            "delta_by_prompt": {c: a.delta[c].tolist() for c in a.delta},
            "removed_share": {c: a.removed_share[c].tolist() for c in a.removed_share},
            "resid_norm": {c: a.resid_norm[c].tolist() for c in a.resid_norm},
            "actual_norm": {c: a.actual_norm[c].tolist() for c in a.actual_norm},
            "skipped": [[l, c] for l, c in a.skipped], "tag_share": a.tag_share,
            "sinks": {str(l): v for l, v in a.sinks.items()},
            "bos_spread_max": float(max(a.bos_spread)) if a.bos_spread else None,
            "seconds": round(a.seconds, 1), "cpu_seconds": round(a.cpu, 1)}
