"""The release chapter: tag ablations, the random control, the swap, and the verdict rules.

- An ablation that removes nothing leaves the logits exactly as in the clean run; a mean
  ablation whose means are the prompt's own values is one of those.
- Removing z_tag of one head equals, by hand, that head's output minus z_tag (from
  ``ctr.definitions``) fed through W_O (a hook on the output projection of a copy of the run).
- The random control removes, at every token, exactly the norm the ablation removes (1e-6) and
  lies in a subspace of the stated dimension.
- Swapping values that are the same in both prompts changes nothing; the non-sink control
  picks the nearest non-sink tokens; pairs align token by token.
- Every rule returns each of its outcomes on fabricated numbers; the chapter runs in smoke mode.
"""
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctr import definitions as D
from ctr import extract, models
from ctr import verdicts as V
from ctr.chapters import release as R
from ctr.chapters import release_swap as RS
from ctr.chapters import release_verdicts as RV

TEXT = ["The cat sat. Then it slept, and the dog barked at it. The end.", "Short. Prompt, here."]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planted():
    return models.load("tiny-planted-llama")


def stats_for(S, H, Dh):
    """LayerStats with sinks S and no means (for the removal ablation)."""
    return R.LayerStats(S, torch.zeros(0, dtype=torch.long), torch.zeros(H, 0, Dh, dtype=torch.float64),
                        torch.zeros(H, 0, dtype=torch.long))


def clean_layer(m, batch, l):
    for rec in extract.layers(m, batch):
        if rec.layer == l:
            return rec.A.clone(), rec.V.clone(), rec.head_out.clone(), rec.window


def test_an_ablation_that_removes_nothing_gives_the_clean_logits_exactly(planted):
    m, l = planted, 1
    batch = m.encode(TEXT)
    clean = extract.run(m, batch, positions="last")
    A, V, O, w = clean_layer(m, batch, l)
    empty = stats_for(torch.zeros(2, m.n_heads, A.shape[-1], dtype=torch.bool), m.n_heads, m.head_dim)
    for ablation in ("zero", "mean"):
        for control in (False, True):
            f = R.make_edit(empty, [0, 1], batch.input_ids, ablation, "all", control,
                            torch.Generator().manual_seed(0))
            r = extract.run(m, batch, positions="last", edits={l: f})
            assert torch.equal(r.logits, clean.logits)
            assert torch.equal(torch.isnan(r.loss), torch.isnan(clean.loss))
            assert torch.equal(r.loss.nan_to_num(), clean.loss.nan_to_num())
    # a mean ablation over one prompt, where each (head, token) is a sink once: every mean is
    # that sink's own value, so nothing is removed
    one = m.encode(["The cat sat on the mat. Then it slept and the dog barked at it"])
    A1, V1, _, w = clean_layer(m, one, l)
    S = R.sink_mask(A1, one.lengths, w, 0.2, 2)
    b, h, t = torch.nonzero(R.select(S, "mid"), as_tuple=True)
    assert len(h) and len(set(zip(h.tolist(), one.input_ids[0, t].tolist()))) == len(h)
    acc = R._Accumulator(1, m.n_heads, A1.shape[-1], m.head_dim)
    acc.add([0], one.input_ids, S, V1)
    f = R.make_edit(acc.done(), [0], one.input_ids, "mean", "mid")
    r = extract.run(m, one, positions="last", edits={l: f})
    assert torch.equal(r.logits, extract.run(m, one, positions="last").logits)
    # the removal of the same sinks does change the output
    f = R.make_edit(acc.done(), [0], one.input_ids, "zero", "mid")
    assert not torch.equal(extract.run(m, one, positions="last", edits={l: f}).logits,
                           extract.run(m, one, positions="last").logits)


def test_removing_z_tag_of_one_head_is_its_output_minus_z_tag_through_W_O(planted):
    m, l, h, eps, mq = planted, 1, 2, 0.2, 2
    batch = m.encode(TEXT)
    A, V, O, w = clean_layer(m, batch, l)
    O_hand = O.clone()                                              # (B, T, H, D)
    S_all = torch.zeros(A.shape[0], m.n_heads, A.shape[-1], dtype=torch.bool)
    for b, n in enumerate(batch.lengths):                           # the definitions, per prompt
        S = D.sinks(D.alpha(A[b, :, :n, :n], w, mq), eps)           # (H, n)
        S_all[b, :, :n] = S
        O_hand[b, :n, h] -= D.z_tag(A[b, h, :n, :n], V[b, h, :n], S[h])
    assert S_all[:, h].sum() >= 2                                   # something is removed
    f = R.make_edit(stats_for(S_all, m.n_heads, m.head_dim), [0, 1], batch.input_ids, "zero",
                    "all", heads=[h])
    T = batch.input_ids.shape[1]
    pos = torch.arange(T).expand(2, T)
    edited = extract.run(m, batch, positions=pos, edits={l: f})
    # by hand: the hand-made head outputs go through W_O (a pre-hook on the output projection)
    o_proj = m.hf.model.layers[l].self_attn.o_proj
    hook = o_proj.register_forward_pre_hook(lambda mod, args: (O_hand.reshape(2, T, -1),))
    try:
        with torch.no_grad():
            want = m.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        hook.remove()
    clean = extract.run(m, batch, positions=pos)
    for b, n in enumerate(batch.lengths):
        assert torch.allclose(edited.logits[b, :n], want[b, :n], atol=1e-4, rtol=1e-5)
        assert not torch.allclose(edited.logits[b, :n], clean.logits[b, :n], atol=1e-3)


def test_random_control_removes_the_stated_norm_in_a_subspace_of_the_stated_dimension():
    g = torch.Generator().manual_seed(1)
    B, T, H, Dh = 3, 7, 4, 8
    O = torch.randn(B, T, H, Dh, generator=g)
    removed = torch.randn(B, T, H, Dh, generator=g, dtype=torch.float64)
    k = torch.tensor([[1, 2, 0, 3], [2, 2, 1, 1], [0, 0, 3, 1]])
    none = (k == 0).unsqueeze(1).expand(B, T, H)
    removed[none] = 0                      # a head without sinks removes nothing
    out = R.random_control(O, removed, k, torch.Generator().manual_seed(2))
    want = removed.norm(dim=-1)
    assert torch.allclose(out.norm(dim=-1), want, atol=1e-6, rtol=0)
    assert not out[none].any()
    for b in range(B):
        for h in range(H):
            rank = torch.linalg.matrix_rank(out[b, :, h]).item()
            assert rank == min(int(k[b, h]), T)
            # it is not the tag: the direction is drawn, not copied
            if k[b, h]:
                assert not torch.allclose(out[b, :, h], removed[b, :, h])


def test_sink_mask_matches_the_definitions_per_prompt_and_split():
    g = torch.Generator().manual_seed(0)
    A = torch.rand(2, 3, 6, 6, generator=g).tril()
    A[:, :, :, 0] += 3
    A[1, :, :, 4:] = 0
    A = A / A.sum(-1, keepdim=True)
    S = R.sink_mask(A, [6, 4], None, 0.2, 1)
    assert torch.equal(S[0], D.sinks(D.alpha(A[0], None, 1), 0.2))
    assert torch.equal(S[1, :, :4], D.sinks(D.alpha(A[1, :, :4, :4], None, 1), 0.2))
    assert not S[1, :, 4:].any()
    assert R.select(S, "bos")[..., 1:].sum() == 0 and R.select(S, "mid")[..., 0].sum() == 0
    assert torch.equal(R.select(S, "bos") | R.select(S, "mid"), S)
    assert R.even_layers(30, 6) == [0, 6, 12, 17, 23, 29] and R.even_layers(3, None) == [0, 1, 2]


def test_swap_of_shared_values_changes_nothing_and_controls_are_the_nearest_non_sinks(planted):
    S = torch.tensor([True, False, False, True, True, False])
    assert torch.nonzero(RS.control_positions(S, 6)).flatten().tolist() == [1, 2, 5]
    m, l = planted, 1
    batch = m.encode(TEXT)
    A, V, O, w = clean_layer(m, batch, l)
    clean = extract.run(m, batch, positions="last")
    C = torch.ones(2, m.n_heads, A.shape[-1], dtype=torch.bool)
    r = extract.run(m, batch, positions="last", edits={l: RS.swap_edit(V, C)})
    assert torch.allclose(r.logits, clean.logits, atol=1e-5)      # donor = recipient
    r = extract.run(m, batch, positions="last", edits={l: RS.swap_edit(V * 0, C & False)})
    assert torch.equal(r.logits, clean.logits)                    # no cell swapped


def test_pairs_align_token_by_token(planted):
    for p in (RS.sentiment_pairs(planted, 3), RS.city_pairs(planted, 3)):
        assert len(p) == 3 and p.labels == [1, 0] * 3
        for i in range(3):
            a, b = planted.ids(p.texts[2 * i]), planted.ids(p.texts[2 * i + 1])
            assert len(a) == len(b) == p.lengths[i] and a[-1] == b[-1]
            k = p.differ_from[i]
            assert a[:k] == b[:k] and a[k] != b[k]
    c = RS.city_pairs(planted, 2)
    x, y = c.texts[0].split("\n")[-1], c.texts[1].split("\n")[-1]
    assert x.split(" is in ")[0] == y.split(" is in ")[0] and x != y     # same city, other country


# --- rules ------------------------------------------------------------------------------------------

def test_above_zero_and_rule_hurts_more_return_every_outcome():
    assert RV.above_zero(0.01, 0.2) == V.REPRODUCED
    assert RV.above_zero(-0.2, -0.01) == V.NOT
    assert RV.above_zero(0.0, 0.0) == V.NOT                # exactly no effect
    assert RV.above_zero(-0.1, 0.1) == V.COMPATIBLE
    assert RV.above_zero(float("nan"), 0.1) == V.UNTESTABLE
    with pytest.raises(ValueError):
        RV.above_zero(0.2, 0.1)
    assert RV.rule_hurts_more(0.01, 0.2) == V.REPRODUCED
    assert RV.rule_hurts_more(-0.3, -0.1) == V.NOT
    assert RV.rule_hurts_more(-0.1, 0.1) == V.COMPATIBLE
    assert RV.rule_hurts_more(0.01, 0.2, removed=False) == V.UNTESTABLE


def test_rule_swap_returns_every_outcome():
    yes, no, maybe = (0.1, 0.3), (-0.2, -0.1), (-0.1, 0.2)
    assert RV.rule_swap(0.5, yes, yes) == V.REPRODUCED
    assert RV.rule_swap(0.5, no, no) == V.NOT
    assert RV.rule_swap(0.5, yes, maybe) == V.COMPATIBLE
    assert RV.rule_swap(0.5, yes, no) == V.PARTLY
    assert RV.rule_swap(-0.1, yes, yes) == V.UNTESTABLE      # the model does not tell the labels apart
    assert RV.rule_swap(float("nan"), yes, yes) == V.UNTESTABLE
    assert RV.rule_swap_answer(yes, yes) == V.REPRODUCED
    assert RV.rule_swap_answer(no, no) == V.NOT
    assert RV.rule_swap_answer(maybe, yes) == V.COMPATIBLE
    assert RV.rule_swap_answer(no, yes) == V.PARTLY
    assert RV.rule_swap_answer((math.nan, math.nan), (math.nan, math.nan)) == V.UNTESTABLE


def test_swap_fractions_on_fabricated_runs():
    """Two pairs, both directions: the sink swap moves the recipients halfway to the donor,
    the control not at all; label and answer measures agree when LD follows the label."""
    ld = np.array([2.0, -2.0, 1.0, -1.0])
    directed = [(0, 1), (1, 0), (2, 3), (3, 2)]
    s = RS.Swap("t", "m", 0, 0, "", 5, ld, directed)
    half = np.array([ld[r] + 0.5 * (ld[d] - ld[r]) for r, d in directed])
    s.swapped = {"head_sink": half, "head_ctrl": ld[[0, 1, 2, 3]].copy()}
    iv = RV.swap_intervals(s, n_boot=20)
    assert iv["accuracy"] == 1.0 and iv["gap"][0] == pytest.approx(3.0)
    for by in ("label", "answer"):
        assert iv[by]["head_sink"][0] == pytest.approx(0.5)
        assert iv[by]["head_ctrl"][0] == pytest.approx(0.0)
        assert iv[by]["head_diff"][0] == pytest.approx(0.5)
    rows = RV.swap_claims("m", s, iv)
    assert {r["id"] for r in rows} == {"swap_t_head", "swap_t_layer", "swap_t_head_answer",
                                       "swap_t_layer_answer"}
    assert all(r["verdict"] in V.VERDICTS for r in rows)


def test_the_chapter_runs_in_smoke_mode(tmp_path):
    import nbformat
    import papermill

    env = os.environ.copy()
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]
    try:
        papermill.execute_notebook(str(ROOT / "book" / "release.ipynb"), str(tmp_path / "release.ipynb"),
                                   parameters={"smoke": True, "models": ["tiny-planted-llama"],
                                               "results_dir": str(tmp_path)},
                                   kernel_name="python3", cwd=str(ROOT / "book"), progress_bar=False)
    finally:
        os.environ.clear()
        os.environ.update(env)
    from ctr import results
    res = results.load("release", tmp_path)
    ids = {r["id"] for r in res["claims"]}
    assert {"tags_lm_bos", "tags_lm_mid", "tags_lm_specific", "swap_sentiment_head",
            "swap_cities_layer_answer"} <= ids
    assert all(r["verdict"] in V.VERDICTS for r in res["claims"])
    nb = nbformat.read(str(tmp_path / "release.ipynb"), as_version=4)
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))


def test_first_token_spread_is_taken_within_prompts_that_share_the_first_token():
    H, T, Dh = 2, 3, 4
    V = torch.randn(3, H, T, Dh, generator=torch.Generator().manual_seed(0))
    V[1, :, 0] = V[0, :, 0]                         # prompts 0 and 1 start with the same token
    ids = torch.tensor([[5, 1, 2], [5, 3, 4], [7, 1, 1]])
    acc = R._Accumulator(3, H, T, Dh)
    acc.add([0, 1, 2], ids, torch.zeros(3, H, T, dtype=torch.bool), V)
    assert acc.done().bos_spread == 0.0               # different first tokens are not compared
    V[1, 0, 0] += 1.0
    acc = R._Accumulator(3, H, T, Dh)
    acc.add([0, 1, 2], ids, torch.zeros(3, H, T, dtype=torch.bool), V)
    assert acc.done().bos_spread > 0.1


def test_swapping_only_cells_before_the_first_difference_is_a_no_op(planted):
    """Why swap() does not run such pairs: before the difference both prompts are the same
    tokens, so their values are the same (causality)."""
    p = RS.sentiment_pairs(planted, 1)
    m, l = planted, 1
    V_b = clean_layer(m, m.encode([p.texts[1]]), l)[1]
    batch = m.encode([p.texts[0]])
    C = torch.zeros(1, m.n_heads, batch.input_ids.shape[1], dtype=torch.bool)
    C[..., :p.differ_from[0]] = True
    clean = extract.run(m, batch, positions="last")
    r = extract.run(m, batch, positions="last", edits={l: RS.swap_edit(V_b, C)})
    assert torch.allclose(r.logits, clean.logits, atol=1e-5)
    C[..., p.differ_from[0]:] = True                  # one more position and it does change
    r = extract.run(m, batch, positions="last", edits={l: RS.swap_edit(V_b, C)})
    assert not torch.allclose(r.logits, clean.logits, atol=1e-4)


def test_ablate_adds_the_layers_with_the_largest_tags_and_removes_their_measured_share(planted):
    texts = ["The cat sat. The dog ran. It rained all day.", "One. Two, three. Four and five."]
    a = R.ablate(planted, texts, max_tokens=40, min_queries=2, layers=[], top=1,
                 conditions=("zero_bos",), progress=False)
    share = np.array(a.tag_share)                                     # (L, 2)
    l = int(np.argmax(share.sum(1)))
    assert a.layers == [l] and share[l].sum() > 0
    # the ablation run removes what the clean pass measured, and the control the same norm
    assert a.removed_share["zero_bos"][0] == pytest.approx(share[l, 0], rel=1e-4)
    assert a.removed_share["zero_bos_ctrl"][0] == pytest.approx(share[l, 0], rel=1e-4)
    assert a.delta["zero_bos"].shape == (1, 2) and np.isfinite(a.delta["zero_bos"]).all()
