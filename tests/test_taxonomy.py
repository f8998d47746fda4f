"""Sink taxonomy counting on hand-built attention."""
import numpy as np
import pandas as pd
import pytest
import torch

from ctr import results
from ctr import verdicts as V
from ctr.chapters import taxonomy


def causal(rows):
    T = len(rows)
    A = torch.zeros(T, T)
    for i, r in enumerate(rows):
        A[i, :len(r)] = torch.tensor(r)
    return A


def test_taxonomy_counts_a_hand_built_set():
    # Two prompts, one layer, two heads, T = 4, tokens chosen by hand. With min_queries=2 the
    # last key can never be a sink; eps = 0.2.
    toks = [["<s>", "the", ".", "cat"], ["<s>", ".", "dog", "."]]
    # head 0 always sinks on the first token; head 1 on the token at position 1
    h0 = causal([[1.0], [0.9, 0.1], [0.8, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    h1 = causal([[1.0], [0.5, 0.5], [0.1, 0.8, 0.1], [0.1, 0.8, 0.05, 0.05]])
    # alpha: h0 -> [0.85, 0.1, 0.1, -]; h1 -> [0.425, 0.7, 0.075, -]
    A = torch.stack([h0, h1])
    V = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    O = A @ V
    rows = []
    for p in range(2):
        new, n, ve = taxonomy.layer_instances(A, V, O, None, toks[p], 0.2, 2, prompt=p)
        rows += new
        assert n.tolist() == [1, 2]
    inst = pd.DataFrame(rows, columns=["prompt", "layer", "head", "position", "token", "alpha", "ve"])
    r = taxonomy.Result("hand", inst, np.array([[[1, 2]], [[1, 2]]]), np.zeros((2, 1, 2)), [None],
                        0.0, 8)
    t = taxonomy.table(r).set_index("token")
    # hand count: first token 4 times (h0 and h1, both prompts); "the" once; "." once
    assert t.loc["'<s>' (first token)", "frequency"] == 4
    assert t.loc["'the'", "frequency"] == 1
    assert t.loc["'.'", "frequency"] == 1
    assert t.frequency.sum() == 6
    # mean VE of a token = mean over the heads in which it is a sink
    assert t.loc["'the'", "mean_ve"] == pytest.approx(inst[inst.token == "the"].ve.iloc[0])
    first = inst[inst.position == 0].ve
    assert t.loc["'<s>' (first token)", "mean_ve"] == pytest.approx(first.mean())
    k = taxonomy.kinds(r)
    assert k["first token"] == pytest.approx(4 / 6)
    assert k["function word"] == pytest.approx(1 / 6)
    assert k["punctuation / space"] == pytest.approx(1 / 6)


def test_sliding_window_keys_are_scored_over_visible_queries():
    # window 2: key 0 is seen by queries 0 and 1 only; it takes 60% of query 1 -> alpha 0.8
    A = causal([[1.0], [0.6, 0.4], [0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.5, 0.5]])
    A = A.unsqueeze(0)
    V = torch.randn(1, 5, 2)
    rows, n, _ = taxonomy.layer_instances(A, V, A @ V, 2, list("abcde"), 0.6, 1)
    assert 0 in [r[3] for r in rows]                 # alpha_0 = (1.0 + 0.6) / 2 = 0.8
    rows_full, _, _ = taxonomy.layer_instances(A, V, A @ V, None, list("abcde"), 0.6, 1)
    assert 0 not in [r[3] for r in rows_full]        # diluted over 5 queries: 0.32

# QK-norm detection on tiny Qwen3/Gemma3 (yes) and Llama/Qwen2 (no): tests/test_models.py


# --- case-sensitive kinds, the non-first share, and every outcome of the rules -------------------

def test_kinds_are_case_sensitive_like_the_paper():
    k = taxonomy.kind
    assert k("The", 5) == k(" the", 5) == k("Ġthe", 5) == k("ĠI", 5) == "function word"
    assert k("THE", 5) == "content / other"            # the paper's distilled-model sink
    assert k(",”", 5) == k(" ", 5) == "punctuation / space"
    assert k("the", 0) == "first token"


def test_paper_share_on_its_own_table():
    rows = results.paper()["taxonomy"]["tables"]["Qwen2.5-14B"]
    # by hand: '.', ',', ' the', ' I', ' ”', ' to', ',”' over those plus ' began', ' Stark'
    hit = 5323 + 3807 + 3333 + 3283 + 3203 + 2603 + 2253
    assert taxonomy.paper_base_share(rows) == pytest.approx(hit / (hit + 2592 + 2512))


def test_base_share_counts_only_non_first_instances_per_prompt():
    inst = pd.DataFrame([(0, 0, 0, 0, "<s>", 0.9, 0.3), (0, 0, 1, 4, ".", 0.5, 0.3),
                         (1, 0, 0, 0, "<s>", 0.9, 0.3), (1, 0, 1, 2, "Doctor", 0.5, 0.3),
                         (1, 0, 1, 3, "the", 0.5, 0.3)],
                        columns=["prompt", "layer", "head", "position", "token", "alpha", "ve"])
    r = taxonomy.Result("x", inst, np.ones((2, 1, 2)), np.zeros((2, 1, 2)), [None], 0.0, 10)
    b = taxonomy.base_share(r, n_boot=200)
    assert b["instances"] == 3 and b["share"] == pytest.approx(2 / 3)
    assert taxonomy.kinds(r, first=False)["content / other"] == pytest.approx(1 / 3)


def test_rules_every_outcome():
    assert taxonomy.rule_base_sinks(100, 0.6, 0.8) == V.REPRODUCED
    assert taxonomy.rule_base_sinks(100, 0.4, 0.6) == V.COMPATIBLE
    assert taxonomy.rule_base_sinks(100, 0.1, 0.3) == V.NOT          # content sinks in a base model
    assert taxonomy.rule_base_sinks(10, 0.6, 0.8) == V.UNTESTABLE
    assert taxonomy.rule_reasoning((0.1, 0.3), (0.01, 0.05)) == V.REPRODUCED
    assert taxonomy.rule_reasoning((-0.1, 0.3), (0.01, 0.05)) == V.COMPATIBLE
    assert taxonomy.rule_reasoning((0.1, 0.3), (-0.05, -0.01)) == V.PARTLY
    assert taxonomy.rule_reasoning((-0.3, -0.1), (-0.05, -0.01)) == V.NOT


def test_differences_over_the_same_prompts():
    def res(n, ve):
        return taxonomy.Result("m", pd.DataFrame(), np.asarray(n, float), np.asarray(ve, float),
                               [None], 0.0, 1)
    base = res([[[1, 1]], [[1, 1]], [[1, 1]]], [[[0.2, 0.2]]] * 3)
    other = res([[[2, 2]], [[2, 2]], [[2, 2]]], [[[0.9, 0.2]]] * 3)
    d = taxonomy.differences(base, other, high_ve=0.5, n_boot=100)
    assert d["sinks"][0] == pytest.approx(1.0) and d["high_ve"][0] == pytest.approx(0.5)
    rows = taxonomy.claims({}, {"b vs r": d}, results.paper(), 0.5)
    assert rows[0]["verdict"] == V.REPRODUCED
