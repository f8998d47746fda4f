"""How much of each head's output is tag: one streaming pass per model (paper Fig. 3, rebuttal).

For every prompt, layer and head it records, at every threshold eps of a sweep, the number of
sinks and the variance explained (VE) by their tags; at the main eps it also records the
random-subspace baseline, the counts without the tail guard, the cosine between distinct tags
of a head, and the cosine between each tag mapped into the residual stream (through the head's
slice of W_O) and the residual of the non-sink tokens it tags. Arrays are (prompt, layer, head,
eps); nothing of size T x T outlives its layer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm   # text bars: they go to the log, never into the HTML

from .. import analysis
from .. import definitions as D
from .. import extract
from ..models import Model

EPS_SWEEP = (0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.15, 0.2, 0.3, 0.4)


def sweep(alpha: torch.Tensor, V: torch.Tensor, O: torch.Tensor, eps: torch.Tensor,
          rtol: float = 1e-6):
    """Sinks and VE of every head at every threshold at once.

    alpha (H, T), V (H, T, D), O = A V (H, T, D), eps (E,) -> n_sinks (E, H), ve, ve_sq (E, H)
    (NaN where a head has no sink).

    Why one QR suffices: the sinks at a threshold are the keys with alpha > eps, i.e. a prefix of
    the keys sorted by decreasing alpha, so the sink sets of the sweep are nested. Gram-Schmidt on
    the sorted sink values gives an orthonormal q_j per new direction (a value already in the
    span of the earlier ones adds nothing: |R_jj| ~ 0), and ||O U_k||^2 = sum_{j<k} ||O q_j||^2.
    """
    H, T, Dh = V.shape
    a = alpha.nan_to_num(-1.0)
    k = (a.unsqueeze(0) > eps.view(-1, 1, 1)).sum(-1)                       # (E, H)
    K = int(k.max())
    nan = torch.full(k.shape, float("nan"), dtype=torch.float64)
    if K == 0:
        return k, nan, nan
    order = torch.argsort(a, dim=-1, descending=True, stable=True)[:, :K]   # (H, K)
    Vs = torch.gather(V, 1, order.unsqueeze(-1).expand(H, K, Dh)).to(torch.float64)
    Vs = Vs * (torch.arange(K) < k.max(0).values.unsqueeze(1)).unsqueeze(-1)
    Q, R = torch.linalg.qr(Vs.transpose(1, 2))                              # (H, D, K), (H, K, K)
    d = R.diagonal(dim1=-2, dim2=-1).abs()
    new = d > rtol * d.amax(-1, keepdim=True).clamp_min(1e-300)              # adds a direction
    O64 = O.to(torch.float64)
    c = ((O64 @ Q) ** 2).sum(1) * new                                       # (H, min(D, K))
    if c.shape[1] < K:          # more sinks than dimensions: the extra ones add nothing
        c = torch.cat([c, c.new_zeros(H, K - c.shape[1])], 1)
    cum = torch.cat([torch.zeros(H, 1, dtype=torch.float64), c.cumsum(-1)], -1)  # (H, K+1)
    tot = (O64 ** 2).sum((1, 2))                                            # (H,)
    ve_sq = torch.gather(cum.unsqueeze(0).expand(k.shape[0], H, K + 1), 2, k.unsqueeze(-1))[..., 0] / tot
    ve_sq = torch.where(k > 0, ve_sq.clamp(0, 1), nan)
    return k, ve_sq.sqrt(), ve_sq


@dataclass
class Result:
    model: str
    eps: tuple
    n_sinks: np.ndarray          # (P, L, H, E)
    ve: np.ndarray               # (P, L, H, E)
    ve_sq: np.ndarray
    ve_random: np.ndarray        # (P, L, H) at the main eps
    ve_expected: np.ndarray      # (P, L, H) sqrt(k / d_head)
    n_sinks_unguarded: np.ndarray  # (P, L, H) at the main eps, min_queries = 1
    tail_unguarded: np.ndarray   # (P, L, H) of those, sinks among the last ``min_queries - 1`` keys
    bos_sink: np.ndarray         # (P, L, H) token 0 is a sink at the main eps
    seconds: float = 0.0
    tag_cos: list = field(default_factory=list)       # cosines between distinct tags of a head
    tag_token: np.ndarray = None  # (P, L) mean cosine(tag through W_O, residual of tagged token)
    head_dim: int = 0
    min_queries: int = 1
    main_eps: float = D.EPS


def run(model: Model, texts: list[str], max_tokens: int = 150, eps=EPS_SWEEP,
        main_eps: float = D.EPS, min_queries: int = 16, seed: int = 0, batch_size: int = 8,
        progress: bool = True) -> Result:
    eps = tuple(eps)
    if main_eps not in eps:
        raise ValueError(f"main_eps={main_eps} must be one of the swept eps {eps}")
    eps_t = torch.tensor(eps, dtype=torch.float64)
    batch = model.encode(texts, max_tokens=max_tokens)
    P, L, H, E = len(texts), model.n_layers, model.n_heads, len(eps)
    t0 = time.time()
    r = Result(model=model.name, eps=eps, n_sinks=np.zeros((P, L, H, E), np.int16),
               ve=np.full((P, L, H, E), np.nan), ve_sq=np.full((P, L, H, E), np.nan),
               ve_random=np.full((P, L, H), np.nan), ve_expected=np.full((P, L, H), np.nan),
               n_sinks_unguarded=np.zeros((P, L, H), np.int16),
               tail_unguarded=np.zeros((P, L, H), np.int16), bos_sink=np.zeros((P, L, H), bool),
               tag_token=np.full((P, L), np.nan), head_dim=model.head_dim,
               min_queries=min_queries, main_eps=main_eps)
    gen = torch.Generator().manual_seed(seed)
    W_O = [model.out_proj(l).detach().float() for l in range(L)]
    Dh = model.head_dim
    bar = tqdm(total=P * L, desc=f"{model.name}: variance", unit="layer", disable=not progress)
    for start in range(0, P, batch_size):
        idx = list(range(start, min(start + batch_size, P)))
        for rec_b in extract.layers(model, batch.select(idx)):
            for b, p in enumerate(idx):
                _layer(r, p, rec_b.prompt(b), eps_t, main_eps, min_queries, gen, W_O, Dh)
            bar.update(len(idx))
    bar.close()
    r.seconds = time.time() - t0
    return r


def _layer(r: Result, p: int, rec, eps_t, main_eps, min_queries, gen, W_O, Dh) -> None:
    l = rec.layer
    A, V = rec.A[0].float(), rec.V[0].float()
    O = rec.head_out[0].transpose(0, 1).float()
    a = D.alpha(A, rec.window, min_queries)
    k, ve, ve2 = sweep(a.double(), V.double(), O, eps_t)
    r.n_sinks[p, l] = k.T.numpy()
    r.ve[p, l], r.ve_sq[p, l] = ve.T.numpy(), ve2.T.numpy()
    main = analysis.layer_summary(A, V, O, rec.window, main_eps, min_queries, gen, alpha=a)
    r.ve_random[p, l] = main["ve_random"].numpy()
    r.ve_expected[p, l] = main["ve_expected"].numpy()
    S = main["S"]
    r.bos_sink[p, l] = S[:, 0].numpy()
    # once, the same counts without the guard: the tail artifact
    S1 = D.sinks(D.alpha(A, rec.window, 1), main_eps)
    T = A.shape[-1]
    r.n_sinks_unguarded[p, l] = S1.sum(-1).numpy()
    r.tail_unguarded[p, l] = S1[:, T - (min_queries - 1):].sum(-1).numpy() if min_queries > 1 else 0
    _tag_geometry(r, p, l, A, V, S, W_O[l], rec.resid_in[0].float(), Dh)


def _tag_geometry(r: Result, p: int, l: int, A, V, S, W_O, resid, Dh) -> None:
    """Cosines between distinct tags of each head, and between each tag mapped to the residual
    stream (W_O restricted to the head's D columns) and the residual entering the layer of the
    non-sink tokens that attend most to that sink (the tokens it tags)."""
    H, T, _ = V.shape
    k = S.sum(-1)
    K = int(k.max())
    if K == 0:
        return
    order = torch.argsort((~S).to(torch.int8), dim=-1, stable=True)[:, :K]   # sink positions first
    valid = torch.arange(K) < k.unsqueeze(1)                                 # (H, K)
    tags = torch.gather(V, 1, order.unsqueeze(-1).expand(H, K, Dh))         # (H, K, D)
    tn = torch.nn.functional.normalize(tags, dim=-1)
    c = tn @ tn.transpose(1, 2)
    pair = valid.unsqueeze(2) & valid.unsqueeze(1) & torch.ones(K, K, dtype=torch.bool).triu(1)
    r.tag_cos.extend(c[pair].tolist())
    mapped = torch.einsum("hkD,dhD->hkd", tags, W_O.view(W_O.shape[0], H, Dh))
    cos = torch.einsum("hkd,td->hkt", torch.nn.functional.normalize(mapped, dim=-1),
                       torch.nn.functional.normalize(resid, dim=-1))          # (H, K, T)
    w = torch.gather(A, 2, order.unsqueeze(1).expand(H, T, K)).masked_fill(~valid.unsqueeze(1), -1.0)
    dom = w.argmax(-1)                                                       # (H, T) dominant sink
    first = torch.where(valid, order, T).amin(-1)                            # earliest sink per head
    tagged = ~S & (torch.arange(T).unsqueeze(0) > first.unsqueeze(1))        # non-sinks that see one
    vals = torch.gather(cos, 1, dom.unsqueeze(1))[:, 0]                      # (H, T)
    if tagged.any():
        r.tag_token[p, l] = float(vals[tagged].mean())


TAG_BINS = np.round(np.arange(-1.0, 1.0001, 0.05), 2)   # 0.05-wide bins: [-0.05, 0.05) is two of them


def summary(r: Result) -> dict:
    """The chapter's key numbers for one model (what the results file keeps)."""
    e = r.eps.index(r.main_eps)
    n = r.n_sinks[..., e]
    ve = r.ve[..., e]
    has = ~np.isnan(ve)
    tc = np.asarray(r.tag_cos)
    n_total = int(n.sum())
    return {
        "prompts": int(n.shape[0]), "layers": int(n.shape[1]), "heads": int(n.shape[2]),
        "eps": r.main_eps, "min_queries": r.min_queries,
        "sinks_per_head": float(n.mean()),
        "share_heads_1_2_sinks": float(((n >= 1) & (n <= 2)).mean()),
        "share_heads_no_sink": float((n == 0).mean()),
        "share_heads_bos_sink": float(r.bos_sink.mean()),
        "share_sinks_not_bos": float(1 - r.bos_sink.sum() / n_total) if n_total else None,
        "ve_mean": float(np.nanmean(ve)) if has.any() else None,
        "ve_median": float(np.nanmedian(ve)) if has.any() else None,
        "ve_quartiles": [float(x) for x in np.nanpercentile(ve, [25, 75])] if has.any() else None,
        "ve_p90": float(np.nanpercentile(ve, 90)) if has.any() else None,
        "ve_sq_mean": float(np.nanmean(r.ve_sq[..., e])) if has.any() else None,
        "ve_random_mean": float(np.nanmean(r.ve_random)) if has.any() else None,
        "ve_expected_mean": float(np.nanmean(r.ve_expected)) if has.any() else None,
        "share_heads_ve_above_0.5": float((ve[has] > 0.5).mean()) if has.any() else None,
        "sinks_per_head_unguarded": float(r.n_sinks_unguarded.mean()),
        "tail_sinks_per_head_unguarded": float(r.tail_unguarded.mean()),
        "sweep": [{"eps": eps, "sinks": float(r.n_sinks[..., i].mean()),
                   "ve": float(np.nanmean(r.ve[..., i])) if (~np.isnan(r.ve[..., i])).any() else None}
                  for i, eps in enumerate(r.eps)],
        "tag_pairs": int(tc.size),
        "tag_cos_hist": np.histogram(tc, bins=TAG_BINS)[0].tolist() if tc.size else [],
        "tag_cos_share_near_0": float(((tc >= -0.05) & (tc < 0.05)).mean()) if tc.size else None,
        "tag_cos_median": float(np.median(tc)) if tc.size else None,
        "tag_token_cos": float(np.nanmean(r.tag_token)) if (~np.isnan(r.tag_token)).any() else None,
        "ve_by_layer": [float(x) if x == x else None for x in
                        (np.nanmean(np.where(has, ve, np.nan), axis=(0, 2)) if has.any()
                         else np.full(n.shape[1], np.nan))],
    }
