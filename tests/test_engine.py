"""The engine's writing and prefix caching, on tiny random models of every architecture.

- Prefix caching: records of prompts run as (prefix once, continuations on copies of its cache)
  equal the records of the whole prompts run in full (A, V, head outputs, residuals), 1e-5.
- Edits: writing back what was read changes nothing (exactly); zeroing one head's outputs equals
  zeroing that head's columns of W_O in a copy of the model (the hand computation); starting at
  layer l from the clean residual stream equals the full edited run.
- Loss and logits: the chunked cross-entropy equals the one from the model's full logits.
"""
import copy

import pytest
import torch
import transformers

from ctr import analysis, extract, models, tiny

PREFIX = "Review: the film was long. Verdict:"
SUFFIXES = [" good", " bad, very bad indeed.", " fine. It rained."]
TEXT = ["The cat sat. Then it slept, and the dog barked at it.", "Short prompt."]
_MODELS: dict = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and far faster when other processes hold the cores."""
    with extract.one_thread():
        yield


def wrapped(a, **kw):
    key = (a, tuple(sorted(kw.items())))
    if key not in _MODELS:
        _MODELS[key] = models.wrap(f"tiny-{a}", tiny.model(a, **kw), tiny.tokenizer())
    return _MODELS[key]


def records(m, batch, **kw):
    out = []
    for rec in extract.layers(m, batch, **kw):
        out.append([(rec.prompt(b).A, rec.prompt(b).V, rec.prompt(b).head_out,
                     rec.prompt(b).resid_in, rec.prompt(b).resid_out)
                    for b in range(len(batch.lengths))])
    return out


def assert_same_records(got, want, atol=1e-5):
    assert len(got) == len(want)
    for l, (g, w) in enumerate(zip(got, want)):
        for b, (gb, wb) in enumerate(zip(g, w)):
            for name, x, y in zip(("A", "V", "head_out", "resid_in", "resid_out"), gb, wb):
                assert x.shape == y.shape, (l, b, name)
                err = (x - y).abs().max().item()
                assert err < atol * max(1.0, y.abs().max().item()), (l, b, name, err)


def prefix_case(m):
    batch = m.encode([PREFIX + s for s in SUFFIXES])
    P = extract.common_prefix(batch)
    assert 0 < P < min(batch.lengths)
    return batch, extract.prefix(m, batch.input_ids[0, :P])


@pytest.mark.parametrize("a", tiny.ARCHS)
def test_prefix_cached_records_equal_full_records(a):
    m = wrapped(a)
    batch, pre = prefix_case(m)
    assert len(pre) == extract.common_prefix(batch)
    assert_same_records(records(m, batch, prefix=pre), records(m, batch))
    # the same cache serves a second batch (it is copied, never written)
    sub = batch.select([2, 0])
    assert_same_records(records(m, sub, prefix=pre), records(m, sub))


def windowed(a, w=4):
    """A tiny model whose sliding-window layers see only ``w`` keys."""
    cfg = tiny.config(a)
    cfg.sliding_window = w
    if a == "llama4_text":
        cfg.attention_chunk_size = w
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    return models.wrap(f"tiny-{a}-w{w}", hf, tiny.tokenizer())


@pytest.mark.parametrize("a", ["gemma3", "gemma2", "mistral", "olmo3", "cohere2", "exaone4",
                               "gpt_oss", "ministral", "llama4_text"])
def test_prefix_caching_handles_windows_shorter_than_the_prefix(a):
    m = windowed(a)                            # the cache keeps only the last 3 prefix keys
    assert 4 in m.windows or a == "llama4_text"
    batch, pre = prefix_case(m)
    assert len(pre) > 4
    assert_same_records(records(m, batch, prefix=pre), records(m, batch))


def test_prefix_refuses_prompts_that_do_not_start_with_it():
    m = wrapped("llama")
    batch, pre = prefix_case(m)
    other = m.encode(["Something else entirely, and long enough."])
    with pytest.raises(extract.ExtractionError, match="prompt 0 does not start"):
        list(extract.layers(m, other, prefix=pre))
    with pytest.raises(extract.ExtractionError, match="at least one more token"):
        whole = m.encode([PREFIX])
        list(extract.layers(m, whole, prefix=extract.prefix(m, whole.input_ids[0])))


def hf_loss_and_logits(hf, batch):
    logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:],
                                           reduction="none")
    for b, n in enumerate(batch.lengths):
        ce[b, n - 1:] = float("nan")
    return ce, logits


def close(x, y, atol=1e-5):
    """Equal NaN patterns (padding) and values within atol (atol=0: identical)."""
    nan = torch.isnan(x)
    return torch.equal(nan, torch.isnan(y)) and bool(((x - y)[~nan].abs() <= atol).all())


@pytest.mark.parametrize("a", tiny.ARCHS)
def test_edits_identity_zeroed_head_and_start(a):
    m = wrapped(a, layers=3)
    batch = m.encode(TEXT)
    clean = extract.run(m, batch, positions="last", keep_resid=True)
    # the engine's unedited loss and logits are the model's (chunked head, 3 rows at a time)
    ce, logits = hf_loss_and_logits(m.hf, batch)
    last = torch.tensor(batch.lengths) - 1
    assert close(clean.loss, ce)
    assert close(clean.logits[:, 0], logits[torch.arange(2), last])
    assert close(extract.run(m, batch, chunk_rows=3).loss, clean.loss)

    # writing back what was read, at every layer: exactly the unedited run
    ident = extract.run(m, batch, positions="last",
                        edits={l: (lambda rec: rec.head_out) for l in range(m.n_layers)})
    assert close(ident.loss, clean.loss, 0) and torch.equal(ident.logits, clean.logits)
    vals = extract.run(m, batch, positions="last",
                       edits={l: (lambda rec: rec.from_values(rec.V)) for l in range(m.n_layers)})
    assert close(vals.loss, clean.loss, 1e-5) and close(vals.logits, clean.logits, 1e-5)

    # zeroing head h of layer l = zeroing W_O's columns for head h in a copy of the model
    l, h, D = 1, 2, m.head_dim

    def zero(rec):
        out = rec.head_out.clone()
        out[:, :, h] = 0
        return out
    every = torch.arange(batch.input_ids.shape[1]).expand(2, -1)   # logits at every position
    edited = extract.run(m, batch, positions=every, edits={l: zero})
    hf2 = copy.deepcopy(m.hf)
    m2 = models.Model("copy", hf2, m.tokenizer, m.lm)   # out_proj() reads hf2's weights
    with torch.no_grad():
        m2.out_proj(l)[:, h * D:(h + 1) * D] = 0
    ce2, logits2 = hf_loss_and_logits(hf2, batch)
    assert torch.equal(edited.logits, logits2)              # exactly, on one thread
    assert close(edited.loss, ce2)                          # our chunked head: rounding only
    assert not close(edited.loss, clean.loss, 1e-4)        # the edit did something

    # starting at layer l from the clean residual stream = the full edited run, exactly
    resumed = extract.run(m, batch, positions=every, edits={l: zero}, start=clean.start(l))
    assert close(resumed.loss, edited.loss, 0) and torch.equal(resumed.logits, edited.logits)


def test_edit_sees_the_layer_and_later_layers_see_the_edit():
    m = wrapped("qwen2", layers=3)
    batch = m.encode(TEXT)
    seen, recs = {}, {}

    def grab(rec):
        seen[rec.layer] = rec
        return rec.from_values(torch.zeros_like(rec.V))      # a value edit: V = 0
    extract.run(m, batch, loss=False, edits={1: grab},
                on_layer=lambda r: recs.__setitem__(r.layer, r.head_out.clone()))
    full = list(records(m, batch))
    r = seen[1]
    assert r.resid_out is None and r.A.shape == (2, m.n_heads, *batch.input_ids.shape[1:] * 2)
    assert torch.allclose(r.A[0, :, :batch.lengths[0], :batch.lengths[0]], full[1][0][0][0])
    assert torch.equal(recs[1], torch.zeros_like(recs[1]))   # on_layer sees the edited outputs
    assert not torch.allclose(recs[2][0, :batch.lengths[0]], full[2][0][2][0])


def test_loss_mask_vocab_and_positions():
    m = wrapped("gemma2")                                    # final-logit softcapping
    batch = m.encode(TEXT)
    ce, logits = hf_loss_and_logits(m.hf, batch)
    mask = torch.zeros(ce.shape, dtype=torch.bool)
    mask[0, 3] = mask[1, 0] = True
    r = extract.run(m, batch, loss=mask, positions=torch.tensor([[1, 4], [0, 2]]), vocab=[5, 7, 9])
    assert torch.isnan(r.loss).sum() == r.loss.numel() - 2
    assert abs(r.loss[0, 3] - ce[0, 3]) < 1e-5 and abs(r.loss[1, 0] - ce[1, 0]) < 1e-5
    assert torch.allclose(r.logits[0], logits[0, [1, 4]][:, [5, 7, 9]], atol=1e-5)
    assert torch.allclose(r.logits[1], logits[1, [0, 2]][:, [5, 7, 9]], atol=1e-5)


def test_bad_edits_and_starts_get_one_clear_error():
    m = wrapped("llama")
    batch = m.encode(TEXT)
    with pytest.raises(extract.ExtractionError, match="edit of layer 0 returned shape"):
        extract.run(m, batch, edits={0: lambda rec: rec.head_out[:, :1]})
    with pytest.raises(ValueError, match="resid of shape"):
        extract.run(m, batch, start=(1, torch.zeros(2, 3, m.d_model)))
    clean = extract.run(m, batch, loss=False, keep_resid=[1])
    with pytest.raises(ValueError, match=r"edits for layers \[0\]"):
        extract.run(m, batch, start=clean.start(1), edits={0: lambda rec: None})
    with pytest.raises(KeyError, match="keep_resid"):
        clean.start(0)
    # the model still works afterwards
    assert len(list(extract.layers(m, batch))) == m.n_layers


def test_streams_interleave_with_other_runs():
    """Two models' streams in lockstep, another run while one is paused; a second trace of a
    paused model is refused, and the paused stream goes on unharmed."""
    m, m2 = wrapped("llama"), wrapped("gpt2")
    batch = m.encode(TEXT)
    want = [r[0][0] for r in records(m, batch)]
    want2 = [r[0][0] for r in records(m2, m2.encode(TEXT))]
    loss = extract.run(m2, TEXT).loss
    for l, (rec, rec2) in enumerate(zip(extract.layers(m, batch), extract.layers(m2, TEXT))):
        assert torch.equal(rec.prompt(0).A, want[l]) and torch.equal(rec2.prompt(0).A, want2[l])
        with pytest.raises(extract.ExtractionError, match="paused in an unfinished"):
            extract.run(m2, TEXT)
    for rec in extract.layers(m, batch):
        assert close(extract.run(m2, TEXT).loss, loss, 0)


# --- the analysis on top of the engine --------------------------------------------------------

def test_layer_summary_of_several_prompts_equals_one_call_per_prompt():
    """Batched over G prompts, with the same random draws (prompt 1 has no sinks: no draws)."""
    g = torch.Generator().manual_seed(3)
    G, H, T, Dh = 3, 4, 20, 8
    logits = torch.randn(G, H, T, T, generator=g) * 3
    logits[..., 0] += 3
    logits[:, 1:, :, 5] += 3
    A = torch.softmax(logits.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")), -1)
    A[1] = torch.eye(T)                    # attends to itself only: alpha = 1/n_t, no sink
    V = torch.randn(G, H, T, Dh, generator=g)
    O = A @ V
    s = analysis.layer_summary(A, V, O, None, 0.2, 5, torch.Generator().manual_seed(0))
    assert s["n_sinks"][1].sum() == 0 and s["n_sinks"][0].sum() > 0
    gen = torch.Generator().manual_seed(0)
    for i in range(G):
        one = analysis.layer_summary(A[i], V[i], O[i], None, 0.2, 5, gen)
        for key, x in one.items():
            assert x.shape == s[key][i].shape, key
            assert close(s[key][i].double(), x.double(), 1e-12), key


def test_heads_do_not_depend_on_batch_size_for_equal_lengths():
    m = models.load("tiny-planted-llama")
    texts = [TEXT[0], TEXT[0][::-1], "It rained. We stayed in and read a book all afternoon."]
    one = analysis.heads(m, texts, eps=[0.1, 0.2], max_tokens=40, min_queries=3, progress=False)
    three = analysis.heads(m, texts, eps=[0.1, 0.2], max_tokens=40, min_queries=3,
                           progress=False, batch_size=3)
    key = ["prompt", "layer", "head", "eps"]
    one, three = one.sort_values(key, ignore_index=True), three.sort_values(key, ignore_index=True)
    assert one.drop(columns=["ve", "ve_sq", "ve_random"]).equals(
        three.drop(columns=["ve", "ve_sq", "ve_random"]))
    for c in ("ve", "ve_sq", "ve_random"):
        assert close(torch.tensor(one[c].values), torch.tensor(three[c].values), 1e-12), c
    assert one["n_sinks"].sum() > 0 and one["ve_random"].notna().any()


def test_common_prefix_leaves_the_final_token():
    from ctr.models import Batch

    def batch(seqs):
        T = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
        return Batch(ids, (ids > 0).long(), [len(s) for s in seqs], [[]] * len(seqs))

    assert extract.common_prefix(batch([[1, 2, 3, 4], [1, 2, 3, 5]])) == 3
    assert extract.common_prefix(batch([[1, 2, 3], [1, 2, 3]])) == 2      # one token left to each
    assert extract.common_prefix(batch([[1, 2, 3], [1, 9, 3, 4]])) == 1
