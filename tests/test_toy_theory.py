"""The toy model (toy_model) and the toy-theory chapter's code: task, constructions, causal
masking, the attention backward, batched training bit for bit in every setting, the plateau
rule, the mechanism detector, and every outcome of every rule, on fabricated numbers and on
planted runs pushed through the chapter's real measurement code."""
import math

import pytest
import torch

from ctr import results, stats
from ctr import verdicts as V
from ctr.chapters import toy_model as tm
from ctr.chapters import toy_multihead as mh
from ctr.chapters import toy_theory as toy
from ctr.chapters.toy_theory import verdicts as TV

GRID = [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30]
PAPER = results.paper()["toy"]


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
    with pytest.raises(ValueError, match="at least 3 tokens"):
        tm.make_task(4, 2)


# --- constructions -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["width2", "width4"])
def test_construction_error_falls_monotonically_and_vanishes(variant, task):
    rows = toy.sweep_construction(lambda s, dt: toy.construction(variant, s, dt), GRID, task)
    err = {r["s_tag"]: r["max_abs_error"] for r in rows}
    assert err[20] < 1e-4 and err[30] < 1e-7
    tail = [err[s] for s in GRID if s >= 3]
    assert all(b < a for a, b in zip(tail, tail[1:]))       # strictly falling from s_tag = 3
    assert err[2] > 0.5                                     # a small s_tag really fails
    assert toy.construction_ok(GRID, [err[s] for s in GRID])
    assert not toy.construction_ok(GRID, [err[s] for s in GRID[:-1]] + [1.0])   # rises at 30


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


def near_zero_solution(c: float = 20.0) -> tm.Toys:
    """Another width-2 solution, with [SEP] = 0 (s_tag = 0): layer 1 scores -c ONE_i ONE_j, so
    the numbers after [SEP] attend to it (score 0 against -c) and keep ONE = 1 while earlier
    numbers end at 0; layer 2 scores c ONE_i ONE_j and writes VAL - ONE to ONE."""
    m = toy.construction("width2", 0.0)
    with torch.no_grad():
        m.W[0, 0, 0, 0, 0] = -c * torch.eye(2)[toy.ONE]
        m.W[0, 1, 0, 0, 0] = c * torch.eye(2)[toy.ONE]
    return m


def test_a_solution_with_sep_near_zero_solves_the_task_and_is_told_apart(task):
    m = near_zero_solution()
    assert float(tm.r2(m(task.x, task.kind), task.y)[0]) > 0.999
    (run,) = toy.measure(m, task, [(1.0, 0)], "width2")
    assert run["success"] and run["mechanism"]["mechanism"] and run["solution"] == "[SEP] near 0"
    assert not TV.emerged(run)
    (run,) = toy.measure(toy.construction("width2", 20.0), task, [(10.0, 0)], "width2")
    assert run["solution"] == "Theorem 7.1" and TV.emerged(run)
    assert toy.solution(0.7) == "neither" and toy.solution(float("nan")) == "neither"


def test_unknown_variant_or_setting_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown toy variant.*width2, width4"):
        toy.check_variants(["width3"])
    with pytest.raises(ValueError, match="unknown toy variant"):
        toy.construction("paper")
    with pytest.raises(ValueError, match="unknown setting 'batch 7'"):
        toy.setting("batch 7")
    with pytest.raises(ValueError, match="positive weight scale"):
        tm.Toys([0], 1.0, d=2, scale=0.0)


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
         dict(d=3, heads=2, d_head=3, n_sep=2, out_proj=True),
         dict(d=3, heads=1, d_head=3, n_sep=2, out_proj=True)]


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


@pytest.mark.parametrize("T,Tq", [(16, 16), (16, 1), (8, 8), (5, 1), (32, 32)])
def test_the_written_out_attention_backward_equals_autograd(T, Tq):
    """_Attention's hand-written backward (and the padding of fewer than 16 keys) against
    autograd through softmax(q k^T + mask) v, in float64."""
    g = torch.Generator().manual_seed(T + Tq)
    q, k, v = (torch.randn(6, n, 3, generator=g, dtype=torch.float64).mul(2).requires_grad_()
               for n in (Tq, T, T))
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)[-Tq:]
    with torch.enable_grad():
        ours = torch.autograd.grad(tm.attend(q, k, v, mask)[0].square().sum(), (q, k, v))
        ref = torch.autograd.grad(((q @ k.transpose(1, 2) + mask).softmax(-1) @ v)
                                  .square().sum(), (q, k, v))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# Every training setting of the chapters: batch size, weight scale, sequence length, both
# toy-theory widths, the multi-head model (head dimension 3, one and two heads), the plateau.
SETTINGS = {
    "default": dict(arch=ARCHS[0]), "batch 32": dict(arch=ARCHS[0], batch_size=32),
    "batch 128": dict(arch=ARCHS[0], batch_size=128),
    "weight scale 0.1": dict(arch=dict(ARCHS[0], scale=0.1)),
    "weight scale 0.5": dict(arch=dict(ARCHS[0], scale=0.5)),
    "length 8": dict(arch=ARCHS[0], T=8), "length 32": dict(arch=ARCHS[0], T=32),
    "width 4": dict(arch=ARCHS[1]), "two heads of dimension 3": dict(arch=ARCHS[2], T=12),
    "one head of dimension 3": dict(arch=ARCHS[3], T=12),
    "plateau": dict(arch=ARCHS[2], T=12, plateau=tm.Plateau(4, patience=1, min_gain=0.3)),
}


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("group", [1, 2 ** 30])
def test_a_run_trained_in_a_batch_equals_the_same_run_trained_alone(name, group, monkeypatch):
    """Bit for bit: final weights and every loss, whether the batch is processed one run at a
    time (group 1) or all at once, and the same run trained as the only one."""
    st = SETTINGS[name]
    T, bs = st.get("T", 16), st.get("batch_size", 128)
    make = mh.make_task if st["arch"].get("n_sep") == 2 else tm.make_task
    data, test = make(256, T, 0), make(64, T, 1)
    monkeypatch.setattr(tm, "GROUP_ENTRIES", group)

    def fit(seeds, s_tags, orders):
        m = tm.Toys(seeds, s_tags, **st["arch"])
        return m, tm.train(m, data, test, orders, epochs=2, batch_size=bs,
                           plateau=st.get("plateau"))

    a, ha = fit([5, 6, 7], [10.0, 6.0, 1.0], [1, 2, 3])
    c, hc = fit([6], [6.0], [2])
    for x, y in zip(a.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x[1:2], y)
    assert [e[1] for e in ha["loss"]] == [e[0] for e in hc["loss"]]
    assert [e[1] for e in ha["test_loss"]] == [e[0] for e in hc["test_loss"]]
    assert ha["epochs"][1] == hc["epochs"][0]
    # another seed gives other weights; the same seed at another init only another s_tag
    assert not torch.equal(a.W[0], a.W[1])
    s0 = ha["snapshots"][0]
    m0 = tm.Toys([5, 5], [10.0, 1.0], **st["arch"])
    assert torch.equal(m0.W[0], s0["W"][0]) and torch.equal(m0.W[1], s0["W"][0])


def test_the_weight_scale_multiplies_the_same_draws():
    a, b = tm.Toys([3], 1.0, d=2, scale=1.0), tm.Toys([3], 1.0, d=2, scale=0.1)
    torch.testing.assert_close(b.W, 0.1 * a.W, rtol=1e-6, atol=0)
    torch.testing.assert_close(b.w_out, 0.1 * a.w_out, rtol=1e-6, atol=0)


def test_plateau_rule():
    p = tm.Plateau(max_epochs=8, patience=2, min_gain=0.1)
    assert not p.stopped([1.0, 0.8])                          # too early to judge
    assert not p.stopped([1.0, 0.8, 0.7, 0.6])               # 0.6 < 0.9 * 0.8: still improving
    assert p.stopped([1.0, 0.8, 0.79, 0.75])                 # 0.75 >= 0.9 * 0.8: stop
    assert p.stopped([1.0, 0.5, float("nan"), float("nan")])  # diverged
    assert p.stopped([1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005])   # max_epochs


def test_a_stopped_run_is_frozen_and_leaves_the_batch():
    data, test = tm.make_task(256, 12, 0), tm.make_task(64, 12, 1)
    m = tm.Toys([1, 2], [10.0, 1.0], d=2, sep_dirs=[[0.0, 1.0]])
    h = tm.train(m, data, test, [1, 2], epochs=1, batch_size=64,
                 plateau=tm.Plateau(6, patience=1, min_gain=0.99))
    assert h["epochs"] == [2, 2]                              # nobody gains 99% in one epoch
    assert len(h["loss"]) == 2 and all(v == v for v in h["test_loss"][-1])
    h = tm.train(tm.Toys([1, 2], [10.0, 1.0], d=2, sep_dirs=[[0.0, 1.0]]), data, test, [1, 2],
                 epochs=1, batch_size=64, plateau=tm.Plateau(4, patience=1, min_gain=-1e9))
    assert h["epochs"] == [4, 4]                              # any change counts as a gain
    m = tm.Toys([1, 2, 3], [10.0, 6.0, 1.0], d=2, sep_dirs=[[0.0, 1.0]])
    h = tm.train(m, data, test, [1, 2, 3], epochs=1, batch_size=64,
                 plateau=tm.Plateau(5, patience=1, min_gain=0.05))
    for r, e in enumerate(h["epochs"]):
        assert all(math.isnan(x[r]) for x in h["test_loss"][e:])      # no curve once stopped
        for later in h["snapshots"][e + 1:]:                          # weights frozen
            assert torch.equal(later["W"][r], h["snapshots"][e]["W"][r])


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


def test_train_runs_is_seeded_independent_across_inits_and_paired_across_settings():
    base = dict(seed=0, n_sequences=128, n_test=64, epochs=1, lr=5e-2, weight_decay=1e-3,
                r2_min=0.9, eps=0.2, tv_max=0.2)
    a = toy.train_runs(dict(base, variant="width2", setting="default",
                            slots=[(10.0, 0), (6.0, 0)], snapshots=True))
    b = toy.train_runs(dict(base, variant="width2", setting="weight scale 0.5",
                            slots=[(10.0, 0)]))
    w = a["snapshots"]["W"][0]                                  # (R, ...) at initialisation
    assert not torch.equal(w[0], w[1])                          # init 10 and 6: own draws
    assert a["runs"][0]["r2"] != b["runs"][0]["r2"]
    again = toy.train_runs(dict(base, variant="width2", setting="default", slots=[(6.0, 0)]))
    assert again["runs"][0]["r2"] == a["runs"][1]["r2"]         # alone = in a batch
    assert {r["setting"] for r in b["runs"]} == {"weight scale 0.5"}


# --- verdict rules, fabricated numbers -----------------------------------------------------------

def test_rule_success_every_outcome():
    assert TV.rule_success(0.001, 30, 30, 0, 10) == V.NOT            # Holm-adjusted p < 0.05
    assert TV.rule_success(0.9, 12, 30, 4, 10) == V.REPRODUCED       # CI within +-0.35
    assert TV.rule_success(0.3, 5, 30, 4, 10) == V.COMPATIBLE
    assert TV.rule_success(1.0, 0, 0, 4, 10) == V.UNTESTABLE
    # RULES.md: at 30 seeds "reproduced" is reachable at about 12-13/30 for init 10, 9-11/30
    # for init 6, 0-5/30 for init 1 (checked with the real Newcombe interval, p_adj large)
    ok = {s: [k for k in range(31) if TV.rule_success(1.0, k, 30, pk, 10) == V.REPRODUCED]
          for s, pk in ((10, 4), (6, 3), (1, 0))}
    assert 12 in ok[10] and 13 in ok[10] and 10 in ok[6] and ok[1][0] == 0 and 5 in ok[1]


def test_rule_trend_every_outcome():
    assert TV.rule_trend([8, 5, 0], [10] * 3) == V.REPRODUCED
    assert TV.rule_trend([1, 1, 4], [10] * 3) == V.NOT   # the earlier build: z -1.74, one-sided
    assert TV.rule_trend([2, 2, 3], [10] * 3) == V.COMPATIBLE
    assert TV.rule_trend([3, 3, 3], [10] * 3) == V.COMPATIBLE
    assert TV.rule_trend([3], [10], [10]) == V.UNTESTABLE
    assert stats.cochran_armitage([4, 3, 0], [10] * 3, [10, 6, 1])["z"] == pytest.approx(
        2.15, abs=0.01)                                              # the paper's, as RULES.md


def test_rule_emergence_every_outcome():
    assert TV.rule_emergence(10, 10) == V.REPRODUCED
    assert TV.rule_emergence(3, 5) == V.COMPATIBLE
    assert TV.rule_emergence(0, 10) == V.NOT
    assert TV.rule_emergence(0, 0) == V.UNTESTABLE


def test_best_init():
    assert TV.best_init({10.0: (1, 30), 6.0: (1, 30), 1.0: (4, 30)}) == 1.0
    assert TV.best_init({10.0: (2, 30), 6.0: (2, 30), 1.0: (1, 30)}) == 10.0   # tie: 10 first
    with pytest.raises(ValueError, match="no runs"):
        TV.best_init({10.0: (0, 0)})


# --- verdict rules on planted runs through the real measurement code ---------------------------

def planted(plan: dict, task) -> list[dict]:
    """Runs of the width-2 model through toy.measure: plan = {init: (n_theorem, n_zero,
    n_random)}: Theorem 7.1 constructions (s_tag 20), [SEP]-near-0 solutions, random weights."""
    kinds = [(s, k) for s, counts in plan.items()
             for k, n in zip(("theorem", "zero", "random"), counts) for _ in range(n)]
    m = tm.Toys(list(range(len(kinds))), 10.0, **toy.VARIANTS["width2"]["arch"])
    sources = {"theorem": toy.construction("width2", 20.0), "zero": near_zero_solution()}
    with torch.no_grad():
        for i, (_, k) in enumerate(kinds):
            if k in sources:
                for name, p in sources[k].state_dict().items():
                    m.state_dict()[name][i] = p[0]
    return toy.measure(m, task, [(s, i) for i, (s, _) in enumerate(kinds)], "width2")


def verdicts(runs):
    return {r["id"]: r["verdict"] for r in TV.claim_rows(runs, PAPER, "s", "c")}


def test_success_and_trend_verdicts_on_planted_runs(task):
    runs = planted({10.0: (12, 0, 18), 6.0: (30, 0, 0), 1.0: (8, 0, 22)}, task)
    assert [r["success"] for r in runs].count(True) == 50
    v = verdicts(runs)
    assert v["success_init_10"] == V.REPRODUCED                      # 12/30 against 4/10
    assert v["success_init_6"] == V.NOT                              # 30/30 against 3/10
    assert v["success_init_1"] == V.COMPATIBLE                       # 8/30 against 0/10
    rows = {r["id"]: r for r in TV.claim_rows(runs, PAPER, "s", "c")}
    assert rows["success_init_6"]["p_adj"] >= rows["success_init_6"]["p_raw"]
    assert all(r["rule"] and r["settings"].startswith("s") for r in rows.values())
    assert verdicts(planted({10.0: (20, 0, 10), 6.0: (10, 0, 20), 1.0: (0, 0, 30)}, task))[
        "success_trend"] == V.REPRODUCED
    assert verdicts(planted({10.0: (0, 0, 30), 6.0: (10, 0, 20), 1.0: (20, 0, 10)}, task))[
        "success_trend"] == V.NOT
    assert v["success_trend"] == V.COMPATIBLE                        # 12, 30, 8: no clear rise


def test_emergence_verdicts_on_planted_runs(task):
    def em(plan):
        return verdicts(planted(plan, task))["emergence"]

    assert em({10.0: (6, 0, 2), 6.0: (0, 0, 2), 1.0: (0, 0, 2)}) == V.REPRODUCED
    assert em({10.0: (0, 0, 2), 6.0: (0, 0, 2), 1.0: (0, 6, 2)}) == V.NOT     # [SEP] near 0
    assert em({10.0: (3, 0, 2), 6.0: (0, 0, 2), 1.0: (0, 3, 2)}) == V.COMPATIBLE
    assert em({10.0: (0, 0, 2), 6.0: (0, 0, 2), 1.0: (0, 0, 2)}) == V.UNTESTABLE


def test_sensitivity_rows_and_closing_note_on_planted_runs(task):
    rise = planted({10.0: (8, 0, 2), 6.0: (4, 0, 6), 1.0: (0, 0, 10)}, task)
    flat = planted({10.0: (2, 0, 8), 6.0: (2, 0, 8), 1.0: (2, 0, 8)}, task)
    runs = ([dict(r, setting="default") for r in rise]
            + [dict(r, setting="length 8") for r in flat])
    rows = TV.sensitivity(runs, toy.SETTINGS)
    assert [r["setting"] for r in rows] == ["default", "length 8"]
    assert [r["rises"] for r in rows] == [True, False] and rows[1]["T"] == 8
    table = TV.sensitivity_table(rows, PAPER)
    assert table[0]["setting"] == "the paper" and table[0]["paper's rising trend"] == "yes"
    assert table[1]["init 10"] == "8/10"
    note = TV.closing(TV.claim_rows(rise, PAPER, "s", "c"), rows, "Ran in 1 s.")
    assert "1 of the 2 training settings" in note and note.endswith("Ran in 1 s.")
    assert "**reproduced**" in note
    text = TV.in_words(rise, PAPER)
    assert "rises" in text and "Of the 12 successful runs, 12 pass" in text
    assert TV.success_table(rise, PAPER)[0]["ours"] == "8/10"
    assert TV.descriptive_table(flat, PAPER)[2]["ours"] == "2/10"
