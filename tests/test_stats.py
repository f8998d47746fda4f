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
    assert stats.cochran_armitage([10, 10], [10, 10], [0, 1]) == {"z": 0.0, "p": 1.0}


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
