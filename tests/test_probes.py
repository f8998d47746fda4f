"""Semantic probes: the mass-mean probe of every head at once, the selection rule that can say
no, McNemar, re-splits, the label-shuffle null, the verdict rule on every outcome, the prompt
sets, the shared-prefix forward pass (against the plain extraction), and the chapter in smoke
mode."""
import json
import math
import shutil

import nbformat
import numpy as np
import pytest
import torch

from ctr import book, data, models, tiny
from ctr import definitions as D
from ctr import verdicts as V
from ctr.chapters import probes
from ctr.chapters import probes_stats as PS
from ctr.chapters import probes_verdicts as PV


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


# --- the selection rule ------------------------------------------------------------------------

def test_select_head_maximises_the_gap_then_the_tag_accuracy_then_the_lowest_index():
    tag = np.array([[0.90, 0.80], [0.70, 0.90]])
    notag = np.array([[0.60, 0.50], [0.50, 0.70]])
    # gaps 0.30, 0.30, 0.20, 0.20 (not exactly equal in floating point): the tie goes to (0, 0)
    assert PS.select_head(tag, notag) == (0, 0)
    assert PS.select_head(np.full((2, 2), 0.8), np.full((2, 2), 0.5)) == (0, 0)   # lowest index
    assert PS.select_head(tag, notag - np.array([[0, 0], [0, 0.5]])) == (1, 1)
    assert PS.best_head(np.array([[0.5, 0.9], [0.9, 0.1]])) == (0, 1)


def test_select_head_says_no_when_no_tag_beats_its_no_tag():
    assert PS.select_head(np.array([[0.6, 0.7]]), np.array([[0.6, 0.9]])) is None   # a tie is no


def planted(n=600, L=3, H=4, Dh=16, tag_head=(1, 2), notag_sep=0.0, seed=0):
    """z_tag, z_notag, o of n prompts: only ``tag_head``'s z_tag separates the classes (means
    +-1.5 along one axis); every z_notag separates them by ``notag_sep``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    sign = (y.double() - 0.5)[:, None, None]
    zt = torch.randn(n, L, H, Dh, generator=g, dtype=torch.float64)
    zn = torch.randn(n, L, H, Dh, generator=g, dtype=torch.float64)
    zt[:, tag_head[0], tag_head[1], 0] += 3.0 * sign[:, 0, 0]
    zn[..., 0] += notag_sep * sign
    train = torch.arange(n) < 2 * n // 3
    return {"tag": zt, "no_tag": zn, "activation": zt + zn}, y, train


def test_the_rule_picks_the_one_head_whose_tag_carries_the_label():
    X, y, train = planted()
    masks, null = PS.balanced_splits(y, 400, 10, seed=1), PS.shuffled_labels(y, train, 20, seed=1)
    s = PS.select(X, y, train, masks, null)
    assert s.head == (1, 2) == s.best_tag
    assert s.test["tag"][1, 2] > 0.9 and abs(s.test["no_tag"][1, 2] - 0.5) < 0.1
    assert s.mcnemar["only_tag"] > s.mcnemar["only_no_tag"] and s.mcnemar["p"] < 1e-10
    assert s.resplits["modal_head"] == [1, 2] and s.resplits["modal_count"] == 10
    assert s.resplits["same_as_main"] == 10 and s.resplits["theta_tag_mean"] > 90
    assert s.null["theta_tag_p95"] < 60


def test_the_rule_says_no_when_every_no_tag_carries_the_label_better():
    X, y, train = planted(tag_head=(0, 0), notag_sep=4.0)
    s = PS.select(X, y, train)
    assert s.head is None and s.mcnemar is None
    assert s.train["no_tag"].min() > s.train["tag"].max()


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
                         "p": pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)}


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


# --- the verdict rule, on fabricated summaries ---------------------------------------------------

def summary(layer=3, tag=80.0, no_tag=50.0, p=1e-6, only=(40, 5), rs_tag=78.0, rs_no_tag=52.0,
            null95=56.0, heads_with_sink=270):
    return {"layer": layer, "head": 1, "n_test": 200, "theta_tag": tag, "theta_no_tag": no_tag,
            "theta_activation": 70.0, "heads_with_sink": heads_with_sink,
            "mcnemar": {"only_tag": only[0], "only_no_tag": only[1], "n": 200, "p": p},
            "resplits": {"n": 10, "theta_tag_mean": rs_tag, "theta_tag_sd": 2.0,
                         "theta_no_tag_mean": rs_no_tag, "modal_count": 7},
            "null": {"theta_tag_p95": null95},
            "best_tag": {"layer": 2, "head": 0, "theta_tag": 55.0}}


@pytest.mark.parametrize("kw, want", [
    ({}, V.REPRODUCED),
    ({"layer": None}, V.NOT),                                     # no head satisfies the rule
    ({"rs_tag": 55.0}, V.NOT),                                    # not above the shuffle null
    ({"rs_tag": 56.0}, V.NOT),                                    # equal to it is not above
    ({"p": 0.2, "only": (12, 8)}, V.COMPATIBLE),                  # tag vs no-tag undecided
    ({"rs_no_tag": 79.0}, V.COMPATIBLE),                          # the re-splits disagree
    ({"no_tag": 90.0, "only": (4, 24), "p": 1e-4}, V.PARTLY),     # no-tag carries more
    ({"heads_with_sink": 0}, V.UNTESTABLE),
])
def test_carried_by_tag_rule_on_every_outcome(kw, want):
    s = summary(**kw)
    assert PV.carried_by_tag(s) == want
    assert PV.ours_text(s)                                        # every outcome has its line
    if kw.get("layer", 3) is None:
        assert "no head satisfies the rule" in PV.ours_text(s) and PV.interval_text(s) == "-"


def test_claim_rows_follow_the_verdict_schema():
    paper = {"truth_probes": {"models": {"A": [98.0, 50.0, 50.0], "B": [92.5, 56.5, 97.0]}},
             "sentiment_probes": {"models": {"A": [88.5, 84.0, 86.5]}}}
    s = summary()
    summ = {"m": {t: {"paper": s, "guard": summary(rs_tag=50.0)}
                  for t in ("cities", "sentiment", "cities_suffix")}}
    rows = PV.claim_rows(summ, paper, 5)
    assert [r["id"] for r in rows] == [c[0] for c in PV.CLAIMS]
    assert all(set(r) == set(V.COLUMNS) for r in rows)
    assert [r["verdict"] for r in rows] == [V.REPRODUCED, V.NOT, V.NOT, V.REPRODUCED, V.NOT]
    assert "92.5-98.0%" in rows[0]["paper"] and "[73.9, 85.0]" in rows[0]["interval"]
    assert "min_queries=5" in rows[1]["claim"]


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


def test_probe_task_is_deterministic_and_json_ready(planted_model):
    c = data.cities(24, 12)
    r1 = probes.probe_task(planted_model, c, also=(2,), task="cities", progress=False, n_null=20)
    r2 = probes.probe_task(planted_model, c, also=(2,), task="cities", progress=False, n_null=20)
    assert r1.min_queries == 5 and set(r1.by_guard) == {5, 1, 2}
    s1, s2 = json.dumps(r1.summary(), sort_keys=True), json.dumps(r2.summary(), sort_keys=True)
    assert s1 == s2
    s = r1.summary()
    assert set(s["by_guard"]) == {"1", "2", "5"} and s["paper"]["min_queries"] == 1
    for prot in ("paper", "guard"):
        m = s[prot]
        assert m["null"]["n"] == 20 and m["resplits"]["n"] == 10
        assert m["best_tag"]["layer"] < planted_model.n_layers
        if m["selected"]:
            assert 0 <= m["layer"] < planted_model.n_layers and 0 <= m["head"] < planted_model.n_heads
            for k in ("theta_tag", "theta_no_tag", "theta_activation", "logistic_activation"):
                # accuracies are k / 12 test prompts, in percent
                assert 0 <= m[k] <= 100 and m[k] * 12 / 100 == pytest.approx(round(m[k] * 12 / 100), abs=1e-3)
        else:
            assert m["layer"] is None and m["theta_tag"] is None and m["mcnemar"] is None


def test_country_from_end_counts_the_country_and_the_full_stop(planted_model):
    texts = ["The city of Paris is in France.", "The city of Paris is in France. Is this true? Answer:"]
    n = probes.country_from_end(planted_model, texts)
    tail = len(planted_model.encode([texts[1]]).tokens[0]) - len(planted_model.encode([texts[0]]).tokens[0])
    assert n[0] >= 2 and n[1] == n[0] + tail


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
    for task in ("cities", "sentiment", "cities_suffix"):
        assert r[task]["paper"]["min_queries"] == 1 and r[task]["guard"]["min_queries"] == 5
        assert {"resplits", "null", "mcnemar", "best_tag", "best_activation"} <= set(r[task]["paper"])
    assert [c["id"] for c in res["claims"]] == [c[0] for c in PV.CLAIMS]
    assert all(c["verdict"] in V.VERDICTS and c["rule"] for c in res["claims"])


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
