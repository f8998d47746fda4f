"""The sinks chapter: its measures (3-PC silhouettes per space, cases, the bootstrap over
prompts) and every outcome of its four rules, on fabricated numbers and on planted prompts run
through the real measurement code (``sinks_measures.measure_prompt``); the model path
(``sinks.scan``) on the tiny planted model."""
import numpy as np
import pytest
import torch

from ctr import definitions as D
from ctr import rules, stats
from ctr import verdicts as V
from ctr.chapters import sinks
from ctr.chapters.sinks import measures as SM
from ctr.chapters.sinks import verdicts as SV

T, H, DH, DM, L = 40, 3, 6, 12, 5      # tokens, heads, head dim, d_model, layers
P, MQ = 10, 4                          # the mid-prompt sink; min_queries
ALT = np.arange(P + 1, T) % 2 == 0     # tokens t > P: every other one attends most to P


# --- planted prompts ---------------------------------------------------------------------------

def two_sink(p=P, to_p=ALT, tail=0.0):
    """Attention whose sinks are exactly {0, p}: tokens up to p attend to 0; each t > p gives
    0.6 to its dominant sink (p where ``to_p``), 0.25 to the other, the rest spread. ``tail``:
    the last query's weight on itself (the tail artifact)."""
    A = np.zeros((T, T))
    A[0, 0] = 1.0
    for t in range(1, T):
        if t <= p:
            A[t, 0], A[t, 1:t + 1] = 0.8, 0.2 / t
            continue
        dom, oth = (p, 0) if to_p[t - p - 1] else (0, p)
        rest = [j for j in range(1, t + 1) if j != p]
        A[t, rest] = 0.15 / len(rest)
        A[t, dom], A[t, oth] = 0.6, 0.25
    if tail:
        A[T - 1] *= 1 - tail
        A[T - 1, T - 1] += tail
    return A


def uniform():
    """Causal uniform attention: no key reaches alpha 0.2 (alpha_0 = H_40 / 40 = 0.107)."""
    return np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]


def bos_only():
    A = uniform() * 0.3
    A[:, 0] += 0.7
    return A


def prompt(seed, heads=None, z_sep=4.0, deep_sep=0.0, in_sep=0.0, to_p=ALT, deep_layer=3):
    """One prompt's layers. ``heads``: {(layer, head): attention}; the two-sink heads' outputs
    z carry ``z_sep`` x (+1 for tokens labelled p, -1 for 0) on dim 0; the residual entering
    layer 0 carries ``in_sep`` and the one leaving ``deep_layer`` carries ``deep_sep`` so."""
    heads = {(0, 0): two_sink(), (0, 1): two_sink()} if heads is None else heads
    rng = np.random.default_rng(seed)
    lab = np.where(to_p, 1.0, -1.0)
    R = rng.normal(size=(L + 1, T, DM))           # R[l]: entering layer l; R[l + 1]: leaving it
    R[0, P + 1:, 0] += in_sep * lab
    R[deep_layer + 1, P + 1:, 0] += deep_sep * lab
    out = []
    for l in range(L):
        A = np.stack([heads.get((l, h), uniform()) for h in range(H)])
        z = rng.normal(size=(H, T, DH))
        for h in range(H):
            if (l, h) in heads:
                z[h, P + 1:, 0] += z_sep * lab
        out.append(SM.Layer(l, torch.tensor(A), torch.tensor(z), torch.tensor(R[l]),
                            torch.tensor(R[l + 1]), None, torch.tensor(rng.normal(size=(H, T, DH))),
                            torch.tensor(rng.normal(size=(H, DM, DH)))))
    return out


def measured(n, **kw):
    """``n`` planted prompts through the real measures, then over prompts (sinks_measures)."""
    plan = kw.pop("plan", None)
    scans = [SM.measure_prompt(i, prompt(i, **(plan(i) if plan else kw)), L, 0.2, MQ, 3)
             for i in range(n)]
    return SM.aggregate(scans)


# --- definitions and measures ----------------------------------------------------------------

def test_mid_window_by_hand():
    # T = 128: T/10 = 12.8, so 13 is the first; 2T/3 = 85.3, so 85 is the last
    assert SM.mid_window(128) == (13, 86)
    assert SM.mid_window(30) == (4, 20)         # 2T/3 = 20 exactly: 20 is not below it
    assert SM.mid_window(40) == (4, 27)


def test_the_pages_five_token_example_shows_the_tail_artifact():
    A = torch.tensor([[1, 0, 0, 0, 0], [.8, .2, 0, 0, 0], [.7, .15, .15, 0, 0],
                      [.7, .1, .1, .1, 0], [.4, .1, .1, .1, .3]])
    one = D.sinks(D.alpha(A, min_queries=1))
    two = D.sinks(D.alpha(A, min_queries=2))
    assert torch.nonzero(one).flatten().tolist() == [0, 4]
    assert torch.nonzero(two).flatten().tolist() == [0]


def test_pc3_silhouette_uses_only_the_first_three_components():
    rng = np.random.default_rng(0)
    lab = np.repeat([0, 1], 30)
    X = rng.normal(size=(60, 6)) * np.array([10, 10, 10, 1, 1, 1])
    hidden, shown = X.copy(), X.copy()
    hidden[:, 3] += 3 * lab              # separated along the 4th component: not seen
    shown[:, 0] += 60 * lab              # along the first: seen
    assert abs(SM.pc3_silhouette(hidden, lab)) < 0.05
    assert SM.pc3_silhouette(shown, lab) > 0.6
    assert SM.pc3_silhouette(hidden[:, 3:], lab) > 0.3      # there, it is a top component
    assert np.isnan(SM.pc3_silhouette(X[:3], np.array([0, 0, 1])))      # a group of one


def test_pca_is_fitted_per_space_on_the_case_tokens_only():
    layers = prompt(0, heads={(1, 2): two_sink()})
    first = SM.measure_prompt(0, layers, L, 0.2, MQ).clusters[0]
    t, lab = SM.case_tokens(layers[1].A[[2]].numpy(), P)
    assert first["sil_in"] == pytest.approx(SM.pc3_silhouette(layers[1].resid_in[t].numpy(), lab))
    assert first["sil_out"] == pytest.approx(SM.pc3_silhouette(layers[1].z[2, t].numpy(), lab))
    # massive activations at the sinks (tokens 0 and p) or anything before p change nothing;
    # nor does rotating and scaling the input space; the output's value is its own
    R, z = layers[1].resid_in.clone(), layers[1].z.clone()
    R[: P + 1] *= 1e4
    Q, _ = torch.linalg.qr(torch.randn(DM, DM, dtype=torch.float64))
    layers[1].resid_in = 7 * R @ Q
    layers[1].z = z * 0.01
    again = SM.measure_prompt(0, layers, L, 0.2, MQ).clusters[0]
    assert again["sil_in"] == pytest.approx(first["sil_in"], abs=1e-6)
    assert again["sil_out"] == pytest.approx(first["sil_out"], abs=1e-6)


def test_case_tokens_follow_the_mean_attention_over_the_heads():
    a = two_sink()
    b = two_sink(to_p=~ALT)            # the opposite labels
    c = two_sink()
    t, lab = SM.case_tokens(np.stack([a, b, c]), P)
    assert t.tolist() == list(range(P + 1, T))
    assert (lab == np.where(ALT, P, 0)).all()          # 2 heads against 1: the mean decides
    t, lab = SM.case_tokens(np.stack([a, b]), P)        # a tie everywhere: the first token
    assert (lab == 0).all()


def test_layers_out_of_order_or_missing_are_an_error():
    layers = prompt(0)
    with pytest.raises(ValueError, match="in order"):
        SM.measure_prompt(0, layers[1:], L)
    with pytest.raises(ValueError, match="4 layers given"):
        SM.measure_prompt(0, layers[:4], L)


def test_the_bootstrap_resamples_prompts_not_cases():
    rng = np.random.default_rng(1)
    cases = [{"prompt": i, "gain": float(rng.normal(0.1, 0.05))} for i in range(25)]
    base = SM.mean_over_prompts(cases, "gain")
    dup = SM.mean_over_prompts(cases + [c for c in cases if c["prompt"] == 3] * 4, "gain")
    assert (base["n_prompts"], dup["n_prompts"]) == (25, 25)
    assert (base["n_cases"], dup["n_cases"]) == (25, 29)
    units = np.array([[c["gain"], 1] for c in cases])
    assert (base["lo"], base["hi"]) == stats.bootstrap(units, stats.ratio_of_sums)
    # a hundred cases of one prompt are one unit: not testable, however many cases
    one = SM.mean_over_prompts([{"prompt": 0, "gain": 0.9}] * 100, "gain")
    assert (one["n_prompts"], one["n_cases"]) == (1, 100)
    assert SV.rule_clusters(one) == V.UNTESTABLE


# --- the rules on fabricated numbers -------------------------------------------------------------

def _m(lo, hi, n_prompts=25, n_cases=40):
    return {"mean": (lo + hi) / 2, "lo": lo, "hi": hi, "n_cases": n_cases, "n_prompts": n_prompts}


@pytest.mark.parametrize("rule", [SV.rule_clusters, SV.rule_persist])
def test_gain_rules_on_fabricated_numbers(rule):
    assert rule(_m(0.06, 0.30)) == V.REPRODUCED
    assert rule(_m(-0.02, 0.04)) == V.NOT
    assert rule(_m(0.01, 0.09)) == V.COMPATIBLE
    assert rule(_m(0.06, 0.30, n_prompts=19)) == V.UNTESTABLE       # the 20-prompt floor
    assert rule({"mean": None, "lo": None, "hi": None, "n_cases": 0, "n_prompts": 0}) \
        == V.UNTESTABLE


def test_existence_rules_on_fabricated_numbers():
    assert SV.rule_two_sinks(1) == V.REPRODUCED and SV.rule_two_sinks(0) == V.NOT
    assert SV.rule_own_sinks(3) == V.REPRODUCED and SV.rule_own_sinks(0) == V.NOT


# --- every outcome from the real measures on planted prompts ------------------------------------

def test_two_sinks_reproduced_on_a_planted_case():
    a = measured(2, heads={(2, 1): two_sink()})
    assert a["two_sinks"]["pairs"] == 2 and a["two_sinks"]["heads_seen"] == 2 * L * H
    assert SV.rule_two_sinks(a["two_sinks"]["pairs"]) == V.REPRODUCED


def test_two_sinks_not_reproduced_on_a_planted_case():
    # BOS only; a second sink before the window (p = 2); three sinks (a tail sink, no guard)
    early = two_sink(p=2, to_p=np.arange(3, T) % 2 == 0)
    a = measured(2, heads={(0, 0): bos_only(), (1, 0): early})
    assert SV.rule_two_sinks(a["two_sinks"]["pairs"]) == V.NOT
    layers = prompt(0, heads={(0, 0): two_sink(tail=0.9)})
    no_guard = SM.measure_prompt(0, layers, L, 0.2, min_queries=1)
    assert no_guard.heads[0].sinks == [0, P, T - 1] and no_guard.heads[0].p is None
    guarded = SM.measure_prompt(0, layers, L, 0.2, min_queries=MQ)
    assert guarded.heads[0].sinks == [0, P] and guarded.heads[0].p == P


def test_clusters_reproduced_on_a_planted_case():
    a = measured(22, heads={(1, 0): two_sink()}, z_sep=4.0)
    g = a["clusters"]["gain"]
    assert (g["n_cases"], g["n_prompts"]) == (22, 22) and g["lo"] > 0.3
    assert SV.rule_clusters(g) == V.REPRODUCED


def test_clusters_not_reproduced_on_a_planted_case():
    a = measured(22, heads={(1, 0): two_sink()}, z_sep=0.0)      # the output does not separate
    g = a["clusters"]["gain"]
    assert g["hi"] < 0.05
    assert SV.rule_clusters(g) == V.NOT


def test_clusters_compatible_on_a_planted_case():
    # 3 of 25 prompts separate strongly, the rest not at all: a weak mean with a wide interval
    a = measured(25, plan=lambda i: {"heads": {(1, 0): two_sink()},
                                     "z_sep": 4.0 if i < 3 else 0.0})
    g = a["clusters"]["gain"]
    assert g["lo"] < 0.05 < g["hi"]
    assert SV.rule_clusters(g) == V.COMPATIBLE


def test_clusters_not_testable_on_planted_cases():
    none = measured(22, heads={(1, 0): bos_only()})
    assert none["clusters"]["cases"] == 0
    assert SV.rule_clusters(none["clusters"]["gain"]) == V.UNTESTABLE
    few = measured(12, heads={(1, 0): two_sink()}, z_sep=4.0)       # separates, 12 prompts
    assert few["clusters"]["gain"]["lo"] > 0.3
    assert SV.rule_clusters(few["clusters"]["gain"]) == V.UNTESTABLE
    to_p = np.arange(P + 1, T) < P + 4                              # 3 tokens attend to p
    thin = measured(22, heads={(1, 0): two_sink(to_p=to_p)}, to_p=to_p)
    assert thin["clusters"]["skipped"] == thin["clusters"]["cases"] == 22
    assert SV.rule_clusters(thin["clusters"]["gain"]) == V.UNTESTABLE


def test_persist_reproduced_on_a_planted_case():
    a = measured(22, deep_sep=4.0)                  # heads 0, 1 of layer 0; layer 3 keeps it
    g = a["persist"]["gain"]
    assert (g["n_cases"], a["clusters"]["gain"]["n_cases"]) == (22, 44)
    assert g["lo"] > 0.3
    assert SV.rule_persist(g) == V.REPRODUCED


def test_persist_not_reproduced_on_a_planted_case():
    a = measured(22, deep_sep=0.0)                  # the deeper residual has lost the grouping
    assert SV.rule_persist(a["persist"]["gain"]) == V.NOT
    lost = measured(22, in_sep=4.0, deep_sep=0.0)   # grouped at the input, gone deeper
    assert lost["persist"]["gain"]["hi"] < -0.3
    assert SV.rule_persist(lost["persist"]["gain"]) == V.NOT


def test_persist_compatible_on_a_planted_case():
    a = measured(25, plan=lambda i: {"deep_sep": 4.0 if i < 3 else 0.0})
    g = a["persist"]["gain"]
    assert g["lo"] < 0.05 < g["hi"]
    assert SV.rule_persist(g) == V.COMPATIBLE


def test_persist_not_testable_on_planted_cases():
    # one two-sink head per layer: clusters cases, but no (prompt, layer) with two
    one = measured(22, heads={(0, 0): two_sink(), (1, 1): two_sink()}, deep_sep=4.0)
    assert one["persist"]["cases"] == 0 and one["clusters"]["gain"]["n_cases"] == 44
    assert SV.rule_persist(one["persist"]["gain"]) == V.UNTESTABLE
    assert one["persist"]["one_head"]["n_cases"] == 44          # shown, no verdict
    # two heads at different p; two heads at layer 2, whose layer + 3 > L - 1
    other_p = {(0, 0): two_sink(), (0, 1): two_sink(p=20, to_p=np.arange(21, T) % 2 == 0)}
    late = {(2, 0): two_sink(), (2, 1): two_sink()}
    for heads in (other_p, late):
        a = measured(22, heads=heads, deep_sep=4.0)
        assert a["persist"]["cases"] == 0
        assert SV.rule_persist(a["persist"]["gain"]) == V.UNTESTABLE
    few = measured(12, deep_sep=4.0)
    assert SV.rule_persist(few["persist"]["gain"]) == V.UNTESTABLE


def test_persist_measures_deeper_and_last_layer_where_they_are():
    layers = prompt(0, deep_sep=4.0)
    s = SM.measure_prompt(0, layers, L, 0.2, MQ)
    case = s.persist[0]
    t, lab = SM.case_tokens(np.stack([layers[0].A[0].numpy(), layers[0].A[1].numpy()]), P)
    sil = lambda l: SM.pc3_silhouette(layers[l].resid_out[t].numpy(), lab)  # noqa: E731
    assert case["sil_deeper"] == pytest.approx(sil(3))
    assert case["sil_last"] == pytest.approx(sil(L - 1))
    assert case["heads"] == [0, 1] and case["persist_gain"] == case["sil_deeper"] - case["sil_in"]


def test_along_the_write_direction_sees_what_is_written_there():
    layers = prompt(0, heads={(0, 0): two_sink()})
    W, V_ = layers[0].write[0].numpy(), layers[0].V[0].numpy()
    u = W @ (V_[P] - V_[0])
    u /= np.linalg.norm(u)
    lab = np.where(ALT, 1.0, 0.0)
    layers[3].resid_out = layers[3].resid_out.clone()
    layers[3].resid_out[P + 1:] += torch.tensor(5 * np.outer(lab, u))
    c = SM.measure_prompt(0, layers, L, 0.2, MQ).clusters[0]
    assert c["d_deeper"] > 3 and abs(c["d_in"]) < 1.5 and c["d_gain"] > 2


def test_own_sinks_reproduced_on_a_planted_case():
    heads = {(0, 0): two_sink(), (3, 2): two_sink(p=20, to_p=np.arange(21, T) % 2 == 0)}
    a = measured(3, plan=lambda i: {"heads": heads if i == 1 else {(0, 0): two_sink()}})
    o = a["own_sinks"]
    assert (o["prompts_with"], o["prompts"]) == (1, 3)
    assert o["example"] == {"prompt": 1, "a": [0, 0, [P]], "b": [3, 2, [20]]} or \
        o["example"] == {"prompt": 1, "a": [3, 2, [20]], "b": [0, 0, [P]]}
    assert SV.rule_own_sinks(o["prompts_with"]) == V.REPRODUCED


def test_own_sinks_not_reproduced_on_a_planted_case():
    # two heads share their mid-prompt sink; a third has a sink at p and one more (not disjoint)
    A3 = two_sink()
    A3[25:, 20] += 0.5
    A3 /= A3.sum(-1, keepdims=True)
    a = measured(3, heads={(0, 0): two_sink(), (1, 1): two_sink(), (2, 0): A3})
    s = SM.measure_prompt(0, prompt(0, heads={(2, 0): A3}), L, 0.2, MQ)
    assert s.heads[2 * H].mid == [P, 20]
    assert SV.rule_own_sinks(a["own_sinks"]["prompts_with"]) == V.NOT


# --- the rows ---------------------------------------------------------------------------------

def test_rows_carry_the_rule_text_settings_choice_and_stay_eight_columns():
    a = measured(22, deep_sep=4.0)
    r = {"all": a}
    rows = SV.claims("planted", r, {"eps": 0.2, "min_queries": MQ, "depth": 3})
    assert [x["id"] for x in rows] == ["two_sinks", "clusters", "persist", "own_sinks"]
    for x in rows:
        assert x["rule"] == rules.text(x["id"])
        assert x["settings"] == f"eps 0.2, min_queries {MQ}" and x["choice"]
        assert x["verdict"] in V.VERDICTS
    assert [x["verdict"] for x in rows] == [V.REPRODUCED, V.REPRODUCED, V.REPRODUCED, V.NOT]
    assert "write direction (kept by the residual connection by construction)" in rows[2]["note"]
    assert "0.05 is this book's margin" in rows[1]["rule"]
    assert SV.table(rows).shape == (4, 8)
    assert "mean attention" in SV.choices(rows)


# --- the model path -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from ctr import models as M
    return M.load("tiny-planted-llama")


TEXTS = ["the cat sat on the mat. it was a warm day and the sun was out. " * 2,
         "a short story. the dog ran far away, then came back home at night. " * 2]


def test_the_model_path_hands_the_measures_consistent_layers(tiny):
    from ctr import extract
    batch = tiny.encode(TEXTS, max_tokens=48)
    prev = None
    for rec in extract.layers(tiny, batch):
        x = sinks.layer_of(tiny, rec, 1)
        T_ = batch.lengths[1]
        assert x.A.shape == (tiny.n_heads, T_, T_) and x.z.shape[:2] == (tiny.n_heads, T_)
        torch.testing.assert_close(x.z, x.A @ x.V, rtol=1e-4, atol=1e-5)
        if prev is not None:
            torch.testing.assert_close(x.resid_in, prev)
        prev = x.resid_out
        W = tiny.out_proj(x.layer).float()
        h = 1
        torch.testing.assert_close(x.write[h], W[:, h * tiny.head_dim:(h + 1) * tiny.head_dim])


def test_run_and_summary_on_the_tiny_model(tiny):
    f = sinks.run("tiny-planted-llama", TEXTS, min_queries=4, max_tokens=48, batch=1)
    s = sinks.summary(f)
    heads = f.cases["two_sinks"]["heads_seen"]
    assert heads == len(TEXTS) * tiny.n_layers * tiny.n_heads == s["heads_seen"]
    rows = SV.claims("tiny", s, {"eps": 0.2, "min_queries": 4})
    assert all(r["verdict"] in V.VERDICTS for r in rows)
    for k in ("prompt", "layer", "head", "sinks", "second_sink", "qualifies", "other",
              "candidates", "heads_seen", "silhouette_input", "silhouette_output",
              "silhouette_deeper", "silhouette_last", "cluster_gain", "persist"):
        assert k in s


def test_the_head_shown_is_the_strongest_with_two_groups_and_the_pair_has_own_sinks():
    strong = np.arange(P + 1, T) % 3 != 0          # 2 of 3 tokens to p: a larger alpha_p
    pair = {(0, 0): two_sink(), (3, 2): two_sink(p=20, to_p=np.arange(21, T) % 2 == 0)}
    alone = {(1, 1): two_sink(to_p=strong)}
    only_p = np.arange(P + 1, T) < T - 3            # all but 3 tokens to p: skipped, strongest
    thin = {(2, 0): two_sink(to_p=only_p)}
    scans = [SM.measure_prompt(i, prompt(i, heads=h), L, 0.2, MQ)
             for i, h in enumerate((pair, alone, thin))]
    alpha_p = {i: max(h.alphas[1] for h in s.heads if h.p) for i, s in enumerate(scans)}
    assert alpha_p[2] > alpha_p[1] > alpha_p[0]
    s = sinks.pick(scans)
    # the strongest whose case is not skipped; it has no partner, so the pair comes from prompt 0
    assert (s.main.prompt, s.main.layer, s.main.head, s.main.qualifies) == (1, 1, 1, True)
    assert [(x.prompt, x.layer, x.head) for x in s.pair] == [(0, 0, 0), (0, 3, 2)] or \
        [(x.prompt, x.layer, x.head) for x in s.pair] == [(0, 3, 2), (0, 0, 0)]
    assert s.other_disjoint and s.heads_with_mid_sink == 2 and s.candidates == 4
    s = sinks.pick(scans[:1])                       # the head shown has a partner: its pair
    assert (s.main.layer, s.main.head) == (s.pair[0].layer, s.pair[0].head)
    s = sinks.pick(scans[1:2])                      # no pair anywhere
    assert s.pair == [] and s.other is None and not s.other_disjoint
