"""The variance chapter's reductions: the threshold sweep and the tag geometry."""
import math

import numpy as np
import pytest
import torch

from ctr.chapters import variance
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


def empty_result(L=1, H=1):
    return variance.Result(model="x", eps=(0.2,), n_sinks=np.zeros((1, L, H, 1)),
                           ve=np.zeros((1, L, H, 1)), ve_sq=np.zeros((1, L, H, 1)),
                           ve_random=np.zeros((1, L, H)), ve_expected=np.zeros((1, L, H)),
                           n_sinks_unguarded=np.zeros((1, L, H)), tail_unguarded=np.zeros((1, L, H)),
                           bos_sink=np.zeros((1, L, H), bool), tag_token=np.full((1, L), np.nan))


@pytest.mark.parametrize("theta_deg", [90.0, 60.0, 135.0])
def test_tag_vs_token_cosine_recovers_a_constructed_angle(theta_deg):
    # one head (D = 2) in a 2-D residual stream, W_O = identity: the tag maps to itself.
    # Sink at 0 with value e1; every later token's residual is at angle theta to e1.
    T, th = 6, math.radians(theta_deg)
    A = torch.zeros(1, T, T)
    A[0, :, 0] = 0.7
    for t in range(T):
        A[0, t, t] += 0.3 if t else 0.3
    A[0, 0, 0] = 1.0
    V = torch.zeros(1, T, 2)
    V[0, :, 0] = 1.0
    S = torch.zeros(1, T, dtype=torch.bool)
    S[0, 0] = True
    resid = torch.tensor([[math.cos(th), math.sin(th)]] * T) * 5.0
    r = empty_result()
    variance._tag_geometry(r, 0, 0, A, V, S, torch.eye(2), resid, 2)
    assert r.tag_token[0, 0] == pytest.approx(math.cos(th), abs=1e-6)


def test_tag_cosines_between_distinct_tags_of_a_head():
    T = 5
    A = attention(1, T, sinks=[0, 2])
    V = torch.zeros(1, T, 2)
    V[0, 0] = torch.tensor([1.0, 0.0])
    V[0, 2] = torch.tensor([1.0, 1.0])          # 45 degrees from the first tag
    S = torch.zeros(1, T, dtype=torch.bool)
    S[0, [0, 2]] = True
    r = empty_result()
    variance._tag_geometry(r, 0, 0, A, V, S, torch.eye(2), torch.randn(T, 2), 2)
    assert r.tag_cos == pytest.approx([math.cos(math.pi / 4)])


def test_run_on_the_planted_model_finds_its_sinks_and_tags():
    from ctr import data, models
    m = models.load("tiny-planted-llama")
    r = variance.run(m, data.imdb_reviews(3, min_words=60), max_tokens=80, min_queries=8,
                     batch_size=2, progress=False)
    s = variance.summary(r)
    assert s["share_heads_bos_sink"] > 0.9          # heads 0-1 sink on <bos>, 2-3 mostly too
    assert s["ve_mean"] > s["ve_random_mean"]
    assert [x["sinks"] for x in s["sweep"]] == sorted([x["sinks"] for x in s["sweep"]], reverse=True)
    assert s["tag_pairs"] > 0                       # heads 2-3 have <bos> and "." tags
