"""The two toy chapters' code: task generators, constructions, causal masking, training, and the
detectors of catch, tag, release (single head) and of head roles (two heads)."""
import pytest
import torch

from ctr.chapters import toy_theory as toy
from ctr.chapters import toy_multihead as mh


@pytest.fixture(scope="module")
def task():
    return toy.make_task(1024, 16, seed=1)


@pytest.fixture(scope="module")
def task2():
    return mh.make_task(1024, 16, seed=1)


# --- tasks ---------------------------------------------------------------------------------------

def test_task_targets_and_separator_positions(task, task2):
    for i in range(50):
        x, kind = task.x[i].tolist(), task.kind[i].tolist()
        p = kind.index(toy.SEP)
        assert 1 <= p <= 14 and kind.count(toy.SEP) == 1 and kind[-1] == toy.NUM
        assert task.y[i] == pytest.approx(sum(x[p + 1:]) / len(x[p + 1:]), abs=1e-6)
        x, kind = task2.x[i].tolist(), task2.kind[i].tolist()
        p1, p2 = kind.index(toy.SEP), kind.index(toy.SEP2)
        assert 1 <= p1 and p1 + 2 <= p2 <= 14
        after = [v for v, k in zip(x[p1 + 1:], kind[p1 + 1:]) if k == toy.NUM]
        between = x[p1 + 1:p2]
        assert task2.y[i] == pytest.approx(sum(after) / len(after) + sum(between) / len(between),
                                           abs=1e-5)
    again = toy.make_task(1024, 16, seed=1)
    assert torch.equal(again.x, task.x) and not torch.equal(toy.make_task(1024, 16, 2).x, task.x)


# --- constructions -------------------------------------------------------------------------------

@pytest.mark.parametrize("build,which", [(toy.construction, "task"), (mh.construction, "task2")])
def test_construction_error_vanishes_as_s_tag_grows(build, which, request):
    t = request.getfixturevalue(which)
    err = [float((build(s)(t.x, t.kind) - t.y).abs().max()) for s in (2.0, 5.0, 10.0, 20.0)]
    assert err[-1] < 1e-3
    assert err[0] > err[1] > err[2] > err[3]       # grows as s_tag shrinks
    assert err[0] > 0.1                            # small s_tag really fails


def test_mechanism_detector_on_construction_and_on_random_init(task):
    found = toy.mechanism(toy.construction(20.0), task)
    assert found["catch"] and found["tag"] and found["release"] and found["mechanism"]
    assert found["tv_layer2"] < 1e-3 and found["tag_separated"] == 1.0
    weak = toy.mechanism(toy.construction(2.0), task)      # catch too soft: release fails
    assert not weak["release"] and not weak["mechanism"]
    for seed in range(3):
        assert not toy.mechanism(toy.ToyModel(10.0, seed=seed), task)["mechanism"]


def test_role_detection_on_the_constructed_two_head_solution(task2):
    r = mh.roles(mh.construction(20.0), task2)
    assert [h["role"] for h in r["layer1"]] == list(mh.ROLES_L1)
    assert [h["role"] for h in r["layer2"]] == list(mh.ROLES_L2)
    assert r["paper_roles"]
    # swapping the two heads of layer 1 swaps the detected roles
    m = mh.construction(20.0)
    with torch.no_grad():
        m.W[0] = m.W[0].flip(0)
        m.W_O[0] = torch.cat([m.W_O[0][:, mh.D_HEAD:], m.W_O[0][:, :mh.D_HEAD]], 1)
    r = mh.roles(m, task2)
    assert [h["role"] for h in r["layer1"]] == list(mh.ROLES_L1)[::-1] and r["paper_roles"]
    # and models that do not solve the task are not given the paper's roles
    assert not mh.roles(mh.construction(2.0), task2)["paper_roles"]
    assert not any(mh.roles(mh.model(2, seed=s), task2)["paper_roles"] for s in range(3))


# --- the model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: toy.ToyModel(10.0, seed=3),
                                  lambda: mh.model(2, seed=3), lambda: mh.model(1, seed=3)])
def test_causal_masking(make, task2):
    """Changing tokens after position i never changes any output at i; changing one before does."""
    m = make()
    t = task2[:64] if m.e_SEP.shape[0] == 2 else toy.make_task(64, 16, seed=5)
    _, ref = m(t.x, t.kind, trace=True)
    g = torch.Generator().manual_seed(0)
    for i in (0, 3, 8, 14):
        x, kind = t.x.clone(), t.kind.clone()
        x[:, i + 1:] = torch.randn(x[:, i + 1:].shape, generator=g)
        kind[:, i + 1:] = torch.roll(kind[:, i + 1:], 1, dims=1)   # separators move too
        _, new = m(x, kind, trace=True)
        for key in ("A1", "A2"):
            assert torch.equal(new[key][:, :, :i + 1, :i + 1], ref[key][:, :, :i + 1, :i + 1])
        for key in ("o1", "h1", "o2", "h2"):
            torch.testing.assert_close(new[key][:, :i + 1], ref[key][:, :i + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(new["h2"][:, i + 1:], ref["h2"][:, i + 1:])
    x = t.x.clone()
    x[:, 0] += 1.0                                   # an earlier token does matter
    assert not torch.allclose(m(x, t.kind, trace=True)[1]["h2"][:, -1], ref["h2"][:, -1])
    # the training path (layer 2 at the last position only) gives the traced prediction
    torch.testing.assert_close(m(t.x, t.kind), m(t.x, t.kind, trace=True)[0], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("make,gen", [(lambda: toy.ToyModel(10.0, seed=0), toy.make_task),
                                      (lambda: mh.model(2, seed=0), mh.make_task)])
def test_short_training_decreases_the_loss(make, gen):
    m = make()
    data, test = gen(1024, 16, seed=0), gen(256, 16, seed=1)
    with torch.no_grad():
        before = float(((m(test.x, test.kind) - test.y) ** 2).mean())
    hist = toy.train(m, data, test, epochs=4, batch_size=128, seed=0)
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["test_loss"][-1] < 0.5 * before
    assert len(hist["snapshots"]) == 5 and not torch.equal(hist["snapshots"][0]["W"], m.W)


def test_runs_are_seeded_and_do_not_depend_on_the_number_of_workers():
    cfgs = toy.configs(0, 2, (10.0, 1.0), T=12, n_sequences=256, n_test=512, epochs=2, lr=5e-2,
                       weight_decay=1e-3, batch_size=128, r2_min=0.9)
    one = toy.run_many(toy.run, cfgs, workers=1)
    two = toy.run_many(toy.run, cfgs, workers=2)
    for a, b in zip(one, two):
        assert a["cfg"] == b["cfg"] and a["r2"] == b["r2"] and a["loss"] == b["loss"]
        assert a["mechanism"] == b["mechanism"]
    assert one[0]["loss"] != one[1]["loss"]          # runs differ by their index
    # same run index, different s_tag init: same weights except s_tag
    s0, s1 = one[0]["snapshots"][0], one[2]["snapshots"][0]
    assert torch.equal(s0["W"], s1["W"]) and float(s0["s_tag"]) != float(s1["s_tag"])


def test_fisher_and_pick():
    assert toy.fisher_p(4, 10, 4, 10) == pytest.approx(1.0)
    assert toy.fisher_p(0, 15, 10, 15) < 0.01
    runs = [{"cfg": {"s_tag_init": s, "run": r}, "r2": r2, "success": r2 > 0.9}
            for s, r, r2 in [(10.0, 0, 0.5), (6.0, 0, 0.95), (1.0, 0, 0.99)]]
    assert toy.pick(runs)[0]["cfg"]["s_tag_init"] == 6.0
    assert toy.pick([dict(runs[0], success=False)])[1] is False
