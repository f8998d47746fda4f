r"""The paper's equations, in one place, named as in the paper (SPEC.md section 2).

Shapes: one prompt of T tokens, one layer; leading dimensions are heads (or anything else).
``A`` is (..., T, T) with rows = queries and columns = keys, rows summing to 1 over visible
keys. ``V`` is (..., T, D): the value vectors each query head reads (GQA already expanded).
Positions are 0-based here; the paper's 1-based t is our t + 1.

Sink score (paper: alpha_t = 1/(T-t+1) sum_{k=t..T} A[k,t], 1-based)
    alpha_t = (1 / n_t) * sum_k A[k, t],    n_t = number of queries that can see key t
With full causal attention n_t = T - t (the paper's denominator). In a sliding-window layer
(query i sees key j when 0 <= i - j < W) n_t = min(T - t, W), so keys that late queries cannot
see are not penalised for it. Keys with n_t < ``min_queries`` get NaN: the last keys are seen by
so few queries that one query's self-attention can put them over epsilon (the tail artifact).

Sinks: S = {t : alpha_t > eps}, eps = 0.2.   Tags: the value vectors v_s, s in S.
Split:  z_tag(t) = sum_{k in S} A[t,k] V[k],  z_notag(t) = sum_{k not in S} A[t,k] V[k].
Variance explained:  VE = ||A V U U^T||_F / ||A V||_F,  U an orthonormal basis of span{v_s}.
Mass-mean probe: theta = mu_true - mu_false; predict true iff theta.x > theta.(mu_true+mu_false)/2.

Precision: a model run in bfloat16 (8 significant bits) gives A, V and head outputs in bfloat16.
Every reduction here is done in float32 or wider whatever the input's dtype: alpha sums A over
queries in float32 (a bfloat16 sum of 1,000 terms keeps about 3 significant digits, and eps = 0.2
is a sharp threshold); z_tag / z_notag are computed in float32; tag bases and VE in float64; the
mass-mean probe's means and scores in float32. Results stay on the input's device.
"""
from __future__ import annotations

import math

import torch

EPS = 0.2


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs; float32 or float64 inputs keep their dtype."""
    return torch.promote_types(dtype, torch.float32)


def visible_queries(T: int, window: int | None = None) -> torch.Tensor:
    """n_t for t = 0..T-1: how many queries can attend to key t."""
    n = torch.arange(T, 0, -1)
    return n if window is None else n.clamp(max=window)


def check_eps(eps) -> None:
    """eps must lie in (0, 1): alpha is a mean attention weight, so eps >= 1 finds no sink and
    eps <= 0 makes every key one."""
    for e in ([eps] if isinstance(eps, (int, float)) else list(eps)):
        if not 0 < float(e) < 1:
            raise ValueError(f"eps={e} is outside (0, 1): a sink score is a mean attention weight "
                             "(at most 1), so the threshold must lie strictly between 0 and 1 "
                             "(the paper's is 0.2)")


def check_max_tokens(max_tokens) -> None:
    """None (no truncation) or a whole number >= 2: a sink score needs a key and a later query."""
    if max_tokens is not None and (int(max_tokens) != max_tokens or max_tokens < 2):
        raise ValueError(f"max_tokens={max_tokens} must be a whole number >= 2: a sink score "
                         "needs a key and at least one later query")


def check_min_queries(min_queries) -> None:
    if int(min_queries) != min_queries or min_queries < 1:
        raise ValueError(f"min_queries={min_queries} must be a whole number >= 1 (1 = no tail "
                         "guard: the formula as written)")


def alpha(A: torch.Tensor, window: int | None = None, min_queries: int = 1) -> torch.Tensor:
    """Sink scores (..., T). NaN where fewer than ``min_queries`` queries see the key."""
    check_min_queries(min_queries)
    T = A.shape[-1]
    n = visible_queries(T, window).to(A.device)
    dt = _wide(A.dtype)
    a = A.sum(dim=-2, dtype=dt) / n.to(dt)          # accumulated in float32: no copy of A
    return a.masked_fill(n < min_queries, float("nan"))


def sinks(alpha_: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Boolean sink mask (..., T): alpha_t > eps (NaN scores are never sinks)."""
    check_eps(eps)
    return alpha_ > eps   # comparisons with NaN are False


def tags(V: torch.Tensor, S: torch.Tensor) -> list[torch.Tensor]:
    """Per head, the (k, D) stack of its sinks' value vectors. V: (H, T, D), S: (H, T)."""
    return [V[h][S[h]] for h in range(V.shape[0])]


def z_tag(A: torch.Tensor, V: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """(..., T, D): the part of each head output that comes from the sinks (in float32 or wider)."""
    dt = _wide(A.dtype)
    return (A.to(dt) * S.unsqueeze(-2).to(dt)) @ V.to(dt)


def z_notag(A: torch.Tensor, V: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """(..., T, D): the part that comes from every other key. z_tag + z_notag = A V."""
    dt = _wide(A.dtype)
    return (A.to(dt) * (~S).unsqueeze(-2).to(dt)) @ V.to(dt)


def split(A, V, S):
    return z_tag(A, V, S), z_notag(A, V, S)


def basis(vectors: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis (D, r) of the span of the rows of ``vectors`` (k, D), r <= k."""
    if vectors.shape[0] == 0:
        return vectors.new_zeros((vectors.shape[-1], 0))
    U, s, _ = torch.linalg.svd(vectors.T.to(torch.float64), full_matrices=False)
    r = int((s > rtol * s.max()).sum()) if s.numel() and s.max() > 0 else 0
    return U[:, :r].to(_wide(vectors.dtype))


def variance_explained(O: torch.Tensor, U: torch.Tensor, squared: bool = False) -> float:
    """||O U U^T||_F / ||O||_F for head outputs O (T, D) and an orthonormal basis U (D, k).

    The paper's form is the ratio of norms (``squared=False``); ``squared=True`` gives the share
    of the squared norm (a fraction of variance in the usual sense). Uncentred, as written.
    """
    if U.shape[1] == 0:
        return float("nan")
    O64, U64 = O.to(torch.float64), U.to(torch.float64)
    num = torch.linalg.norm(O64 @ U64)     # = ||O U U^T||_F because U has orthonormal columns
    den = torch.linalg.norm(O64)
    r = float(num / den) if den > 0 else float("nan")
    return r * r if squared else r


def random_basis(D: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random k-dimensional subspace of R^D (orthonormal columns)."""
    G = torch.randn(D, k, generator=generator, dtype=torch.float64)
    Q, _ = torch.linalg.qr(G)
    return Q


def random_subspace_ve(O: torch.Tensor, k: int, generator: torch.Generator | None = None,
                       draws: int = 8) -> float:
    """Mean VE of ``draws`` random k-dim subspaces: the baseline a tag must beat."""
    if k == 0:
        return float("nan")
    vals = [variance_explained(O, random_basis(O.shape[-1], k, generator)) for _ in range(draws)]
    return sum(vals) / len(vals)


def random_subspace_expectation(k: int, D: int) -> float:
    """sqrt(k / D): approximately the VE of a random k-dim subspace (exact for the squared form)."""
    return math.sqrt(k / D)


# --- mass-mean probe (Marks & Tegmark 2023) ---------------------------------------------------

def mass_mean_fit(X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """theta = mu_true - mu_false and the midpoint threshold theta.(mu_true + mu_false)/2."""
    y, X = y.bool(), X.to(_wide(X.dtype))
    if y.all() or (~y).all():
        raise ValueError("mass-mean probe needs both classes in the training split")
    mu_t, mu_f = X[y].mean(0), X[~y].mean(0)
    theta = mu_t - mu_f
    return theta, float(theta @ (mu_t + mu_f) / 2)


def mass_mean_predict(X: torch.Tensor, theta: torch.Tensor, threshold: float) -> torch.Tensor:
    return (X.to(theta.dtype) @ theta) > threshold


def mass_mean_accuracy(X_train, y_train, X_test, y_test) -> float:
    theta, thr = mass_mean_fit(X_train, y_train)
    return float((mass_mean_predict(X_test, theta, thr) == y_test.bool()).float().mean())
