"""The multi-head toy chapter's code: task, the width-3 construction, R^2_short and the low-loss
threshold, head ablation, the two role detectors, and every outcome of every rule, on
fabricated numbers and on planted models pushed through the chapter's real measurement code."""
import math

import pytest
import torch

from ctr import results
from ctr import verdicts as V
from ctr.chapters import toy_model as tm
from ctr.chapters import toy_multihead as mh
from ctr.chapters.toy_multihead import verdicts as MV
from ctr.chapters import toy_theory as toy

PAPER = results.paper()["multihead_toy"]


@pytest.fixture(scope="module")
def task2():
    return mh.make_task(512, 16, seed=1)


def test_task_targets_and_separator_positions(task2):
    for i in range(50):
        x, kind = task2.x[i].tolist(), task2.kind[i].tolist()
        p1, p2 = kind.index(tm.SEP), kind.index(tm.SEP2)
        assert 1 <= p1 and p1 + 2 <= p2 <= 14
        after = [v for v, k in zip(x[p1 + 1:], kind[p1 + 1:]) if k == tm.NUM]
        between = x[p1 + 1:p2]
        assert task2.y[i] == pytest.approx(sum(after) / len(after) + sum(between) / len(between),
                                           abs=1e-5)
    with pytest.raises(ValueError, match="T >= 5"):
        mh.make_task(4, 4)


def test_the_model_is_the_rebuttals():
    m = mh.model(2, 10.0, [0, 1])
    assert (m.d, m.heads, m.d_head) == (3, 2, 3) and m.W_O.shape == (2, 2, 3, 6)
    h = m.embed(torch.tensor([[0.7, 0.0, 0.0]]), torch.tensor([[0, 1, 2]]))
    assert h[0, 0, 0].tolist() == pytest.approx([0.7, 1.0, 0.0])      # a number: (x, 1, 0)
    assert float(h[0, 0, 1].norm()) == pytest.approx(10.0, rel=1e-6)    # s_tag: the initial
    assert float(h[0, 0, 2].norm()) == pytest.approx(10.0, rel=1e-6)    # norm of both
    with pytest.raises(ValueError, match="positive integer"):
        mh.model(0)


def test_construction_error_falls_monotonically_and_vanishes(task2):
    grid = [2, 3, 5, 8, 10, 15, 20, 25]
    rows = toy.sweep_construction(mh.construction, grid, task2, target=mh.target)
    err = [r["max_abs_error"] for r in rows]
    assert err[grid.index(20)] < 1e-4 and err[-1] < 1e-6 and err[0] > 0.5
    assert all(b < a for a, b in zip(err, err[1:]))


# --- R^2_short and the low-loss threshold -------------------------------------------------------

def segments_task(pairs):
    """Sequences 0.5 [SEP] b [SEP2] a with (a, b) given: m_between = b, m_after = (a + b) / 2."""
    x = torch.tensor([[0.5, 0.0, b, 0.0, a] for a, b in pairs])
    kind = torch.tensor([[0, 1, 0, 2, 0]] * len(pairs))
    return tm.Task(x, kind, mh.target(tm.Task(x, kind, None)).float())


def test_r2_short_on_constructed_tasks_with_known_answers():
    # y = (a + 3b) / 2 with a, b = +-1 balanced: R^2 on m_between = b is 9/10, on m_after 4/5
    t = segments_task([(1, 1), (1, -1), (-1, 1), (-1, -1)])
    s = mh.r2_short(t)
    assert s["fits"]["m_between"] == pytest.approx(0.9) and s["fits"]["m_after"] == pytest.approx(
        0.8)
    assert s["r2_short"] == pytest.approx(0.9) and s["component"] == "m_between"
    assert mh.low_loss_threshold(s["r2_short"]) == pytest.approx(0.99)
    # between numbers that cancel: m_between = 0 and y = m_after, so R^2_short = 1
    x = torch.tensor([[0.3, 0.0, 1.0, -1.0, 0.0, v] for v in (2.0, -1.0, 0.5, 3.0)])
    kind = torch.tensor([[0, 1, 0, 0, 2, 0]] * 4)
    s = mh.r2_short(tm.Task(x, kind, None))
    assert s["r2_short"] == pytest.approx(1.0) and s["component"] == "m_after"
    assert mh.r2_fit(torch.ones(4), torch.arange(4.0)) == 0.0        # constant y: no fit


def between_only(s: float = 20.0) -> tm.Toys:
    """The construction without layer-2 head 0's output: its prediction is m_between alone."""
    m = mh.construction(s)
    with torch.no_grad():
        m.W_O[0, 1, :, :mh.D_HEAD] = 0.0
    return m


def test_the_construction_reaches_low_loss_and_passes_the_role_detector(task2):
    threshold = mh.low_loss_threshold(mh.r2_short(task2)["r2_short"])
    assert 0.98 < threshold < 0.995                  # R^2_short about 0.89 at T = 16
    for s in (10.0, 20.0):
        (run,) = mh.measure(mh.construction(s), task2, s, threshold)
        assert run["low_loss"] and run["function"]["paper_roles"] and run["roles"]["paper_roles"]
        assert run["learned"]["carries"] == "both"
    (run,) = mh.measure(between_only(), task2, 20.0, threshold)
    assert not run["low_loss"] and run["r2"] <= mh.r2_short(task2)["r2_short"] + 1e-6
    assert run["learned"]["carries"] == "m_between" and not run["function"]["paper_roles"]


# --- ablation, by hand ---------------------------------------------------------------------------

X = torch.tensor([[0.5, 0.0, 1.0, 3.0, 0.0, -2.0, 4.0]])     # 0.5 [SEP] 1 3 [SEP2] -2 4
KIND = torch.tensor([[0, 1, 0, 0, 2, 0, 0]])


def test_ablating_a_head_removes_exactly_its_contribution():
    """m_after = mean(1, 3, -2, 4) = 1.5, m_between = mean(1, 3) = 2, y = 3.5."""
    s = 30.0
    m = mh.construction(s, torch.float64)
    y, tr = m(X, KIND, trace=True)
    assert float(y[0, 0]) == pytest.approx(3.5, abs=1e-6)
    for h, by_hand in ((0, 1.5), (1, 2.0)):
        delta = y - m(X, KIND, ablate=(2, h))
        # the identity: a layer-2 head's contribution is its output read out at the last position
        contribution = tr["o2_heads"][0, h, 0, -1] @ m.w_out[0]
        assert float(delta[0, 0]) == pytest.approx(float(contribution), abs=1e-12)
        assert float(delta[0, 0]) == pytest.approx(by_hand, abs=1e-6)
    # zeroing layer-1 head 0 removes the tag Z = 3s: layer-2 head 0 then attends to [SEP]
    # (VAL 0) and the readout loses -(1 + s)/(3s) * 3s: y_ablated = 1 + s + m_between
    assert float(m(X, KIND, ablate=(1, 0))[0, 0]) == pytest.approx(1 + s + 2.0, abs=1e-6)
    # zeroing layer-1 head 1 leaves ONE = 1 on every number: layer-2 head 1 averages all five
    # numbers, (0.5 + 1 + 3 - 2 + 4) / 5 = 1.3, and the readout loses s
    assert float(m(X, KIND, ablate=(1, 1))[0, 0]) == pytest.approx(1.5 + 1.3 - s, abs=1e-6)


# --- role detectors ------------------------------------------------------------------------------

def test_role_detectors_recover_the_construction(task2):
    c = mh.construction(20.0)
    r = mh.roles(c, task2)[0]
    assert [h["role"] for h in r["layer1"]] == list(mh.ROLES_L1)
    assert [h["role"] for h in r["layer2"]] == list(mh.ROLES_L2) and r["paper_roles"]
    f = mh.functional_roles(c, task2)[0]
    for layer in ("layer1", "layer2"):
        assert [h["carries"] for h in f[layer]] == list(mh.CARRIES)
    assert f["paper_roles"]
    assert f["layer2"][0]["b_after"] == pytest.approx(1.0, abs=1e-3)
    assert f["layer2"][1]["b_between"] == pytest.approx(1.0, abs=1e-3)
    assert f["layer1"][1]["share_between"] > 0.8 > f["layer1"][1]["share_after"]


def test_swapping_heads_swaps_roles_and_non_solutions_get_none(task2):
    m = mh.construction(20.0)
    with torch.no_grad():                        # swap the two heads of both layers
        for l in range(2):
            m.W[0, l] = m.W[0, l].flip(0)
            m.W_O[0, l] = torch.cat([m.W_O[0, l, :, mh.D_HEAD:], m.W_O[0, l, :, :mh.D_HEAD]], -1)
    r, f = mh.roles(m, task2)[0], mh.functional_roles(m, task2)[0]
    assert [h["role"] for h in r["layer1"]] == list(mh.ROLES_L1)[::-1] and r["paper_roles"]
    assert [h["carries"] for h in f["layer2"]] == list(mh.CARRIES)[::-1] and f["paper_roles"]
    for bad in (mh.construction(2.0), mh.model(2, 10.0, [0, 1, 2])):
        assert not any(x["paper_roles"] for x in mh.functional_roles(bad, task2))
        assert not any(x["paper_roles"] for x in mh.roles(bad, task2))


def test_carries_every_outcome():
    assert mh.carries(1.0, 0.0, 1.0, 0.0) == "m_after"
    assert mh.carries(-0.58, 1.01, 0.1, 0.9) == "m_between"   # the construction's layer-1 head 1
    assert mh.carries(-1.0, 1.0, 0.3, 0.7) == "neither"       # moves m_between, share too low
    assert mh.carries(0.9, 1.0, 0.3, 0.7) == "both"
    assert mh.carries(0.1, 0.15, 0.3, 0.7) == "neither"       # coefficients below 0.2
    assert mh.carries(0.19, 0.0, 1.0, 0.0) == "neither"


def test_explain_shares_are_the_variance_each_term_explains_alone(task2):
    m_a, m_b = mh.components(task2)
    (f,) = mh.explain((2 * m_a - m_b)[None], task2)
    assert (f["b_after"], f["b_between"]) == (pytest.approx(2.0), pytest.approx(-1.0))
    va, vb = float(m_a.var()), float(m_b.var())
    assert f["share_after"] == pytest.approx(4 * va / (4 * va + vb))
    (f,) = mh.explain(torch.full((1, len(task2)), float("nan")), task2)
    assert math.isnan(f["b_after"])


# --- training ------------------------------------------------------------------------------------

def test_two_head_training_decreases_the_loss_and_measures_every_run():
    cfg = dict(heads=2, s_tag_init=10.0, seed=0, n_seeds=2, T=12, n_sequences=512, n_test=256,
               epochs=2, max_epochs=3, patience=1, min_gain=0.01, lr=5e-2, weight_decay=1e-3,
               batch_size=128, threshold=0.99, eps=0.2, tv_max=0.2)
    out = mh.train_heads(cfg)
    assert len(out["runs"]) == 2 and all(2 <= r["epochs"] <= 3 for r in out["runs"])
    assert all(len(r["val_r2"]) == r["epochs"] and r["best_val_r2"] == max(r["val_r2"])
               for r in out["runs"])
    test = mh.make_task(256, 12, tm.derive(0, "mh-test"))
    untrained = mh.model(2, 10.0, [tm.derive(0, "mh-model", 2, 10.0, r) for r in range(2)])
    before = tm.r2(untrained(test.x, test.kind), test.y)
    assert all(r["r2"] > float(b) + 0.2 for r, b in zip(out["runs"], before))
    m = tm.from_state(out["arch"], out["state"])
    assert m.heads == 2 and m.runs == 2


# --- verdict rules, fabricated numbers -----------------------------------------------------------

def test_rules_every_outcome():
    assert MV.rule_one_head(0, 15, 4) == V.REPRODUCED
    assert MV.rule_one_head(1, 15, 4) == V.COMPATIBLE            # Wilson lower end 0.012
    assert MV.rule_one_head(5, 15, 4) == V.NOT                   # Wilson lower end 0.15
    assert MV.rule_one_head(0, 15, 0) == V.UNTESTABLE            # the task was not learned
    assert MV.rule_two_heads(4, 15, 0, 15) == V.REPRODUCED       # RULES.md's example
    assert MV.rule_two_heads(1, 15, 0, 15) == V.COMPATIBLE
    assert MV.rule_two_heads(0, 15, 5, 15) == V.NOT
    assert MV.rule_two_heads(0, 15, 0, 15) == V.UNTESTABLE
    assert MV.rule_roles(4, 4) == V.REPRODUCED                   # the fewest runs that can
    assert MV.rule_roles(3, 3) == V.COMPATIBLE
    assert MV.rule_roles(0, 6) == V.NOT
    assert MV.rule_roles(0, 0) == V.UNTESTABLE


def test_combined_verdicts_follow_the_across_models_rule():
    rows = [{"id": "roles", "model": "s_tag init 10", "verdict": V.REPRODUCED},
            {"id": "roles", "model": "s_tag init 1", "verdict": V.NOT},
            {"id": "one_head_fails", "model": "s_tag init 10", "verdict": V.UNTESTABLE},
            {"id": "one_head_fails", "model": "s_tag init 1", "verdict": V.REPRODUCED}]
    c = {x["claim"]: x["verdict"] for x in MV.combined(rows)}
    assert c == {"roles": V.PARTLY, "one head fails": V.REPRODUCED}


# --- verdict rules on planted models through the real measurement code ------------------------

POS = (4, 9)                       # [SEP] at 4, [SEP2] at 9: 4 numbers between, 6 after


@pytest.fixture(scope="module")
def fixed():
    """Held-out sequences with the separators at fixed positions (T = 16)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 16, generator=g)
    kind = torch.zeros(256, 16, dtype=torch.long)
    kind[:, POS[0]], kind[:, POS[1]] = tm.SEP, tm.SEP2
    x = x.masked_fill(kind != tm.NUM, 0.0)
    t = tm.Task(x, kind, None)
    return tm.Task(x, kind, mh.target(t).float())


def one_head_for_fixed_lengths(s: float = 20.0, n_between: int = 4, n_after2: int = 6):
    """One head per layer solves the task when the segment lengths never change: layer 1 tags
    numbers between the separators with ONE = 1 + 2s and after [SEP2] with 1 + s (both with
    Z = -3s, numbers before [SEP] Z = 2); layer 2 weights a number between the separators
    r = 2 + n_after2 / n_between times one after [SEP2], and writes twice the average."""
    m = mh.model(1, s)
    e = torch.eye(3)
    r = 2 + n_after2 / n_between
    kappa = math.log(r) / (s * (1 + s))
    W, W_O = torch.zeros(2, 1, 3, 3, 3), torch.zeros(2, 3, 3)
    W[0, 0, 0, 0], W[0, 0, 1, 0] = e[mh.ONE], -e[mh.ONE] - e[mh.Z]
    W[0, 0, 2, 0], W[0, 0, 2, 1] = -e[mh.ONE], e[mh.Z] + 2 * e[mh.ONE]
    W_O[0, mh.ONE, 0], W_O[0, mh.Z, 1] = 1.0, 1.0
    W[1, 0, 0, 0], W[1, 0, 1, 0], W[1, 0, 2, 0] = e[mh.ONE], -e[mh.Z] + kappa * e[mh.ONE], \
        2 * e[mh.VAL]
    W_O[1, mh.ONE, 0] = 1.0
    with torch.no_grad():
        m.e_SEP.copy_(torch.tensor([[[0.0, -2.0, 1.0], [0.0, -1.0, -1.0]]]))
        m.W.copy_(W[None])
        m.W_O.copy_(W_O[None])
        m.w_out.copy_((e[mh.ONE] + (1 + s) / (3 * s) * e[mh.Z])[None])
    return m


def one_head_in_two(s: float = 20.0):
    """The fixed-length one-head solution inside a two-head model whose second heads write
    nothing: low loss without the paper's roles."""
    one, m = one_head_for_fixed_lengths(s), mh.model(2, s)
    with torch.no_grad():
        m.e_SEP.copy_(one.e_SEP)
        m.W.zero_()
        m.W[:, :, :1] = one.W
        m.W_O.zero_()
        m.W_O[..., :mh.D_HEAD] = one.W_O
        m.w_out.copy_(one.w_out)
    return m


def stack(models: list) -> tm.Toys:
    """Runs of one head count side by side in one model."""
    return tm.from_state(models[0].arch, {k: torch.cat([m.state_dict()[k] for m in models])
                                          for k in models[0].state_dict()})


def measured(fixed, plan: dict) -> list[dict]:
    """Runs through mh.measure, plan = {init: {kind: count}} with kinds: two (the two-head
    construction), between (m_between only), shared (both tags read by layer-2 head 1), inside
    (one head inside two), one (the one-head fixed-length solution), rand1 / rand2 (random
    weights)."""
    threshold = mh.low_loss_threshold(mh.r2_short(fixed)["r2_short"])
    make = {"two": lambda: mh.construction(20.0), "between": between_only,
            "shared": shared_tags, "inside": one_head_in_two, "one": one_head_for_fixed_lengths,
            "rand1": lambda: mh.model(1, 10.0, [7]), "rand2": lambda: mh.model(2, 10.0, [7])}
    runs = []
    for s, kinds in plan.items():
        for heads in (2, 1):
            models = [make[k]() for k, n in kinds.items() for _ in range(n)]
            models = [m for m in models if m.heads == heads]
            if models:
                runs += mh.measure(stack(models), fixed, s, threshold)
    return runs


def shared_tags(s: float = 20.0) -> tm.Toys:
    """The construction with layer-2 head 1 reading both tags (key ONE + Z): still a solution,
    but without layer-1 head 1 it averages every number after [SEP], so ablating that head
    moves m_between and m_after alike (b = (-1, 1)): by ablation it carries neither, by its
    attention it is the paper's head with sinks at [SEP] and [SEP2]."""
    m = mh.construction(s)
    with torch.no_grad():
        m.W[0, 1, 1, 1, 0] = torch.eye(3)[mh.ONE] + torch.eye(3)[mh.Z]
    return m


def test_a_solution_whose_layer1_tags_are_shared_fails_the_ablation_reading_only(task2):
    threshold = mh.low_loss_threshold(mh.r2_short(task2)["r2_short"])
    (run,) = mh.measure(shared_tags(), task2, 20.0, threshold)
    assert run["low_loss"] and run["roles"]["paper_roles"] and MV.paper_roles_alt(run)
    h1 = run["function"]["layer1"][1]
    assert h1["b_after"] == pytest.approx(-1.0, abs=0.05) and h1["carries"] == "neither"
    assert not run["function"]["paper_roles"]


def test_the_fixed_length_solutions_reach_low_loss(fixed):
    threshold = mh.low_loss_threshold(mh.r2_short(fixed)["r2_short"])
    for m in (one_head_for_fixed_lengths(), one_head_in_two(), mh.construction(20.0)):
        assert float(tm.r2(m(fixed.x, fixed.kind), fixed.y)[0]) > threshold
    (run,) = mh.measure(one_head_in_two(), fixed, 10.0, threshold)
    assert run["low_loss"] and not run["function"]["paper_roles"]


def rows_of(runs):
    return {(r["id"], r["model"]): r["verdict"]
            for r in MV.claim_rows(runs, PAPER, 0.99, "s", "c")}


def test_every_outcome_of_every_rule_on_planted_models(fixed):
    v = rows_of(measured(fixed, {
        10.0: {"two": 5, "rand2": 10, "rand1": 15},                 # two heads learn it, one not
        6.0: {"two": 1, "rand2": 14, "one": 5, "rand1": 10},          # one head at low loss too
        1.0: {"between": 15, "rand1": 15}}))                          # nothing learned
    assert v["one_head_fails", "s_tag init 10"] == V.REPRODUCED
    assert v["one_head_fails", "s_tag init 6"] == V.NOT
    assert v["one_head_fails", "s_tag init 1"] == V.UNTESTABLE
    assert v["two_heads_needed", "s_tag init 10"] == V.REPRODUCED
    assert v["two_heads_needed", "s_tag init 6"] == V.COMPATIBLE
    assert v["two_heads_needed", "s_tag init 1"] == V.UNTESTABLE
    assert v["roles", "s_tag init 10"] == V.REPRODUCED                # 5 of 5 low-loss runs
    assert v["roles", "s_tag init 6"] == V.COMPATIBLE                 # 1 of 1
    assert v["roles", "s_tag init 1"] == V.UNTESTABLE
    v = rows_of(measured(fixed, {
        10.0: {"inside": 8, "two": 1, "rand2": 6, "one": 1, "rand1": 14},
        6.0: {"two": 2, "inside": 2, "rand1": 15},
        1.0: {"rand2": 15, "one": 6, "rand1": 9}}))
    assert v["roles", "s_tag init 10"] == V.NOT                       # 1 of 9
    assert v["roles", "s_tag init 6"] == V.COMPATIBLE                 # 2 of 4
    assert v["one_head_fails", "s_tag init 10"] == V.COMPATIBLE       # 1/15
    assert v["two_heads_needed", "s_tag init 1"] == V.NOT             # 0/15 against 6/15
    assert v["one_head_fails", "s_tag init 1"] == V.UNTESTABLE
    v = rows_of(measured(fixed, {10.0: {"shared": 4, "rand1": 2}}))   # the alternative reading
    assert v["roles", "s_tag init 10"] == V.NOT                       # 0 of 4 by ablation
    assert v["roles_alt", "s_tag init 10"] == V.REPRODUCED            # 4 of 4


def test_tables_and_closing_note_on_planted_models(fixed):
    runs = measured(fixed, {10.0: {"between": 3, "rand1": 3}})
    short = mh.r2_short(fixed)
    note = MV.closing(MV.claim_rows(runs, PAPER, 0.99, "s", "c"), runs, short, 0.99, "Done.")
    assert "not testable here" in note and "m_between (3 runs)" in note and note.endswith("Done.")
    table = MV.count_table(runs, 0.99)
    assert table[0]["heads per layer"] == 2 and table[0]["low loss (R² > 0.9900)"] == "0/3"
    assert "m_between (3)" in table[0]["prediction carries"]
    assert len(MV.run_table(runs)) == 6 and "0.99" in MV.threshold_text(short, 0.99)
    assert [r["reading"] for r in MV.claim_rows(runs, PAPER, 0.99, "s", "c")
            if r["id"].endswith("_alt")] == [V.ALTERNATIVE]
    assert "0 of 3 two-head runs at low loss" in MV.role_text(runs)
    i, how = mh.pick(runs)
    assert runs[i]["heads"] == 2 and how.startswith("**no two-head run")
    runs = measured(fixed, {10.0: {"inside": 1, "two": 1}})
    assert mh.pick(runs)[0] == 1                    # low loss with the paper's roles first
    with pytest.raises(ValueError, match="no two-head run"):
        mh.pick([r for r in runs if r["heads"] == 1])
