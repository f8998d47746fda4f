"""The release chapter: tag ablations, the residual-space control, the swap and its no-op
detector, and the ordered verdict rules of RULES.md ("Release, tested").

- An ablation that removes nothing leaves the logits exactly as in the clean run; removing
  z_tag of one head equals, by hand, that head's output minus z_tag fed through W_O.
- The control removes, token by token, the norm the ablation removes in the residual stream
  (after W_O and Gemma-3's post-attention scale), to 1e-6, along a fresh direction per token.
- The first-token mean-ablation replaces each prompt's tag by the leave-one-out mean.
- The swap's no-op detector reads the values: a pair whose sinks precede the difference is a
  no-op, one whose sink is at the difference is not, and equal values after the difference
  count as equal.
- Every outcome of every rule: on fabricated numbers, and from the chapter's own measurement
  code on one-layer models with planted weights (``planted_bos``, ``planted_swap``).
"""
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

from ctr import definitions as D
from ctr import extract, models, rules, tiny
from ctr import verdicts as V
from ctr.chapters import release as R
from ctr.chapters.release import figures as RF
from ctr.chapters.release import means as RM
from ctr.chapters.release import swap as RS
from ctr.chapters.release import verdicts as RV

TEXT = ["The cat sat. Then it slept, and the dog barked at it. The end.", "Short. Prompt, here."]
ROOT = Path(__file__).resolve().parents[1]
torch.set_grad_enabled(False)


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
            return rec


def layer_stats(m, batch, rec, eps=0.2, mq=2):
    """The clean pass's LayerStats of one layer, for the prompts of ``batch``."""
    S = R.sink_mask(rec.A, rec.lengths, rec.window, eps, mq)
    acc = R._Accumulator(len(rec.lengths), m.n_heads, rec.A.shape[-1], m.head_dim)
    acc.add(list(range(len(rec.lengths))), batch.input_ids, S, rec.V, rec.A, rec.lengths)
    return acc.done()


# --- one-layer models with planted weights ----------------------------------------------------------

def _one_layer(seed=0):
    cfg = tiny.config("llama", layers=1)
    cfg.num_key_value_heads = 4
    cfg.attention_bias = True
    torch.manual_seed(seed)
    m = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    for p in m.parameters():
        p.data.zero_()
    m.model.norm.weight.data.fill_(1.0)
    m.model.layers[0].input_layernorm.weight.data.fill_(1.0)
    m.model.layers[0].post_attention_layernorm.weight.data.fill_(1.0)
    return m, tiny.tokenizer()


def planted_bos(tag=4.0, letter=0.0, other=0.0, back=4.0, content_query=True):
    """Texts of 'a' and 'b'. Head 0 attends to <bos> from every 'a' (``content_query``; else
    from every token alike, so its first-token tag is the same in every prompt); <bos>'s value
    lies along value dim 0, which W_O writes to residual dim 10 (value dims 1-7 to dims 11-17).
    The logit of 'b' reads dim 10 (``tag``: its logit at A = 1), the 'a' indicator (``letter``)
    and dims 11-17 (``other``); 'a' follows 'b' with logit ``back``. Every token has a large constant
    coordinate, so the final norm hardly depends on the tag."""
    m, tok = _one_layer()
    bos, a, b = (tok.convert_tokens_to_ids(x) for x in ("<bos>", "a", "b"))
    with torch.no_grad():
        E = m.model.embed_tokens.weight
        E[:, 5], E[:, 3] = 100.0, 100.0                      # after the input norm: 4 and 4
        for t, d in ((bos, 0), (a, 1), (b, 2)):
            E[t, 3], E[t, d] = 0.0, 100.0
        at = m.model.layers[0].self_attn
        at.k_proj.weight[3, 0] = 1.0                         # slowest RoPE pair: reads <bos>
        if content_query:
            at.q_proj.weight[3, 1] = 2.0
        else:
            at.q_proj.bias[3] = 8.0
        at.v_proj.weight[0, 0] = 1.0
        for j in range(8):
            at.o_proj.weight[10 + j, j] = 2.5
        W = m.lm_head.weight
        W[:, 5] = -5.0                                       # every other token far below
        W[a, 5] = W[b, 5] = 0.0
        W[a, 2] = back / 4                                   # the indicator is 4 after the norm
        W[b, 10] = tag / 0.4                                 # dim 10 is 0.4 A after the norm
        W[b, 1] = letter / 4
        W[b, 11:18] = other / 0.4
    return models.wrap("planted-bos", m, tok)


def ab_texts(n=24, length=40, p_alt=1.0, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c = rng.choice("ab")
        s = [c]
        for _ in range(length - 1):
            c = ("b" if c == "a" else "a") if rng.random() < p_alt else c
            s.append(c)
        out.append("".join(s))
    return out


def bos_verdict(p_alt=1.0, **kw):
    m = planted_bos(**kw)
    a = R.ablate(m, ab_texts(p_alt=p_alt), max_tokens=60, min_queries=4, layers=[0],
                 conditions=("mean_bos",), progress=False)
    iv = RV.ablation_intervals(a)
    row = RV.ablation_claims("planted", a, iv)[0]
    assert row["id"] == "tags_lm_bos"
    return row, iv["mean_bos"]


def planted_swap(head0=1.0, head1=0.0):
    """Prompts "<bos> f f M f ... f :" with M = 'P' (label 1) or 'N' (label 0). Heads 0 and 1
    attend to M from every later token; its value is +1 ('P') or -1 ('N') along value dim 0;
    W_O writes head 0's to residual dim 10 and head 1's to dim 11; the answer '1' (vs '0')
    reads them with weights ``head0`` and ``head1``."""
    m, tok = _one_layer()
    P, N, one, zero = (tok.convert_tokens_to_ids(x) for x in ("P", "N", "1", "0"))
    with torch.no_grad():
        E = m.model.embed_tokens.weight
        E[:, 5], E[:, 3] = 100.0, 100.0
        E[P, 3], E[P, 1] = 0.0, 100.0
        E[N, 3], E[N, 2] = 0.0, 100.0
        at = m.model.layers[0].self_attn
        for h in (0, 1):
            at.k_proj.weight[8 * h + 3, 1] = at.k_proj.weight[8 * h + 3, 2] = 1.0
            at.q_proj.bias[8 * h + 3] = 8.0
            at.v_proj.weight[8 * h, 1], at.v_proj.weight[8 * h, 2] = 1.0, -1.0
            at.o_proj.weight[10 + h, 8 * h] = 2.5
        W = m.lm_head.weight
        W[one, 10], W[one, 11] = head0, head1
        W[zero, 10], W[zero, 11] = -head0, -head1
    return models.wrap("planted-swap", m, tok), (one, zero)


def swap_pairs(answer_ids, n=24, marker_at=3, differ_after=False, seed=0):
    """Aligned pairs: the marker 'P' / 'N' at ``marker_at``; with ``differ_after`` both prompts
    have 'P' and differ at a later filler instead (the sink precedes the difference)."""
    rng = random.Random(seed)
    texts, diff, lens = [], [], []
    for _ in range(n):
        f = [rng.choice("xyz") for _ in range(12)]
        a = "".join(f[:marker_at - 1]) + "P" + "".join(f[marker_at - 1:]) + ":"
        if differ_after:
            k = marker_at + 4
            b = a[:k - 1] + ("w" if a[k - 1] != "w" else "v") + a[k:]
        else:
            b = a.replace("P", "N")
            k = marker_at
        texts += [a, b]
        diff.append(k)
        lens.append(len(a) + 1)
    return RS.Pairs("sentiment", texts, [1, 0] * n, ("1", "0"), answer_ids, diff, lens)


def swap_verdict(model, pairs, scope="head"):
    s = RS.swap(model, pairs, 0, 0, min_queries=4, conditions=("head_sink", "head_ctrl", "layer_sink",
                                                               "layer_ctrl", "layer_all"))
    iv = RV.swap_intervals(s)
    rows = {r["id"]: r for r in RV.swap_claims("planted", s, iv)}
    return s, iv, rows[f"swap_sentiment_{scope}"]


# --- ablations: exact identities --------------------------------------------------------------------

def test_an_ablation_that_removes_nothing_gives_the_clean_logits_exactly(planted):
    m, l = planted, 1
    batch = m.encode(TEXT)
    clean = extract.run(m, batch, positions="last")
    rec = clean_layer(m, batch, l)
    gram = R.residual_gram(m.out_proj(l), m.post_attn_scale(l), m.n_heads)
    empty = stats_for(torch.zeros(2, m.n_heads, rec.A.shape[-1], dtype=torch.bool), m.n_heads, m.head_dim)
    for ablation, which in (("zero", "all"), ("mean", "mid")):
        for control in (False, True):
            f = R.make_edit(empty, [0, 1], batch.input_ids, ablation, which, control,
                            torch.Generator().manual_seed(0), gram=gram)
            r = extract.run(m, batch, positions="last", edits={l: f})
            assert torch.equal(r.logits, clean.logits)
            assert torch.equal(r.loss.nan_to_num(), clean.loss.nan_to_num())
    # a mean ablation over one prompt, where each (head, token) is a sink once: every mean is
    # that sink's own value, so nothing is removed; the removal of the same sinks changes it
    one = m.encode(["The cat sat on the mat. Then it slept and the dog barked at it"])
    st = layer_stats(m, one, clean_layer(m, one, l))
    b, h, t = torch.nonzero(R.select(st.S, "mid"), as_tuple=True)
    assert len(h) and len(set(zip(h.tolist(), one.input_ids[0, t].tolist()))) == len(h)
    base = extract.run(m, one, positions="last").logits
    f = R.make_edit(st, [0], one.input_ids, "mean", "mid")
    assert torch.equal(extract.run(m, one, positions="last", edits={l: f}).logits, base)
    f = R.make_edit(st, [0], one.input_ids, "zero", "mid")
    assert not torch.equal(extract.run(m, one, positions="last", edits={l: f}).logits, base)


def test_removing_z_tag_of_one_head_is_its_output_minus_z_tag_through_W_O(planted):
    m, l, h, eps, mq = planted, 1, 2, 0.2, 2
    batch = m.encode(TEXT)
    rec = clean_layer(m, batch, l)
    A, Vv, O_hand = rec.A, rec.V, rec.head_out.clone()              # O (B, T, H, D)
    S_all = torch.zeros(A.shape[0], m.n_heads, A.shape[-1], dtype=torch.bool)
    for b, n in enumerate(batch.lengths):                           # the definitions, per prompt
        S = D.sinks(D.alpha(A[b, :, :n, :n], rec.window, mq), eps)  # (H, n)
        S_all[b, :, :n] = S
        O_hand[b, :n, h] -= D.z_tag(A[b, h, :n, :n], Vv[b, h, :n], S[h])
    assert S_all[:, h].sum() >= 2                                   # something is removed
    f = R.make_edit(stats_for(S_all, m.n_heads, m.head_dim), [0, 1], batch.input_ids, "zero",
                    "all", heads=[h])
    T = batch.input_ids.shape[1]
    pos = torch.arange(T).expand(2, T)
    edited = extract.run(m, batch, positions=pos, edits={l: f})
    o_proj = m.hf.model.layers[l].self_attn.o_proj
    hook = o_proj.register_forward_pre_hook(lambda mod, args: (O_hand.reshape(2, T, -1),))
    try:
        want = m.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        hook.remove()
    clean = extract.run(m, batch, positions=pos)
    for b, n in enumerate(batch.lengths):
        assert torch.allclose(edited.logits[b, :n], want[b, :n], atol=1e-4, rtol=1e-5)
        assert not torch.allclose(edited.logits[b, :n], clean.logits[b, :n], atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_control_removes_the_tags_norm_in_the_residual_stream_token_by_token(arch):
    m = models.load(f"tiny-random-{arch}")
    block = m.hf.model.layers[1]
    if arch == "gemma3":             # a post-attention norm whose scale is not 1
        block.post_attention_layernorm.weight.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        assert m.post_attn_scale(1) is not None
    else:
        assert m.post_attn_scale(1) is None
    batch = m.encode(TEXT + ["A third prompt, a bit longer than that."])
    rec = clean_layer(m, batch, 1)
    st = layer_stats(m, batch, rec, eps=0.1, mq=1)          # random weights: weaker sinks
    W = block.self_attn.o_proj.weight.double()                            # by hand: (d, H*D)
    scale = (1 + block.post_attention_layernorm.weight.double() if arch == "gemma3"
             else torch.ones(W.shape[0], dtype=torch.float64))
    gram = R.residual_gram(m.out_proj(1), m.post_attn_scale(1), m.n_heads)
    H, Dh = m.n_heads, m.head_dim
    for ablation, which in (("zero", "all"), ("mean", "bos")):
        removed = R.removed_by(st, [0, 1, 2], batch.input_ids, rec, ablation, which)
        ctrl = R.residual_control(removed, gram, torch.Generator().manual_seed(1))

        def resid(x):               # (B, T, H, D) -> (B, T, H) norms after W_O and the scale
            return torch.stack([(scale[:, None] * W[:, h * Dh:(h + 1) * Dh] @ x[:, :, h, :, None])
                                .squeeze(-1).norm(dim=-1) for h in range(H)], -1)
        want, got = resid(removed), resid(ctrl)
        assert (want > 1e-3).sum() > 10                                  # something is removed
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)
        assert not ctrl[want == 0].any()
        if arch == "gemma3":        # matching without the scale would be a different control
            bare = torch.stack([(W[:, h * Dh:(h + 1) * Dh] @ ctrl[:, :, h, :, None]).squeeze(-1)
                                .norm(dim=-1) for h in range(H)], -1)
            bare_want = torch.stack([(W[:, h * Dh:(h + 1) * Dh] @ removed[:, :, h, :, None])
                                     .squeeze(-1).norm(dim=-1) for h in range(H)], -1)
            assert (bare - bare_want).abs().max() > 1e-3
        # a fresh direction at every token: no two tokens of a head share one
        b, h = divmod(int((want > 0).sum(1).flatten().argmax()), H)   # the busiest (prompt, head)
        u = torch.nn.functional.normalize(ctrl[b, :, h][want[b, :, h] > 0], dim=-1)
        cos = (u @ u.T).abs() - torch.eye(len(u), dtype=u.dtype)
        assert len(u) > 3 and cos.max() < 0.999
        # and the edit removes exactly that control from the head outputs
        f = R.make_edit(st, [0, 1, 2], batch.input_ids, ablation, which, control=True,
                        generator=torch.Generator().manual_seed(1), gram=gram)
        assert torch.allclose(rec.head_out.double() - f(rec).double(), ctrl, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_attention_write_is_what_the_layer_adds_from_its_attention(arch):
    """The control's diagnostic: W_O, then (Gemma-3) the post-attention norm, as the model's own
    forward computes it (captured by a hook on the module that ends the attention branch)."""
    m = models.load(f"tiny-random-{arch}")
    block = m.hf.model.layers[1]
    if arch == "gemma3":
        block.post_attention_layernorm.weight.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    end = block.post_attention_layernorm if arch == "gemma3" else block.self_attn.o_proj
    seen = {}
    hook = end.register_forward_hook(lambda mod, args, out: seen.setdefault("y", out))
    batch = m.encode(TEXT)
    try:
        m.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        hook.remove()
    rec = clean_layer(m, batch, 1)
    got = RM.attention_write(m, 1)(rec.head_out)
    for b, n in enumerate(batch.lengths):
        assert torch.allclose(got[b, :n], seen["y"][b, :n].float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_alternative_control_matches_the_actual_change_of_the_attentions_write(arch):
    m = models.load(f"tiny-random-{arch}")
    if arch == "gemma3":
        m.hf.model.layers[1].post_attention_layernorm.weight.data.normal_(
            0, 0.5, generator=torch.Generator().manual_seed(3))
    batch = m.encode(TEXT + ["A third prompt, a bit longer than that."])
    rec = clean_layer(m, batch, 1)
    st = layer_stats(m, batch, rec, eps=0.1, mq=1)
    gram = R.residual_gram(m.out_proj(1), m.post_attn_scale(1), m.n_heads)
    write = RM.attention_write(m, 1)
    removed = R.removed_by(st, [0, 1, 2], batch.input_ids, rec, "zero", "all")
    c = RM.matched_control(removed, rec.head_out, write, gram, torch.Generator().manual_seed(1))
    base = write(rec.head_out)
    want = (write((rec.head_out.double() - removed).float()) - base).norm(dim=-1)
    got = (write((rec.head_out.double() - c).float()) - base).norm(dim=-1)
    valid = torch.arange(rec.A.shape[-1]) < torch.tensor(rec.lengths).unsqueeze(1)
    assert (want[valid] > 1e-3).sum() > 10
    assert torch.allclose(got[valid], want[valid], rtol=1e-3, atol=1e-5)
    # the rule's control, rescaled per token: the same directions
    r = R.residual_control(removed, gram, torch.Generator().manual_seed(1))
    k = (c.norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-30))                # (B, T, H)
    on = r.norm(dim=-1) > 0
    assert torch.allclose(c[on], r[on] * k[on][:, None], atol=1e-9)
    assert torch.allclose(k.amax(-1)[on.any(-1)], k.where(on, torch.inf).amin(-1)[on.any(-1)])
    if arch == "gemma3":   # the per-token RMS makes the two controls differ
        assert (k[on] - 1).abs().max() > 0.05


def test_first_token_mean_ablation_replaces_each_tag_by_the_leave_one_out_mean(planted):
    m, l = planted, 1
    batch = m.encode(["The cat sat. It slept.", "A dog ran. He barked.", "Rain fell all day."])
    rec = clean_layer(m, batch, l)
    st = layer_stats(m, batch, rec)
    x = RM.first_token_tag(rec.A, rec.V, st.S, rec.lengths)                # (B, T, H, D)
    removed = R.removed_by(st, [0, 1, 2], batch.input_ids, rec, "mean", "bos")
    n = min(batch.lengths)
    for p in range(3):
        others = [q for q in range(3) if q != p]
        want = x[p, :n] - x[others, :n].mean(0)
        assert torch.allclose(removed[p, :n], want, atol=1e-12)
    assert removed[:, :n].abs().max() > 1e-3                  # the tags differ across prompts
    # the ablated tags keep the tags' average (at positions every prompt reaches)
    assert torch.allclose((x - removed)[:, :n].mean(0), x[:, :n].mean(0), atol=1e-12)
    # a position only one prompt reaches is left alone
    assert not removed[:, max(batch.lengths) - 1].any()


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


def test_first_token_spread_is_taken_within_prompts_that_share_the_first_token():
    H, T, Dh = 2, 3, 4
    Vv = torch.randn(3, H, T, Dh, generator=torch.Generator().manual_seed(0))
    Vv[1, :, 0] = Vv[0, :, 0]                       # prompts 0 and 1 start with the same token
    ids = torch.tensor([[5, 1, 2], [5, 3, 4], [7, 1, 1]])
    acc = R._Accumulator(3, H, T, Dh)
    acc.add([0, 1, 2], ids, torch.zeros(3, H, T, dtype=torch.bool), Vv)
    assert acc.done().bos_spread == 0.0               # different first tokens are not compared
    Vv[1, 0, 0] += 1.0
    acc = R._Accumulator(3, H, T, Dh)
    acc.add([0, 1, 2], ids, torch.zeros(3, H, T, dtype=torch.bool), Vv)
    assert acc.done().bos_spread > 0.1


def test_ablate_adds_the_layers_with_the_largest_tags_and_matches_the_residual_norm(planted):
    texts = ["The cat sat. The dog ran. It rained all day.", "One. Two, three. Four and five."]
    a = R.ablate(planted, texts, max_tokens=40, min_queries=2, layers=[], top=1,
                 conditions=("zero_bos",), progress=False)
    share = np.array(a.tag_share)                                     # (L, 2)
    l = int(np.argmax(share.sum(1)))
    assert a.layers == [l] and share[l].sum() > 0
    # the ablation run removes what the clean pass measured; the control the same residual norm
    assert a.removed_share["zero_bos"][0] == pytest.approx(share[l, 0], rel=1e-4)
    assert a.resid_norm["zero_bos_ctrl"][0] == pytest.approx(a.resid_norm["zero_bos"][0], rel=1e-6)
    # the actual change of the attention's write is the norm of the heads' images summed, at
    # most the sum of their norms (the quantity matched head by head)
    for c in ("zero_bos", "zero_bos_ctrl"):
        assert 0.3 * a.resid_norm[c][0] < a.actual_norm[c][0] <= a.resid_norm[c][0] * (1 + 1e-5)
    assert a.delta["zero_bos"].shape == (1, 2) and np.isfinite(a.delta["zero_bos"]).all()
    assert "zero_bos_ctrl_actual" not in a.delta              # only for the primary reading


def test_the_first_token_row_has_an_alternative_with_the_actual_matched_control(planted):
    texts = ["The cat sat. The dog ran. It rained all day.", "One. Two, three. Four and five."]
    a = R.ablate(planted, texts, max_tokens=40, min_queries=2, layers=[1],
                 conditions=("mean_bos",), progress=False)
    # no post-attention norm: the actual change is W_O's image summed over the heads
    assert a.actual_norm["mean_bos_ctrl_actual"][0] == pytest.approx(a.actual_norm["mean_bos"][0], rel=1e-3)
    rows = RV.ablation_claims("planted", a, RV.ablation_intervals(a, n_boot=20))
    assert [r["id"] for r in rows] == ["tags_lm_bos", "tags_lm_bos_alt"]
    assert rows[1]["reading"] == V.ALTERNATIVE and rows[1]["rule"] == RV.ALT_CONTROL_RULE


# --- the ordered rule: fabricated numbers -------------------------------------------------------------

def test_ordered_rule_returns_every_outcome_in_its_order():
    n = 32
    assert RV.rule_tags(0.5, 0.2, 0.8, n, removed=False) == (V.UNTESTABLE, "nothing removed")
    assert RV.rule_tags(0.5, 0.2, 0.8, 19)[0] == V.UNTESTABLE           # fewer than 20 prompts
    assert RV.rule_tags(0.02, 0.011, 0.03, n) == (V.REPRODUCED, None)
    assert RV.rule_tags(0.01, 0.001, 0.02, n) == (V.REPRODUCED, None)    # estimate at the floor
    # CI > 0 but small: compatible (negligible) comes before "CI < 0.01 -> not supported"
    assert RV.rule_tags(0.0003, 0.0001, 0.0005, n) == (V.COMPATIBLE, "negligible effect (< 0.01 nats)")
    assert RV.rule_tags(0.0, -0.001, 0.009, n) == (V.NOT, None)
    assert RV.rule_tags(-0.2, -0.3, -0.1, n) == (V.NOT, None)
    assert RV.rule_tags(0.0, 0.0, 0.0, n) == (V.NOT, None)               # exactly no effect
    assert RV.rule_tags(0.005, -0.002, 0.012, n) == (V.COMPATIBLE, None)
    assert RV.rule_tags(math.nan, math.nan, math.nan, n)[0] == V.UNTESTABLE
    with pytest.raises(ValueError):
        RV.rule_tags(0.1, 0.2, 0.1, n)


def test_swap_rule_returns_every_outcome_with_a_floor_of_005_of_the_gap():
    n = 40
    assert RV.rule_swap(0.5, 0.3, 0.7, n, no_op=True)[0] == V.UNTESTABLE
    assert "no-op" in RV.rule_swap(0.5, 0.3, 0.7, n, no_op=True)[1]
    assert RV.rule_swap(math.nan, math.nan, math.nan, n, no_op=False)[0] == V.UNTESTABLE
    assert RV.rule_swap(0.5, 0.3, 0.7, 19, no_op=False)[0] == V.UNTESTABLE
    assert RV.rule_swap(0.06, 0.01, 0.1, n, no_op=False) == (V.REPRODUCED, None)
    assert RV.rule_swap(0.03, 0.01, 0.05, n, no_op=False) == (V.COMPATIBLE,
                                                               "negligible effect (< 0.05 of the gap)")
    assert RV.rule_swap(0.02, -0.01, 0.049, n, no_op=False) == (V.NOT, None)
    assert RV.rule_swap(0.02, -0.01, 0.06, n, no_op=False) == (V.COMPATIBLE, None)


def test_the_alternative_swap_reading_is_not_testable_when_the_label_gap_may_be_zero():
    assert RV.rule_swap_label_alt(V.REPRODUCED, (0.01, -0.009, 0.029))[0] == V.UNTESTABLE
    assert RV.rule_swap_label_alt(V.NOT, (0.01, math.nan, math.nan))[0] == V.UNTESTABLE
    assert RV.rule_swap_label_alt(V.REPRODUCED, (0.3, 0.2, 0.4)) is None      # the same as the rule
    assert RV.rule_swap_label_alt(V.UNTESTABLE, (0.01, -0.009, 0.029)) is None


def test_swap_fractions_on_fabricated_runs():
    """Two pairs, both directions: the sink swap moves the recipients halfway to the donor,
    the control not at all; label and answer measures agree when LD follows the label."""
    ld = np.array([2.0, -2.0, 1.0, -1.0])
    directed = [(0, 1), (1, 0), (2, 3), (3, 2)]
    s = RS.Swap("t", "m", 0, 0, "", 5, ld, directed)
    half = np.array([ld[r] + 0.5 * (ld[d] - ld[r]) for r, d in directed])
    s.swapped = {"head_sink": half, "head_ctrl": ld[[0, 1, 2, 3]].copy()}
    s.n_cells = {c: np.array([2, 2, 1, 1]) for c in s.swapped}
    s.n_cells_changed = {"head_sink": np.array([2, 2, 1, 1]), "head_ctrl": np.array([0, 0, 0, 1])}
    iv = RV.swap_intervals(s, n_boot=20)
    assert iv["accuracy"] == 1.0 and iv["gap"][0] == pytest.approx(3.0)
    assert iv["no_ops"]["head_ctrl"] == {"directed_pairs": 4, "directed_no_op": 3, "cells": 6,
                                         "cells_no_op": 5, "contributing_pairs": 1}
    for by in ("label", "answer"):
        assert iv[by]["head_sink"][0] == pytest.approx(0.5)
        assert iv[by]["head_ctrl"][0] == pytest.approx(0.0)
        assert iv[by]["head_diff"][0] == pytest.approx(0.5)
    rows = RV.swap_claims("m", s, iv)
    assert {r["id"] for r in rows} == {"swap_t_head", "swap_t_layer", "swap_t_head_answer",
                                       "swap_t_layer_answer"}
    assert all(r["verdict"] == V.UNTESTABLE for r in rows)        # 2 pairs, no layer swap
    # 24 pairs whose label gaps straddle 0; the sink swap moves 0.1 of each directed gap
    rng = np.random.default_rng(0)
    ld = np.repeat(rng.normal(0.25, 1.0, 24), 2) * np.tile([1.0, -1.0], 24)
    directed = [(2 * i, 2 * i + 1) for i in range(24)]
    s = RS.Swap("t", "m", 0, 0, "", 5, ld, directed)
    s.swapped = {"head_sink": np.array([ld[r] + 0.1 * (ld[d] - ld[r]) for r, d in directed]),
                 "head_ctrl": ld[0::2].copy()}
    s.n_cells = {c: np.ones(24, int) for c in s.swapped}
    s.n_cells_changed = {c: np.ones(24, int) for c in s.swapped}
    iv = RV.swap_intervals(s, n_boot=200)
    assert iv["gap"][1] < 0 < iv["gap"][2]
    rows = {r["id"]: r for r in RV.swap_claims("m", s, iv)}
    assert rows["swap_t_head"]["verdict"] == V.REPRODUCED               # the rule as written
    alt = rows["swap_t_head_alt"]
    assert alt["verdict"] == V.UNTESTABLE and alt["reading"] == V.ALTERNATIVE
    assert "swap_t_head_answer_alt" not in rows


# --- the ordered rule on the chapter's own measurement: planted first-token tags ----------------------

def test_tags_lm_bos_supported_on_a_planted_case():
    """The answer 'b' is read from the first-token tag alone: mean-ablating it costs about 0.1
    nats, the control of the same residual norm a twentieth of that."""
    row, r = bos_verdict(tag=4.0)
    assert row["verdict"] == V.REPRODUCED
    assert row["note"].startswith("constant-value tag")      # every text starts with <bos>
    assert r["overall"][1] > 0 and r["overall"][0] > 0.05
    assert row["rule"] == rules.text("tags_lm_bos") and "min_queries 4" in row["settings"]


def test_only_a_first_token_shared_by_every_prompt_is_flagged_constant(planted):
    """RULES.md, constant-value tags: with <bos> the first-token tag is one vector times a
    weight; without it (first words differ) it is not, and the row says nothing."""
    texts = ["The cat sat. It slept.", "A dog ran. He barked.", "Rain fell all day. Then sun."]
    for bos in (True, False):
        a = R.ablate(planted.with_bos(bos), texts, max_tokens=40, min_queries=2, layers=[1],
                     conditions=("mean_bos",), progress=False)
        row = RV.ablation_claims("planted", a, RV.ablation_intervals(a, n_boot=20))[0]
        assert a.same_first_token == bos and a.removed("mean_bos").all()
        assert ("constant-value tag" in row["note"]) == bos
        assert row["verdict"] == V.UNTESTABLE and "fewer than 20" in row["note"]     # 3 prompts


def test_tags_lm_bos_negligible_on_a_planted_case():
    """The tag adds 0.6 of the answer's logit of 4: a consistent but tiny cost."""
    row, r = bos_verdict(tag=0.6, letter=3.4)
    assert row["verdict"] == V.COMPATIBLE
    assert row["note"].startswith("negligible effect (< 0.01 nats); constant-value tag")
    assert 0 < r["overall"][1] and r["overall"][0] < 0.01


def test_tags_lm_bos_not_supported_on_a_planted_case():
    """Nothing reads the tag's direction; the random directions of the control are read."""
    row, r = bos_verdict(tag=0.0, letter=4.0, other=1.0)
    assert row["verdict"] == V.NOT and r["overall"][2] < 0.01


def test_tags_lm_bos_compatible_on_a_planted_case():
    """A small effect measured on texts the model predicts only 90% of the time: the interval
    holds both 0 and the floor."""
    row, r = bos_verdict(p_alt=0.9, tag=0.8, letter=1.4, back=2.2)     # ln 9 = 2.2: calibrated
    assert row["verdict"] == V.COMPATIBLE and "negligible" not in row["note"]
    assert r["overall"][1] <= 0 < 0.01 <= r["overall"][2]


def test_tags_lm_bos_not_testable_when_the_mean_ablation_removes_nothing():
    """Every token attends to <bos> alike: the first-token tag is the same in every prompt, so
    its mean-ablation removes nothing (while removing it would)."""
    m = planted_bos(tag=4.0, content_query=False)
    a = R.ablate(m, ab_texts(), max_tokens=60, min_queries=4, layers=[0],
                 conditions=("mean_bos", "zero_bos"), progress=False)
    iv = RV.ablation_intervals(a)
    row = RV.ablation_claims("planted", a, iv)[0]
    assert (row["verdict"], row["note"]) == (V.UNTESTABLE, "nothing removed")
    assert a.removed_share["mean_bos"][0] == 0 and a.removed_share["zero_bos"][0] > 0.5
    assert "zero-ablation beside it" in row["ours"]


# --- the swap: the no-op detector and the rule on a planted case --------------------------------------

@pytest.fixture(scope="module")
def swap_model():
    return planted_swap(head0=1.0)


def test_swap_is_a_no_op_when_every_sink_precedes_the_difference(swap_model):
    m, ans = swap_model
    pairs = swap_pairs(ans, differ_after=True)
    s, iv, row = swap_verdict(m, pairs)
    assert (s.n_cells["head_sink"] > 0).all()                           # sinks were swapped
    assert (s.n_cells_changed["head_sink"] == 0).all() and s.run["head_sink"] == 0
    assert iv["no_ops"]["head_sink"]["directed_no_op"] == len(s.directed)
    assert row["verdict"] == V.UNTESTABLE and "no-op" in row["note"]
    assert np.array_equal(s.swapped["head_sink"], s.ld[[r for r, _ in s.directed]])


def test_swap_runs_when_a_sink_follows_the_difference(swap_model):
    m, ans = swap_model
    s, iv, row = swap_verdict(m, swap_pairs(ans))
    assert (s.n_cells_changed["head_sink"] >= 1).all() and s.run["head_sink"] == len(s.directed)
    assert iv["no_ops"]["head_sink"]["directed_no_op"] == 0
    # the values are compared, not the positions: at this layer a value depends on its token
    # alone, so the cells after the difference with the same token count as no-ops
    assert (s.n_cells_differ["layer_all"] > s.n_cells_changed["layer_all"]).all()


def test_swap_supported_on_a_planted_case(swap_model):
    """The answer reads the selected head's sink value alone: the swap moves the whole gap."""
    m, ans = swap_model
    s, iv, row = swap_verdict(m, swap_pairs(ans))
    assert row["verdict"] == V.REPRODUCED
    assert iv["label"]["head_diff"][0] == pytest.approx(1.0, abs=0.01)
    assert row["rule"] == rules.text("swap_sentiment_head")


def test_swap_negligible_on_a_planted_case():
    """The answer reads the selected head 1 part in 50: a consistent but small move."""
    m, ans = planted_swap(head0=0.02, head1=0.98)
    s, iv, row = swap_verdict(m, swap_pairs(ans))
    assert (row["verdict"], row["note"]) == (V.COMPATIBLE, "negligible effect (< 0.05 of the gap)")
    assert iv["label"]["head_diff"][0] == pytest.approx(0.02, abs=0.005)


def test_swap_not_supported_on_a_planted_case():
    """The answer reads another head that sinks on the same token: swapping the selected head's
    sink values moves nothing, though they differ between the prompts."""
    m, ans = planted_swap(head0=0.0, head1=1.0)
    s, iv, row = swap_verdict(m, swap_pairs(ans))
    assert (s.n_cells_changed["head_sink"] >= 1).all()
    assert row["verdict"] == V.NOT
    assert iv["gap"][1] > 0
    # every head of the layer swapped carries the gap
    layer = {r["id"]: r for r in RV.swap_claims("planted", s, iv)}["swap_sentiment_layer"]
    assert layer["verdict"] == V.REPRODUCED


def test_swap_of_shared_values_changes_nothing_and_controls_are_the_nearest_non_sinks(planted):
    S = torch.tensor([True, False, False, True, True, False])
    assert torch.nonzero(RS.control_positions(S, 6)).flatten().tolist() == [1, 2, 5]
    m, l = planted, 1
    batch = m.encode(TEXT)
    rec = clean_layer(m, batch, l)
    clean = extract.run(m, batch, positions="last")
    C = torch.ones(2, m.n_heads, rec.A.shape[-1], dtype=torch.bool)
    r = extract.run(m, batch, positions="last", edits={l: RS.swap_edit(rec.V, C)})
    assert torch.allclose(r.logits, clean.logits, atol=1e-5)      # donor = recipient
    r = extract.run(m, batch, positions="last", edits={l: RS.swap_edit(rec.V * 0, C & False)})
    assert torch.equal(r.logits, clean.logits)                    # no cell swapped


def test_pairs_align_token_by_token(planted):
    for p in (RS.pairs_for(planted, "sentiment", 3), RS.pairs_for(planted, "cities", 3)):
        assert len(p) == 3 and p.labels == [1, 0] * 3
        for i in range(3):
            a, b = planted.ids(p.texts[2 * i]), planted.ids(p.texts[2 * i + 1])
            assert len(a) == len(b) == p.lengths[i] and a[-1] == b[-1]
            k = p.differ_from[i]
            assert a[:k] == b[:k] and a[k] != b[k]
    c = RS.city_pairs(planted, 2)
    x, y = c.texts[0].split("\n")[-1], c.texts[1].split("\n")[-1]
    assert x.split(" is in ")[0] == y.split(" is in ")[0] and x != y     # same city, other country
    with pytest.raises(ValueError, match="task"):
        RS.pairs_for(planted, "poems")


# --- the page's helpers ---------------------------------------------------------------------------------

def test_largest_and_fmt_pick_the_layer_with_the_largest_change():
    class A:
        layers = [0, 3, 7]
    iv = {"c": {"tag": [(0.01, 0.0, 0.02), (-0.2, -0.3, -0.1), (0.1, 0.05, 0.15)],
                "ctrl": [(0.0, -0.1, 0.1), (0.02, 0.01, 0.03), (0.0, 0.0, 0.0)]}}
    l, t, k = RF.largest(A, iv, "c")
    assert l == 3 and t[0] == -0.2 and k[0] == 0.02
    assert RF.fmt((0.0123, -0.001, 0.02)) == "+0.012 (95% CI [-0.001, +0.020])"


def test_rules_changed_names_the_rules_version_and_what_changed():
    text = RF.rules_changed()
    assert rules.commit() in text
    for what in ("residual stream", "mean-ablation", "size floor", "no-op"):
        assert what in text
