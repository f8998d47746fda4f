"""How much of each head's output is tag: one streaming pass per model (paper Fig. 3, rebuttal).

For every prompt, layer and head it records, at every threshold eps of a sweep, the number of
sinks and the variance explained (VE) by their tags; at the main eps it also records the
random-subspace baseline, the counts without the tail guard, and the tag geometry: every tag
mapped into the residual stream (through its head's slice of W_O and, where the model
normalises the attention output before the residual add, that norm's per-dimension scale), the
cosines between mapped tags of different heads of one layer and of one head, the same for
random value-space vectors sent through the same maps (the null), and the cosine between each
mapped tag and the residual of every token that attends to it. Arrays are (prompt, layer, head,
eps) or per prompt, so that intervals can be bootstrapped over prompts; nothing of size T x T
outlives its layer. The rules that turn these numbers into verdicts are in ``variance.verdicts``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm   # text bars: they go to the log, never into the HTML

from ... import analysis
from ... import definitions as D
from ... import extract
from ...models import Model
from .geometry import (FINE_BINS, NULL_DRAWS, PAIR_BINS, _hist,  # noqa: F401
                       map_vectors, mapped_tags, pair_cosines, residual_map, tag_geometry)

EPS_SWEEP = (0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.15, 0.2, 0.3, 0.4)
SATURATION_EPS = (0.03, 0.1, 0.4)   # the three thresholds of the sweep rule's D (RULES.md)
MIN_PROMPTS = 5      # a head enters the per-head VE when it has a sink in at least 5 prompts
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


def saturation(E, S) -> tuple[float, float]:
    """The sweep rule's D and its ratio form q, from E(eps) (mean VE, sinkless heads as 0) and
    S(eps) (mean sinks per head) at eps = 0.03, 0.1, 0.4 (three values each, in that order).

    D = [E(0.1) - E(0.4)] [S(0.03) - S(0.1)] - [E(0.03) - E(0.1)] [S(0.1) - S(0.4)].
    q = {[E(0.03) - E(0.1)] / [S(0.03) - S(0.1)]} / {[E(0.1) - E(0.4)] / [S(0.1) - S(0.4)]}:
    the VE gained per sink added below eps 0.1 over the VE gained per sink added from 0.4 to
    0.1 (q < 1, D > 0: the gain per sink falls as sinks are added; the paper's own table gives
    q = 0.31 and 0.42 in this orientation, its inverse would be 3.2 and 2.4).
    """
    (e03, e1, e4), (s03, s1, s4) = E, S
    d = (e1 - e4) * (s03 - s1) - (e03 - e1) * (s1 - s4)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.float64(e03 - e1) / (s03 - s1) / (np.float64(e1 - e4) / (s1 - s4))
    return float(d), float(q)


def fall(ve03: float, ve4: float) -> float:
    """The relative fall f = (VE(0.03) - VE(0.4)) / VE(0.03) of the mean VE over the sweep."""
    return float((ve03 - ve4) / ve03) if ve03 else float("nan")


# The paper's ten bins for tag-pair cosines (its rebuttal histogram; the last bin is closed),
# and 0.05-wide bins for the figure. [-0.05, 0.05) is two bins of either.
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
    pairs_cross: np.ndarray      # (P, 10) tag pairs of different heads of a layer, paper's bins
    pairs_within: np.ndarray     # (P, 10) pairs of distinct tags of one head
    null_cross: np.ndarray       # (P, 10) the same pairs of random value-space vectors
    null_within: np.ndarray      #   (NULL_DRAWS draws each)
    fine_cross: np.ndarray       # (P, 40) the same in 0.05-wide bins
    fine_within: np.ndarray
    tag_token: np.ndarray        # (P, L) mean cos(mapped tag, residual entering the layer)
    tag_token_abs: np.ndarray    # (P, L) mean |cos| of the same pairs
    tag_token_null_abs: np.ndarray   # (P, L) mean |cos| for random value-space vectors instead
    tag_token_out: np.ndarray    # (P, L) mean cos with the residual leaving the layer
    head_dim: int = 0
    d_model: int = 0
    n_kv_heads: int = 0
    post_norm: bool = False      # tags mapped through a post-attention norm's scale
    min_queries: int = 1
    main_eps: float = D.EPS
    seconds: float = 0.0

    @classmethod
    def empty(cls, model: str, P: int, L: int, H: int, eps=(D.EPS,), **kw) -> "Result":
        """A result with every array allocated (counts 0, measurements NaN)."""
        E, nb, nf = len(eps), len(PAIR_BINS) - 1, len(FINE_BINS) - 1
        kw.setdefault("n_kv_heads", H)
        nan = lambda *s: np.full(s, np.nan)           # noqa: E731
        zero = lambda *s: np.zeros(s, np.int64)       # noqa: E731
        return cls(model=model, eps=tuple(eps), n_sinks=np.zeros((P, L, H, E), np.int16),
                   ve=nan(P, L, H, E), ve_sq=nan(P, L, H, E), ve_random=nan(P, L, H),
                   ve_expected=nan(P, L, H), n_sinks_unguarded=np.zeros((P, L, H), np.int16),
                   tail_unguarded=np.zeros((P, L, H), np.int16),
                   bos_sink=np.zeros((P, L, H), bool), pairs_cross=zero(P, nb),
                   pairs_within=zero(P, nb), null_cross=zero(P, nb), null_within=zero(P, nb),
                   fine_cross=zero(P, nf), fine_within=zero(P, nf), tag_token=nan(P, L),
                   tag_token_abs=nan(P, L), tag_token_null_abs=nan(P, L),
                   tag_token_out=nan(P, L), **kw)

    def ve_zero(self) -> np.ndarray:
        """VE with a sinkless head counted as 0: what the formula gives for an empty U, and the
        reading the paper's threshold table supports (its average falls as eps grows)."""
        return np.nan_to_num(self.ve, nan=0.0)


@dataclass
class Context:
    """What every layer of the pass shares: thresholds, guard, random generators, maps."""
    eps: torch.Tensor            # (E,) float64
    main_eps: float
    min_queries: int
    gen: torch.Generator         # random subspaces (VE baseline)
    gen_null: torch.Generator    # random value-space vectors (orthogonality null)
    W: list                      # per layer: residual_map(W_O, scale)


def run(model: Model, texts: list[str], max_tokens: int = 150, eps=EPS_SWEEP,
        main_eps: float = D.EPS, min_queries: int = 16, seed: int = 0, batch_size: int = 8,
        progress: bool = True) -> Result:
    """One pass of ``texts`` (truncated to ``max_tokens``) through ``model``: sinks and VE at
    every eps of ``eps``, and at ``main_eps`` the baseline, the tail counts and the tag geometry.
    Random draws are seeded from ``seed``; ``batch_size`` prompts run together."""
    eps = tuple(eps)
    D.check_eps(eps)
    D.check_min_queries(min_queries)
    if main_eps not in eps:
        raise ValueError(f"main_eps={main_eps} must be one of the swept eps {eps}")
    batch = model.encode(texts, max_tokens=max_tokens)
    P, L, H = len(texts), model.n_layers, model.n_heads
    t0 = time.time()
    scales = [model.post_attn_scale(l) for l in range(L)]
    r = Result.empty(model.name, P, L, H, eps, head_dim=model.head_dim, d_model=model.d_model,
                     n_kv_heads=model.n_kv_heads, post_norm=scales[0] is not None,
                     min_queries=min_queries, main_eps=main_eps)
    ctx = Context(torch.tensor(eps, dtype=torch.float64), main_eps, min_queries,
                  torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1),
                  [residual_map(model.out_proj(l), scales[l]) for l in range(L)])
    bar = tqdm(total=P * L, desc=f"{model.name}: variance", unit="layer", disable=not progress)
    for start in range(0, P, batch_size):
        idx = list(range(start, min(start + batch_size, P)))
        for rec_b in extract.layers(model, batch.select(idx)):
            rec_b = rec_b.cpu()      # numpy below; a no-op for float32 on the CPU
            for b, p in enumerate(idx):
                measure_layer(r, p, rec_b.prompt(b), ctx)
            bar.update(len(idx))
    bar.close()
    r.seconds = time.time() - t0
    return r


def measure_layer(r: Result, p: int, rec, ctx: Context) -> None:
    """Everything the chapter keeps of one layer of one prompt (``rec``: a one-prompt
    ``extract.LayerRecord``), written into row ``p`` of ``r``. Many small ops: one thread."""
    with extract.one_thread():
        _measure_layer(r, p, rec, ctx)


def _measure_layer(r: Result, p: int, rec, ctx: Context) -> None:
    l = rec.layer
    # Activations may come in bfloat16 (dtype="bfloat16"): alpha, VE and cosines are computed in
    # float32 (float64 for the bases), upcast here, on the CPU.
    A, V = rec.A[0].float().cpu(), rec.V[0].float().cpu()
    O = rec.head_out[0].transpose(0, 1).float().cpu()                       # (H, T, D)
    a = D.alpha(A, rec.window, ctx.min_queries)
    k, ve, ve2 = sweep(a.double(), V.double(), O, ctx.eps)
    r.n_sinks[p, l] = k.T.numpy()
    r.ve[p, l], r.ve_sq[p, l] = ve.T.numpy(), ve2.T.numpy()
    main = analysis.layer_summary(A, V, O, rec.window, ctx.main_eps, ctx.min_queries, ctx.gen,
                                  alpha=a)
    r.ve_random[p, l] = main["ve_random"].numpy()
    r.ve_expected[p, l] = main["ve_expected"].numpy()
    S = main["S"]
    r.bos_sink[p, l] = S[:, 0].numpy()
    # once, the same counts without the guard: the tail artifact
    S1 = D.sinks(D.alpha(A, rec.window, 1), ctx.main_eps)
    T, mq = A.shape[-1], ctx.min_queries
    r.n_sinks_unguarded[p, l] = S1.sum(-1).numpy()
    r.tail_unguarded[p, l] = S1[:, T - (mq - 1):].sum(-1).numpy() if mq > 1 else 0
    out = None if rec.resid_out is None else rec.resid_out[0].float().cpu()
    tag_geometry(r, p, l, A, V, S, ctx.W[l], rec.resid_in[0].float().cpu(), out, ctx.gen_null)


# --- reductions (what the results file keeps, and what the verdicts resample) -----------------

def sweep_means(r: Result) -> dict[str, np.ndarray]:
    """Per prompt and eps, averaged over layers and heads: sinks, VE with sinkless heads as 0
    (the paper-like average), VE over heads with sinks only, and the squared VE with sinkless
    heads as 0 (the energy fraction E of the sweep rule). (P, E) each."""
    has = ~np.isnan(r.ve)
    with np.errstate(invalid="ignore"):
        excl = np.nansum(r.ve, axis=(1, 2)) / has.sum(axis=(1, 2))
    return {"sinks": r.n_sinks.mean(axis=(1, 2)), "ve_zero": r.ve_zero().mean(axis=(1, 2)),
            "ve_excluded": excl, "ve_sq_zero": np.nan_to_num(r.ve_sq).mean(axis=(1, 2))}


def per_head(x: np.ndarray, has: np.ndarray, min_prompts: int = MIN_PROMPTS) -> np.ndarray:
    """Per head, the mean of x (P, N) over the prompts in which the head has a sink (``has``,
    (P, N)); NaN for a head with a sink in fewer than ``min_prompts`` prompts (a prompt drawn
    twice by a bootstrap resample counts twice)."""
    n = has.sum(0)
    s = np.where(has, x, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n >= min_prompts, s / n, np.nan)


def layer_mean(x: np.ndarray) -> np.ndarray:
    """Mean over prompts and heads of a [prompt, layer, head] array, ignoring NaN; a layer with
    no value gives NaN (no warning: a layer where no head has a sink is a result, not an error)."""
    ok = ~np.isnan(x)
    cnt = ok.sum(axis=(0, 2))
    tot = np.where(ok, x, 0.0).sum(axis=(0, 2))
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def prompt_means(x: np.ndarray) -> np.ndarray:
    """Per prompt, the mean over layers of a (P, L) array, ignoring NaN (NaN for a prompt with
    no value at any layer)."""
    ok = ~np.isnan(x)
    return np.where(ok.any(1), np.where(ok, x, 0.0).sum(1) / np.maximum(ok.sum(1), 1), np.nan)


def _f(x):
    return None if x is None or not np.isfinite(x) else float(x)


def _share(h, bins):
    return _f(h[list(bins)].sum() / h.sum()) if h.sum() else None


def summary(r: Result) -> dict:
    """The chapter's key numbers for one model (what the results file keeps; no intervals)."""
    e = r.eps.index(r.main_eps)
    n, ve = r.n_sinks[..., e], r.ve[..., e]
    has = ~np.isnan(ve)
    P = n.shape[0]
    n_total = int(n.sum())
    sw = sweep_means(r)
    ph = per_head(ve.reshape(P, -1), has.reshape(P, -1))
    ph_diff = per_head((ve - r.ve_random).reshape(P, -1), has.reshape(P, -1))
    ok = ~np.isnan(ph)
    out = {
        "prompts": int(P), "layers": int(n.shape[1]), "heads": int(n.shape[2]),
        "kv_heads": r.n_kv_heads, "head_dim": r.head_dim, "d_model": r.d_model,
        "post_norm": r.post_norm, "eps": r.main_eps, "min_queries": r.min_queries,
        "sinks_per_head": float(n.mean()),
        "share_heads_1_2_sinks": float(((n >= 1) & (n <= 2)).mean()),
        "share_heads_no_sink": float((n == 0).mean()),
        "share_heads_bos_sink": float(r.bos_sink.mean()),
        "share_sinks_not_bos": float(1 - r.bos_sink.sum() / n_total) if n_total else None,
        "ve_mean": _f(np.nanmean(ve)) if has.any() else None,   # heads with sinks only
        "ve_mean_zero": float(np.nan_to_num(ve).mean()),          # sinkless heads as VE 0
        "ve_sq_mean": _f(np.nanmean(r.ve_sq[..., e])) if has.any() else None,
        "ve_random_mean": _f(np.nanmean(r.ve_random)) if has.any() else None,
        "ve_expected_mean": _f(np.nanmean(r.ve_expected)) if has.any() else None,
        # per head (mean over the prompts in which it has a sink; heads with >= 5 such prompts)
        "ve_heads": int(ok.sum()), "ve_min_prompts": MIN_PROMPTS,
        "ve_median": _f(np.median(ph[ok])) if ok.any() else None,
        "ve_quartiles": [float(x) for x in np.percentile(ph[ok], [25, 75])] if ok.any() else None,
        "ve_p95": _f(np.percentile(ph[ok], 95)) if ok.any() else None,
        "ve_max": _f(ph[ok].max()) if ok.any() else None,
        "ve_minus_random_median": _f(np.median(ph_diff[ok])) if ok.any() else None,
        "ve_per_head": [None if x != x else float(x) for x in ph],
        "sinks_per_head_unguarded": float(r.n_sinks_unguarded.mean()),
        "tail_sinks_per_head_unguarded": float(r.tail_unguarded.mean()),
        "sweep": [{"eps": x, "sinks": float(sw["sinks"][:, i].mean()),
                   "ve_zero": float(sw["ve_zero"][:, i].mean()),
                   "ve_sq_zero": float(sw["ve_sq_zero"][:, i].mean()),
                   "ve": _f(np.nanmean(r.ve[..., i])) if (~np.isnan(r.ve[..., i])).any() else None}
                  for i, x in enumerate(r.eps)],
    }
    if all(x in r.eps for x in SATURATION_EPS):
        i = [r.eps.index(x) for x in SATURATION_EPS]
        S = sw["sinks"][:, i].mean(0)
        d, q = saturation(sw["ve_sq_zero"][:, i].mean(0), S)
        vz = sw["ve_zero"][:, i].mean(0)
        out["saturation"] = {"D": d, "q": _f(q), "q_norm": _f(saturation(vz, S)[1]),
                             "f": _f(fall(vz[0], vz[2]))}
    else:
        out["saturation"] = None
    for key in ("cross", "within"):
        h, h0 = getattr(r, f"pairs_{key}").sum(0), getattr(r, f"null_{key}").sum(0)
        near, null = _share(h, (4, 5)), _share(h0, (4, 5))
        out.update({f"pairs_{key}": int(h.sum()), f"pairs_{key}_hist": h.tolist(),
                    f"null_{key}_hist": h0.tolist(),
                    f"pairs_{key}_fine": getattr(r, f"fine_{key}").sum(0).tolist(),
                    f"pairs_{key}_near_0": near, f"null_{key}_near_0": null,
                    f"r_{key}": near / null if near is not None and null else None,
                    f"a_{key}": _share(h, (9,))})
    for k in ("tag_token", "tag_token_abs", "tag_token_null_abs", "tag_token_out"):
        x = prompt_means(getattr(r, k))
        out[k + "_cos"] = _f(np.nanmean(x)) if (~np.isnan(x)).any() else None
    out["ve_by_layer"] = [_f(x) for x in layer_mean(np.where(has, ve, np.nan))]
    out["ve_zero_by_layer"] = np.nan_to_num(ve).mean(axis=(0, 2)).tolist()
    # per prompt, for intervals computed by other chapters (QK-norm, scale)
    out["by_prompt"] = {"sinks_per_head": n.reshape(P, -1).mean(1).tolist(),
                        "ve_zero": np.nan_to_num(ve).reshape(P, -1).mean(1).tolist(),
                        "bos_sink": r.bos_sink.reshape(P, -1).mean(1).tolist()}
    return out
