"""Sink taxonomy: counting on hand-built attention; what kind of token a sink is (case kept,
whitespace apart); every outcome of the base_sinks rule (RULES.md) on fabricated numbers and on
planted sink instances run through the chapter's own measurement (``layer_instances``,
``base_sinks``), including "partly", the degenerate interval replaced by Wilson and the floors;
the reasoning rule; the notebook's shape."""
import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from ctr import book, results, rules, stats
from ctr import verdicts as V
from ctr.chapters import taxonomy
from ctr.chapters.taxonomy import verdicts as TV


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
    Vv = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    O = A @ Vv
    rows = []
    for p in range(2):
        new, n, ve = taxonomy.layer_instances(A, Vv, O, None, toks[p], 0.2, 2, prompt=p)
        rows += new
        assert n.tolist() == [1, 2]
    inst = pd.DataFrame(rows, columns=taxonomy.COLUMNS)
    r = taxonomy.Result("hand", inst, np.array([[[1, 2]], [[1, 2]]]), np.zeros((2, 1, 2)),
                        [None], 0.0, 8)
    t = taxonomy.table(r).set_index("token")
    # hand count: first token 4 times (h0 and h1, both prompts); "the" once; "." once
    assert t.loc["'<s>' (first token)", "frequency"] == 4
    assert t.loc["'the'", "frequency"] == 1
    assert t.loc["'.'", "frequency"] == 1
    assert t.frequency.sum() == 6
    # mean VE of a token = mean over the heads in which it is a sink
    assert t.loc["'the'", "mean VE"] == pytest.approx(inst[inst.token == "the"].ve.iloc[0])
    first = inst[inst.position == 0].ve
    assert t.loc["'<s>' (first token)", "mean VE"] == pytest.approx(first.mean())
    k = TV.kinds(r)
    assert k["first token"] == pytest.approx(4 / 6)
    assert k["function word"] == pytest.approx(1 / 6)
    assert k["punctuation"] == pytest.approx(1 / 6)


def test_sliding_window_keys_are_scored_over_visible_queries():
    # window 2: key 0 is seen by queries 0 and 1 only; it takes 60% of query 1 -> alpha 0.8
    A = causal([[1.0], [0.6, 0.4], [0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5],
                [0.0, 0.0, 0.0, 0.5, 0.5]]).unsqueeze(0)
    Vv = torch.randn(1, 5, 2)
    rows, n, _ = taxonomy.layer_instances(A, Vv, A @ Vv, 2, list("abcde"), 0.6, 1)
    assert 0 in [r[3] for r in rows]                 # alpha_0 = (1.0 + 0.6) / 2 = 0.8
    rows_full, _, _ = taxonomy.layer_instances(A, Vv, A @ Vv, None, list("abcde"), 0.6, 1)
    assert 0 not in [r[3] for r in rows_full]        # diluted over 5 queries: 0.32

# QK-norm detection on tiny Qwen3/Gemma3 (yes) and Llama/Qwen2 (no): tests/test_models.py


# --- what kind of token a sink is -----------------------------------------------------------------

def test_kinds_keep_case_like_the_paper():
    k = TV.kind
    assert k("The", 5) == k(" the", 5) == k("Ġthe", 5) == k("ĠI", 5) == "function word"
    assert k("THE", 5) == "content / other"            # the paper's distilled-model sink
    assert k("Doctor", 5) == k("'s", 5) == "content / other"
    assert k("the", 0) == "first token"


def test_punctuation_is_the_unicode_punctuation_classes_and_whitespace_does_not_count():
    k = TV.kind
    assert k(",”", 5) == k(" .", 5) == k("...", 5) == k("—", 5) == k("Ġ”", 5) == "punctuation"
    assert k("$", 5) == k("<", 5) == "content / other"    # symbols are not punctuation
    assert k(" ", 5) == k("\n", 5) == k("Ġ", 5) == k("▁", 5) == "whitespace"
    assert "whitespace" not in TV.COUNTED
    text = TV.word_list()
    assert "Po" in text and "the, a, an" in text and "whitespace token does not count" in text


def test_paper_share_on_its_own_table():
    rows = results.paper()["taxonomy"]["tables"]["Qwen2.5-14B"]
    # by hand: '.', ',', ' the', ' I', ' ”', ' to', ',”' over those plus ' began', ' Stark'
    hit = 5323 + 3807 + 3333 + 3283 + 3203 + 2603 + 2253
    assert TV.paper_base_share(rows) == pytest.approx(hit / (hit + 2592 + 2512))


# --- planted sink instances through the chapter's measurement --------------------------------------

def planted(sinks_per_prompt, T=40, eps=0.2, min_queries=4, seed=0):
    """One head per prompt whose queries put 0.8 of their attention on the planted sink
    positions 1..k (split evenly among those they can see), 0.1 on token 0 and 0.1 on
    themselves: positions 1..k are sinks with the given token strings; token 0 and the rest
    are not (alpha_0 = 0.12). Returns the chapter's Result from ``layer_instances``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p, toks in enumerate(sinks_per_prompt):
        k = len(toks)
        tokens = ["<s>", *toks] + ["x"] * (T - 1 - k)
        A = torch.zeros(T, T)
        for i in range(T):
            seen = [s for s in range(1, k + 1) if s <= i]
            A[i, 0] += 0.1 if seen else 0.9
            for s in seen:
                A[i, s] += 0.8 / len(seen)
            A[i, i] += 0.1
        A = (A / A.sum(-1, keepdim=True))[None]
        Vv = torch.randn(1, T, 4, generator=g)
        new, _, _ = taxonomy.layer_instances(A, Vv, A @ Vv, None, tokens, eps, min_queries, p)
        assert sorted(r[3] for r in new) == list(range(1, k + 1))   # exactly the planted sinks
        rows += new
    P = len(sinks_per_prompt)
    return taxonomy.Result("planted", pd.DataFrame(rows, columns=taxonomy.COLUMNS),
                           np.ones((P, 1, 1)), np.zeros((P, 1, 1)), [None], 0.0, P * T)


def judged(sinks_per_prompt, **kw):
    b = TV.base_sinks(planted(sinks_per_prompt, **kw), n_boot=400)
    return b, TV.rule_base_sinks(b)


def test_base_sinks_reproduced_on_planted_punctuation_and_function_word_sinks():
    b, v = judged([[".", ",", "Doctor"]] * 5 + [[".", ",", " the"]] * 20)
    assert b["instances"] == 75 and b["share"] == pytest.approx(70 / 75)
    assert b["lo"] > 0.5 and not b["wilson"]
    assert b["n_types"] == 4 and b["top_share"] == pytest.approx(25 / 75)
    assert v == V.REPRODUCED


def test_base_sinks_partly_when_the_share_rests_on_two_token_types():
    b, v = judged([[" the", "Doctor"]] * 5 + [[" the", " the"]] * 20)
    assert b["instances"] == 50 and b["lo"] > 0.5
    assert [t for t, _, _ in b["types"]] == [" the", "Doctor"]
    assert b["top_type"] == " the" and b["top_share"] == pytest.approx(0.9)
    assert v == V.PARTLY


def test_base_sinks_not_reproduced_on_planted_content_sinks():
    b, v = judged([["Doctor", "IMAGE", "."]] * 5 + [["Doctor", "IMAGE", "Stark"]] * 20)
    assert b["share"] == pytest.approx(5 / 75) and b["hi"] < 0.5
    assert v == V.NOT


def test_base_sinks_compatible_when_the_interval_holds_one_half():
    b, v = judged([[".", ","]] * 13 + [["Doctor", "IMAGE"]] * 12)
    assert b["lo"] < 0.5 < b["hi"]
    assert v == V.COMPATIBLE


def test_a_bare_whitespace_sink_does_not_count_on_planted_sinks():
    b, _ = judged([[" ", "."]] * 25)
    assert b["share"] == pytest.approx(0.5)
    assert ("\u0020", 0.5, "whitespace") in b["types"]


def test_base_sinks_degenerate_interval_is_replaced_by_wilson_and_flagged():
    b, v = judged([[".", ",", " the"]] * 25)
    assert b["bootstrap"] == [1.0, 1.0]                  # the bootstrap cannot move off 1
    lo, hi = stats.wilson(25, 25)                        # n = prompts with an instance, k = n
    assert b["wilson"] and (b["lo"], b["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert b["lo"] < 1.0 and v == V.REPRODUCED
    rows = TV.claims({"m": b}, {}, results.paper(), 0.2, 32)
    assert "degenerate" in rows[0]["note"] and "n = 25 prompts" in rows[0]["note"]


def test_base_sinks_not_testable_with_fewer_than_30_instances():
    b, v = judged([["."]] * 25)                          # 25 instances from 25 prompts
    assert b["instances"] == 25 and b["prompts_with_any"] >= stats.MIN_UNITS
    assert v == V.UNTESTABLE


def test_base_sinks_not_testable_on_fewer_than_20_contributing_prompts():
    b, v = judged([[".", ",", " the", "of"]] * 10)       # 40 instances, 10 prompts
    assert b["instances"] == 40 and b["prompts_with_any"] == 10
    assert v == V.UNTESTABLE


@pytest.mark.parametrize("kw, want", [
    ({}, V.REPRODUCED),
    ({"n_types": 2}, V.PARTLY),
    ({"n_types": 1}, V.PARTLY),
    ({"lo": 0.2, "hi": 0.45}, V.NOT),
    ({"lo": 0.4, "hi": 0.6}, V.COMPATIBLE),
    ({"lo": 0.5, "hi": 0.7}, V.COMPATIBLE),              # "CI > 0.5": the whole interval
    ({"instances": 29}, V.UNTESTABLE),
    ({"prompts_with_any": 19}, V.UNTESTABLE),
])
def test_base_sinks_rule_on_every_outcome_from_fabricated_numbers(kw, want):
    b = {"instances": 100, "prompts_with_any": 40, "lo": 0.6, "hi": 0.8, "n_types": 5, **kw}
    assert TV.rule_base_sinks(b) == want


def test_base_sinks_claim_row_carries_the_rule_text_and_settings():
    b, _ = judged([[".", ",", "Doctor"]] * 5 + [[".", ",", " the"]] * 20)
    rows = TV.claims({"m": b}, {}, results.paper(), 0.2, 32)
    assert [r["id"] for r in rows] == ["base_sinks", "reasoning"]
    assert rows[0]["rule"] == rules.text("base_sinks") and rows[1]["rule"] == rules.text("reasoning")
    assert rows[0]["settings"] == "eps 0.2, min_queries 32" and "note" not in rows[0]
    assert rows[1]["verdict"] == V.UNTESTABLE
    assert "4 token types" in rows[0]["ours"] and "82%" in rows[0]["paper"]
    blocks = TV.verdict_blocks(rows)
    assert len(blocks) == 2 and "  - m: **reproduced**" in blocks[0].data
    assert "  - no pair: **not testable here**" in blocks[1].data


def test_base_share_counts_only_non_first_instances_per_prompt():
    inst = pd.DataFrame([(0, 0, 0, 0, "<s>", 0.9, 0.3), (0, 0, 1, 4, ".", 0.5, 0.3),
                         (1, 0, 0, 0, "<s>", 0.9, 0.3), (1, 0, 1, 2, "Doctor", 0.5, 0.3),
                         (1, 0, 1, 3, "the", 0.5, 0.3)], columns=taxonomy.COLUMNS)
    r = taxonomy.Result("x", inst, np.ones((2, 1, 2)), np.zeros((2, 1, 2)), [None], 0.0, 10)
    b = TV.base_sinks(r, n_boot=200)
    assert b["instances"] == 3 and b["share"] == pytest.approx(2 / 3)
    assert TV.kinds(r, first=False)["content / other"] == pytest.approx(1 / 3)


# --- the reasoning rule ------------------------------------------------------------------------------

def test_reasoning_rule_every_outcome():
    assert TV.rule_reasoning((0.1, 0.3), (0.01, 0.05)) == V.REPRODUCED
    assert TV.rule_reasoning((-0.1, 0.3), (0.01, 0.05)) == V.COMPATIBLE
    assert TV.rule_reasoning((0.1, 0.3), (-0.05, -0.01)) == V.PARTLY
    assert TV.rule_reasoning((-0.3, -0.1), (-0.05, -0.01)) == V.NOT


def test_differences_over_the_same_prompts():
    def res(n, ve):
        return taxonomy.Result("m", pd.DataFrame(columns=taxonomy.COLUMNS), np.asarray(n, float),
                               np.asarray(ve, float), [None], 0.0, 1)
    base = res([[[1, 1]], [[1, 1]], [[1, 1]]], [[[0.2, 0.2]]] * 3)
    other = res([[[2, 2]], [[2, 2]], [[2, 2]]], [[[0.9, 0.2]]] * 3)
    d = taxonomy.differences(base, other, high_ve=0.5, n_boot=100)
    assert d["sinks"][0] == pytest.approx(1.0) and d["high_ve"][0] == pytest.approx(0.5)
    rows = TV.claims({}, {"b vs r": d}, results.paper(), 0.2, 32)
    assert rows[0]["verdict"] == V.REPRODUCED and rows[0]["id"] == "reasoning"


def test_kinds_figure_draws_every_model():
    import matplotlib.pyplot as plt

    from ctr.chapters.taxonomy import figures as taxonomy_figures
    r = planted([[".", ",", " the"]] * 3)
    fig = taxonomy_figures.kinds_bars({"a": r, "b": r})
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 2 * len(TV.KINDS)
    plt.close(fig)


def test_notebook_defines_no_function_and_has_device_and_dtype():
    nb = nbformat.read(book.ROOT / "book" / "taxonomy.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "def " not in code and "device_map" not in code
    params = nb.cells[1].source.splitlines()
    assert params[1].startswith('device = "cpu"') and params[2].startswith('dtype = "float32"')
    hidden = {"hide-input", "remove-input", "remove-cell", "parameters"}
    shown = [c for c in nb.cells if c.cell_type == "code"
             and not hidden & set(c.metadata.get("tags", []))]
    assert 1 <= len(shown) <= 3
    assert all(len(line) <= 79 for c in shown for line in c.source.splitlines())
    figs = [c for c in nb.cells if c.metadata.get("mystnb", {}).get("figure")]
    assert [c.metadata["mystnb"]["figure"]["name"] for c in figs] == ["fig-taxonomy-kinds"]


def test_stats_table_prints_counts_as_integers():
    r = planted([[".", ",", " the"]] * 3)
    t = taxonomy.stats_table({"a": r})
    assert t.loc["sink instances", "a"] == "9" and t.loc["sinks per head", "a"] == "1.00"
    assert t.loc["tokens read", "a"] == "120"
