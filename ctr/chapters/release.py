r"""Release, tested (beyond the paper), part 1: does next-token prediction need the tags?

The paper shows that tags exist and can be read by a probe; it never removes one. Here, for one
layer at a time, the tag part of every head's output is removed and the change in next-token
cross-entropy is measured, against a control that removes the same norm from a random subspace
of the same dimension of the same heads. Sinks as in the variance chapter: a key is a sink of
head (l, h) in a prompt when its alpha exceeds eps (0.2) and at least ``min_queries`` queries see
it (the tail guard).

Ablations of head (l, h) on one prompt, S its sinks, o(t) = sum_k A[t,k] v_k its output:

- ``zero``: remove z_tag, o(t) - sum_{s in S} A[t,s] v_s (catch and tag go);
- ``mean``: replace each sink's value by that sink token's mean value, o(t) - sum_{s in S}
  A[t,s] (v_s - m(l,h,tok_s)). m(l,h,tok) is the mean value vector of head (l, h) over every
  occurrence, in every prompt of the set, of token id tok *as a sink of that head*: the part of
  the tag that every such sink shares stays (so does the catch: A is not touched), the part
  that is specific to this prompt goes. Only sink occurrences enter the mean, because a sink
  "." may differ systematically from a non-sink "."; a token that is a sink of the head in only
  one prompt is its own mean there and loses nothing (the chapter reports how often).
- ``bos`` / ``mid``: the sinks at position 0 only (BOS, where the model's BOS policy prepends
  one; else the first text token), or every other sink. The first token sees only itself, so
  its value vector depends on its token id alone (the same in every prompt when it is BOS):
  mean-ablating it by token is exactly a no-op (checked in the clean pass, ``bos_spread``), and
  only ``zero`` is run for it.
- control: per (prompt, head) a uniformly random subspace Q of dimension k (the number of
  sinks removed); at every token the part of o(t) in Q, rescaled to the norm of what the
  ablation removes there, is removed instead (``random_control``).

Cost: an ablated pass changes nothing below its layer, so it starts from the clean run's
residual stream there (``extract.run(start=...)``), and the loss may be scored on a seeded
subset of positions shared by every condition (Gemma-3's 262k-token head dominates a pass).
The clean pass's sink means are kept by ``release_means``; the swap experiment (part 2) is in
``release_swap`` (prompts: ``release_prompts``), the verdict rules in ``release_verdicts``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm   # text bars: they go to the log, never into the HTML

from .. import definitions as D
from .. import extract
from ..models import Model
from .release_means import LayerStats, _Accumulator, means_at, select  # noqa: F401

# condition -> (ablation, which sinks); each also runs with its random control ("<name>_ctrl")
CONDITIONS = {"zero_bos": ("zero", "bos"), "zero_mid": ("zero", "mid"), "mean_mid": ("mean", "mid")}


def cpu_seconds() -> float:
    """CPU time of this process (user + system), all threads."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sink_mask(A: torch.Tensor, lengths, window: int | None, eps: float,
              min_queries: int) -> torch.Tensor:
    """Sinks (B, H, T) of every head of one layer, each prompt on its own length.
    A (B, H, T, T) right-padded attention; padding columns are never sinks."""
    B, H, T, _ = A.shape
    S = torch.zeros(B, H, T, dtype=torch.bool)
    for n in sorted(set(lengths)):
        idx = [b for b, m in enumerate(lengths) if m == n]
        a = D.alpha(A[idx][:, :, :n, :n].float(), window, min_queries)      # (b, H, n)
        S[idx, :, :n] = D.sinks(a, eps)
    return S


def removed_part(A: torch.Tensor, V: torch.Tensor, S: torch.Tensor,
                 M: torch.Tensor | None = None) -> torch.Tensor:
    """What an ablation takes out of the head outputs, (B, T, H, D), in float64.

    A (B, H, T, T), V (B, H, T, D), S (B, H, T) the sinks ablated. M None: z_tag =
    sum_{s in S} A[t,s] v_s. M (B, H, T, D) the mean value at each sink: sum A[t,s] (v_s - m_s).
    """
    W = A.double() * S.unsqueeze(-2).double()                               # (B, H, T, T)
    X = V.double() if M is None else V.double() - M.double()
    return (W @ X).transpose(1, 2)


def random_control(O: torch.Tensor, removed: torch.Tensor, k: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The control for ``removed``: per (prompt, head) a random k-dim subspace Q of R^D (k from
    ``k`` (B, H); k = 0 removes nothing); at every token the projection of the head output onto
    Q, rescaled to the norm of ``removed`` at that token. O, removed (B, T, H, D); returns the
    (B, T, H, D) float64 part to remove, with ||out(t)|| = ||removed(t)|| for every (b, t, h)
    where the projection is not zero."""
    B, T, H, Dh = O.shape
    K = max(int(k.max()), 1) if k.numel() else 1
    G = torch.randn(B, H, Dh, K, generator=generator, dtype=torch.float64)
    Q, _ = torch.linalg.qr(G)                                               # (B, H, D, K)
    Q = Q * (torch.arange(K) < k.unsqueeze(-1)).unsqueeze(-2).to(Q.dtype)   # keep k columns
    Oh = O.double().transpose(1, 2)                                         # (B, H, T, D)
    P = (Oh @ Q) @ Q.transpose(-1, -2)                                      # (B, H, T, D)
    want = removed.double().transpose(1, 2).norm(dim=-1, keepdim=True)      # (B, H, T, 1)
    have = P.norm(dim=-1, keepdim=True)
    scale = torch.where(have > 0, want / have.clamp_min(1e-300), torch.zeros_like(have))
    return (P * scale).transpose(1, 2)


def make_edit(st: LayerStats, idx, ids: torch.Tensor, ablation: str, which: str,
              control: bool = False, generator: torch.Generator | None = None,
              heads=None, log: dict | None = None):
    """The edit (for ``extract.run(edits={l: ...})``) of one condition on the prompts ``idx``
    (ids (B, T) their token ids): new head outputs = old - removed. ``heads``: only these heads
    (default all). ``log`` collects the norms removed."""
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation={ablation!r}: use 'zero' (remove z_tag) or 'mean'")

    def edit(rec):
        B, T = rec.head_out.shape[:2]
        S = select(st.S[idx][:, :, :T], which)
        if heads is not None:
            keep = torch.zeros(S.shape[1], dtype=torch.bool)
            keep[list(heads)] = True
            S = S & keep.view(1, -1, 1)
        M = means_at(st, idx, ids[:, :T], S) if ablation == "mean" else None
        removed = removed_part(rec.A, rec.V, S, M)
        if control:
            removed = random_control(rec.head_out, removed, S.sum(-1), generator)
        if log is not None:
            valid = torch.arange(T).unsqueeze(0) < torch.tensor(rec.lengths).unsqueeze(1)
            log["removed"] = log.get("removed", 0.0) + float(removed.norm(dim=-1)[valid].sum())
            log["output"] = log.get("output", 0.0) + float(rec.head_out.double().norm(dim=-1)[valid].sum())
        return (rec.head_out.double() - removed).to(rec.head_out.dtype)
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
    n_layers: int = 0
    n_positions: int | None = None
    seconds: float = 0.0
    cpu: float = 0.0


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
            acc[rec.layer].add(idx, sub.input_ids, S, rec.V)
            valid = torch.arange(rec.A.shape[-1]).unsqueeze(0) < torch.tensor(rec.lengths).unsqueeze(1)
            for j, which in enumerate(("bos", "mid")):
                norms[rec.layer, j] += float(removed_part(rec.A, rec.V, select(S, which))
                                             .norm(dim=-1)[valid].sum())
            norms[rec.layer, 2] += float(rec.head_out.double().norm(dim=-1)[valid].sum())
        r = extract.run(model, sub, loss=_sub(mask, idx, sub), keep_resid=True, on_layer=collect)
        clean.append(r.loss)
        resid[idx[0]] = r
    stats = {l: acc[l].done() for l in range(L)}
    tag_share = norms[:, :2] / np.maximum(norms[:, 2:], 1e-300)              # (L, 2)
    if top:
        layers = sorted(set(layers) | set(np.argsort(-tag_share.sum(1), kind="stable")[:top].tolist()))
    names = [c for n in conditions for c in (n, f"{n}_ctrl")]
    delta = {c: np.zeros((len(layers), P)) for c in names}
    share = {c: np.zeros(len(layers)) for c in names}
    bar = tqdm(total=len(layers) * len(names) * len(chunks), desc=f"{model.name}: ablations",
               unit="pass", disable=not progress)
    skipped = []
    for i, l in enumerate(layers):
        for ci, c in enumerate(names):
            ablation, which = CONDITIONS[c.removesuffix("_ctrl")]
            if not select(stats[l].S, which).any():
                # no such sink in any prompt: the edit removes exactly nothing (tested), so the
                # pass would give the clean loss; it is not run
                skipped.append((l, c))
                bar.update(len(chunks))
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + 1009 * l + ci)
            log: dict = {}
            for j, idx in enumerate(chunks):
                sub = batch.select(idx)
                f = make_edit(stats[l], idx, sub.input_ids, ablation, which, c.endswith("_ctrl"),
                              gen, log=log)
                r = extract.run(model, sub, loss=_sub(mask, idx, sub), edits={l: f},
                                start=resid[idx[0]].start(l))
                delta[c][i, idx] = _per_prompt(r.loss - clean[j])
                bar.update(1)
            share[c][i] = log["removed"] / log["output"]
    bar.close()
    clean_loss = np.concatenate([_per_prompt(x) for x in clean])
    return Ablation(model.name, layers, list(conditions), delta, share, clean_loss, skipped,
                    tag_share.tolist(),
                    sinks=_sink_summary(stats, layers, batch.input_ids), bos_spread=[stats[l].bos_spread for l in range(L)],
                    n_layers=L, n_positions=n_positions, seconds=time.time() - t0,
                    cpu=cpu_seconds() - c0)


def _sub(mask, idx, sub):
    return True if mask is None else mask[idx][:, :sub.input_ids.shape[1] - 1]


def _per_prompt(x: torch.Tensor) -> np.ndarray:
    return torch.nanmean(x.double(), dim=1).numpy()


def _sink_summary(stats: dict[int, LayerStats], layers, ids: torch.Tensor) -> dict:
    """Per ablated layer: BOS and mid-prompt sinks per head, and the share of mid-prompt sink
    occurrences whose (head, token) mean is taken over at least two prompts (elsewhere the
    mean ablation removes nothing)."""
    out = {}
    for l in layers:
        st = stats[l]
        S = st.S
        mid = select(S, "mid")
        b, h, t = torch.nonzero(mid, as_tuple=True)
        shared = None
        if len(b):
            support = st.n_prompts[h, torch.searchsorted(st.tokens, ids[b, t])]
            shared = float(support.ge(2).double().mean())
        out[l] = {"bos_per_head": float(S[..., 0].double().mean()),
                  "mid_per_head": float(mid.sum(-1).double().mean()),
                  "mean_over_2_prompts": shared}
    return out


def summary(a: Ablation) -> dict:
    """JSON-ready: per condition and layer, the mean change in loss over prompts."""
    return {"model": a.model, "layers": a.layers, "n_layers": a.n_layers,
            "conditions": a.conditions, "n_positions": a.n_positions,
            "clean_loss": float(a.clean_loss.mean()),
            "delta": {c: a.delta[c].mean(1).tolist() for c in a.delta},
            "delta_by_prompt": {c: a.delta[c].tolist() for c in a.delta},
            "removed_share": {c: a.removed_share[c].tolist() for c in a.removed_share},
            "skipped": [[l, c] for l, c in a.skipped], "tag_share": a.tag_share,
            "sinks": {str(l): v for l, v in a.sinks.items()},
            "bos_spread_max": float(max(a.bos_spread)) if a.bos_spread else None,
            "seconds": round(a.seconds, 1), "cpu_seconds": round(a.cpu, 1)}
