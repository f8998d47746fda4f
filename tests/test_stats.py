"""Intervals and tests against hand-computed values."""
import math

import numpy as np
import pytest

from ctr import stats


def test_wilson_hand_computed():
    lo, hi = stats.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert stats.wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert stats.wilson(10, 10)[1] == pytest.approx(1.0)
    assert stats.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson(11, 10)


def test_mcnemar_hand_computed():
    # 8 items only A gets right, 2 only B, 5 both, 5 neither:
    # p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 112 / 1024
    a = [1] * 8 + [0] * 2 + [1] * 5 + [0] * 5
    b = [0] * 8 + [1] * 2 + [1] * 5 + [0] * 5
    r = stats.mcnemar(a, b)
    assert (r["only_a"], r["only_b"], r["n"]) == (8, 2, 20)
    assert r["p"] == pytest.approx(112 / 1024)
    assert stats.mcnemar(a, a)["p"] == 1.0


def test_cochran_armitage_hand_computed():
    # successes 0/2 at score 0, 2/2 at score 1: p=1/2, T=1, Var=1/4 -> z = 2
    r = stats.cochran_armitage([0, 2], [2, 2], [0, 1])
    assert r["z"] == pytest.approx(2.0)
    assert r["p"] == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(2 / math.sqrt(2)))))
    assert stats.cochran_armitage([2, 0], [2, 2], [0, 1])["z"] == pytest.approx(-2.0)
    assert stats.cochran_armitage([3, 3, 3], [10, 10, 10], [1, 6, 10])["z"] == pytest.approx(0.0)
    assert stats.cochran_armitage([10, 10], [10, 10], [0, 1])["p"] == 1.0


def test_bootstrap_interval_covers_and_is_seeded():
    x = np.random.default_rng(0).normal(1.0, 1.0, size=400)
    lo, hi = stats.bootstrap(x, np.mean, n_boot=500, seed=1)
    assert lo < 1.0 < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.25)
    assert stats.bootstrap(x, np.mean, n_boot=500, seed=1) == (lo, hi)


def test_permutation_detects_a_difference_and_not_noise():
    rng = np.random.default_rng(0)
    vals = np.r_[rng.normal(1, 1, 50), rng.normal(0, 1, 50)]
    labels = np.r_[np.ones(50), np.zeros(50)].astype(bool)
    d = lambda lab: stats.cohens_d(vals[lab], vals[~lab])  # noqa: E731
    assert stats.permutation(d, labels, n_perm=500)["p"] < 0.01
    noise = rng.normal(0, 1, 100)
    dn = lambda lab: stats.cohens_d(noise[lab], noise[~lab])  # noqa: E731
    assert stats.permutation(dn, labels, n_perm=500)["p"] > 0.05


@pytest.mark.parametrize("d,expected", [(64, 0.31), (576, 0.77), (4096, 0.99)])
def test_random_cosine_share_analytic_and_monte_carlo(d, expected):
    share = stats.share_near_zero_random(d)
    assert share == pytest.approx(expected, abs=0.01)
    rng = np.random.default_rng(d)
    u = rng.normal(size=(20000, d))
    v = rng.normal(size=(20000, d))
    cos = (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
    assert ((cos >= -0.05) & (cos < 0.05)).mean() == pytest.approx(share, abs=0.015)
    assert np.abs(cos).mean() == pytest.approx(stats.mean_abs_cos_random(d), rel=0.03)


# --- the library-backed tests and what stats.py keeps, checked against libraries ----------------

def test_newcombe_and_fisher_against_hand_values():
    # Newcombe's (1998) worked example 1: 56/70 vs 48/80 -> [0.0524, 0.3339]
    lo, hi = stats.newcombe(56, 70, 48, 80)
    assert lo == pytest.approx(0.0524, abs=1e-4) and hi == pytest.approx(0.3339, abs=1e-4)
    # Fisher 4/10 vs 0/10: p two-sided = 2 * C(10,4) C(10,0) / C(20,4) = 0.0867
    assert stats.fisher(4, 10, 0, 10) == pytest.approx(2 * math.comb(10, 4) / math.comb(20, 4))
    assert stats.fisher(4, 10, 0, 10, "greater") == pytest.approx(math.comb(10, 4) / math.comb(20, 4))


def test_mcnemar_one_sided_p_values():
    a = [1] * 8 + [0] * 2 + [1] * 5
    b = [0] * 8 + [1] * 2 + [1] * 5
    r = stats.mcnemar(a, b)       # 8 vs 2 discordant: P(X >= 8 | 10, 1/2) = 56/1024
    assert r["p_greater"] == pytest.approx(56 / 1024) and r["p_less"] == pytest.approx(1013 / 1024)
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
    assert r["p"] == pytest.approx(sm_mcnemar([[5, 8], [2, 0]], exact=True).pvalue)


def test_holm_matches_hand_adjustment_and_skips_missing():
    # sorted 0.01, 0.03, 0.04: 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert stats.holm([0.04, 0.01, None, 0.03]) == pytest.approx([0.06, 0.03, None, 0.06])


def test_cochran_armitage_equals_the_linear_by_linear_test_times_its_factor():
    from statsmodels.stats.contingency_tables import Table

    k, n, x = [4, 3, 0], [10, 10, 10], [10, 6, 1]        # the paper's toy counts
    r = stats.cochran_armitage(k, n, x)
    t = Table(np.array([[ki, ni - ki] for ki, ni in zip(k, n)], float), shift_zeros=False)
    ll = t.test_ordinal_association(row_scores=np.array(x, float), col_scores=np.array([1.0, 0.0]))
    N = sum(n)
    assert r["z"] == pytest.approx(ll.zscore * math.sqrt(N / (N - 1)), rel=1e-9)
    assert r["z"] == pytest.approx(2.15, abs=0.01)       # RULES.md: "z = +2.15"
    assert r["p_rise"] == pytest.approx(stats.normal_sf(r["z"]))
    assert r["p_rise"] + r["p_fall"] == pytest.approx(1.0)


def test_interaction_lr_is_zero_for_identical_groups_and_large_for_opposite_trends():
    same = stats.interaction_lr([4, 3, 1], [10] * 3, [4, 3, 1], [10] * 3, [10, 6, 1])
    assert same["lr"] == pytest.approx(0.0, abs=1e-6) and same["p"] == pytest.approx(1.0, abs=1e-6)
    opp = stats.interaction_lr([2, 10, 25], [30] * 3, [4, 3, 0], [10] * 3, [10, 6, 1])
    assert opp["p"] < 0.01


def test_undegenerate_replaces_a_point_interval_by_wilson():
    r = stats.undegenerate(1.0, 1.0, 1.0, 40)
    assert r["wilson"] and (r["lo"], r["hi"]) == pytest.approx(stats.wilson(40, 40))
    assert stats.undegenerate(0.5, 0.4, 0.6, 40) == {"lo": 0.4, "hi": 0.6, "wilson": False}


def test_wilson_matches_the_closed_form():
    k, n, z = 3, 17, stats.Z95
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert stats.wilson(k, n) == pytest.approx((mid - half, mid + half))
