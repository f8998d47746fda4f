"""Per-head analysis of a model on a set of prompts, streamed layer by layer.

``heads(model, prompts)`` returns one row per (prompt, layer, head, eps): the number of sinks,
their positions and token strings, and the variance explained (VE) by their tags, with the
random-subspace baseline. The definitions it applies live in ``ctr.definitions``; this module
only vectorises them over heads and drives the extraction.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from tqdm import tqdm   # text bars: they go to the log, never into the HTML

from . import definitions as D
from . import extract
from .models import Model


def _basis_batched(Vs: torch.Tensor, k: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal bases for each head at once: Vs (H, K, D) padded sink values, k (H,) counts.

    Returns (H, D, K) with the unused columns zeroed, so ||O U|| is each head's own projection.
    """
    U, s, _ = torch.linalg.svd(Vs.transpose(-1, -2).to(torch.float64), full_matrices=False)
    smax = s.amax(dim=-1, keepdim=True).clamp_min(1e-300)
    keep = s > rtol * smax
    return U * keep.unsqueeze(-2)


def layer_summary(A: torch.Tensor, V: torch.Tensor, O: torch.Tensor, window: int | None,
                  eps: float, min_queries: int, generator: torch.Generator | None = None,
                  alpha: torch.Tensor | None = None, random: bool = True) -> dict[str, torch.Tensor]:
    """Sinks and VE for every head of one layer of one prompt.

    A (H, T, T), V (H, T, D), O (H, T, D) = A V (the head outputs). Returns per head: alpha
    (H, T), sink mask (H, T), n_sinks, ve, ve_sq, ve_random (mean over 4 random subspaces of
    the same dimension; NaN when ``random`` is False) and the sqrt(k/D) expectation.
    """
    H, T, Dh = V.shape
    a = D.alpha(A, window, min_queries) if alpha is None else alpha
    S = D.sinks(a, eps)
    k = S.sum(-1)
    K = int(k.max()) if H else 0
    out = {"alpha": a, "S": S, "n_sinks": k}
    nan = torch.full((H,), float("nan"), dtype=torch.float64)
    if K == 0:
        out.update(ve=nan, ve_sq=nan, ve_random=nan, ve_expected=nan)
        return out
    # Pad each head's sink values to K rows (zeros add nothing to the span).
    order = torch.argsort((~S).to(torch.int8), dim=-1, stable=True)[:, :K]   # sink positions first
    Vs = torch.gather(V, 1, order.unsqueeze(-1).expand(H, K, Dh))
    Vs = Vs * (torch.arange(K).unsqueeze(0) < k.unsqueeze(1)).unsqueeze(-1).to(V.dtype)
    U = _basis_batched(Vs, k)
    O64 = O.to(torch.float64)
    den = torch.linalg.norm(O64, dim=(-2, -1))
    num = torch.linalg.norm(O64 @ U, dim=(-2, -1))
    ve = num / den
    # Random baseline: the first k_h columns of a random orthonormal frame are a random k_h-space.
    draws = []
    for _ in range(4 if random else 0):
        G = torch.randn(H, Dh, K, generator=generator, dtype=torch.float64)
        Q, _ = torch.linalg.qr(G)
        Q = Q * (torch.arange(K) < k.unsqueeze(1)).unsqueeze(1).to(Q.dtype)
        draws.append(torch.linalg.norm(O64 @ Q, dim=(-2, -1)) / den)
    has = k > 0
    rnd = torch.stack(draws).mean(0) if draws else nan
    out.update(ve=torch.where(has, ve, nan), ve_sq=torch.where(has, ve * ve, nan),
               ve_random=torch.where(has, rnd, nan),
               ve_expected=torch.where(has, (k.to(torch.float64) / Dh).sqrt(), nan))
    return out


def _rows(name, prompt, layer, eps, T, s, toks) -> list[dict]:
    a = s["alpha"]
    H = s["S"].shape[0]
    where = torch.nonzero(s["S"]).tolist()          # (head, position) pairs, sorted
    pos = [[] for _ in range(H)]
    for h, t in where:
        pos[h].append(t)
    ve, ve_sq = s["ve"].tolist(), s["ve_sq"].tolist()
    ve_random, ve_expected = s["ve_random"].tolist(), s["ve_expected"].tolist()
    return [{"model": name, "prompt": prompt, "layer": layer, "head": h, "eps": eps, "T": T,
             "n_sinks": len(pos[h]), "sink_positions": pos[h],
             "sink_tokens": [toks[i] for i in pos[h]], "bos_sink": bool(pos[h]) and pos[h][0] == 0,
             "sink_alphas": [float(a[h, i]) for i in pos[h]],
             "ve": ve[h], "ve_sq": ve_sq[h], "ve_random": ve_random[h],
             "ve_expected": ve_expected[h]} for h in range(H)]


def heads(model: Model, prompts, eps: float | Sequence[float] = D.EPS, min_queries: int = 1,
          max_tokens: int | None = None, batch_size: int = 1, seed: int = 0,
          progress: bool = True, desc: str | None = None,
          random_at: float | None = None) -> pd.DataFrame:
    """One row per (prompt, layer, head, eps). Streams: holds one layer's attention at a time.

    The random-subspace baseline is drawn at one threshold only, ``random_at`` (default: 0.2 if
    it is among ``eps``, else the first), to keep threshold sweeps cheap; elsewhere it is NaN.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    batch_all = model.encode(prompts, max_tokens=max_tokens)   # validates every prompt up front
    eps_list = [eps] if isinstance(eps, (int, float)) else list(eps)
    if random_at is None:
        random_at = D.EPS if D.EPS in eps_list else eps_list[0]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    bar = tqdm(total=len(prompts) * model.n_layers, desc=desc or model.name, unit="layer",
               disable=not progress, leave=False)
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        for rec in extract.layers(model, batch_all.select(idx)):
            for b, p in enumerate(idx):
                r = rec.prompt(b)
                A, V, O = r.A[0].float(), r.V[0].float(), r.head_out[0].transpose(0, 1).float()
                a = D.alpha(A, r.window, min_queries)
                toks = batch_all.tokens[p]
                for e in eps_list:
                    s = layer_summary(A, V, O, r.window, e, min_queries, gen, alpha=a,
                                      random=(e == random_at))
                    rows.extend(_rows(model.name, p, rec.layer, e, r.lengths[0], s, toks))
            bar.update(len(idx))
    bar.close()
    return pd.DataFrame(rows)
