"""The multi-head toy chapter's code: task, construction, head ablation, the two role detectors
(attention pattern, function) and the verdict rules."""
import pytest
import torch

from ctr import verdicts as V
from ctr.chapters import toy_model as tm
from ctr.chapters import toy_multihead as mh
from ctr.chapters import toy_theory as toy


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


def test_construction_error_falls_monotonically_and_vanishes(task2):
    grid = [2, 3, 5, 8, 10, 15, 20, 25]
    rows = toy.sweep_construction(mh.construction, grid, task2, target=mh.target)
    err = [r["max_abs_error"] for r in rows]
    assert err[grid.index(20)] < 1e-4 and err[0] > 0.5
    assert all(b < a for a, b in zip(err, err[1:]))


# --- ablation, by hand ---------------------------------------------------------------------------

X = torch.tensor([[0.5, 0.0, 1.0, 3.0, 0.0, -2.0, 4.0]])     # 0.5 [SEP] 1 3 [SEP2] -2 4
KIND = torch.tensor([[0, 1, 0, 0, 2, 0, 0]])


def test_ablating_a_head_removes_exactly_its_contribution():
    """m_after = mean(1, 3, -2, 4) = 1.5, m_between = mean(1, 3) = 2, y = 3.5."""
    m = mh.construction(20.0, torch.float64)
    y, tr = m(X, KIND, trace=True)
    assert float(y[0, 0]) == pytest.approx(3.5, abs=1e-6)
    for h, by_hand in ((0, 1.5), (1, 2.0)):
        delta = y - m(X, KIND, ablate=(2, h))
        # the identity: a layer-2 head's contribution is its output read out at the last position
        contribution = tr["o2_heads"][0, h, 0, -1] @ m.w_out[0]
        assert float(delta[0, 0]) == pytest.approx(float(contribution), abs=1e-12)
        assert float(delta[0, 0]) == pytest.approx(by_hand, abs=1e-6)
    # zeroing layer-1 head 0 removes the tag A: layer-2 head 0 then averages every number,
    # (0.5 + 1 + 3 - 2 + 4) / 5 = 1.3, so the output drops by 1.5 - 1.3
    assert float((y - m(X, KIND, ablate=(1, 0)))[0, 0]) == pytest.approx(0.2, abs=1e-6)
    # ... and layer-1 head 1 removes B: layer-2 head 1 averages every number too: 2 - 1.3
    assert float((y - m(X, KIND, ablate=(1, 1)))[0, 0]) == pytest.approx(0.7, abs=1e-6)


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


def test_swapping_heads_swaps_roles_and_non_solutions_get_none(task2):
    m = mh.construction(20.0)
    with torch.no_grad():                        # swap the two heads of both layers
        m.W[0] = m.W[0].flip(1)
        m.W_O[0] = torch.cat([m.W_O[0, :, :, mh.D_HEAD:], m.W_O[0, :, :, :mh.D_HEAD]], -1)
    r, f = mh.roles(m, task2)[0], mh.functional_roles(m, task2)[0]
    assert [h["role"] for h in r["layer1"]] == list(mh.ROLES_L1)[::-1] and r["paper_roles"]
    assert [h["carries"] for h in f["layer2"]] == list(mh.CARRIES)[::-1] and f["paper_roles"]
    for bad in (mh.construction(2.0), mh.model(2, 10.0, [0, 1, 2])):
        assert not any(x["paper_roles"] for x in mh.functional_roles(bad, task2))
        assert not any(x["paper_roles"] for x in mh.roles(bad, task2))


def test_carries_every_outcome():
    assert mh.carries(1.0, 0.0) == "m_after"
    assert mh.carries(-0.58, 1.01) == "m_between"     # the construction's layer-1 head 1
    assert mh.carries(0.9, 1.0) == "both"
    assert mh.carries(0.1, -0.15) == "neither"


# --- training and verdict rules ------------------------------------------------------------------

def test_two_head_training_decreases_the_loss():
    data, test = mh.make_task(512, 16, seed=0), mh.make_task(256, 16, seed=1)
    m = mh.model(2, 10.0, [0, 1])
    with torch.no_grad():
        before = ((m(test.x, test.kind) - test.y) ** 2).mean(1)
    hist = tm.train(m, data, test, [0, 1], epochs=3, batch_size=128)
    assert all(hist["test_loss"][-1][r] < 0.5 * float(before[r]) for r in range(2))


def test_bad_head_count_is_one_clear_error():
    with pytest.raises(ValueError, match="positive integer"):
        mh.model(0)


def test_rules_every_outcome():
    assert mh.rule_one_head(0, 15, 0, 15) == V.REPRODUCED
    assert mh.rule_one_head(1, 15, 0, 15) == V.COMPATIBLE
    assert mh.rule_one_head(10, 15, 0, 15) == V.NOT
    assert mh.rule_one_head(0, 0, 0, 15) == V.UNTESTABLE
    assert mh.rule_two_vs_one(15, 15, 0, 15) == V.REPRODUCED
    assert mh.rule_two_vs_one(3, 15, 2, 15) == V.COMPATIBLE
    assert mh.rule_two_vs_one(0, 15, 15, 15) == V.NOT
    assert mh.rule_two_vs_one(3, 15, 0, 0) == V.UNTESTABLE
    assert mh.rule_roles(10, 10) == V.REPRODUCED
    assert mh.rule_roles(3, 5) == V.COMPATIBLE
    assert mh.rule_roles(0, 10) == V.NOT
    assert mh.rule_roles(0, 0) == V.UNTESTABLE


def test_claim_rows_on_fabricated_runs():
    paper = {"one_head": {"successes": 0, "runs": 15}, "two_heads": "four roles"}
    runs = [{"heads": h, "run": r, "success": r < (12 if h == 2 else 9),
             "low_loss": h == 2 and r < 6, "roles": {"paper_roles": r < 2},
             "function": {"paper_roles": r < 5}} for h in (2, 1) for r in range(15)]
    rows = mh.claim_rows(runs, paper, 0.9, 0.999)
    assert all(set(r) == set(V.COLUMNS) for r in rows)
    v = {r["id"]: r["verdict"] for r in rows}
    assert v == {"one_head_fails_r2_0.999": V.REPRODUCED, "two_heads_needed_r2_0.999": V.REPRODUCED,
                 "one_head_fails_r2_0.9": V.NOT, "two_heads_needed_r2_0.9": V.COMPATIBLE,
                 "roles_function_r2_0.999": V.COMPATIBLE, "roles_pattern_r2_0.999": V.COMPATIBLE,
                 "roles_function_r2_0.9": V.COMPATIBLE, "roles_pattern_r2_0.9": V.NOT}
    assert mh.pick(runs)[0] == 0 and mh.pick(runs, ("low_loss",))[1].startswith("the first")
    none = [dict(r, low_loss=False, success=False, r2=r["run"] / 100) for r in runs]
    assert mh.pick(none)[0] == 14
