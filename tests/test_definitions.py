"""The paper's equations on hand-built tensors with hand-computed answers."""
import math

import pytest
import torch

from ctr import analysis
from ctr import definitions as D


def causal(rows):
    """A lower-triangular attention matrix from its non-zero rows."""
    T = len(rows)
    A = torch.zeros(T, T, dtype=torch.float64)
    for i, r in enumerate(rows):
        A[i, :len(r)] = torch.tensor(r, dtype=torch.float64)
    assert torch.allclose(A.sum(-1), torch.ones(T, dtype=torch.float64))
    return A


A4 = causal([[1.0], [0.5, 0.5], [0.6, 0.1, 0.3], [0.7, 0.1, 0.1, 0.1]])


def test_alpha_hand_computed():
    # alpha_t = (sum of column t) / (T - t), 0-based
    a = D.alpha(A4)
    expected = [(1 + 0.5 + 0.6 + 0.7) / 4, (0.5 + 0.1 + 0.1) / 3, (0.3 + 0.1) / 2, 0.1 / 1]
    assert a.tolist() == pytest.approx(expected)


def test_min_queries_excludes_tail_keys():
    a = D.alpha(A4, min_queries=3)
    assert a[:2].tolist() == pytest.approx([0.7, 0.7 / 3])
    assert torch.isnan(a[2:]).all()            # keys 2, 3 are seen by 2 and 1 queries
    assert D.sinks(a, 0.05).tolist() == [True, True, False, False]


def test_tail_artifact_without_guard():
    # the last key scores its own self-attention: 0.1 here, 0.9 below -> a "sink" of one query
    A = causal([[1.0], [0.9, 0.1], [0.9, 0.0, 0.1], [0.05, 0.0, 0.05, 0.9]])
    assert D.sinks(D.alpha(A)).tolist() == [True, False, False, True]
    assert D.sinks(D.alpha(A, min_queries=2)).tolist() == [True, False, False, False]


def test_sliding_window_uses_visible_query_denominator():
    # window 2: query i sees keys i-1, i
    A = causal([[1.0], [0.5, 0.5], [0.0, 0.8, 0.2], [0.0, 0.0, 0.6, 0.4]])
    assert D.visible_queries(4, 2).tolist() == [2, 2, 2, 1]
    a = D.alpha(A, window=2)
    assert a.tolist() == pytest.approx([1.5 / 2, 1.3 / 2, 0.8 / 2, 0.4 / 1])
    # the full-causal denominator would have diluted key 0 over 4 queries
    assert D.alpha(A)[0] == pytest.approx(1.5 / 4)


def test_sinks_threshold_is_strict_and_nan_safe():
    a = torch.tensor([0.2, 0.2000001, float("nan"), 0.9])
    assert D.sinks(a, 0.2).tolist() == [False, True, False, True]


def test_split_is_exact():
    g = torch.Generator().manual_seed(0)
    H, T, Dh = 3, 7, 5
    A = torch.softmax(torch.randn(H, T, T, generator=g).masked_fill(
        torch.ones(T, T).triu(1).bool(), float("-inf")), -1)
    V = torch.randn(H, T, Dh, generator=g)
    S = torch.rand(H, T, generator=g) > 0.6
    zt, zn = D.split(A, V, S)
    assert torch.allclose(zt + zn, A @ V, atol=1e-6)
    # z_tag of a head is a combination of its sink values only
    h = 0
    assert torch.allclose(zt[h], A[h][:, S[h]] @ V[h][S[h]], atol=1e-6)
    assert torch.allclose(D.z_tag(A, V, torch.zeros_like(S)), torch.zeros(H, T, Dh))


def test_variance_explained_identities():
    g = torch.Generator().manual_seed(1)
    Dh = 16
    tags = torch.randn(2, Dh, generator=g)
    U = D.basis(tags)
    assert U.shape == (Dh, 2)
    assert torch.allclose(U.T @ U, torch.eye(2), atol=1e-6)
    inside = torch.randn(50, 2, generator=g) @ tags          # outputs in the tag span
    assert D.variance_explained(inside, U) == pytest.approx(1.0, abs=1e-6)
    P = torch.eye(Dh) - U @ U.T                                # outputs orthogonal to it
    outside = torch.randn(50, Dh, generator=g) @ P
    assert D.variance_explained(outside, U) == pytest.approx(0.0, abs=1e-6)
    mixed = inside + outside
    ve, ve2 = D.variance_explained(mixed, U), D.variance_explained(mixed, U, squared=True)
    assert ve2 == pytest.approx(ve ** 2)
    assert D.variance_explained(mixed, U[:, :0]) != D.variance_explained(mixed, U[:, :0])  # NaN


def test_random_subspace_baseline_near_sqrt_k_over_d():
    g = torch.Generator().manual_seed(2)
    Dh, k = 64, 4
    O = torch.randn(400, Dh, generator=g)
    ve = D.random_subspace_ve(O, k, generator=g, draws=32)
    assert ve == pytest.approx(math.sqrt(k / Dh), rel=0.1)
    assert D.random_subspace_expectation(k, Dh) == pytest.approx(0.25)


def test_basis_drops_repeated_tags():
    v = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0]])
    assert D.basis(v).shape == (3, 2)
    assert D.basis(v[:0]).shape == (3, 0)


def test_layer_summary_matches_definitions_head_by_head():
    g = torch.Generator().manual_seed(3)
    H, T, Dh = 4, 20, 8
    logits = torch.randn(H, T, T, generator=g) * 3
    logits[:, :, 0] += 3          # a BOS-like sink
    logits[1:, :, 5] += 3         # a second sink in three heads
    A = torch.softmax(logits.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")), -1)
    V = torch.randn(H, T, Dh, generator=g)
    O = A @ V
    s = analysis.layer_summary(A, V, O, None, 0.2, 3, torch.Generator().manual_seed(0))
    for h in range(H):
        a = D.alpha(A[h], min_queries=3)
        S = D.sinks(a)
        assert s["S"][h].tolist() == S.tolist()
        U = D.basis(V[h][S])
        assert float(s["ve"][h]) == pytest.approx(D.variance_explained(O[h], U), abs=1e-6)
        assert float(s["ve_expected"][h]) == pytest.approx(math.sqrt(int(S.sum()) / Dh))
    assert s["S"][0, 0] and s["S"][1, 5]


def test_eps_sweep_monotone_on_fixed_attention():
    g = torch.Generator().manual_seed(4)
    H, T = 6, 40
    logits = torch.randn(H, T, T, generator=g) * 2
    logits[..., 0] += 2
    A = torch.softmax(logits.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")), -1)
    a = D.alpha(A, min_queries=4)
    counts = [int(D.sinks(a, e).sum()) for e in (0.03, 0.05, 0.1, 0.2, 0.4)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


# --- mass-mean probe ---------------------------------------------------------------------------

def test_mass_mean_probe_reaches_analytic_accuracy():
    # two isotropic Gaussians N(+mu, I), N(-mu, I): the optimal (and mass-mean) rule is the
    # midpoint hyperplane, with accuracy Phi(|mu|).
    g = torch.Generator().manual_seed(5)
    d, n = 10, 4000
    mu = torch.zeros(d)
    mu[0] = 1.0
    y = torch.rand(n, generator=g) > 0.5
    X = torch.randn(n, d, generator=g) + torch.where(y, 1.0, -1.0).unsqueeze(1) * mu
    acc = D.mass_mean_accuracy(X[:2000], y[:2000], X[2000:], y[2000:])
    analytic = 0.5 * (1 + math.erf(1.0 / math.sqrt(2)))   # Phi(1) = 0.841
    assert acc == pytest.approx(analytic, abs=0.025)


def test_mass_mean_probe_at_chance_on_shuffled_labels():
    g = torch.Generator().manual_seed(6)
    n = 4000
    y = torch.rand(n, generator=g) > 0.5
    X = torch.randn(n, 10, generator=g) + y.float().unsqueeze(1) * 2
    y_shuffled = y[torch.randperm(n, generator=g)]
    acc = D.mass_mean_accuracy(X[:2000], y_shuffled[:2000], X[2000:], y_shuffled[2000:])
    assert acc == pytest.approx(0.5, abs=0.04)


def test_mass_mean_probe_needs_two_classes():
    with pytest.raises(ValueError, match="both classes"):
        D.mass_mean_fit(torch.randn(5, 3), torch.ones(5))


# --- input checks: one clear error each -----------------------------------------------------------

@pytest.mark.parametrize("eps", [0, 1, 2, -0.1])
def test_eps_outside_0_1_is_refused(eps):
    with pytest.raises(ValueError, match=r"outside \(0, 1\)"):
        D.sinks(torch.rand(3, 5), eps)


@pytest.mark.parametrize("mq", [0, -3, 2.5])
def test_min_queries_below_1_is_refused(mq):
    with pytest.raises(ValueError, match="min_queries"):
        D.alpha(torch.rand(2, 5, 5), min_queries=mq)


def test_unwritable_results_dir_is_refused(tmp_path):
    import os

    from ctr import results
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):          # root can write anyway: use a path under a file
            bad = tmp_path / "file"
            bad.write_text("x")
            ro = bad / "sub"
        with pytest.raises(results.ResultsDirError, match="cannot write results"):
            results.save("x", {"a": 1}, ro)
        assert not list(tmp_path.glob("**/x.json"))
    finally:
        os.chmod(tmp_path / "ro", 0o700)


@pytest.mark.parametrize("mt", [1, 0, -5, 2.5])
def test_max_tokens_below_2_is_refused(mt):
    from ctr import models
    m = models.load("tiny-planted-llama")
    with pytest.raises(models.PromptError, match="max_tokens"):
        m.encode(["The cat sat on the mat."], max_tokens=mt)
    assert m.encode(["The cat sat on the mat."], max_tokens=2).lengths == [2]


def test_cli_refuses_eps_outside_0_1():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "ctr", "inspect", "tiny-planted-llama", "The cat.",
                        "--eps", "2"], capture_output=True, text=True)
    assert r.returncode != 0 and "outside (0, 1)" in r.stderr and "Traceback" not in r.stderr
