"""Semantic probes: per-head mass-mean probes, the selection rule, the tail guard, the shared-prefix
forward pass (against the plain extraction), and the chapter in smoke mode."""
import json
import math
import shutil

import nbformat
import numpy as np
import pytest
import torch

from ctr import book, data, models, tiny
from ctr.chapters import probes
from ctr import definitions as D


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


def test_head_accuracies_reach_the_analytic_accuracy_in_every_head():
    seps = (0.0, 1.0, 2.0, 3.0, 0.5, 1.5)
    X, y, train = gaussian_heads(seps=seps)
    tr, te = probes.head_accuracies(X, y, train)
    for k, s in enumerate(seps):
        assert te[k // 3, k % 3] == pytest.approx(phi(s / 2), abs=0.03), s
        assert tr[k // 3, k % 3] == pytest.approx(phi(s / 2), abs=0.03), s


def test_head_accuracies_at_chance_on_shuffled_labels():
    X, y, train = gaussian_heads(seps=(3.0,) * 6)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    _, te = probes.head_accuracies(X, y, train)
    assert np.all(np.abs(te - 0.5) < 0.04)


def test_head_accuracies_match_the_definition_per_head():
    X, y, train = gaussian_heads(n=400, seps=(0.0, 1.0, 2.0, 3.0, 0.5, 1.5))
    _, te = probes.head_accuracies(X, y, train)
    for l in range(2):
        for h in range(3):
            ref = D.mass_mean_accuracy(X[train, l, h], y[train], X[~train, l, h], y[~train])
            assert te[l, h] == pytest.approx(ref)


def test_select_head_maximises_the_gap_then_the_tag_accuracy_then_the_lowest_index():
    tag = np.array([[0.90, 0.80], [0.70, 0.90]])
    notag = np.array([[0.60, 0.50], [0.50, 0.70]])
    # gaps 0.30, 0.30, 0.20, 0.20: (0,0) and (0,1) tie on the gap, (0,0) has the higher tag
    assert probes.select_head(tag, notag) == (0, 0)
    tag2 = np.array([[0.8, 0.8], [0.8, 0.8]])
    assert probes.select_head(tag2, notag * 0 + 0.5) == (0, 0)       # full tie: lowest index
    assert probes.select_head(tag, notag - np.array([[0, 0], [0, 0.5]])) == (1, 1)


def test_guard_for_and_chance_level():
    assert probes.guard_for(0.2) == 5          # 1/5 = 0.2 is not > eps: one query cannot do it
    assert probes.guard_for(0.1) == 10
    assert probes.guard_for(0.3) == 4
    c = probes.chance_level(200)
    k = round(c * 200)
    p = sum(math.comb(200, j) for j in range(k, 201)) / 2 ** 200
    p_before = sum(math.comb(200, j) for j in range(k - 1, 201)) / 2 ** 200
    assert p < 0.05 <= p_before


def test_verdict_rules():
    assert probes.verdict(0.80, 0.60, 200) == "reproduced"
    assert probes.verdict(0.80, 0.70, 200) == "partly reproduced"     # gap below 15 points
    assert probes.verdict(0.60, 0.50, 200) == "partly reproduced"
    assert probes.verdict(0.55, 0.50, 200) == "not reproduced"        # within chance
    assert probes.verdict(0.65, 0.70, 200) == "not reproduced"        # no-tag carries more


def test_logistic_baseline_separates_and_is_at_chance_when_shuffled():
    X, y, train = gaussian_heads(n=1000, L=1, H=1, seps=(4.0,))
    X = X[:, 0, 0]
    assert probes.logistic(X[train], y[train], X[~train], y[~train]) > 0.95
    ys = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))]
    assert abs(probes.logistic(X[train], ys[train], X[~train], ys[~train]) - 0.5) < 0.07


def test_common_prefix_leaves_the_final_token():
    assert probes._common_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert probes._common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert probes._common_prefix([[1, 2, 3], [1, 9, 3, 4]]) == 1


# --- on the tiny planted model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def planted():
    return models.load("tiny-planted-llama")


@pytest.fixture(scope="module")
def prompts():
    return {"cities": data.cities(16, 8).texts, "sentiment": data.sentiment(8, 4).texts}


@pytest.mark.parametrize("task", ["cities", "sentiment"])
def test_shared_prefix_gives_the_same_features_as_full_prompts(planted, prompts, task):
    texts = prompts[task]
    a = probes.features(planted, texts, guards=(1, 5), batch_size=5, shared_prefix=True, progress=False)
    b = probes.features(planted, texts, guards=(1, 5), batch_size=3, shared_prefix=False, progress=False)
    assert a.shared > 0 and b.shared == 0
    assert torch.allclose(a.o, b.o, atol=1e-4)
    for g in (1, 5):
        assert torch.allclose(a.z_tag[g], b.z_tag[g], atol=1e-4)
        assert torch.allclose(a.z_notag[g], b.z_notag[g], atol=1e-4)
        assert torch.equal(a.n_sinks[g], b.n_sinks[g])
        assert torch.equal(a.top_sink[g], b.top_sink[g])


def test_features_split_the_head_output_and_respect_the_guard(planted, prompts):
    f = probes.features(planted, prompts["cities"], guards=(1, 2, 5), progress=False)
    for g in (1, 2, 5):
        assert torch.allclose(f.z_tag[g] + f.z_notag[g], f.o, atol=1e-5)
        # no sink: z_tag is the empty sum
        none = f.sink_mass[g] == 0
        assert torch.all(f.z_tag[g][none] == 0)
    assert f.self_sink[1].any()                    # the planted "." is its own sink unguarded
    assert not f.self_sink[2].any() and not f.self_sink[5].any()
    assert torch.all(f.tail_mass[5] == 0)          # the guard removes exactly the tail
    assert (f.n_sinks[5] <= f.n_sinks[1]).all()
    assert {t[-1] for t in f.tokens} == {"."}


def test_probe_task_is_deterministic_and_json_ready(planted):
    c = data.cities(24, 12)
    r1 = probes.probe_task(planted, c, also=(1,), task="cities", progress=False)
    r2 = probes.probe_task(planted, c, also=(1,), task="cities", progress=False)
    assert r1.min_queries == 5 and set(r1.by_guard) == {5, 1}
    s1, s2 = json.dumps(r1.summary(), sort_keys=True), json.dumps(r2.summary(), sort_keys=True)
    assert s1 == s2
    m = r1.summary()["by_guard"]["5"]
    assert 0 <= m["layer"] < planted.n_layers and 0 <= m["head"] < planted.n_heads
    for k in ("theta_tag", "theta_no_tag", "theta_activation", "logistic_activation"):
        assert 0 <= m[k] <= 100 and m[k] * 12 / 100 == pytest.approx(round(m[k] * 12 / 100), abs=1e-3)


# --- the chapter ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_chapter_runs_in_smoke_mode(tmp_path):
    for f in ("_config.yml", "_toc.yml"):
        shutil.copy(book.ROOT / f, tmp_path / f)
    (tmp_path / "book").mkdir()
    shutil.copy(book.ROOT / "book" / "probes.ipynb", tmp_path / "book" / "probes.ipynb")
    book.run_chapter("probes", smoke=True, root=tmp_path)
    nb = nbformat.read(tmp_path / "book" / "executed" / "probes.ipynb", as_version=4)
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outs)
    res = json.loads((tmp_path / "book" / "executed" / "results" / "probes.json").read_text())
    r = res["models"]["tiny-planted-llama"]
    for task in ("cities", "sentiment"):
        g = r[task]["by_guard"]
        assert {str(r[task]["min_queries"]), "1"} <= set(g)
        assert {"theta_tag", "theta_no_tag", "theta_activation", "layer", "head",
                "logistic_activation"} <= set(g[str(r[task]["min_queries"])])
        assert r[task]["verdict"] in ("reproduced", "partly reproduced", "not reproduced")


@pytest.mark.parametrize("arch", tiny.ARCHS)
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
