"""The tag geometry of the variance chapter (RULES.md tag_orth_cross / tag_orth_within /
tag_token): every tag written into the residual stream through its head's slice of W_O (and,
where the model normalises the attention output before the residual add, that norm's
per-dimension scale), the cosines between mapped tags across and within heads, the same for
random value-space vectors sent through the same maps (the null), and the cosine of each mapped
tag with the residual of the tokens that attend to it. Accumulated per prompt into ``Result``.
"""
from __future__ import annotations

import numpy as np
import torch

NULL_DRAWS = 4       # random value-space vectors per tag, for the orthogonality null
PAIR_BINS = np.array([-1.0, -0.6, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.6, 1.0])
FINE_BINS = np.round(np.arange(-1.0, 1.0001, 0.05), 2)


def residual_map(W_O: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Where a head-space vector lands in the residual stream: W_O (d_model, H * D), its rows
    multiplied by the post-attention norm's per-dimension scale where the model has one
    (Gemma-3: the RMSNorm weight). The norm's per-token factor is left out: it multiplies every
    head's contribution at a token alike and does not change a cosine."""
    W = W_O.detach().float().cpu()
    return W if scale is None else W * scale.float().cpu().unsqueeze(1)


def map_vectors(X: torch.Tensor, head: torch.Tensor, W: torch.Tensor, H: int) -> torch.Tensor:
    """Head-space vectors X (n, D), the i-th of head ``head[i]``, through that head's columns of
    W (d_model, H * D) -> (n, d_model)."""
    n, Dh = X.shape
    Xf = X.new_zeros(n, H, Dh)                  # each vector in its head's slot of H * D
    Xf[torch.arange(n), head] = X
    return Xf.view(n, H * Dh) @ W.T


def mapped_tags(V: torch.Tensor, S: torch.Tensor, W: torch.Tensor):
    """Every tag written into the residual stream: V (H, T, D), S (H, T), W = ``residual_map``.
    Returns (tags (n, d_model), head of each (n,), position of each (n,)), heads in order."""
    h, t = torch.nonzero(S, as_tuple=True)                                  # (n,), (n,)
    return map_vectors(V[h, t], h, W, V.shape[0]), h, t


def pair_cosines(tags: torch.Tensor, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines of all pairs of distinct mapped tags (n, d_model), or of each of a stack of such
    sets (..., n, d_model): (pairs of different heads, pairs of one head), flattened."""
    u = torch.nn.functional.normalize(tags, dim=-1)
    G = u @ u.transpose(-1, -2)                                             # (..., n, n)
    n = len(head)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    same = head.unsqueeze(0) == head.unsqueeze(1)
    return G[..., upper & ~same].reshape(-1), G[..., upper & same].reshape(-1)


def _hist(c: torch.Tensor, bins: np.ndarray) -> np.ndarray:
    return np.histogram(c.double().clamp(-1, 1).numpy(), bins=bins)[0]   # last bin closed


def _layer_mean(x: torch.Tensor, M: torch.Tensor, head: torch.Tensor, H: int) -> float:
    """x (n, T) over the (tag, token) pairs M (n, T): mean over a head's pairs, then over the
    heads that have any."""
    s = torch.zeros(H, dtype=torch.float64).index_add_(0, head, (x * M).sum(1).double())
    c = torch.zeros(H, dtype=torch.float64).index_add_(0, head, M.sum(1).double())
    return float((s[c > 0] / c[c > 0]).mean())


def tag_geometry(r: Result, p: int, l: int, A, V, S, W, resid_in, resid_out=None,
                 gen: torch.Generator | None = None) -> None:
    """The tag geometry of one layer of one prompt, into row ``p`` of ``r``.

    Pairs: each mapped tag against every mapped tag of another head of the same layer, and
    against the other tags of its own head; the null draws NULL_DRAWS random vectors per tag,
    isotropic in its head's value space, through the same map. Tag vs token: each tag against
    the residual of every token t > s that attends to it (A[t, s] > 0) and is not a sink of
    that head, unweighted; the residual entering the layer (what the tag is added to) and,
    shown beside, the residual leaving it.
    """
    if not S.any():
        return
    H, T, Dh = V.shape
    tags, head, pos = mapped_tags(V, S, W)
    cross, within = pair_cosines(tags, head)
    r.pairs_cross[p] += _hist(cross, PAIR_BINS)
    r.pairs_within[p] += _hist(within, PAIR_BINS)
    r.fine_cross[p] += _hist(cross, FINE_BINS)
    r.fine_within[p] += _hist(within, FINE_BINS)
    unit = torch.nn.functional.normalize
    M = ((torch.arange(T).unsqueeze(0) > pos.unsqueeze(1)) & ~S[head]
         & (A[head, :, pos] > 0))                                             # (n, T)
    n = len(head)
    rnd = map_vectors(torch.randn(NULL_DRAWS * n, Dh, generator=gen), head.repeat(NULL_DRAWS),
                      W, H).view(NULL_DRAWS, n, -1)
    c0, w0 = pair_cosines(rnd, head)
    r.null_cross[p] += _hist(c0, PAIR_BINS)
    r.null_within[p] += _hist(w0, PAIR_BINS)
    null_abs = (unit(rnd, dim=-1) @ unit(resid_in, dim=-1).T).abs()          # (draws, n, T)
    if not M.any():
        return
    cos = unit(tags, dim=-1) @ unit(resid_in, dim=-1).T                       # (n, T)
    r.tag_token[p, l] = _layer_mean(cos, M, head, H)
    r.tag_token_abs[p, l] = _layer_mean(cos.abs(), M, head, H)
    r.tag_token_null_abs[p, l] = _layer_mean(null_abs.mean(0), M, head, H)
    if resid_out is not None:
        r.tag_token_out[p, l] = _layer_mean(unit(tags, dim=-1) @ unit(resid_out, dim=-1).T,
                                            M, head, H)
