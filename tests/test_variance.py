"""The variance chapter: the threshold sweep, the tag geometry, and every rule of RULES.md's
variance section, each outcome on fabricated numbers and on the chapter's own measurement code
(``variance.measure_layer``) run on planted attention tensors, values and W_O."""
import math

import numpy as np
import pytest
import torch

from ctr import definitions as D
from ctr import results, rules
from ctr import verdicts as V
from ctr.chapters import variance
from ctr.chapters.variance import verdicts as VV
from ctr.extract import LayerRecord, one_thread

R, C, P_, N, U = V.REPRODUCED, V.COMPATIBLE, V.PARTLY, V.NOT, V.UNTESTABLE
EPS = variance.EPS_SWEEP


def gen(seed):
    return torch.Generator().manual_seed(seed)


def attention(H, T, sinks, strength=3.0, seed=0):
    logits = torch.randn(H, T, T, generator=gen(seed))
    for s in sinks:
        logits[..., s] += strength
    mask = torch.ones(T, T).triu(1).bool()
    return torch.softmax(logits.masked_fill(mask, float("-inf")), -1)


def planted_attention(T, sinks: dict, H=1):
    """Row i puts weight w on each sink p < i and the rest on itself: alpha is known."""
    A = torch.zeros(T, T)
    for i in range(T):
        for p, w in sinks.items():
            if p < i:
                A[i, p] = w
        A[i, i] = 1 - A[i].sum()
    return A.expand(H, T, T).clone()


def measure(prompts, W, d_model, eps=EPS, mq=16, seed=0):
    """The chapter's per-layer measurement on planted layers: prompts[p][l] = dict(A (H, T, T),
    V (H, T, D), optional O (H, T, D) (default A V) and resid (T, d_model))."""
    P, L = len(prompts), len(prompts[0])
    H, T, Dh = prompts[0][0]["V"].shape
    r = variance.Result.empty("planted", P, L, H, eps, head_dim=Dh, d_model=d_model,
                              min_queries=mq)
    ctx = variance.Context(torch.tensor(eps, dtype=torch.float64), 0.2, mq, gen(seed),
                           gen(seed + 1), [W] * L)
    g = gen(seed + 2)
    with one_thread():
        _measure(r, prompts, ctx, g, d_model)
    return r


def _measure(r, prompts, ctx, g, d_model):
    for p, layers in enumerate(prompts):
        for l, x in enumerate(layers):
            A, Vv = x["A"], x["V"]
            O = x.get("O", A @ Vv)
            res = x.get("resid", torch.randn(A.shape[-1], d_model, generator=g))
            rec = LayerRecord(l, A[None], Vv[None], O.transpose(0, 1)[None], res[None], None,
                              None, [A.shape[-1]])
            variance.measure_layer(r, p, rec, ctx)


def judge(r, n_boot=1000):
    s = variance.summary(r)
    iv = VV.intervals(r, n_boot=n_boot)
    return {x["id"]: x for x in VV.claims("planted", s, iv, results.paper())}, s, iv


# --- the sweep ---------------------------------------------------------------------------------

@pytest.mark.parametrize("Dh", [16, 3])      # 3: more sinks than dimensions at low eps
def test_sweep_equals_the_definition_at_every_eps(Dh):
    H, T = 4, 40
    A = attention(H, T, sinks=[0, 9, 17])
    Vv = torch.randn(H, T, Dh, generator=gen(1))
    O = A @ Vv
    a = D.alpha(A, min_queries=5)
    k, ve, ve_sq = variance.sweep(a.double(), Vv.double(), O, torch.tensor(EPS, dtype=torch.float64))
    for i, e in enumerate(EPS):
        S = D.sinks(a, e)
        for h in range(H):
            assert int(k[i, h]) == int(S[h].sum())
            ref = D.variance_explained(O[h], D.basis(Vv[h][S[h]]))
            if S[h].any():
                assert float(ve[i, h]) == pytest.approx(ref, abs=1e-6)
                assert float(ve_sq[i, h]) == pytest.approx(ref ** 2, abs=1e-6)
            else:
                assert math.isnan(float(ve[i, h]))


def test_sweep_is_monotone_in_eps_on_a_fixed_attention_tensor():
    A = attention(6, 50, sinks=[0, 12, 30], strength=2.0, seed=3)
    Vv = torch.randn(6, 50, 8, generator=gen(4))
    k, _, _ = variance.sweep(D.alpha(A, min_queries=4).double(), Vv.double(), A @ Vv,
                             torch.tensor(EPS, dtype=torch.float64))
    counts = k.sum(1).tolist()                      # total sinks per eps, eps increasing
    assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[0] > counts[-1]
    assert (k[:-1] >= k[1:]).all()                  # per head too


def test_saturation_D_and_q_by_hand():
    # E = (0.5, 0.4, 0.1), S = (3, 1.5, 0.5) at eps 0.03, 0.1, 0.4:
    # D = 0.3 * 1.5 - 0.1 * 1.0 = 0.35; q = (0.1 / 1.5) / (0.3 / 1.0) = 2/9
    d, q = variance.saturation((0.5, 0.4, 0.1), (3.0, 1.5, 0.5))
    assert d == pytest.approx(0.35) and q == pytest.approx(2 / 9)
    # a straight line E = S / 10 is neither saturating nor accelerating
    d, q = variance.saturation((0.3, 0.15, 0.05), (3.0, 1.5, 0.5))
    assert d == pytest.approx(0.0, abs=1e-12) and q == pytest.approx(1.0)
    assert variance.fall(0.5, 0.3) == pytest.approx(0.4)


def test_the_paper_s_q_and_f_come_out_of_its_own_table():
    ps = VV.paper_saturation(results.paper())
    assert round(ps["Llama-3.1-8B"]["q"], 2) == 0.31 and round(ps["Llama-3.1-8B"]["f"], 2) == 0.39
    m = "DeepSeek-R1-Distill-Llama-8B"
    assert round(ps[m]["q"], 2) == 0.42 and round(ps[m]["f"], 2) == 0.20


def test_the_paper_s_r_and_a_come_out_of_its_histograms():
    po = VV.paper_orthogonality(results.paper())
    rs = [v["r"] for v in po.values()]
    assert round(min(rs), 2) == 0.55 and round(max(rs), 2) == 0.76
    assert max(v["a"] for v in po.values()) == pytest.approx(0.0017, abs=5e-5)


def sweep_case(energies, P=24, extra=None):
    """One head, D = 4, sinks at 0 (alpha 0.51 > 0.4), 5 (0.21, in (0.1, 0.4]) and 10 (0.066,
    in (0.03, 0.1]) with values e1, e2, e3; O has energy energies[j] along e_j. So the squared
    VE is known at every eps: sum of the first k energies over the total."""
    T, Dh = 48, 4
    A = planted_attention(T, {0: 0.5, 5: 0.2, 10: 0.06})
    prompts = []
    for p in range(P):
        Vv = torch.randn(1, T, Dh, generator=gen(p))
        Vv[0, 0], Vv[0, 5], Vv[0, 10] = torch.eye(4)[:3]
        c = torch.tensor(energies if extra is None else extra(p), dtype=torch.float32)
        O = (torch.ones(T, Dh) * (c / T).sqrt()).unsqueeze(0)
        prompts.append([{"A": A, "V": Vv, "O": O}])
    return measure(prompts, torch.eye(4), 4)


def test_D_on_a_planted_curve_is_the_hand_computed_value():
    r = sweep_case([4.0, 2.0, 1.0, 3.0])
    i = [EPS.index(e) for e in (0.03, 0.1, 0.4)]
    assert r.n_sinks[0, 0, 0, i].tolist() == [3, 2, 1]
    assert r.ve_sq[0, 0, 0, i] == pytest.approx([0.7, 0.6, 0.4])
    rows, s, iv = judge(r)
    # D = (0.6 - 0.4)(3 - 2) - (0.7 - 0.6)(2 - 1) = 0.1; q = 0.1 / 0.2 = 0.5
    assert iv["D"][0] == pytest.approx(0.1) and s["saturation"]["q"] == pytest.approx(0.5)
    assert rows["sweep"]["verdict"] == R                 # sweep_reproduced_on_a_planted_case


def test_sweep_not_reproduced_on_a_planted_case():
    # the later sinks explain more per sink than the first: 0.1, 0.2, 0.8 -> D = 0.1 - 0.6
    r = sweep_case([1.0, 1.0, 6.0, 2.0])
    rows, _, iv = judge(r)
    assert iv["D"][0] == pytest.approx(-0.5)
    assert rows["sweep"]["verdict"] == N


def test_D_interval_contains_0_for_random_subspaces():
    # Sinks whose values are random directions, head outputs independent of them: the squared
    # VE of a random k-subspace is k / D in expectation, so E is linear in S and D ~ 0.
    T, H, Dh, P = 48, 6, 16, 30
    A = planted_attention(T, {0: 0.5, 5: 0.2, 10: 0.06, 14: 0.06}, H)
    prompts = [[{"A": A, "V": torch.randn(H, T, Dh, generator=gen(100 + p)),
                 "O": torch.randn(H, T, Dh, generator=gen(200 + p))}] for p in range(P)]
    r = measure(prompts, torch.randn(32, H * Dh, generator=gen(7)), 32)
    rows, s, iv = judge(r)
    pt, lo, hi = iv["D"]
    assert lo < 0 < hi
    assert rows["sweep"]["verdict"] == C                 # sweep_compatible_on_a_planted_case


def test_sweep_not_testable_without_its_thresholds_or_prompts():
    r = sweep_case([4.0, 2.0, 1.0, 3.0], P=10)
    assert judge(r)[0]["sweep"]["verdict"] == U          # fewer than 20 prompts
    s = variance.summary(sweep_case([4.0, 2.0, 1.0, 3.0], P=2))
    s["saturation"] = None
    rows = VV.claims("x", s, VV.intervals(sweep_case([4.0, 2.0, 1.0, 3.0], P=2), n_boot=10),
                     results.paper())
    assert rows[2]["verdict"] == U


# --- VE 20-40% -----------------------------------------------------------------------------------

def ve_case(targets, Dh=32, P=24, H=4):
    """H heads with one sink (token 0, value e1); head outputs c e1 + noise orthogonal to e1,
    c chosen so that the VE of prompt p is about targets[p % len(targets)]."""
    T = 40
    A = planted_attention(T, {0: 0.5}, H)
    prompts = []
    for p in range(P):
        t = targets[p % len(targets)]
        Vv = torch.randn(H, T, Dh, generator=gen(p))
        Vv[:, 0] = torch.eye(Dh)[0]
        noise = torch.randn(H, T, Dh, generator=gen(1000 + p))
        noise[..., 0] = 0
        c = math.sqrt(t * t * (Dh - 1) / (1 - t * t))
        prompts.append([{"A": A, "V": Vv, "O": noise + c * torch.eye(Dh)[0]}])
    return measure(prompts, torch.randn(64, H * Dh, generator=gen(5)), 64)


def test_ve_20_40_reproduced_on_a_planted_case():
    rows, s, iv = judge(ve_case([0.3]))
    assert s["ve_median"] == pytest.approx(0.3, abs=0.02)
    assert rows["ve_20_40"]["parts"] == {"in range": R, "beats random": R}
    assert rows["ve_20_40"]["verdict"] == R


def test_ve_20_40_partly_when_above_the_range_on_a_planted_case():
    rows, s, _ = judge(ve_case([0.6]))
    assert rows["ve_20_40"]["parts"] == {"in range": N, "beats random": R}
    assert rows["ve_20_40"]["verdict"] == P_


def test_ve_20_40_in_range_compatible_when_straddling_on_a_planted_case():
    rows, s, iv = judge(ve_case([0.33, 0.47]))
    lo, hi = iv["ve_median"][1:]
    assert lo < 0.4 < hi
    assert rows["ve_20_40"]["parts"]["in range"] == C and rows["ve_20_40"]["verdict"] == C


def test_ve_20_40_not_reproduced_below_range_and_random_on_a_planted_case():
    # VE 0.12 with 8 dimensions: a random 1-dimensional subspace explains about 0.3
    rows, s, iv = judge(ve_case([0.12], Dh=8))
    assert iv["beats_random_median"][2] < 0
    assert rows["ve_20_40"]["parts"] == {"in range": N, "beats random": N}
    assert rows["ve_20_40"]["verdict"] == N


def test_ve_20_40_beats_random_compatible_on_a_planted_case():
    # a random 1-d subspace of 16 dimensions explains about 0.2 here: VE alternating around it
    r = ve_case([0.12, 0.32], Dh=16)
    rows, s, iv = judge(r)
    lo, hi = iv["beats_random_median"][1:]
    assert lo < 0 < hi
    assert rows["ve_20_40"]["parts"]["beats random"] == C


def test_ve_20_40_not_testable_with_fewer_than_20_prompts_on_a_planted_case():
    rows, _, _ = judge(ve_case([0.3], P=12))
    assert rows["ve_20_40"]["verdict"] == U
    assert rows["sinks_1_2"]["verdict"] == U


def test_per_head_ve_drops_heads_with_sinks_in_fewer_than_5_prompts():
    has = np.zeros((8, 3), bool)
    has[:, 0] = True                    # head 0: 8 prompts
    has[:5, 1] = True                   # head 1: exactly 5
    has[:4, 2] = True                   # head 2: 4 -> excluded
    x = np.arange(24, dtype=float).reshape(8, 3)
    ph = variance.per_head(x, has)
    assert ph[0] == pytest.approx(x[:, 0].mean()) and ph[1] == pytest.approx(x[:5, 1].mean())
    assert np.isnan(ph[2])


def test_up_to_70_is_descriptive_and_outside_the_claims():
    r = ve_case([0.3])
    s = variance.summary(r)
    d = VV.descriptive("planted", s, results.paper())
    assert [x["id"] for x in d] == ["up_to_70"] and d[0]["verdict"] == VV.NO_VERDICT
    assert d[0]["rule"] == rules.text("up_to_70")
    assert s["ve_max"] >= s["ve_p95"] >= s["ve_median"]
    assert "up_to_70" not in [x["id"] for x in VV.claims("p", s, VV.intervals(r, n_boot=20),
                                                        results.paper())]


# --- sinks per head ------------------------------------------------------------------------------

def test_sinks_1_2_outcomes_on_planted_cases():
    T, Dh, H = 40, 8, 4

    def case(sinks_of_prompt, P=24):
        prompts = []
        for p in range(P):
            A = torch.stack([planted_attention(T, s)[0] for s in sinks_of_prompt(p)])
            prompts.append([{"A": A, "V": torch.randn(H, T, Dh, generator=gen(p))}])
        return judge(measure(prompts, torch.randn(32, H * Dh, generator=gen(3)), 32))[0]

    one = {0: 0.5}
    three = {0: 0.3, 4: 0.25, 8: 0.25}
    assert case(lambda p: [one] * 4)["sinks_1_2"]["verdict"] == R
    assert case(lambda p: [three] * 4)["sinks_1_2"]["verdict"] == N
    # half the heads have one sink, half three, with the split varying by prompt around 1/2
    mix = lambda p: [one, three, one if p % 2 else three, three if p % 3 else one]  # noqa: E731
    assert case(mix)["sinks_1_2"]["verdict"] == C


# --- tag geometry --------------------------------------------------------------------------------

def orth_case(P=30, L=4, H=4, Dh=16, d_model=64, aligned=lambda p, l: False, W=None,
              sinks=(0, 5), n_aligned=None):
    """Every head has sinks at ``sinks`` with random values (random in each head's value
    space); in the layers where aligned(p, l), the sink values of the first ``n_aligned`` heads
    (default all) are e1 instead, and every head's first W_O column is the same vector: their
    mapped tags coincide."""
    T = 40
    A = planted_attention(T, {s: 0.3 for s in sinks}, H)
    if W is None:
        W = torch.randn(d_model, H * Dh, generator=gen(11))
        W[:, ::Dh] = W[:, :1]                       # column 0 of every head's slice: one vector
    prompts = []
    for p in range(P):
        layers = []
        for l in range(L):
            Vv = torch.randn(H, T, Dh, generator=gen(p * 100 + l))
            if aligned(p, l):
                Vv[:n_aligned, list(sinks)] = torch.eye(Dh)[0]
            layers.append({"A": A, "V": Vv})
        prompts.append(layers)
    return measure(prompts, W, d_model)


def test_r_is_1_within_its_interval_for_random_value_space_vectors():
    rows, s, iv = judge(orth_case())
    for key in ("cross", "within"):
        pt, lo, hi = iv[f"r_{key}"]
        assert lo < 1 < hi and 0.8 < pt < 1.25
    assert rows["tag_orth_cross"]["parts"]["near 0"] == R


def test_tag_orth_reproduced_on_a_planted_case():
    # random tags, and a few prompts where two heads' tags align in one layer: a small share
    rows, s, iv = judge(orth_case(P=40, aligned=lambda p, l: p % 10 == 0 and l == 0, n_aligned=2))
    assert 0 < iv["a_cross"][0] < 0.01 and iv["a_cross"][2] < 0.01
    assert rows["tag_orth_cross"]["parts"] == {"near 0": R, "rarely aligned": R}
    assert rows["tag_orth_cross"]["verdict"] == R


def test_tag_orth_not_reproduced_on_a_planted_case():
    rows, s, iv = judge(orth_case(aligned=lambda p, l: True))
    assert iv["a_cross"][0] == pytest.approx(1.0) and iv["r_cross"][0] < 0.05
    for key in ("cross", "within"):
        assert rows[f"tag_orth_{key}"]["parts"] == {"near 0": N, "rarely aligned": N}
        assert rows[f"tag_orth_{key}"]["verdict"] == N


def test_tag_orth_partly_when_near_0_but_often_aligned_on_a_planted_case():
    # a quarter of the layers aligned: r stays above 0.5, a far above 0.01
    rows, s, iv = judge(orth_case(aligned=lambda p, l: l == 0))
    assert rows["tag_orth_cross"]["parts"] == {"near 0": R, "rarely aligned": N}
    assert rows["tag_orth_cross"]["verdict"] == P_


def test_tag_orth_compatible_parts_on_planted_cases():
    # r around 0.5: about half the prompts have every layer aligned
    rows, _, iv = judge(orth_case(P=40, aligned=lambda p, l: p % 2 == 0 and p % 8 != 0))
    lo, hi = iv["r_cross"][1:]
    assert lo < 0.5 < hi and rows["tag_orth_cross"]["parts"]["near 0"] == C
    # a around 0.01: one prompt of 40 with one aligned layer
    rows, _, iv = judge(orth_case(P=40, aligned=lambda p, l: p == 7 and l == 0))
    lo, hi = iv["a_cross"][1:]
    assert lo < 0.01 < hi and rows["tag_orth_cross"]["parts"]["rarely aligned"] == C
    assert rows["tag_orth_cross"]["verdict"] == C


def test_tag_orth_not_testable_with_fewer_than_100_pairs_or_20_prompts():
    # one layer, two heads with one sink each: one cross pair per prompt, no within pair
    rows, s, _ = judge(orth_case(P=30, L=1, H=2, sinks=(0,)))
    assert s["pairs_cross"] == 30 and s["pairs_within"] == 0
    assert rows["tag_orth_cross"]["verdict"] == U and rows["tag_orth_within"]["verdict"] == U
    rows, s, _ = judge(orth_case(P=12))
    assert s["pairs_cross"] >= 100 and rows["tag_orth_cross"]["verdict"] == U


def test_shared_kv_heads_are_named_on_the_cross_row():
    rows, s, iv = judge(orth_case(P=4, L=1))
    assert "note" not in rows["tag_orth_cross"]
    s = dict(s, heads=4, kv_heads=1)
    row = VV.claims("g", s, iv, results.paper())[3]
    assert row["id"] == "tag_orth_cross" and "4 query heads share 1 key-value heads" in row["note"]


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
    Vv = torch.zeros(2, T, 2)
    Vv[:, 0] = torch.tensor([1.0, 0.0])
    Vv[0, 3] = torch.tensor([1.0, 1.0])
    S = torch.zeros(2, T, dtype=torch.bool)
    S[:, 0] = True
    S[0, 3] = True
    W = torch.cat([torch.eye(2), rotation(th)], dim=1)          # (d_model, H * D)
    tags, head, pos = variance.mapped_tags(Vv, S, W)
    assert head.tolist() == [0, 0, 1] and pos.tolist() == [0, 3, 0]
    cross, within = variance.pair_cosines(tags, head)
    assert sorted(cross.tolist()) == pytest.approx(
        sorted([math.cos(th), math.cos(th - math.pi / 4)]), abs=1e-6)
    assert within.tolist() == pytest.approx([math.cos(math.pi / 4)], abs=1e-6)
    r = variance.Result.empty("x", 1, 1, 2)
    A = torch.softmax(torch.randn(2, T, T).masked_fill(torch.ones(T, T).triu(1).bool(), -1e9), -1)
    variance.tag_geometry(r, 0, 0, A, Vv, S, W, torch.randn(T, 2), gen=gen(0))
    assert r.pairs_cross.sum() == 2 and r.pairs_within.sum() == 1
    assert r.null_cross.sum() == 2 * variance.NULL_DRAWS
    b = np.searchsorted(variance.PAIR_BINS, math.cos(math.pi / 4), side="right") - 1
    assert r.pairs_within[0, b] == 1


def test_post_attention_scale_acts_per_dimension_and_a_per_token_scale_does_not():
    H, Dh, d, T = 3, 4, 12, 10
    W_O = torch.randn(d, H * Dh, generator=gen(1))
    g = torch.rand(d, generator=gen(2)) * 3 + 0.1
    assert torch.equal(variance.residual_map(W_O, g), torch.diag(g) @ W_O)
    assert torch.equal(variance.residual_map(W_O, None), W_O)
    Vv = torch.randn(H, T, Dh, generator=gen(3))
    S = torch.zeros(H, T, dtype=torch.bool)
    S[:, 0], S[0, 4] = True, True
    A = planted_attention(T, {0: 0.4, 4: 0.3}, H)
    resid = torch.randn(T, d, generator=gen(4))

    def geometry(W):
        r = variance.Result.empty("x", 1, 1, H)
        variance.tag_geometry(r, 0, 0, A, Vv, S, W, resid, gen=gen(0))
        return r

    # the per-dimension scale: the same cosines as scaling each mapped tag by g by hand
    tags, head, _ = variance.mapped_tags(Vv, S, W_O)
    cross, _ = variance.pair_cosines(tags * g, head)
    scaled = geometry(variance.residual_map(W_O, g))
    assert np.array_equal(scaled.pairs_cross[0], variance._hist(cross, variance.PAIR_BINS))
    unscaled = geometry(W_O)
    assert not np.isclose(scaled.tag_token[0, 0], unscaled.tag_token[0, 0])
    # a factor common to every head at a token (the norm's 1 / RMS): nothing changes
    same = geometry(variance.residual_map(W_O, g * 7.5))
    assert np.array_equal(same.pairs_cross, scaled.pairs_cross)
    assert same.tag_token[0, 0] == pytest.approx(scaled.tag_token[0, 0], abs=1e-6)


def tag_token_case(cosines, P=24):
    """One head, W_O = identity, one sink (token 0, value e1); every later token's residual at
    cosine cosines[p % len] with it."""
    T, Dh = 40, 8
    A = planted_attention(T, {0: 0.5})
    prompts = []
    for p in range(P):
        c = cosines[p % len(cosines)]
        Vv = torch.randn(1, T, Dh, generator=gen(p))
        Vv[0, 0] = torch.eye(Dh)[0]
        res = (c * torch.eye(Dh)[0] + math.sqrt(1 - c * c) * torch.eye(Dh)[1]).repeat(T, 1) * 3
        prompts.append([{"A": A, "V": Vv, "resid": res}])
    return judge(measure(prompts, torch.eye(Dh), Dh))


def test_tag_token_outcomes_on_planted_cases():
    rows, s, iv = tag_token_case([0.0])
    assert iv["tag_token"][0] == pytest.approx(0.0, abs=1e-6) and rows["tag_token"]["verdict"] == R
    rows, s, iv = tag_token_case([0.5])
    assert iv["tag_token"][0] == pytest.approx(0.5, abs=1e-6) and rows["tag_token"]["verdict"] == N
    rows, s, iv = tag_token_case([0.1, 0.25])
    assert iv["tag_token"][1] < 0.174 < iv["tag_token"][2] and rows["tag_token"]["verdict"] == C
    rows, s, iv = tag_token_case([0.0], P=12)
    assert rows["tag_token"]["verdict"] == U


def test_tag_token_counts_every_later_non_sink_token_that_sees_the_tag_unweighted():
    # head 0: sinks at 0 and 3; the residual of token t is e1 for t < 6 and e2 after; tag 0 =
    # e1, tag 3 = e2. Tokens 1, 2 see only tag 0 (cos 1); tokens 4, 5 see tag 0 (cos 1) and tag
    # 3 (cos 0); tokens 6..9 see both (cos 0, 1). Pairs: 2 + 4 + 8 = 14, 8 of them with cos 1.
    T = 10
    Vv = torch.zeros(1, T, 2)
    Vv[0, 0], Vv[0, 3] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    S = torch.zeros(1, T, dtype=torch.bool)
    S[0, [0, 3]] = True
    A = planted_attention(T, {0: 0.1, 3: 0.1})
    resid = torch.zeros(T, 2)
    resid[:6, 0], resid[6:, 1] = 1.0, 1.0
    r = variance.Result.empty("x", 1, 1, 1)
    variance.tag_geometry(r, 0, 0, A, Vv, S, torch.eye(2), resid, gen=gen(0))
    assert r.tag_token[0, 0] == pytest.approx(8 / 14)


def test_ve_of_a_sinkless_head_is_zero_in_the_paper_like_average():
    r = variance.Result.empty("x", 2, 1, 2, eps=(0.1, 0.2))
    r.ve[:, 0, 0, :] = 0.6                       # head 0 has sinks, head 1 none
    m = variance.sweep_means(r)
    assert m["ve_zero"].tolist() == [[0.3, 0.3], [0.3, 0.3]]
    assert m["ve_excluded"].tolist() == [[0.6, 0.6], [0.6, 0.6]]


def test_layer_mean_ignores_nan_and_keeps_empty_layers_empty():
    import warnings
    x = np.full((2, 3, 2), np.nan)
    x[0, 0, 0], x[1, 0, 1] = 0.2, 0.4          # layer 0: two values
    x[1, 2, 0] = 1.0                          # layer 2: one value; layer 1: none
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # a "Mean of empty slice" warning fails the test
        m = variance.layer_mean(x)
    assert m[0] == pytest.approx(0.3) and np.isnan(m[1]) and m[2] == 1.0


# --- the rules, on fabricated numbers: every outcome each can return ---------------------------

def test_rule_sinks_1_2():
    assert VV.rule_sinks_1_2(0.6, 0.8, 30) == R
    assert VV.rule_sinks_1_2(0.45, 0.55, 30) == C
    assert VV.rule_sinks_1_2(0.2, 0.4, 30) == N
    assert VV.rule_sinks_1_2(0.6, 0.8, 19) == U


def test_rule_ve_20_40():
    assert VV.rule_in_range(0.25, 0.35, 30) == R
    assert VV.rule_in_range(0.35, 0.45, 30) == C
    assert VV.rule_in_range(0.45, 0.55, 30) == N
    assert VV.rule_in_range(0.1, 0.15, 30) == N
    assert VV.rule_in_range(0.25, 0.35, 5) == U
    assert VV.rule_beats_random(0.1, 0.2, 30) == R
    assert VV.rule_beats_random(-0.1, 0.2, 30) == C
    assert VV.rule_beats_random(-0.2, -0.1, 30) == N
    assert VV.rule_ve_20_40(R, R) == R
    assert VV.rule_ve_20_40(N, R) == P_
    assert VV.rule_ve_20_40(N, C) == N
    assert VV.rule_ve_20_40(C, R) == C
    assert VV.rule_ve_20_40(U, R) == U


def test_rule_sweep():
    assert VV.rule_sweep(0.01, 0.05, 30) == R
    assert VV.rule_sweep(-0.01, 0.01, 30) == C
    assert VV.rule_sweep(-0.05, -0.01, 30) == N
    assert VV.rule_sweep(0.01, 0.05, 10) == U
    # "CI > 0" is strict: an interval that touches 0 (a model without sinks: D = 0) is on
    # neither side
    assert VV.rule_sweep(0.0, 0.0, 30) == C and VV.rule_sweep(0.0, 0.02, 30) == C


def test_rule_orthogonal():
    near = VV.rule_near0(0.6, 0.9, 30)
    assert near == R and VV.rule_near0(0.4, 0.6, 30) == C and VV.rule_near0(0.1, 0.3, 30) == N
    assert VV.rule_rarely_aligned(0.0, 0.005, 30) == R
    assert VV.rule_rarely_aligned(0.005, 0.02, 30) == C
    assert VV.rule_rarely_aligned(0.02, 0.05, 30) == N
    assert VV.rule_orthogonal(5000, R, R) == R
    assert VV.rule_orthogonal(5000, R, N) == P_
    assert VV.rule_orthogonal(5000, C, N) == N
    assert VV.rule_orthogonal(5000, C, R) == C
    assert VV.rule_orthogonal(99, R, R) == U
    assert VV.rule_orthogonal(5000, VV.rule_near0(0.6, 0.9, 19), R) == U


def test_rule_tag_token():
    assert VV.rule_tag_token(-0.1, -0.05, 30) == R
    assert VV.rule_tag_token(0.15, 0.2, 30) == C
    assert VV.rule_tag_token(0.2, 0.3, 30) == N
    assert VV.rule_tag_token(-0.3, -0.2, 30) == N
    assert VV.rule_tag_token(-0.1, -0.05, 3) == U


# --- the whole pass on the planted model -----------------------------------------------------------

@pytest.fixture(scope="module")
def planted_run():
    from ctr import data, models
    m = models.load("tiny-planted-llama")
    return variance.run(m, data.imdb_reviews(4, min_words=60), max_tokens=64, min_queries=8,
                        batch_size=2, progress=False)


def test_run_on_the_planted_model_finds_its_sinks_and_tags(planted_run):
    s = variance.summary(planted_run)
    assert s["share_heads_bos_sink"] > 0.9          # heads 0-1 sink on <bos>, 2-3 mostly too
    assert s["ve_mean"] > s["ve_random_mean"]
    assert [x["sinks"] for x in s["sweep"]] == sorted([x["sinks"] for x in s["sweep"]], reverse=True)
    assert s["pairs_within"] > 0                    # heads 2-3 have <bos> and "." tags
    assert s["pairs_cross"] > s["pairs_within"]
    assert not s["post_norm"] and s["kv_heads"] == 2


def test_claim_rows_carry_the_rule_text_settings_and_parts(planted_run):
    s = variance.summary(planted_run)
    rows = VV.claims("tiny", s, VV.intervals(planted_run, n_boot=50), results.paper())
    assert [x["id"] for x in rows] == ["sinks_1_2", "ve_20_40", "sweep", "tag_orth_cross",
                                      "tag_orth_within", "tag_token"]
    for x in rows:
        assert set(V.COLUMNS) <= set(x) and x["verdict"] in V.VERDICTS
        assert x["rule"] == rules.text(x["id"]) and x["settings"] == "eps 0.2, min_queries 8"
    assert set(rows[1]["parts"]) == {"in range", "beats random"}
    assert set(rows[3]["parts"]) == {"near 0", "rarely aligned"}
    assert "note" in rows[3]                        # 4 query heads on 2 key-value heads


def test_gemma_tags_go_through_its_post_attention_norm():
    from ctr import models
    m = models.load("tiny-random-gemma3")
    assert m.post_attn_scale(0) is not None
    r = variance.run(m, ["The cat sat on the mat. " * 6] * 2, max_tokens=48, min_queries=4,
                     progress=False)
    assert r.post_norm
    W = variance.residual_map(m.out_proj(0), m.post_attn_scale(0))
    assert torch.allclose(W, m.post_attn_scale(0).unsqueeze(1) * m.out_proj(0).float())
