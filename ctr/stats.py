"""Intervals and tests behind every verdict of the book (RULES.md, "General").

The tests the rules name come from the field's libraries, pinned in ``requirements.txt``:
- a proportion (training runs, prompts): ``wilson`` (statsmodels ``proportion_confint``);
- the difference of two independent proportions (ours vs the paper's k/10): ``newcombe``
  (statsmodels ``confint_proportions_2indep``, method ``newcomb``) and ``fisher`` (scipy);
- two accuracies on the same test items: ``mcnemar`` (exact; scipy ``binomtest`` on the
  discordant pairs, the same p as statsmodels' exact McNemar);
- a family of p-values: ``holm`` (statsmodels ``multipletests``);
- a group x setting interaction of success rates: ``interaction_lr`` (statsmodels binomial GLM,
  likelihood-ratio test).
What no library has stays here, each checked against a library or a hand value in the suite:
- ``bootstrap``: percentile interval over resampled prompts (or seeds), 2,000 resamples, seed 0;
- ``cochran_armitage``: the trend test (equal to statsmodels' linear-by-linear association test
  times sqrt(N / (N - 1)));
- ``cohens_d``, ``permutation``, and the random-direction nulls.
All resampling is seeded, so a rebuild gives the same intervals.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Z95 = 1.959963984540054
N_BOOT = 2000        # RULES.md: percentile bootstrap, 2,000 resamples, seed 0
MIN_UNITS = 20       # RULES.md: a bootstrap over fewer contributing prompts is not testable


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (n = 0: the whole of [0, 1])."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n (got k={k}, n={n})")
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(k, n, alpha=1 - level, method="wilson")
    return max(0.0, float(lo)), min(1.0, float(hi))


def newcombe(k1: int, n1: int, k2: int, n2: int, level: float = 0.95) -> tuple[float, float]:
    """95% Newcombe (hybrid Wilson score) interval of k1/n1 - k2/n2."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    lo, hi = confint_proportions_2indep(k1, n1, k2, n2, method="newcomb", compare="diff",
                                        alpha=1 - level)
    return float(lo), float(hi)


def fisher(k1: int, n1: int, k2: int, n2: int, alternative: str = "two-sided") -> float:
    """Fisher's exact p for k1/n1 against k2/n2; ``alternative`` "greater": the first is larger."""
    from scipy.stats import fisher_exact

    return float(fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative=alternative).pvalue)


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial p-value of k successes in n fair trials."""
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(k, n, 0.5).pvalue)


def mcnemar(a_correct, b_correct) -> dict:
    """Exact McNemar test of two classifiers A and B on the same items.

    only_a = items only A gets right, only_b = items only B gets right; under "same accuracy"
    each discordant item is a fair coin. ``p`` is two-sided; ``p_greater`` is the one-sided p of
    "A is more accurate" and ``p_less`` of "B is more accurate" (RULES.md, Sidedness).
    """
    from scipy.stats import binomtest

    a, b_ = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    if a.shape != b_.shape:
        raise ValueError("mcnemar needs the two predictions on the same items")
    only_a, only_b = int((a & ~b_).sum()), int((~a & b_).sum())
    n = only_a + only_b
    if n == 0:
        p = pg = pl = 1.0
    else:
        p = float(binomtest(only_a, n, 0.5).pvalue)
        pg = float(binomtest(only_a, n, 0.5, alternative="greater").pvalue)
        pl = float(binomtest(only_a, n, 0.5, alternative="less").pvalue)
    return {"only_a": only_a, "only_b": only_b, "n": int(a.size), "p": p, "p_greater": pg,
            "p_less": pl}


def holm(pvalues) -> list[float]:
    """Holm-adjusted p-values of one family (None or NaN entries stay None, outside the family)."""
    from statsmodels.stats.multitest import multipletests

    ps = [None if p is None or (isinstance(p, float) and math.isnan(p)) else float(p)
          for p in pvalues]
    live = [i for i, p in enumerate(ps) if p is not None]
    out: list = [None] * len(ps)
    if live:
        adj = multipletests([ps[i] for i in live], method="holm")[1]
        for i, a in zip(live, adj):
            out[i] = float(a)
    return out


def normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def cochran_armitage(successes, totals, scores) -> dict:
    """Cochran-Armitage test for a linear trend of a proportion over ordered ``scores``.

    Returns z (positive: the rate rises with the score), the two-sided p, and the one-sided
    ``p_rise`` (a rise) and ``p_fall`` (a fall).
    """
    k, n, x = (np.asarray(v, float) for v in (successes, totals, scores))
    N, K = n.sum(), k.sum()
    p = K / N if N else 0.0
    T = float((x * (k - n * p)).sum())
    var = p * (1 - p) * float((n * x * x).sum() - (n * x).sum() ** 2 / N) if N else 0.0
    if var <= 0:        # every run succeeded, or none did: no trend can be seen
        return {"z": 0.0, "p": 1.0, "p_rise": 0.5, "p_fall": 0.5}
    z = T / math.sqrt(var)
    return {"z": z, "p": 2 * normal_sf(abs(z)), "p_rise": normal_sf(z), "p_fall": normal_sf(-z)}


def interaction_lr(k_a, n_a, k_b, n_b, scores) -> dict:
    """Likelihood-ratio test of the group x score interaction in a logistic regression of
    success on score, group and their product (group a vs group b, e.g. ours vs the paper's
    counts at each init). Returns the LR statistic (1 df) and its p."""
    import statsmodels.api as sm
    from scipy.stats import chi2

    k = np.r_[np.asarray(k_a, float), np.asarray(k_b, float)]
    n = np.r_[np.asarray(n_a, float), np.asarray(n_b, float)]
    x = np.r_[np.asarray(scores, float), np.asarray(scores, float)]
    g = np.r_[np.zeros(len(k_a)), np.ones(len(k_b))]
    y = np.c_[k, n - k]

    def deviance(X):
        import warnings

        with warnings.catch_warnings():     # separation (0/10) warns; the deviance still holds
            warnings.simplefilter("ignore")
            return float(sm.GLM(y, sm.add_constant(X), family=sm.families.Binomial()).fit().deviance)

    lr = max(0.0, deviance(np.c_[x, g]) - deviance(np.c_[x, g, x * g]))
    return {"lr": lr, "p": float(chi2.sf(lr, 1))}


def bootstrap(units: np.ndarray, stat: Callable[[np.ndarray], float], n_boot: int = N_BOOT,
              seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``stat`` over resamples of the rows of ``units`` (the independent
    units: one row per prompt, or per seed)."""
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


def ratio_of_sums(u: np.ndarray) -> float:
    """A share over resampled prompts: sum of column 0 / sum of column 1 (NaN on an empty sum)."""
    den = u[:, 1].sum()
    return float(u[:, 0].sum() / den) if den else float("nan")


def undegenerate(estimate: float, lo: float, hi: float, n_units: int) -> dict:
    """RULES.md: a degenerate interval (lo == hi, e.g. [1.00, 1.00]) of a share is replaced by
    the Wilson interval with n = the prompts (seeds) contributing at least one instance and
    k = round(n x estimate), and flagged."""
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)) or lo != hi:
        return {"lo": lo, "hi": hi, "wilson": False}
    k = int(round(n_units * estimate))
    wlo, whi = wilson(k, n_units)
    return {"lo": wlo, "hi": whi, "wilson": True}


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
