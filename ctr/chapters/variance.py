"""How much of each head's output is tag: one streaming pass per model (paper Fig. 3, rebuttal).

For every prompt, layer and head it records, at every threshold eps of a sweep, the number of
sinks and the variance explained (VE) by their tags; at the main eps it also records the
random-subspace baseline, the counts without the tail guard, and the tag geometry: every tag
mapped into the residual stream through its head's slice of W_O, the cosines between the mapped
tags of different heads of one layer (and of one head), and the cosine between each mapped tag
and the residual of the tokens it tags. Arrays are (prompt, layer, head, eps) or per prompt, so
that intervals can be bootstrapped over prompts; nothing of size T x T outlives its layer.
The rules that turn these numbers into verdicts are in ``variance_verdicts``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

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


# The paper's ten bins for tag-pair cosines (its rebuttal histogram; the last bin is closed),
# and 0.05-wide bins for the figure. [-0.05, 0.05) is two bins of either.
PAIR_BINS = np.array([-1.0, -0.6, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.6, 1.0])
FINE_BINS = np.round(np.arange(-1.0, 1.0001, 0.05), 2)


@dataclass
class Result:
    model: str
    eps: tuple
    n_sinks: np.ndarray          # (P, L, H, E)
    ve: np.ndarray               # (P, L, H, E), NaN where a head has no sink
    ve_sq: np.ndarray
    ve_random: np.ndarray        # (P, L, H) at the main eps
    ve_expected: np.ndarray      # (P, L, H) sqrt(k / d_head)
    n_sinks_unguarded: np.ndarray  # (P, L, H) at the main eps, min_queries = 1
    tail_unguarded: np.ndarray   # (P, L, H) of those, sinks among the last ``min_queries - 1`` keys
    bos_sink: np.ndarray         # (P, L, H) token 0 is a sink at the main eps
    pairs_cross: np.ndarray = None   # (P, 10) tag pairs of different heads of a layer, paper's bins
    pairs_within: np.ndarray = None  # (P, 10) pairs of distinct tags of one head
    fine_cross: np.ndarray = None    # (P, 40) the same in 0.05-wide bins
    fine_within: np.ndarray = None
    tag_token: np.ndarray = None     # (P, L) mean cos(tag through W_O, residual of tagged token)
    tag_token_abs: np.ndarray = None  # (P, L) mean |cos| of the same pairs
    seconds: float = 0.0
    head_dim: int = 0
    d_model: int = 0
    min_queries: int = 1
    main_eps: float = D.EPS

    def ve_zero(self) -> np.ndarray:
        """VE with a sinkless head counted as 0: what the formula gives for an empty U, and the
        reading the paper's threshold table supports (its average falls as eps grows)."""
        return np.nan_to_num(self.ve, nan=0.0)


def run(model: Model, texts: list[str], max_tokens: int = 150, eps=EPS_SWEEP,
        main_eps: float = D.EPS, min_queries: int = 16, seed: int = 0, batch_size: int = 8,
        progress: bool = True) -> Result:
    eps = tuple(eps)
    D.check_eps(eps)
    D.check_min_queries(min_queries)
    if main_eps not in eps:
        raise ValueError(f"main_eps={main_eps} must be one of the swept eps {eps}")
    eps_t = torch.tensor(eps, dtype=torch.float64)
    batch = model.encode(texts, max_tokens=max_tokens)
    P, L, H, E = len(texts), model.n_layers, model.n_heads, len(eps)
    t0 = time.time()
    nb, nf = len(PAIR_BINS) - 1, len(FINE_BINS) - 1
    r = Result(model=model.name, eps=eps, n_sinks=np.zeros((P, L, H, E), np.int16),
               ve=np.full((P, L, H, E), np.nan), ve_sq=np.full((P, L, H, E), np.nan),
               ve_random=np.full((P, L, H), np.nan), ve_expected=np.full((P, L, H), np.nan),
               n_sinks_unguarded=np.zeros((P, L, H), np.int16),
               tail_unguarded=np.zeros((P, L, H), np.int16), bos_sink=np.zeros((P, L, H), bool),
               pairs_cross=np.zeros((P, nb), np.int64), pairs_within=np.zeros((P, nb), np.int64),
               fine_cross=np.zeros((P, nf), np.int64), fine_within=np.zeros((P, nf), np.int64),
               tag_token=np.full((P, L), np.nan), tag_token_abs=np.full((P, L), np.nan),
               head_dim=model.head_dim, d_model=model.d_model, min_queries=min_queries,
               main_eps=main_eps)
    gen = torch.Generator().manual_seed(seed)
    W_O = [model.out_proj(l).detach().float() for l in range(L)]
    bar = tqdm(total=P * L, desc=f"{model.name}: variance", unit="layer", disable=not progress)
    for start in range(0, P, batch_size):
        idx = list(range(start, min(start + batch_size, P)))
        for rec_b in extract.layers(model, batch.select(idx)):
            for b, p in enumerate(idx):
                _layer(r, p, rec_b.prompt(b), eps_t, main_eps, min_queries, gen, W_O)
            bar.update(len(idx))
    bar.close()
    r.seconds = time.time() - t0
    return r


def _layer(r: Result, p: int, rec, eps_t, main_eps, min_queries, gen, W_O) -> None:
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
    _tag_geometry(r, p, l, A, V, S, W_O[l], rec.resid_in[0].float())


def mapped_tags(V: torch.Tensor, S: torch.Tensor, W_O: torch.Tensor):
    """Every tag written into the residual stream: W_O restricted to the head's D columns times
    the sink's value vector. V (H, T, D), S (H, T), W_O (d_model, H * D).

    Returns (tags (n, d_model), head of each (n,), position of each (n,)), heads in order.
    """
    H, _, Dh = V.shape
    h, t = torch.nonzero(S, as_tuple=True)                                  # (n,), (n,)
    W = W_O.view(W_O.shape[0], H, Dh)                                       # (d_model, H, D)
    return torch.einsum("nD,dnD->nd", V[h, t], W[:, h]), h, t


def pair_cosines(tags: torch.Tensor, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines of all pairs of distinct mapped tags: (pairs of different heads, pairs of one head)."""
    u = torch.nn.functional.normalize(tags, dim=-1)
    i, j = torch.triu_indices(len(u), len(u), 1)
    c = (u[i] * u[j]).sum(-1)
    same = head[i] == head[j]
    return c[~same], c[same]


def _hist(c: torch.Tensor, bins: np.ndarray) -> np.ndarray:
    return np.histogram(c.double().clamp(-1, 1).numpy(), bins=bins)[0]   # last bin closed


def _tag_geometry(r: Result, p: int, l: int, A, V, S, W_O, resid) -> None:
    """The tag geometry of one layer of one prompt.

    Pairs: each mapped tag against every mapped tag of another head of the same layer (the
    paper's pair counts, millions, match this reading; see the chapter), and against the other
    tags of its own head. Tag vs token: each non-sink token that can see a sink is "tagged" by
    the sink it attends to most; its representation is the residual entering the layer.
    """
    if not S.any():
        return
    tags, head, pos = mapped_tags(V, S, W_O)
    cross, within = pair_cosines(tags, head)
    r.pairs_cross[p] += _hist(cross, PAIR_BINS)
    r.pairs_within[p] += _hist(within, PAIR_BINS)
    r.fine_cross[p] += _hist(cross, FINE_BINS)
    r.fine_within[p] += _hist(within, FINE_BINS)
    H, T, _ = V.shape
    cos = torch.nn.functional.normalize(tags, dim=-1) @ \
        torch.nn.functional.normalize(resid, dim=-1).T                     # (n, T)
    w = A[head, :, pos]                                                      # (n, T) weight on tag
    # per (head, token): the head's tag with the largest weight (tags of other heads masked out)
    own = head.unsqueeze(1) == torch.arange(H).unsqueeze(0)                  # (n, H)
    wh = torch.where(own.unsqueeze(-1), w.unsqueeze(1), -1.0)                # (n, H, T)
    dom = wh.argmax(0)                                                       # (H, T) tag index
    first = torch.full((H,), T).scatter_reduce(0, head, pos, "amin")         # earliest sink
    tagged = ~S & (torch.arange(T).unsqueeze(0) > first.unsqueeze(1))        # (H, T)
    if tagged.any():
        vals = cos[dom, torch.arange(T).unsqueeze(0).expand(H, T)][tagged]
        r.tag_token[p, l] = float(vals.mean())
        r.tag_token_abs[p, l] = float(vals.abs().mean())


def sweep_means(r: Result) -> dict[str, np.ndarray]:
    """Per prompt and eps, averaged over layers and heads: sinks, VE with sinkless heads as 0
    (the paper-like average) and VE over heads with sinks only. (P, E) each."""
    has = ~np.isnan(r.ve)
    with np.errstate(invalid="ignore"):
        excl = np.nansum(r.ve, axis=(1, 2)) / has.sum(axis=(1, 2))
    return {"sinks": r.n_sinks.mean(axis=(1, 2)), "ve_zero": r.ve_zero().mean(axis=(1, 2)),
            "ve_excluded": excl}


def layer_mean(x: np.ndarray) -> np.ndarray:
    """Mean over prompts and heads of a [prompt, layer, head] array, ignoring NaN; a layer with
    no value gives NaN (no warning: a layer where no head has a sink is a result, not an error)."""
    ok = ~np.isnan(x)
    cnt = ok.sum(axis=(0, 2))
    tot = np.where(ok, x, 0.0).sum(axis=(0, 2))
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def summary(r: Result) -> dict:
    """The chapter's key numbers for one model (what the results file keeps; no intervals)."""
    e = r.eps.index(r.main_eps)
    n = r.n_sinks[..., e]
    ve = r.ve[..., e]
    has = ~np.isnan(ve)
    n_total = int(n.sum())
    sw = sweep_means(r)
    cross, within = r.pairs_cross.sum(0), r.pairs_within.sum(0)

    def opt(f, x):
        return float(f(x)) if has.any() else None

    def share_near_0(h):
        return float((h[4] + h[5]) / h.sum()) if h.sum() else None

    return {
        "prompts": int(n.shape[0]), "layers": int(n.shape[1]), "heads": int(n.shape[2]),
        "head_dim": r.head_dim, "d_model": r.d_model,
        "eps": r.main_eps, "min_queries": r.min_queries,
        "sinks_per_head": float(n.mean()),
        "share_heads_1_2_sinks": float(((n >= 1) & (n <= 2)).mean()),
        "share_heads_no_sink": float((n == 0).mean()),
        "share_heads_bos_sink": float(r.bos_sink.mean()),
        "share_sinks_not_bos": float(1 - r.bos_sink.sum() / n_total) if n_total else None,
        "ve_mean": opt(np.nanmean, ve),                       # heads with sinks only
        "ve_mean_zero": float(np.nan_to_num(ve).mean()),      # sinkless heads as VE 0
        "ve_median": opt(np.nanmedian, ve),
        "ve_quartiles": [float(x) for x in np.nanpercentile(ve, [25, 75])] if has.any() else None,
        "ve_p90": opt(lambda x: np.nanpercentile(x, 90), ve),
        "ve_sq_mean": opt(np.nanmean, r.ve_sq[..., e]),
        "ve_random_mean": opt(np.nanmean, r.ve_random),
        "ve_expected_mean": opt(np.nanmean, r.ve_expected),
        "share_heads_ve_above_0.5": float((ve[has] > 0.5).mean()) if has.any() else None,
        "sinks_per_head_unguarded": float(r.n_sinks_unguarded.mean()),
        "tail_sinks_per_head_unguarded": float(r.tail_unguarded.mean()),
        "sweep": [{"eps": eps, "sinks": float(sw["sinks"][:, i].mean()),
                   "ve_zero": float(sw["ve_zero"][:, i].mean()),
                   "ve": (float(np.nanmean(r.ve[..., i])) if (~np.isnan(r.ve[..., i])).any()
                          else None)}
                  for i, eps in enumerate(r.eps)],
        "pairs_cross": int(cross.sum()), "pairs_within": int(within.sum()),
        "pairs_cross_hist": cross.tolist(), "pairs_within_hist": within.tolist(),
        "pairs_cross_fine": r.fine_cross.sum(0).tolist(),
        "pairs_within_fine": r.fine_within.sum(0).tolist(),
        "pairs_cross_near_0": share_near_0(cross), "pairs_within_near_0": share_near_0(within),
        "tag_token_cos": (float(np.nanmean(r.tag_token)) if (~np.isnan(r.tag_token)).any()
                          else None),
        "tag_token_abs_cos": (float(np.nanmean(r.tag_token_abs))
                              if (~np.isnan(r.tag_token_abs)).any() else None),
        "ve_by_layer": [None if x != x else float(x) for x in layer_mean(np.where(has, ve, np.nan))],
        "ve_zero_by_layer": np.nan_to_num(ve).mean(axis=(0, 2)).tolist(),
        # per prompt, for intervals computed by other chapters (QK-norm, scale)
        "by_prompt": {"sinks_per_head": n.reshape(n.shape[0], -1).mean(1).tolist(),
                      "ve_zero": np.nan_to_num(ve).reshape(n.shape[0], -1).mean(1).tolist(),
                      "bos_sink": r.bos_sink.reshape(n.shape[0], -1).mean(1).tolist()},
    }
