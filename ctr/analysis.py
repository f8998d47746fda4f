"""Per-head analysis of a model on a set of prompts, streamed layer by layer.

``heads(model, prompts)`` returns one row per (prompt, layer, head, eps): the number of sinks,
their positions and token strings, and the variance explained (VE) by their tags, with the
random-subspace baseline. The definitions it applies live in ``ctr.definitions``; this module
only vectorises them over heads and drives the extraction.

Devices and dtypes: the sink scores are computed where the model runs (GPU or CPU), accumulated in
float32 from A in the model's dtype; only they, V and the head outputs (H x T x D per prompt,
never A) go to the CPU in float32, where the tag bases, VE and the random baseline are computed in
float64 with CPU generators, so the random draws are the same on every device.
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


def layer_summary(A: torch.Tensor | None, V: torch.Tensor, O: torch.Tensor, window: int | None,
                  eps: float, min_queries: int, generator: torch.Generator | None = None,
                  alpha: torch.Tensor | None = None, random: bool = True) -> dict[str, torch.Tensor]:
    """Sinks and VE for every head of one layer, of one prompt or of G prompts of equal length.

    A (H, T, T) or (G, H, T, T), V and O (H, T, D) or (G, H, T, D), O = A V (the head outputs).
    Returns per head (leading dims as given): alpha (.., T), sink mask (.., T), n_sinks, ve,
    ve_sq, ve_random (mean over 4 random subspaces of the same dimension; NaN when ``random`` is
    False) and the sqrt(k/D) expectation. Random draws are made prompt by prompt, in order, as
    (H, D, K_g) with K_g the prompt's most sinks in a head, so G prompts at once draw exactly
    what G calls of one prompt would; ``generator`` may also be a list, one per prompt.
    ``A`` may be None when ``alpha`` is given (it is read only for the sink scores). Results are on
    V's device; the random draws are made on the CPU (the same numbers on every device).
    """
    lead, T, Dh = V.shape[:-2], V.shape[-2], V.shape[-1]
    dev = V.device
    G = lead[0] if len(lead) == 2 else 1
    V, O = V.reshape(-1, T, Dh), O.reshape(-1, T, Dh)                          # (G*H, ...)
    GH = V.shape[0]
    a = (D.alpha(A, window, min_queries) if alpha is None else alpha).reshape(GH, T).to(dev)
    S = D.sinks(a, eps)
    k = S.sum(-1)
    K = int(k.max()) if GH else 0
    out = {"alpha": a.reshape(*lead, T), "S": S.reshape(*lead, T), "n_sinks": k.reshape(lead)}
    nan = torch.full(lead, float("nan"), dtype=torch.float64, device=dev)
    if K == 0:
        out.update(ve=nan, ve_sq=nan, ve_random=nan, ve_expected=nan)
        return out
    # Pad each head's sink values to K rows (zeros add nothing to the span).
    order = torch.argsort((~S).to(torch.int8), dim=-1, stable=True)[:, :K]   # sink positions first
    Vs = torch.gather(V, 1, order.unsqueeze(-1).expand(GH, K, Dh))
    cols = torch.arange(K, device=dev).unsqueeze(0) < k.unsqueeze(1)          # (G*H, K)
    Vs = Vs * cols.unsqueeze(-1).to(V.dtype)
    U = _basis_batched(Vs, k)
    O64 = O.to(torch.float64)
    den = torch.linalg.norm(O64, dim=(-2, -1))
    ve = torch.linalg.norm(O64 @ U, dim=(-2, -1)) / den
    has = k > 0
    rnd = torch.full((GH,), float("nan"), dtype=torch.float64, device=dev)
    if random:
        # The first k_h columns of a random orthonormal frame are a random k_h-space.
        H = GH // G
        Kg = k.view(G, H).amax(1).tolist()
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * G
        Gm = torch.zeros(G, 4, H, Dh, K, dtype=torch.float64)
        for g in range(G):
            for d in range(4 if Kg[g] else 0):
                Gm[g, d, :, :, :Kg[g]] = torch.randn(H, Dh, Kg[g], generator=gens[g],
                                                     dtype=torch.float64)
        Q, _ = torch.linalg.qr(Gm.to(dev))                       # (G, 4, H, D, min(D, K))
        # more sinks than dimensions (k > D): the subspace is the whole space, all D columns
        Q = Q * cols.view(G, 1, H, 1, K)[..., :Q.shape[-1]].to(Q.dtype)
        num = torch.linalg.norm(O64.view(G, 1, H, T, Dh) @ Q, dim=(-2, -1))   # (G, 4, H)
        rnd = (num / den.view(G, 1, H)).mean(1).reshape(GH)
    out.update(ve=_where(has, ve, lead), ve_sq=_where(has, ve * ve, lead),
               ve_random=_where(has, rnd, lead),
               ve_expected=_where(has, (k.clamp(max=Dh).to(torch.float64) / Dh).sqrt(), lead))
    return out


def _where(has, x, lead):
    return torch.where(has, x, float("nan")).reshape(lead)


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
    """One row per (prompt, layer, head, eps). Streams: holds one layer's attention at a time,
    reduced inside the trace; the prompts of a batch with equal lengths are reduced together.

    The random-subspace baseline is drawn at one threshold only, ``random_at`` (default: 0.2 if
    it is among ``eps``, else the first), to keep threshold sweeps cheap; elsewhere it is NaN.
    Its draws come from one generator per (prompt, layer), seeded from (seed, prompt, layer), so
    they do not depend on ``batch_size`` or on the other prompts.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    batch_all = model.encode(prompts, max_tokens=max_tokens)   # validates every prompt up front
    eps_list = [eps] if isinstance(eps, (int, float)) else list(eps)
    if random_at is None:
        random_at = D.EPS if D.EPS in eps_list else eps_list[0]
    def gen(p: int, layer: int) -> torch.Generator:
        return torch.Generator().manual_seed((seed * 65536 + p) * 65536 + layer)

    rows = []
    bar = tqdm(total=len(prompts) * model.n_layers, desc=desc or model.name, unit="layer",
               disable=not progress, leave=False)
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        sub = batch_all.select(idx)
        groups: dict[int, list[int]] = {}           # prompts of equal length: reduced together
        for b, n in enumerate(sub.lengths):
            groups.setdefault(n, []).append(b)

        def reduce(rec):
            # Inside the trace, between two layers: nothing is handed to another thread.
            out = {}
            with extract.one_thread():
                for n, bs in groups.items():
                    whole = len(groups) == 1           # no padding: no copy of A
                    A = rec.A if whole else rec.A[bs, :, :n, :n]
                    a = D.alpha(A, rec.window, min_queries).cpu()      # float32, on the device
                    V = (rec.V if whole else rec.V[bs, :, :n]).float().cpu()
                    O = (rec.head_out if whole else rec.head_out[bs, :n]).transpose(1, 2)
                    O = O.float().cpu()
                    for e in eps_list:
                        rnd = e == random_at
                        gens = [gen(idx[b], rec.layer) for b in bs] if rnd else None
                        s = layer_summary(None, V, O, rec.window, e, min_queries, gens, alpha=a,
                                          random=rnd)
                        for g, b in enumerate(bs):
                            out[b, e] = _rows(model.name, idx[b], rec.layer, e, n,
                                              {k: v[g] for k, v in s.items()},
                                              batch_all.tokens[idx[b]])
            for b in range(len(idx)):                  # rows in (prompt, eps) order
                for e in eps_list:
                    rows.extend(out[b, e])
            bar.update(len(idx))

        extract.run(model, sub, loss=False, on_layer=reduce)
    bar.close()
    return pd.DataFrame(rows)
