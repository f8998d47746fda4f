"""Intervals and tests behind every verdict of the book.

Which one where:
- a proportion of independent trials (training runs, test prompts): ``wilson``;
- two accuracies on the same test items: ``mcnemar`` (exact, on the discordant pairs);
- a success rate across ordered settings (toy s_tag inits): ``cochran_armitage`` (trend test);
- a statistic of units that are not independent (heads of one prompt, tokens of one document):
  ``bootstrap`` over the independent units (prompts), percentile interval;
- a difference between two groups of tokens: ``permutation`` of the group labels.
All resampling is seeded, so a rebuild gives the same intervals.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (n = 0: the whole of [0, 1])."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n (got k={k}, n={n})")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial p-value of k successes in n fair trials (doubling the smaller tail)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mcnemar(a_correct, b_correct) -> dict:
    """Exact McNemar test of two classifiers on the same items.

    b = items only A gets right, c = items only B gets right; under "same accuracy" each
    discordant item is a fair coin, so p = two-sided binomial(min(b, c); b + c, 1/2).
    """
    a, b_ = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    if a.shape != b_.shape:
        raise ValueError("mcnemar needs the two predictions on the same items")
    only_a, only_b = int((a & ~b_).sum()), int((~a & b_).sum())
    return {"only_a": only_a, "only_b": only_b, "n": int(a.size),
            "p": binom_two_sided(only_a, only_a + only_b)}


def normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def cochran_armitage(successes, totals, scores) -> dict:
    """Cochran-Armitage test for a linear trend of a proportion over ordered ``scores``.

    Returns the statistic z (positive: the rate rises with the score) and the two-sided p.
    """
    k, n, x = (np.asarray(v, float) for v in (successes, totals, scores))
    N, K = n.sum(), k.sum()
    p = K / N if N else 0.0
    T = float((x * (k - n * p)).sum())
    var = p * (1 - p) * float((n * x * x).sum() - (n * x).sum() ** 2 / N) if N else 0.0
    if var <= 0:        # every run succeeded, or none did: no trend can be seen
        return {"z": 0.0, "p": 1.0}
    z = T / math.sqrt(var)
    return {"z": z, "p": 2 * normal_sf(abs(z))}


def bootstrap(units: np.ndarray, stat: Callable[[np.ndarray], float], n_boot: int = 1000,
              seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``stat`` over resamples of the rows of ``units`` (the independent
    units, e.g. one row per prompt)."""
    units = np.asarray(units)
    if len(units) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(units), size=(n_boot, len(units)))
    vals = np.array([stat(units[i]) for i in idx], float)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def cohens_d(x: np.ndarray, y: np.ndarray) -> float:
    """(mean x - mean y) / pooled standard deviation."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    nx, ny = len(x), len(y)
    if nx < 2 or ny < 2:
        return float("nan")
    s = math.sqrt(((nx - 1) * x.var(ddof=1) + (ny - 1) * y.var(ddof=1)) / (nx + ny - 2))
    return float((x.mean() - y.mean()) / s) if s > 0 else float("nan")


def permutation(stat: Callable[[np.ndarray], float], labels: np.ndarray, n_perm: int = 2000,
                seed: int = 0) -> dict:
    """One-sided permutation test of ``stat(labels)`` against shuffled labels.

    p = (1 + #{shuffles with stat >= observed}) / (1 + n_perm), so p is never 0.
    """
    labels = np.asarray(labels)
    obs = stat(labels)
    rng = np.random.default_rng(seed)
    null = np.array([stat(rng.permutation(labels)) for _ in range(n_perm)], float)
    return {"observed": float(obs), "p": float((1 + (null >= obs).sum()) / (1 + n_perm)),
            "null_95": float(np.quantile(null, 0.95))}


def share_near_zero_random(d: int, half_width: float = 0.05) -> float:
    """Probability that two independent uniformly random directions in R^d have a cosine in
    [-w, w). Their squared cosine is Beta(1/2, (d-1)/2), so this is I_{w^2}(1/2, (d-1)/2)."""
    from scipy.special import betainc

    if d < 2:
        raise ValueError("random cosines need d >= 2")
    return float(betainc(0.5, (d - 1) / 2, half_width ** 2))


def mean_abs_cos_random(d: int) -> float:
    """E|cos| of two independent random directions in R^d: Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))."""
    return float(math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi))
