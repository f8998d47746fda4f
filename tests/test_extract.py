"""Extraction identities on tiny random models of every supported architecture (no download)."""
import pytest
import torch

from ctr import arch, extract, models, tiny
from ctr import definitions as D

TEXT = ["The cat sat. Then it slept, and the dog barked at it.", "Short prompt."]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and far faster when other processes hold the cores."""
    with extract.one_thread():
        yield


def wrapped(a, **kw):
    return models.wrap(f"tiny-{a}", tiny.model(a, **kw), tiny.tokenizer())


def reference(m: models.Model, batch):
    """What the model computed, read without nnsight: HF's returned attentions, v_proj outputs
    and the inputs of the output projection (forward hooks)."""
    a = arch.arch_of(m.config)
    layers = arch.getpath(m.hf, a.layers)
    zs = {}
    hooks = []
    for l, layer in enumerate(layers):
        att = getattr(layer, a.attn)
        hooks.append(getattr(att, a.out_proj).register_forward_pre_hook(
            lambda mod, args, l=l: zs.__setitem__(l, args[0].detach().clone())))
    with torch.no_grad():
        out = m.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   output_attentions=True)
    for h in hooks:
        h.remove()
    return out.attentions, zs


@pytest.mark.parametrize("a", tiny.ARCHS)
def test_attention_output_identities(a):
    m = wrapped(a)
    batch = m.encode(TEXT)
    attentions, zs = reference(m, batch)
    seen = 0
    for rec in extract.layers(m, batch):
        B, H, T, _ = rec.A.shape
        assert (H, rec.V.shape[-1]) == (m.n_heads, m.head_dim)
        # nnsight's A is the model's A
        assert torch.allclose(rec.A, attentions[rec.layer], atol=1e-6)
        # sum_j A[i,j] V[j] is what the model computed (input of W_O, read by a plain hook)
        AV = torch.einsum("bhij,bhjd->bihd", rec.A, rec.V)
        model_z = zs[rec.layer].view(B, T, H, -1)
        for b, n in enumerate(rec.lengths):
            assert (AV[b, :n] - model_z[b, :n]).abs().max() < 1e-5
            assert (rec.head_out[b, :n] - model_z[b, :n]).abs().max() < 1e-5
        # z_tag + z_notag = head output, for any sink set
        r = rec.prompt(0)
        A0, V0 = r.A[0], r.V[0]
        S = D.sinks(D.alpha(A0), 0.05)
        zt, zn = D.split(A0, V0, S)
        assert ((zt + zn).transpose(0, 1) - r.head_out[0]).abs().max() < 1e-5
        seen += 1
    assert seen == m.n_layers


def test_attention_call_is_resolved_from_source():
    for a in tiny.ARCHS:
        assert extract.attention_call_name(wrapped(a)) == "attention_interface_1"


def test_residual_stream_chains_across_layers():
    m = wrapped("llama", layers=3)
    prev = None
    for rec in extract.layers(m, TEXT[:1]):
        if prev is not None:
            assert torch.equal(rec.resid_in, prev)
        prev = rec.resid_out.clone()


def test_gqa_values_are_expanded_like_repeat_kv():
    m = wrapped("qwen2")   # 4 query heads, 2 KV heads
    vproj = {}
    h = m.hf.model.layers[0].self_attn.v_proj.register_forward_hook(
        lambda mod, args, out: vproj.__setitem__(0, out.detach().clone()))
    rec = next(extract.layers(m, TEXT[:1]))
    h.remove()
    T = rec.V.shape[2]
    kv = vproj[0].view(1, T, 2, m.head_dim).transpose(1, 2)      # (1, KV, T, D)
    assert torch.equal(rec.V[:, 0], kv[:, 0]) and torch.equal(rec.V[:, 1], kv[:, 0])
    assert torch.equal(rec.V[:, 2], kv[:, 1]) and torch.equal(rec.V[:, 3], kv[:, 1])


def test_batched_prompt_equals_prompt_alone():
    m = wrapped("llama")
    alone = [r.A.clone() for r in extract.layers(m, TEXT[1:])]
    for rec in extract.layers(m, TEXT):
        assert torch.allclose(rec.prompt(1).A, alone[rec.layer], atol=1e-6)


def test_sliding_window_layers_match_the_mask():
    m = wrapped("gemma3", window=4)                      # layer 0 sliding (4), layer 1 full
    assert m.windows == [4, None] and m.sliding_layers == [0]
    recs = [(r.window, r.A[0].clone()) for r in extract.layers(m, TEXT[:1])]
    T = recs[0][1].shape[-1]
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    for w, A in recs:
        visible = (j <= i) if w is None else ((j <= i) & (i - j < w))
        assert torch.all(A[:, ~visible] == 0)
        assert torch.all(A[:, visible] > 0)
        assert torch.equal((A > 0).sum(-2)[0], D.visible_queries(T, w))


def test_early_break_and_consumer_errors_do_not_hang():
    m = wrapped("llama", layers=4)
    for rec in extract.layers(m, TEXT):
        if rec.layer == 1:
            break
    with pytest.raises(KeyError):
        for rec in extract.layers(m, TEXT):
            raise KeyError("consumer")
    # the model still works afterwards
    assert len(list(extract.layers(m, TEXT))) == 4


def test_planted_model_has_its_sinks():
    m = models.load("tiny-planted-llama")
    text = "It rained. We stayed in and read a book all afternoon long, then slept."
    batch = m.encode([text])
    dot = batch.tokens[0].index(".")
    for rec in extract.layers(m, batch):
        S = D.sinks(D.alpha(rec.A[0], min_queries=8))
        assert S[0, 0] and S[1, 0]                     # heads 0-1: <bos>
        assert S[2, dot] and S[3, dot]                 # heads 2-3: "."
