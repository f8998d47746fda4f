"""The toy model (toy_model) and the toy theory chapter's code: task, the two variants'
constructions, causal masking, batched training, the mechanism detector and the verdict rules."""
import math

import pytest
import torch

from ctr import verdicts as V
from ctr.chapters import toy_model as tm
from ctr.chapters import toy_theory as toy

GRID = [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30]


@pytest.fixture(scope="module")
def task():
    return tm.make_task(1024, 16, seed=1)


def test_task_targets_and_separator_positions(task):
    for i in range(50):
        x, kind = task.x[i].tolist(), task.kind[i].tolist()
        p = kind.index(tm.SEP)
        assert 1 <= p <= 14 and kind.count(tm.SEP) == 1 and kind[-1] == tm.NUM
        assert task.y[i] == pytest.approx(sum(x[p + 1:]) / len(x[p + 1:]), abs=1e-6)
    again = tm.make_task(1024, 16, seed=1)
    assert torch.equal(again.x, task.x) and not torch.equal(tm.make_task(1024, 16, 2).x, task.x)


# --- constructions -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["width2", "width4"])
def test_construction_error_falls_monotonically_and_vanishes(variant, task):
    rows = toy.sweep_construction(lambda s, dt: toy.construction(variant, s, dt), GRID, task)
    err = {r["s_tag"]: r["max_abs_error"] for r in rows}
    assert err[20] < 1e-4 and err[30] < 1e-7
    tail = [err[s] for s in GRID if s >= 3]
    assert all(b < a for a, b in zip(tail, tail[1:]))       # strictly falling from s_tag = 3
    assert err[2] > 0.5                                     # a small s_tag really fails
    assert toy.rule_construction(GRID, [err[s] for s in GRID]) == V.REPRODUCED


def test_width2_construction_by_hand():
    """x = (0.5, [SEP], 1, -2, 3): layer 1 leaves the numbers before [SEP] at ONE = 0 and puts
    ONE = -(s - 1) on the numbers after it; the readout returns their mean, 2/3."""
    x = torch.tensor([[0.5, 0.0, 1.0, -2.0, 3.0]])
    kind = torch.tensor([[0, 1, 0, 0, 0]])
    m = toy.construction("width2", 20.0, torch.float64)
    y, tr = m(x, kind, trace=True)
    assert float(y[0, 0]) == pytest.approx(2 / 3, abs=1e-5)
    one = tr["h1"][0, 0, :, toy.ONE]
    assert one[0] == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(one[2:], torch.full((3,), -19.0, dtype=torch.float64), atol=1e-5,
                               rtol=0)
    assert torch.equal(tr["h1"][0, 0, :, toy.VAL], x[0].double())        # values untouched
    # at s_tag = 1 the paper's [SEP] is the number 0: no model can tell them apart
    m1 = toy.construction("width2", 1.0)
    h = m1.embed(torch.zeros(1, 2), torch.tensor([[0, 1]]))
    assert torch.equal(h[0, 0, 0], h[0, 0, 1])


def test_unknown_variant_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown toy variant.*width2, width4"):
        toy.check_variants(["width3"])
    with pytest.raises(ValueError, match="unknown toy variant"):
        toy.construction("paper")


def test_mechanism_detector_on_constructions_and_random_init(task):
    for variant in ("width2", "width4"):
        found = toy.mechanism(toy.construction(variant, 20.0), task)[0]
        assert found["mechanism"] and found["tv_layer2"] < 1e-3 and found["tag_separated"] == 1
        weak = toy.mechanism(toy.construction(variant, 3.0), task)[0]   # catch too soft
        assert not weak["release"] and not weak["mechanism"]
        rand = toy.mechanism(tm.Toys([0, 1, 2], 10.0, **toy.VARIANTS[variant]["arch"]), task)
        assert not any(f["mechanism"] for f in rand)


# --- the model -----------------------------------------------------------------------------------

ARCHS = [dict(d=2, sep_dirs=[[0.0, 1.0]]), dict(d=4),
         dict(d=5, heads=2, d_head=3, n_sep=2, out_proj=True)]


@pytest.mark.parametrize("arch", ARCHS)
def test_causal_masking_and_the_last_query_path(arch):
    """Changing tokens after position i never changes any output at i; changing one before
    does; the training path (layer 2 at the last position only) gives the traced prediction."""
    m = tm.Toys([3, 4], 10.0, **arch)
    t = tm.make_task(64, 16, seed=5)
    _, ref = m(t.x, t.kind, trace=True)
    g = torch.Generator().manual_seed(0)
    for i in (0, 3, 8, 14):
        x, kind = t.x.clone(), t.kind.clone()
        x[:, i + 1:] = torch.randn(x[:, i + 1:].shape, generator=g)
        kind[:, i + 1:] = torch.roll(kind[:, i + 1:], 1, dims=1)   # separators move too
        _, new = m(x, kind, trace=True)
        for key in ("A1", "A2"):
            assert torch.equal(new[key][..., :i + 1, :i + 1], ref[key][..., :i + 1, :i + 1])
        for key in ("h1", "h2"):
            torch.testing.assert_close(new[key][:, :, :i + 1], ref[key][:, :, :i + 1], rtol=0,
                                       atol=1e-6)
        assert not torch.allclose(new["h2"][:, :, i + 1:], ref["h2"][:, :, i + 1:])
    x = t.x.clone()
    x[:, 0] += 1.0
    assert not torch.allclose(m(x, t.kind, trace=True)[1]["h2"][:, :, -1], ref["h2"][:, :, -1])
    torch.testing.assert_close(m(t.x, t.kind), m(t.x, t.kind, trace=True)[0], rtol=1e-5,
                               atol=1e-5)


def test_batched_runs_are_seeded_bit_identical_and_independent_of_each_other():
    data, test = tm.make_task(512, 12, seed=0), tm.make_task(128, 12, seed=1)

    def fit(seeds, s_tags, orders, arch=ARCHS[0]):
        m = tm.Toys(seeds, s_tags, **arch)
        return m, tm.train(m, data, test, orders, epochs=2, batch_size=128)

    a, ha = fit([5, 6, 7], [10.0, 6.0, 1.0], [1, 2, 3])
    b, hb = fit([5, 6, 7], [10.0, 6.0, 1.0], [1, 2, 3])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ha["loss"] == hb["loss"] and ha["test_loss"] == hb["test_loss"]
    assert len(ha["snapshots"]) == 3 and len(ha["loss"]) == 2 and len(ha["loss"][0]) == 3
    # run 6 trained alone follows the same trajectory as inside the batch
    c, _ = fit([6], [6.0], [2])
    for x, y in zip(a.state_dict().values(), c.state_dict().values()):
        torch.testing.assert_close(x[1:2], y, rtol=1e-5, atol=1e-6)
    # same seed, another s_tag init: the same initial weights except s_tag
    s0 = ha["snapshots"][0]
    m0 = tm.Toys([5, 5], [10.0, 1.0], **ARCHS[0])
    assert torch.equal(m0.W[0], s0["W"][0]) and torch.equal(m0.W[1], s0["W"][0])


def test_short_training_decreases_the_loss():
    data, test = tm.make_task(1024, 16, seed=0), tm.make_task(256, 16, seed=1)
    m = tm.Toys([0, 1], 10.0, d=4)
    with torch.no_grad():
        before = ((m(test.x, test.kind) - test.y) ** 2).mean(1)
    hist = tm.train(m, data, test, [0, 1], epochs=4, batch_size=128)
    assert all(hist["loss"][-1][r] < hist["loss"][0][r] for r in range(2))
    assert all(hist["test_loss"][-1][r] < 0.5 * float(before[r]) for r in range(2))
    with pytest.raises(ValueError, match="one batch-order seed per run"):
        tm.train(m, data, test, [0], epochs=1)


# --- verdict rules -------------------------------------------------------------------------------

def test_newcombe_interval_matches_the_published_example():
    lo, hi = toy.newcombe(56, 70, 48, 80)               # Newcombe (1998), Table II, method 10
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)


def test_rule_construction():
    falls = [3.0, 2.0, 1.0, 1e-2, 1e-5]
    assert toy.rule_construction([1, 3, 5, 10, 20], falls) == V.REPRODUCED
    assert toy.rule_construction([1, 3, 5, 10, 20], [3, 2, 1, 1e-2, 2e-4]) == V.NOT  # too big
    assert toy.rule_construction([1, 3, 5, 10, 20], [3, 2, 1, 1e-6, 1e-5]) == V.NOT  # rises
    assert toy.rule_construction([1, 2, 3, 20], [1, 2, 1, 1e-6]) == V.REPRODUCED  # below s=3


def test_rule_rate_every_outcome():
    assert toy.rule_rate(4, 10, 4, 10) == V.COMPATIBLE          # 10 runs cannot show equality
    assert toy.rule_rate(400, 1000, 40, 100) == V.REPRODUCED
    assert toy.rule_rate(10, 10, 0, 10) == V.NOT               # the reversed trend's init 1
    assert toy.rule_rate(0, 0, 4, 10) == V.UNTESTABLE


def test_rule_trend_every_outcome():
    inits = [10, 6, 1]
    assert toy.rule_trend([8, 5, 0], [10] * 3, inits) == V.REPRODUCED
    assert toy.rule_trend([2, 6, 10], [10] * 3, inits) == V.NOT   # the earlier build's counts
    assert toy.rule_trend([4, 3, 0], [10] * 3, inits) in (V.REPRODUCED, V.COMPATIBLE)
    assert toy.rule_trend([3, 3, 3], [10] * 3, inits) == V.COMPATIBLE
    assert toy.rule_trend([3], [10], [10]) == V.UNTESTABLE


def test_rule_emergence_every_outcome():
    assert toy.rule_emergence(10, 10) == V.REPRODUCED
    assert toy.rule_emergence(3, 5) == V.COMPATIBLE
    assert toy.rule_emergence(0, 10) == V.NOT
    assert toy.rule_emergence(0, 0) == V.UNTESTABLE


def test_claim_rows_on_fabricated_runs():
    paper = {"success": [{"s_tag_init": 10, "successes": 4, "runs": 10},
                         {"s_tag_init": 6, "successes": 3, "runs": 10},
                         {"s_tag_init": 1, "successes": 0, "runs": 10}]}
    runs = [{"s_tag_init": s, "run": r, "success": r < k, "mechanism": {"mechanism": r == 0}}
            for s, k in ((10.0, 2), (6.0, 6), (1.0, 10)) for r in range(10)]
    rows = toy.claim_rows("width4", runs, [1, 3, 20], [1.0, 0.5, 1e-6], paper)
    assert [r["id"] for r in rows] == [f"{i}_width4" for i in (
        "construction", "success_init_10", "success_init_6", "success_init_1", "success_trend",
        "emergence")]                     # not the paper's model: rows of its own
    assert all(set(r) == set(V.COLUMNS) and r["model"] == toy.VARIANTS["width4"]["label"]
               for r in rows)
    assert [r["id"] for r in toy.claim_rows("width2", runs, [1, 3, 20], [1.0, 0.5, 1e-6], paper)][:2] \
        == ["construction", "success_init_10"]
    v = {r["id"].removesuffix("_width4"): r["verdict"] for r in rows}
    assert v["success_init_1"] == V.NOT and v["success_trend"] == V.NOT
    assert v["emergence"] == V.NOT                      # 3 of 18 successful runs


def test_pick_and_emergence_epochs():
    runs = [{"s_tag_init": s, "r2": r2, "success": r2 > 0.9}
            for s, r2 in [(10.0, 0.5), (6.0, 0.95), (1.0, 0.99), (10.0, math.nan)]]
    assert toy.pick(runs) == (1, True)
    assert toy.pick([dict(r, success=False) for r in runs]) == (2, False)
    assert toy.emergence_epochs([1.0, 0.5, 0.05, 0.01], 1.0) == [0, 1, 3, 4]
    assert toy.emergence_epochs([1.0] * 6, 1.0) == [0, 2, 4, 6]
