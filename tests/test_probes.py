"""Semantic probes: the mass-mean probe of every head at once; the paper's head selection and
its tie-breaks; McNemar (one-sided), re-splits and the label-shuffle null; every outcome of the
two pre-registered rules (RULES.md, "Semantic probes") on fabricated summaries and on planted
features run through the chapter's own statistics; Holm over a model's family; the
constant-value tag flag on the tiny planted model; the tables; the prompt sets; the
shared-prefix forward pass; the chapter in smoke mode."""
import json
import math
import shutil

import nbformat
import numpy as np
import pytest
import torch

from ctr import book, data, models, rules, tiny
from ctr import definitions as D
from ctr import verdicts as V
from ctr.chapters import probes
from ctr.chapters.probes import stats as PS
from ctr.chapters.probes import tables as PT
from ctr.chapters.probes import verdicts as PV


def gaussian_heads(n=4000, L=2, H=3, Dh=8, seps=(0.0, 1.0, 2.0, 3.0, 0.5, 1.5), seed=0):
    """Features (n, L, H, Dh): in head k the class means are +-seps[k]/2 along one axis, identity
    covariance, so the mass-mean probe's accuracy tends to Phi(seps[k] / 2)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.randn(n, L, H, Dh, generator=g, dtype=torch.float64)
    for k, s in enumerate(seps):
        X[:, k // H, k % H, 0] += (y.double() - 0.5) * s
    train = torch.arange(n) < n // 2
    return X, y, train


def phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


# --- the probe of every head -------------------------------------------------------------------

def test_head_accuracies_reach_the_analytic_accuracy_in_every_head():
    seps = (0.0, 1.0, 2.0, 3.0, 0.5, 1.5)
    X, y, train = gaussian_heads(seps=seps)
    tr, te = probes.PS.head_accuracies(X, y, train)
    for k, s in enumerate(seps):
        assert te[k // 3, k % 3] == pytest.approx(phi(s / 2), abs=0.03), s
        assert tr[k // 3, k % 3] == pytest.approx(phi(s / 2), abs=0.03), s


def test_mass_mean_heads_matches_the_definition_per_head_and_per_labelling():
    X, y, train = gaussian_heads(n=400, seps=(0.0, 1.0, 2.0, 3.0, 0.5, 1.5))
    ys = PS.shuffled_labels(y, train, 3, seed=4)
    Y = torch.cat([y[None].bool(), ys])                         # 4 labellings at once
    c = PS.mass_mean_heads(X, Y, train)
    assert c.shape == (4, 400, 2, 3)
    for s in range(4):
        te = PS.accuracy(c[s:s + 1], ~train)[0]
        for l in range(2):
            for h in range(3):
                ref = D.mass_mean_accuracy(X[train, l, h], Y[s][train], X[~train, l, h], Y[s][~train])
                assert te[l, h] == pytest.approx(ref)


def test_mass_mean_heads_needs_both_classes():
    X, y, _ = gaussian_heads(n=40)
    with pytest.raises(ValueError, match="both classes"):
        PS.mass_mean_heads(X, y, y.bool())                      # training split holds only trues





def test_shuffle_null_on_noise_is_centred_on_chance_and_shows_the_selection_inflation():
    g = torch.Generator().manual_seed(3)
    X = {k: torch.randn(600, 4, 6, 32, generator=g, dtype=torch.float64) for k in ("tag", "no_tag")}
    y, train = torch.arange(600) % 2, torch.arange(600) < 400
    rows = PS.select_then_test({k: PS.mass_mean_heads(x, PS.shuffled_labels(y, train, 40, 5), train)
                                for k, x in X.items()}, train)
    null = PS.null_summary(rows)
    assert null["n"] == 40 and null["n_selected"] == 40
    assert abs(null["theta_tag_mean"] - 50) < 1.5            # test accuracy: a fair coin
    test = 100 * np.array([r["test_tag"] for r in rows])
    assert 1.5 < test.std() < 6                              # ~ sqrt(.25 / 200) = 3.5 points
    assert null["train_theta_tag_mean"] > 58                 # the chosen head's training accuracy




def test_mcnemar_on_the_chosen_head_equals_the_hand_computed_p_value():
    # one-dimensional features whose probes predict x > 0 (training means +-1 per class); on the
    # 200 test prompts: both right 150, only z_tag right 10, only z_notag right 2, both wrong 38
    n_tr, y_tr = 100, torch.arange(100) % 2
    y_te = torch.arange(200) % 2
    s_tr = (2 * y_tr - 1).double()
    right = torch.tensor([1] * 150 + [1] * 10 + [0] * 2 + [0] * 38, dtype=torch.bool)
    right_n = torch.tensor([1] * 150 + [0] * 10 + [1] * 2 + [0] * 38, dtype=torch.bool)
    s_te = (2 * y_te - 1).double()
    zt = torch.cat([s_tr, torch.where(right, s_te, -s_te)])
    zn_tr = s_tr.clone()
    zn_tr[:4] *= -1                                          # z_notag: 96% on training, z_tag 100%
    zn = torch.cat([zn_tr, torch.where(right_n, s_te, -s_te)])
    y = torch.cat([y_tr, y_te])
    train = torch.arange(300) < n_tr
    noise = torch.zeros(300, 1, 2, 1, dtype=torch.float64)    # head (0, 0): no signal at all
    X = {"tag": torch.cat([noise[:, :, :1], zt[:, None, None, None]], 2),
         "no_tag": torch.cat([noise[:, :, :1], zn[:, None, None, None]], 2)}
    s = PS.select(X, y, train)
    assert s.head == (0, 1)
    assert s.mcnemar == {"only_tag": 10, "only_no_tag": 2, "n": 200,
                         "p": pytest.approx(2 * (1 + 12 + 66) / 2 ** 12),
                         "p_greater": pytest.approx((1 + 12 + 66) / 2 ** 12),
                         "p_less": pytest.approx(1 - (1 + 12) / 2 ** 12)}




def test_balanced_splits_and_shuffled_labels_keep_the_class_balance():
    y = torch.arange(600) % 2
    m = PS.balanced_splits(y, 400, 10, seed=0)
    assert m.shape == (10, 600) and (m.sum(1) == 400).all() and (m[:, y == 1].sum(1) == 200).all()
    assert len({tuple(r.tolist()) for r in m}) == 10
    assert torch.equal(m, PS.balanced_splits(y, 400, 10, seed=0))
    train = torch.arange(600) < 400
    ys = PS.shuffled_labels(y, train, 5, seed=0)
    assert (ys[:, train].sum(1) == y[train].sum()).all() and (ys[:, ~train].sum(1) == 100).all()
    assert not torch.equal(ys[0], y.bool())
    with pytest.raises(ValueError):
        PS.balanced_splits(y, 601, 1)


def test_chance_level():
    c = probes.chance_level(200)
    k = round(c * 200)
    p = sum(math.comb(200, j) for j in range(k, 201)) / 2 ** 200
    p_before = sum(math.comb(200, j) for j in range(k - 1, 201)) / 2 ** 200
    assert p < 0.05 <= p_before
    assert probes.guard_for(0.2) == 5 and probes.guard_for(0.1) == 10 and probes.guard_for(0.3) == 4


def test_logistic_baseline_separates_and_is_at_chance_when_shuffled():
    X, y, train = gaussian_heads(n=1000, L=1, H=1, seps=(4.0,))
    X = X[:, 0, 0]
    assert probes.logistic(X[train], y[train], X[~train], y[~train]) > 0.95
    ys = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))]
    assert abs(probes.logistic(X[train], ys[train], X[~train], ys[~train]) - 0.5) < 0.07





# --- the selection rule: the paper's, with RULES.md's tie-breaks --------------------------------

def test_selection_takes_the_largest_training_gap():
    tag = np.array([[0.70, 0.95], [0.80, 0.60]])
    notag = np.array([[0.50, 0.90], [0.55, 0.60]])          # gaps 0.20, 0.05, 0.25, 0
    assert PS.select_head(tag, notag) == (1, 0)


def test_selection_breaks_a_gap_tie_by_the_higher_training_tag():
    tag = np.array([[0.70, 0.90], [0.80, 0.60]])
    notag = np.array([[0.50, 0.70], [0.60, 0.60]])          # gaps 0.2, 0.2, 0.2, 0 (k / n)
    assert PS.select_head(tag, notag) == (0, 1)             # 0.90 beats 0.80 and 0.70


def test_selection_breaks_a_full_tie_by_the_lower_layer_then_head():
    assert PS.select_head(np.full((2, 2), 0.8), np.full((2, 2), 0.5)) == (0, 0)
    tag = np.array([[0.6, 0.8], [0.8, 0.8]])
    assert PS.select_head(tag, np.full((2, 2), 0.5)) == (0, 1)
    assert PS.best_head(np.array([[0.5, 0.9], [0.9, 0.1]])) == (0, 1)


def test_selection_says_no_when_no_tag_beats_its_no_tag():
    assert PS.select_head(np.array([[0.6, 0.7]]), np.array([[0.6, 0.9]])) is None  # a tie is no


# --- planted features through the chapter's statistics ------------------------------------------

def planted(n=600, L=3, H=4, Dh=8, tag_sep=3.0, notag_sep=0.0, seed=0, head=(1, 2)):
    """z_tag, z_notag, o of n prompts (1/3 training, balanced). Every head but ``head`` has
    z_tag == z_notag (training gap exactly 0: never selectable); in ``head`` the class means
    differ by tag_sep (z_tag) and notag_sep (z_notag) along one axis, unit noise; o = sum."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    sign = y.double() - 0.5
    base = torch.randn(n, L, H, Dh, generator=g, dtype=torch.float64)
    zt, zn = base.clone(), base.clone()
    l, h = head
    zt[:, l, h] = torch.randn(n, Dh, generator=g, dtype=torch.float64)
    zn[:, l, h] = torch.randn(n, Dh, generator=g, dtype=torch.float64)
    zt[:, l, h, 0] += tag_sep * sign
    zn[:, l, h, 0] += notag_sep * sign
    train = torch.zeros(n, dtype=torch.bool)
    train[torch.nonzero(y == 1).flatten()[:n // 3]] = True
    train[torch.nonzero(y == 0).flatten()[:n // 3]] = True
    return {"tag": zt, "no_tag": zn, "activation": zt + zn}, y, train


def measured(X, y, train, seed=1, k=10, n_null=100):
    """The chapter's statistics on planted features: a protocol summary as the rules read it."""
    masks = PS.balanced_splits(y, int(train.sum()), k, seed=seed)
    null = PS.shuffled_labels(y, train, n_null, seed=seed)
    return {**PS.select(X, y, train, masks, null).summary(), "min_queries": 1, "eps": 0.2}


def test_probe_rule_reproduced_on_a_planted_tag_that_carries_the_label():
    s = measured(*planted(tag_sep=3.0))
    c = PV.tag_conditions(s)
    assert (s["layer"], s["head"]) == (1, 2) and s["theta_tag"] > 85 > 60 > s["theta_no_tag"]
    assert c["main"] and c["n_pass"] == 10 and c["mean"] > c["null_p95"]
    assert PV.carried_by_tag(s) == V.REPRODUCED


def test_probe_rule_not_reproduced_on_a_planted_tag_that_carries_nothing():
    s = measured(*planted(tag_sep=0.0, seed=4))
    c = PV.tag_conditions(s)
    assert s["layer"] is not None                      # a head is chosen (by its noise) ...
    assert not c["above_null"] and c["majority_le"]    # ... and is no better than selection
    assert PV.carried_by_tag(s) == V.NOT


def test_probe_rule_not_reproduced_when_no_head_is_selectable():
    X, y, train = planted(tag_sep=0.0)
    X["tag"] = X["no_tag"].clone()                     # every head: training gap exactly 0
    s = measured(X, y, train)
    assert s["layer"] is None and s["mcnemar"] is None and s["resplits"]["n_no_head"] == 10
    assert PV.carried_by_tag(s) == V.NOT
    assert "no head satisfies the rule" in PV.ours_text(s) and PV.interval_text(s) == "-"


def test_probe_rule_compatible_on_a_planted_tag_that_carries_the_label_weakly():
    s = measured(*planted(tag_sep=0.4, seed=1))
    c = PV.tag_conditions(s)
    assert 55 < s["theta_tag"] < 70 and c["p_raw"] > 0.05          # (i) fails
    assert c["n_pass"] < 6 and not c["majority_le"] and c["above_null"]
    assert PV.carried_by_tag(s) == V.COMPATIBLE


def family(rows: dict) -> dict:
    """{(task, protocol): summary} of one model -> the chapter's summ, Holm applied."""
    summ = {"m": {}}
    for (task, prot), s in rows.items():
        summ["m"].setdefault(task, {})[prot] = s
    return PV.adjust(summ)


def test_holm_turns_a_raw_pass_into_an_adjusted_fail_on_planted_features():
    weak = measured(*planted(tag_sep=0.35, seed=0))
    others = [measured(*planted(tag_sep=3.0, notag_sep=2.7, seed=s)) for s in range(4)]
    family(dict(zip(PV.FAMILY, [weak, *others])))
    raw, adj = weak["mcnemar"]["p_greater"], weak["mcnemar"]["p_adj"]
    assert raw < 0.05 < adj and adj == pytest.approx(5 * raw)   # the smallest of five p-values
    assert PV.tag_conditions(weak, p_adj=raw)["main"] and not PV.tag_conditions(weak)["main"]
    assert all(o["mcnemar"]["p_adj"] >= o["mcnemar"]["p_greater"] for o in others)


def test_holm_family_leaves_rows_without_a_head_outside():
    ps = (0.01, 0.02, None, 0.04, 0.5)
    rows = {key: fabricated(p=1.0) if p is None else fabricated(p=p) for key, p in zip(PV.FAMILY, ps)}
    rows[PV.FAMILY[2]] = fabricated(layer=None)
    family(rows)
    adj = [r["mcnemar"]["p_adj"] if r["mcnemar"] else None for r in rows.values()]
    # Holm over the four rows with a head, by hand: 4 x 0.01, 3 x 0.02, 2 x 0.04, 1 x 0.5
    assert adj[2] is None
    assert [adj[i] for i in (0, 1, 3, 4)] == pytest.approx([0.04, 0.06, 0.08, 0.5])


def hand_split(test_tag_right: int, test_notag_right: int):
    """1-D features, head (0, 1): 100 training prompts where z_tag is always right and z_notag
    on 96; 200 test prompts where z_tag is right on the first ``test_tag_right`` and z_notag on
    the first ``test_notag_right``. Head (0, 0) has z_tag == z_notag (never selectable)."""
    y = torch.arange(300) % 2
    s = (2 * y - 1).double()
    right_t = torch.cat([torch.ones(100, dtype=torch.bool), torch.arange(200) < test_tag_right])
    right_n = torch.cat([torch.arange(100) >= 4, torch.arange(200) < test_notag_right])
    zt, zn = torch.where(right_t, s, -s), torch.where(right_n, s, -s)
    same = torch.randn(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = {"tag": torch.stack([same, zt], 1)[:, None, :, None],
         "no_tag": torch.stack([same, zn], 1)[:, None, :, None]}
    X["activation"] = X["tag"] + X["no_tag"]
    return X, y, torch.arange(300) < 100


def test_a_significant_difference_in_the_wrong_direction_is_never_reproduced():
    s = measured(*hand_split(test_tag_right=100, test_notag_right=190), k=10, n_null=50)
    mc = s["mcnemar"]
    assert (s["layer"], s["head"]) == (0, 1)            # chosen on training: tag 100% > 96%
    assert mc["only_tag"] == 0 and mc["only_no_tag"] == 90
    assert mc["p"] < 1e-10 and mc["p_less"] < 1e-10 and mc["p_greater"] == 1.0
    assert not PV.tag_conditions(s)["main"]
    assert PV.carried_by_tag(s) != V.REPRODUCED
    # the same significance in the claimed direction passes step (i)
    flipped = fabricated(only=(90, 0), p=mc["p_less"])
    assert PV.tag_conditions(flipped)["main"] and not PV.tag_conditions(
        fabricated(only=(0, 90), p=mc["p_greater"], two_sided=mc["p"]))["main"]


def test_resplit_counts_follow_the_rule():
    rows = [{"head": None},
            {"head": (0, 1), "test_tag": 0.80, "test_no_tag": 0.60, "test_activation": 0.80,
             "p_greater": 0.001},                     # passes; tie with activation: the tag's
            {"head": (0, 1), "test_tag": 0.70, "test_no_tag": 0.60, "test_activation": 0.75,
             "p_greater": 0.09},                      # tag above but not significant
            {"head": (0, 2), "test_tag": 0.60, "test_no_tag": 0.60, "test_activation": 0.50,
             "p_greater": 0.5}]                       # a tie is not "above"
    r = PS.resplit_summary(rows, (0, 1))
    assert (r["n"], r["n_selected"], r["n_no_head"]) == (4, 3, 1)
    assert r["n_pass"] == 1 and r["n_tag_le_no_tag"] == 2 and r["n_tag_ge_activation"] == 2
    assert r["modal_head"] == [0, 1] and r["modal_count"] == 2 and r["same_as_main"] == 2
    assert r["splits"][0] is None and r["splits"][1]["theta_tag"] == 80.0
    assert r["theta_tag_mean"] == pytest.approx(70.0)
    assert PV.needed(10) == 6 and PV.needed(5) == 3 and PV.needed(20) == 12

# --- the rules on fabricated summaries ------------------------------------------------------------

def fabricated(layer=3, tag=80.0, no_tag=50.0, act=70.0, p=1e-6, only=(40, 5), two_sided=None,
               n_pass=8, le=1, rs_mean=78.0, null95=56.0, ge_act=8, va=(20, 5), va_p=0.99,
               n=10, p_adj=None):
    mc = {"only_tag": only[0], "only_no_tag": only[1], "n": 200, "p_greater": p,
          "p": two_sided if two_sided is not None else min(1.0, 2 * p), "p_less": 1 - p}
    if p_adj is not None:
        mc["p_adj"] = p_adj
    return {"layer": layer, "head": None if layer is None else 1, "n_test": 200,
            "selected": layer is not None, "min_queries": 1, "eps": 0.2,
            "theta_tag": tag, "theta_no_tag": no_tag, "theta_activation": act,
            "mcnemar": mc if layer is not None else None,
            "tag_vs_activation": None if layer is None else
            {"only_tag": va[0], "only_activation": va[1], "n": 200, "p": 0.5, "p_greater": 0.5,
             "p_less": va_p},
            "resplits": {"n": n, "n_selected": n, "n_no_head": 0, "n_pass": n_pass,
                         "n_tag_le_no_tag": le, "n_tag_ge_activation": ge_act,
                         "theta_tag_mean": rs_mean, "theta_tag_sd": 2.0,
                         "theta_no_tag_mean": 52.0, "modal_head": [3, 1], "modal_count": 7,
                         "same_as_main": 7},
            "null": {"theta_tag_p95": null95, "theta_tag_mean": 50.0},
            "best_tag": {"layer": 2, "head": 0, "theta_tag": 55.0}}


@pytest.mark.parametrize("kw, want", [
    ({}, V.REPRODUCED),
    ({"layer": None}, V.NOT),                                  # no head satisfies the rule
    ({"le": 6}, V.NOT),                                        # tag <= no-tag on most re-splits
    ({"rs_mean": 56.0}, V.NOT),                                # equal to the null is not above
    ({"rs_mean": 50.0, "p": 1e-9}, V.NOT),                     # (i) alone does not save it
    ({"p": 0.2, "only": (12, 8)}, V.COMPATIBLE),               # (i) fails
    ({"n_pass": 5}, V.COMPATIBLE),                             # (ii) fails: 5 of 10
    ({"n_pass": 6}, V.REPRODUCED),                             # 6 of 10 is enough
    ({"le": 5, "n_pass": 5}, V.COMPATIBLE),                    # 5 of 10 is not a majority
    ({"p": 0.01, "p_adj": 0.06}, V.COMPATIBLE),                # Holm-adjusted p decides (i)
    ({"only": (5, 40), "p": 1.0, "two_sided": 1e-6}, V.COMPATIBLE),   # wrong direction
])
def test_probe_rule_on_every_outcome_from_fabricated_numbers(kw, want):
    s = fabricated(**kw)
    assert PV.carried_by_tag(s) == want
    assert PV.ours_text(s)


def test_probe_rule_needs_the_resplits_and_the_null():
    s = fabricated()
    s["null"] = None
    with pytest.raises(ValueError, match="n_resplits"):
        PV.carried_by_tag(s)


@pytest.mark.parametrize("kw, want", [
    ({}, V.REPRODUCED),
    ({"va": (5, 20), "va_p": 0.002}, V.NOT),                   # activation significantly above
    ({"va": (5, 20), "va_p": 0.002, "ge_act": 10}, V.NOT),     # ... whatever the re-splits say
    ({"ge_act": 5}, V.COMPATIBLE),
    ({"va": (8, 12), "va_p": 0.25, "ge_act": 4}, V.COMPATIBLE),
    ({"ge_act": 6}, V.REPRODUCED),                             # ties were counted for the tag
    ({"layer": None}, V.UNTESTABLE),
])
def test_tag_vs_activation_on_every_outcome_from_fabricated_numbers(kw, want):
    s = fabricated(**kw)
    assert PV.tag_vs_activation(s) == want
    assert PV.act_text(s)


def with_activation(X, y, extra):
    """o = z_tag plus a label signal of strength ``extra`` on another axis of the planted head."""
    act = X["tag"].clone()
    act[:, 1, 2, 1] += extra * (y.double() - 0.5)
    return {**X, "activation": act}


def test_tag_vs_activation_reproduced_on_planted_features():
    s = measured(*planted(tag_sep=3.0))                        # o = z_tag + noise of z_notag
    assert s["resplits"]["n_tag_ge_activation"] >= 6
    assert PV.tag_vs_activation(s) == V.REPRODUCED


def test_tag_vs_activation_not_reproduced_on_planted_features():
    X, y, train = planted(tag_sep=1.5)
    s = measured(with_activation(X, y, 3.0), y, train)
    va = s["tag_vs_activation"]
    assert va["only_activation"] > va["only_tag"] and va["p_less"] < 0.05
    assert PV.tag_vs_activation(s) == V.NOT


def test_tag_vs_activation_compatible_on_planted_features():
    X, y, train = planted(tag_sep=1.5, seed=1)
    s = measured(with_activation(X, y, 0.5), y, train)
    assert s["tag_vs_activation"]["p_less"] > 0.05 and s["resplits"]["n_tag_ge_activation"] < 6
    assert PV.tag_vs_activation(s) == V.COMPATIBLE


def test_tag_vs_activation_not_testable_without_a_head_on_planted_features():
    X, y, train = planted(tag_sep=0.0)
    X["tag"] = X["no_tag"].clone()
    assert PV.tag_vs_activation(measured(X, y, train)) == V.UNTESTABLE


def test_claim_rows_carry_the_rule_text_settings_and_both_p_values():
    paper = {"truth_probes": {"models": {"A": [98.0, 50.0, 50.0], "B": [92.5, 56.5, 97.0]}},
             "sentiment_probes": {"models": {"A": [88.5, 84.0, 86.5]}}}
    summ = {"m": {t: {"paper": fabricated(p=0.001), "guard": {**fabricated(p=0.02),
                                                               "min_queries": 5}}
                  for t in ("cities", "sentiment", "cities_suffix")}}
    rows = PV.claim_rows(summ, paper, 5)
    ids = [r["id"] for r in rows]
    assert ids == [c[0] for c in PV.CLAIMS] + [c[0] for c in PV.ACT_CLAIMS]
    assert all(set(V.COLUMNS) <= set(r) for r in rows)
    for r in rows[:5]:
        assert r["rule"] == rules.text(r["id"]) and r["p_adj"] >= r["p_raw"]
    assert rows[0]["settings"] == "eps 0.2, min_queries 1"
    assert rows[1]["settings"] == "eps 0.2, min_queries 5"
    # Holm over five: 0.001, 0.001 (paper rows) and 0.02 x 3 (guard rows) -> 0.02 x 3 = 0.06
    assert rows[1]["p_raw"] == 0.02 and rows[1]["p_adj"] == pytest.approx(0.06)
    assert rows[1]["verdict"] == V.COMPATIBLE and rows[0]["verdict"] == V.REPRODUCED
    assert rows[5]["rule"] == rules.text("tag_vs_activation") and "p_adj" not in rows[5]
    assert "92.5-98.0%" in rows[0]["paper"] and "[73.9, 85.0]" in rows[0]["interval"]
    assert "min_queries 5" in rows[1]["claim"]
# --- prompt sets ---------------------------------------------------------------------------------

def test_sentiment_prompts_never_print_a_full_stop_after_a_question_or_exclamation_mark():
    texts = data.sentiment().texts
    assert not [t for t in texts if "?." in t or "!." in t]
    assert any(t.endswith("? This statement is:") for t in texts)      # kept, not dropped
    last = data.sentiment_prompt("what a movie ! ! .").splitlines()[-1]
    assert last == "what a movie!! This statement is:"
    assert data.sentiment_prompt("fine .").splitlines()[-1] == "fine. This statement is:"


def test_cities_suffixed_keeps_the_statements_labels_and_split():
    c, s = data.cities(40, 20), data.cities_suffixed(40, 20)
    assert s.labels == c.labels and s.split == c.split
    assert s.texts == [t + data.TRUTH_SUFFIX for t in c.texts]
    with pytest.raises(data.DataError):
        data.cities_suffixed(40, 20, suffix="  ")


# --- on the tiny planted model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def planted_model():
    return models.load("tiny-planted-llama")


@pytest.fixture(scope="module")
def prompts():
    return {"cities": data.cities(16, 8).texts, "sentiment": data.sentiment(8, 4).texts}


@pytest.mark.parametrize("task", ["cities", "sentiment"])
def test_shared_prefix_gives_the_same_features_as_full_prompts(planted_model, prompts, task):
    texts = prompts[task]
    a = probes.features(planted_model, texts, guards=(1, 5), batch_size=5, shared_prefix=True, progress=False)
    b = probes.features(planted_model, texts, guards=(1, 5), batch_size=3, shared_prefix=False, progress=False)
    assert a.shared > 0 and b.shared == 0
    assert torch.allclose(a.o, b.o, atol=1e-4)
    for g in (1, 5):
        assert torch.allclose(a.z_tag[g], b.z_tag[g], atol=1e-4)
        assert torch.allclose(a.z_notag[g], b.z_notag[g], atol=1e-4)
        assert torch.equal(a.n_sinks[g], b.n_sinks[g])
        assert torch.equal(a.top_sink[g], b.top_sink[g])


def test_features_split_the_head_output_and_respect_the_guard(planted_model, prompts):
    f = probes.features(planted_model, prompts["cities"], guards=(1, 2, 5), progress=False)
    for g in (1, 2, 5):
        assert torch.allclose(f.z_tag[g] + f.z_notag[g], f.o, atol=1e-5)
        none = f.sink_mass[g] == 0
        assert torch.all(f.z_tag[g][none] == 0)                # no sink: the empty sum
    assert f.self_sink[1].any()                    # the planted "." is its own sink unguarded
    assert not f.self_sink[2].any() and not f.self_sink[5].any()
    assert torch.all(f.tail_mass[5] == 0)          # the guard removes exactly the tail
    assert (f.n_sinks[5] <= f.n_sinks[1]).all()
    assert {t[-1] for t in f.tokens} == {"."}





# --- constant-value tags (RULES.md, General) on the tiny planted model -------------------------

def test_constant_value_tag_flagged_when_token_0_is_the_only_sink_and_the_same_token(
        planted_model, prompts):
    # heads 0-1 of the planted model sink only on <bos>, which starts every prompt
    f = probes.features(planted_model, prompts["cities"], guards=(5,), progress=False)
    every = torch.ones(len(prompts["cities"]), dtype=torch.bool)
    c = probes.constant_tag(f, 5, (0, 0), every)
    assert f.same_first and c["constant"] and c["norm_share"] == 1.0
    assert c["prompts_first_only"] == 1.0 and c["first_token"] == "<bos>"
    # z_tag = A[T,0] v_0: one vector times one number in every prompt (rank one)
    z = f.z_tag[5][:, 0, 0].double()
    sv = torch.linalg.svdvals(z)
    assert sv[1] < 1e-5 * sv[0]
    note = PV.constant_note({"constant_tag": c})
    assert note.startswith("constant-value tag") and "100%" in note


def test_constant_value_tag_not_flagged_where_other_sinks_carry_the_tag(planted_model, prompts):
    # heads 2-3 also sink on every "."; the sentiment template has full stops mid-prompt
    f = probes.features(planted_model, prompts["sentiment"], guards=(5,), progress=False)
    every = torch.ones(len(prompts["sentiment"]), dtype=torch.bool)
    c = probes.constant_tag(f, 5, (0, 2), every)
    assert f.same_first and not c["constant"] and c["norm_share"] < 0.05
    note = PV.constant_note({"constant_tag": c})
    assert note is None or not note.startswith("constant-value")
    # nearly all of it is not all of it: the note says so without rounding to 100%
    near = {**c, "norm_share": 0.9996, "prompts_first_only": 0.99}
    assert PV.constant_note({"constant_tag": near}).startswith("99.96% of the z_tag norm")


def test_constant_value_tag_not_flagged_when_token_0_differs_between_prompts():
    m = models.load("tiny-planted-llama", prepend_bos=False)
    texts = ["Paris is in France.", "The city of Rome is in Italy.", "Berlin is in Germany."]
    f = probes.features(m, texts, guards=(1,), progress=False)
    c = probes.constant_tag(f, 1, (0, 0), torch.ones(3, dtype=torch.bool))
    assert not f.same_first and not c["constant"] and c["norm_share"] is None
    assert "differs" in PV.constant_note({"constant_tag": c})

@pytest.fixture(scope="module")
def tiny_summ(planted_model):
    """Every task of the chapter on the tiny planted model, small, as the notebook runs it."""
    tasks = {"cities": data.cities(24, 12), "sentiment": data.sentiment(24, 12),
             "cities_suffix": data.cities_suffixed(24, 12)}
    runs = {t: probes.probe_task(planted_model, ds, also=(2,), task=t, progress=False,
                                 n_null=10) for t, ds in tasks.items()}
    return runs, PV.adjust({"tiny": {t: r.summary() for t, r in runs.items()}})


def test_probe_task_is_deterministic_and_json_ready(planted_model, tiny_summ):
    c = data.cities(24, 12)
    r2 = probes.probe_task(planted_model, c, also=(2,), task="cities", progress=False, n_null=10)
    r1 = tiny_summ[0]["cities"]
    assert r1.min_queries == 5 and set(r1.by_guard) == {5, 1, 2}
    assert json.dumps(r1.summary(), sort_keys=True) == json.dumps(r2.summary(), sort_keys=True)
    s = r1.summary()
    assert set(s["by_guard"]) == {"1", "2", "5"} and s["paper"]["min_queries"] == 1
    for prot in ("paper", "guard"):
        m = s[prot]
        assert m["null"]["n"] == 10 and m["resplits"]["n"] == 10 and m["eps"] == 0.2
        assert m["best_tag"]["layer"] < planted_model.n_layers
        if m["selected"]:
            assert 0 <= m["layer"] < planted_model.n_layers
            assert set(m["mcnemar"]) >= {"p", "p_greater", "p_less"}
            assert m["constant_tag"]["first_token"] == "<bos>"
            for k in ("theta_tag", "theta_no_tag", "theta_activation", "logistic_activation"):
                # accuracies are k / 12 test prompts, in percent
                assert 0 <= m[k] <= 100
                assert m[k] * 12 / 100 == pytest.approx(round(m[k] * 12 / 100), abs=1e-3)
        else:
            assert m["layer"] is None and m["theta_tag"] is None and m["mcnemar"] is None


def test_the_tables_are_built_from_the_summaries(tiny_summ):
    runs, summ = tiny_summ
    paper = {"truth_probes": {"models": {"Qwen2.5-3B": [98.0, 50.0, 50.0]}}}
    t = PT.table(summ, paper, "cities", "truth_probes", 5)
    assert t["model"].tolist() == ["Qwen2.5-3B (paper)", "tiny", "tiny"]
    assert t.loc[0, "θ_tag"] == "98.0" and len(t.columns) <= 8
    fam = PT.family_table(summ, 5)
    assert len(fam) == 5 and len(fam.columns) <= 8
    assert fam["verdict"].tolist() == [PV.carried_by_tag(summ["tiny"][t][p]) for t, p in PV.FAMILY]
    assert len(PT.activation_table(summ)) == 2
    assert PT.sweep_table(summ, [1, 2, 5]).shape == (3, 3)
    assert "tiny" in PT.paragraphs(summ).data and PT.suffix_text(summ).data
    claims = PV.claim_rows(summ, {**paper, "sentiment_probes": paper["truth_probes"]}, 5)
    blocks = PT.verdict_blocks(claims)
    assert len(blocks) == 2                       # two rules, a block each
    assert blocks[0].data.count("  - tiny: **") == 5
    assert PV.head_name(3, 1) == "L3H1" and PV.head_name(None, None) == "-"


def test_heads_figure_draws_every_model_and_task(tiny_summ):
    import matplotlib.pyplot as plt

    from ctr.chapters.probes import figures as probes_figures
    runs = {"a": tiny_summ[0], "b": tiny_summ[0]}
    fig = probes_figures.heads(runs, 5)
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == 3 * 4
    plt.close(fig)

def test_country_from_end_counts_the_country_and_the_full_stop(planted_model):
    texts = ["The city of Paris is in France.", "The city of Paris is in France. Is this true? Answer:"]
    n = probes.country_from_end(planted_model, texts)
    tail = len(planted_model.encode([texts[1]]).tokens[0]) - len(planted_model.encode([texts[0]]).tokens[0])
    assert n[0] >= 2 and n[1] == n[0] + tail



def test_notebook_defines_no_function_and_shows_at_most_three_cells():
    nb = nbformat.read(book.ROOT / "book" / "probes.ipynb", as_version=4)
    hidden = {"hide-input", "remove-input", "remove-cell", "parameters"}
    shown = [c for c in nb.cells if c.cell_type == "code"
             and not hidden & set(c.metadata.get("tags", []))]
    assert 1 <= len(shown) <= 3
    assert all(len(line) <= 79 for c in shown for line in c.source.splitlines())
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "def " not in code and "L{" not in code
    text = "\n".join(c.source for c in nb.cells)
    assert "issue 1" not in text.lower()
    for name in ("z_tag", "z_notag", "mass_mean_fit"):
        assert f":pyobject: {name}" in text
    params = nb.cells[1].source.splitlines()
    assert params[1].startswith('device = "cpu"') and params[2].startswith('dtype = "float32"')


# The architectures this extraction path was written and checked for (the first eight tiny
# configs); the extraction engine of ctr.extract replaces it.
PREFIX_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "gpt2")


@pytest.mark.parametrize("arch", PREFIX_ARCHS)
def test_shared_prefix_matches_full_prompts_on_every_architecture(arch):
    m = models.wrap(f"tiny-{arch}", tiny.model(arch), tiny.tokenizer())
    texts = data.cities(8, 4).texts
    a = probes.features(m, texts, guards=(1, 5), batch_size=3, shared_prefix=True, progress=False)
    b = probes.features(m, texts, guards=(1, 5), batch_size=8, shared_prefix=False, progress=False)
    assert a.shared > 0
    assert torch.allclose(a.o, b.o, atol=1e-4)
    for g in (1, 5):
        assert torch.allclose(a.z_tag[g], b.z_tag[g], atol=1e-4)
        assert torch.equal(a.n_sinks[g], b.n_sinks[g])
