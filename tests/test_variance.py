"""The variance chapter's reductions: the threshold sweep and the tag geometry."""
import math

import numpy as np
import pytest
import torch

from ctr.chapters import variance
from ctr.chapters import variance_verdicts as VV
from ctr import verdicts as V
from ctr import definitions as D


def attention(H, T, sinks, strength=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(H, T, T, generator=g)
    for s in sinks:
        logits[..., s] += strength
    mask = torch.ones(T, T).triu(1).bool()
    return torch.softmax(logits.masked_fill(mask, float("-inf")), -1)


@pytest.mark.parametrize("Dh", [16, 3])      # 3: more sinks than dimensions at low eps
def test_sweep_equals_the_definition_at_every_eps(Dh):
    H, T = 4, 40
    A = attention(H, T, sinks=[0, 9, 17])
    V = torch.randn(H, T, Dh, generator=torch.Generator().manual_seed(1))
    O = A @ V
    a = D.alpha(A, min_queries=5)
    eps = torch.tensor(variance.EPS_SWEEP, dtype=torch.float64)
    k, ve, ve_sq = variance.sweep(a.double(), V.double(), O, eps)
    for i, e in enumerate(variance.EPS_SWEEP):
        S = D.sinks(a, e)
        for h in range(H):
            assert int(k[i, h]) == int(S[h].sum())
            ref = D.variance_explained(O[h], D.basis(V[h][S[h]]))
            if S[h].any():
                assert float(ve[i, h]) == pytest.approx(ref, abs=1e-6)
                assert float(ve_sq[i, h]) == pytest.approx(ref ** 2, abs=1e-6)
            else:
                assert math.isnan(float(ve[i, h]))


def test_sweep_is_monotone_in_eps_on_a_fixed_attention_tensor():
    A = attention(6, 50, sinks=[0, 12, 30], strength=2.0, seed=3)
    V = torch.randn(6, 50, 8, generator=torch.Generator().manual_seed(4))
    k, _, _ = variance.sweep(D.alpha(A, min_queries=4).double(), V.double(), A @ V,
                             torch.tensor(variance.EPS_SWEEP, dtype=torch.float64))
    counts = k.sum(1).tolist()                      # total sinks per eps, eps increasing
    assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[0] > counts[-1]
    assert (k[:-1] >= k[1:]).all()                  # per head too


def empty_result(P=1, L=1, H=1, E=1):
    nb, nf = len(variance.PAIR_BINS) - 1, len(variance.FINE_BINS) - 1
    return variance.Result(model="x", eps=(0.2,) * E, n_sinks=np.zeros((P, L, H, E)),
                           ve=np.zeros((P, L, H, E)), ve_sq=np.zeros((P, L, H, E)),
                           ve_random=np.zeros((P, L, H)), ve_expected=np.zeros((P, L, H)),
                           n_sinks_unguarded=np.zeros((P, L, H)), tail_unguarded=np.zeros((P, L, H)),
                           bos_sink=np.zeros((P, L, H), bool),
                           pairs_cross=np.zeros((P, nb), int), pairs_within=np.zeros((P, nb), int),
                           fine_cross=np.zeros((P, nf), int), fine_within=np.zeros((P, nf), int),
                           tag_token=np.full((P, L), np.nan), tag_token_abs=np.full((P, L), np.nan))


@pytest.mark.parametrize("theta_deg", [90.0, 60.0, 135.0])
def test_tag_vs_token_cosine_recovers_a_constructed_angle(theta_deg):
    # one head (D = 2) in a 2-D residual stream, W_O = identity: the tag maps to itself.
    # Sink at 0 with value e1; every later token's residual is at angle theta to e1.
    T, th = 6, math.radians(theta_deg)
    A = torch.zeros(1, T, T)
    A[0, :, 0] = 0.7
    for t in range(1, T):
        A[0, t, t] += 0.3
    A[0, 0, 0] = 1.0
    V = torch.zeros(1, T, 2)
    V[0, :, 0] = 1.0
    S = torch.zeros(1, T, dtype=torch.bool)
    S[0, 0] = True
    resid = torch.tensor([[math.cos(th), math.sin(th)]] * T) * 5.0
    r = empty_result()
    variance._tag_geometry(r, 0, 0, A, V, S, torch.eye(2), resid)
    assert r.tag_token[0, 0] == pytest.approx(math.cos(th), abs=1e-6)
    assert r.tag_token_abs[0, 0] == pytest.approx(abs(math.cos(th)), abs=1e-6)


def rotation(theta):
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]])


@pytest.mark.parametrize("theta_deg", [0.0, 30.0, 90.0, 120.0])
def test_cross_head_cosines_through_W_O_recover_constructed_angles(theta_deg):
    # Two heads (D = 2) in a 2-D residual stream. Both heads' sink value is e1 in head space
    # (as when they share a KV group); head 0's slice of W_O is the identity, head 1's a
    # rotation by theta: the mapped tags are theta apart, although the head-space tags are equal.
    # Head 0 has a second sink, value e1 + e2: 45 degrees from its first tag (a within pair).
    th = math.radians(theta_deg)
    T = 6
    V = torch.zeros(2, T, 2)
    V[:, 0] = torch.tensor([1.0, 0.0])
    V[0, 3] = torch.tensor([1.0, 1.0])
    S = torch.zeros(2, T, dtype=torch.bool)
    S[:, 0] = True
    S[0, 3] = True
    W_O = torch.cat([torch.eye(2), rotation(th)], dim=1)          # (d_model, H * D)
    tags, head, pos = variance.mapped_tags(V, S, W_O)
    assert head.tolist() == [0, 0, 1] and pos.tolist() == [0, 3, 0]
    cross, within = variance.pair_cosines(tags, head)
    # cross pairs: (head 0 sink 0, head 1 sink 0) = theta; (head 0 sink 3, head 1 sink 0) =
    # theta - 45 degrees
    assert sorted(cross.tolist()) == pytest.approx(sorted([math.cos(th), math.cos(th - math.pi / 4)]),
                                                   abs=1e-6)
    assert within.tolist() == pytest.approx([math.cos(math.pi / 4)], abs=1e-6)
    # and the histogram in the paper's bins counts them where they belong
    r = empty_result(H=2)
    A = torch.softmax(torch.randn(2, T, T).masked_fill(torch.ones(T, T).triu(1).bool(), -1e9), -1)
    variance._tag_geometry(r, 0, 0, A, V, S, W_O, torch.randn(T, 2))
    assert r.pairs_cross.sum() == 2 and r.pairs_within.sum() == 1
    b = np.searchsorted(variance.PAIR_BINS, math.cos(math.pi / 4), side="right") - 1
    assert r.pairs_within[0, b] == 1


def test_ve_of_a_sinkless_head_is_zero_in_the_paper_like_average():
    r = empty_result(P=2, L=1, H=2, E=2)
    r.ve[:] = np.nan
    r.ve[:, 0, 0, :] = 0.6                       # head 0 has sinks, head 1 none
    m = variance.sweep_means(r)
    assert m["ve_zero"].tolist() == [[0.3, 0.3], [0.3, 0.3]]
    assert m["ve_excluded"].tolist() == [[0.6, 0.6], [0.6, 0.6]]


def test_paper_like_sweep_matches_a_direct_per_eps_computation():
    H, T, Dh = 4, 40, 8
    A = attention(H, T, sinks=[0, 9, 17], strength=2.5)
    V = torch.randn(H, T, Dh, generator=torch.Generator().manual_seed(2))
    O = A @ V
    a = D.alpha(A, min_queries=5)
    eps = variance.EPS_SWEEP
    k, ve, _ = variance.sweep(a.double(), V.double(), O, torch.tensor(eps, dtype=torch.float64))
    r = empty_result(P=1, L=1, H=H, E=len(eps))
    r.eps, r.n_sinks[0, 0], r.ve[0, 0] = tuple(eps), k.T.numpy(), ve.T.numpy()
    got = variance.sweep_means(r)["ve_zero"][0]
    for i, e in enumerate(eps):
        S = D.sinks(a, e)
        direct = [D.variance_explained(O[h], D.basis(V[h][S[h]])) if S[h].any() else 0.0
                  for h in range(H)]
        assert got[i] == pytest.approx(sum(direct) / H, abs=1e-6)


def test_run_on_the_planted_model_finds_its_sinks_and_tags():
    from ctr import data, models
    m = models.load("tiny-planted-llama")
    r = variance.run(m, data.imdb_reviews(3, min_words=60), max_tokens=80, min_queries=8,
                     batch_size=2, progress=False)
    s = variance.summary(r)
    assert s["share_heads_bos_sink"] > 0.9          # heads 0-1 sink on <bos>, 2-3 mostly too
    assert s["ve_mean"] > s["ve_random_mean"]
    assert [x["sinks"] for x in s["sweep"]] == sorted([x["sinks"] for x in s["sweep"]], reverse=True)
    assert s["pairs_within"] > 0                    # heads 2-3 have <bos> and "." tags
    assert s["pairs_cross"] > s["pairs_within"]


# --- the rules, on fabricated results: every outcome each can return --------------------------

R, C, P_, N, U = V.REPRODUCED, V.COMPATIBLE, V.PARTLY, V.NOT, V.UNTESTABLE


def test_rule_sinks_1_2():
    assert VV.rule_sinks_1_2(0.6, 0.8) == R
    assert VV.rule_sinks_1_2(0.45, 0.55) == C
    assert VV.rule_sinks_1_2(0.2, 0.4) == N


def test_rule_ve_typical():
    assert VV.rule_ve_typical((0.25, 0.35), (0.1, 0.2)) == R
    assert VV.rule_ve_typical((0.35, 0.45), (0.1, 0.2)) == C
    assert VV.rule_ve_typical((0.45, 0.55), (0.1, 0.2)) == P_     # above the range, beats random
    assert VV.rule_ve_typical((0.45, 0.55), (-0.2, -0.1)) == N    # and no better than random
    assert VV.rule_ve_typical((0.25, 0.35), (-0.2, -0.1)) == P_


def test_rule_sweep():
    assert VV.rule_sweep(-0.05, -0.01) == R
    assert VV.rule_sweep(-0.01, 0.01) == C
    assert VV.rule_sweep(0.01, 0.05) == N      # VE rises with eps: against the paper


def test_rule_orthogonal():
    assert VV.rule_orthogonal(5000, (0.6, 0.7), (0.0, 0.002)) == R
    assert VV.rule_orthogonal(5000, (0.45, 0.55), (0.0, 0.002)) == C
    assert VV.rule_orthogonal(5000, (0.1, 0.2), (0.0, 0.002)) == P_
    assert VV.rule_orthogonal(5000, (0.1, 0.2), (0.2, 0.4)) == N
    assert VV.rule_orthogonal(99, (0.6, 0.7), (0.0, 0.0)) == U


def test_rules_tag_token():
    assert VV.rule_tag_token_signed(-0.1, -0.05) == R
    assert VV.rule_tag_token_signed(0.0, 0.05) == C
    assert VV.rule_tag_token_signed(0.1, 0.2) == N
    assert VV.rule_tag_token_abs(0.02, 0.05) == R
    assert VV.rule_tag_token_abs(0.15, 0.2) == C
    assert VV.rule_tag_token_abs(0.3, 0.4) == N


def test_paper_slope_on_its_own_table_is_negative():
    from ctr import results
    pts = results.paper()["eps_sweep"]["models"]["Llama-3.1-8B"]
    assert VV.paper_slope(pts) < 0


def test_claim_rows_on_the_planted_model_are_complete():
    from ctr import data, models, results
    m = models.load("tiny-planted-llama")
    r = variance.run(m, data.imdb_reviews(4, min_words=60), max_tokens=64, min_queries=8,
                     batch_size=2, progress=False)
    rows = VV.claims("tiny", variance.summary(r), VV.intervals(r, n_boot=50), results.paper())
    assert [x["id"] for x in rows] == ["sinks_1_2", "ve_20_40", "sweep", "tag_orth_cross",
                                      "tag_orth_within", "tag_token", "tag_token_abs"]
    assert all(set(x) == set(V.COLUMNS) and x["verdict"] in V.VERDICTS for x in rows)


def test_layer_mean_ignores_nan_and_keeps_empty_layers_empty():
    import warnings
    from ctr.chapters.variance import layer_mean
    x = np.full((2, 3, 2), np.nan)
    x[0, 0, 0], x[1, 0, 1] = 0.2, 0.4          # layer 0: two values
    x[1, 2, 0] = 1.0                          # layer 2: one value; layer 1: none
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # a "Mean of empty slice" warning fails the test
        m = layer_mean(x)
    assert m[0] == pytest.approx(0.3) and np.isnan(m[1]) and m[2] == 1.0
