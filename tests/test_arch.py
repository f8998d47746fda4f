"""Architecture discovery: paths found by inspection, and one clear refusal per kind of model ctr
cannot read. The extraction identities for every architecture in ``tiny.ARCHS`` are checked in
tests/test_extract.py."""
import pytest
import torch
import transformers as tf
from transformers.models.llama import modeling_llama as ml

from ctr import arch, models, tiny


def wrap(hf):
    return models.wrap("tiny", hf, tiny.tokenizer())


def test_tiny_list_covers_the_architectures_asked_for():
    asked = {"olmo", "olmo2", "gpt_neox", "phi", "stablelm", "cohere", "granite", "glm",
             "starcoder2", "mixtral", "qwen2_moe", "qwen3_moe", "smollm3", "gemma"}
    before = {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "gpt2"}
    assert asked <= set(tiny.ARCHS) and before <= set(tiny.ARCHS)
    assert len(set(tiny.ARCHS) - before) >= 15
    # each is built from its own config class, not a Llama in disguise
    types = {tiny.config(a).model_type for a in tiny.ARCHS}
    assert len(types) == len(tiny.ARCHS)


@pytest.mark.parametrize("name,layers,attn,out", [
    ("gpt_neox", "gpt_neox.layers", "attention", "dense"),
    ("opt", "model.decoder.layers", "self_attn", "out_proj"),
    ("gpt2", "transformer.h", "attn", "c_proj"),
    ("gptj", "transformer.h", "attn", "out_proj"),
    ("phi", "model.layers", "self_attn", "dense"),
    ("mixtral", "model.layers", "self_attn", "o_proj"),
])
def test_discovery_finds_layers_attention_and_output_projection(name, layers, attn, out):
    m = wrap(tiny.model(name))
    a = arch.arch_of(m.config)
    assert (a.layers, a.attn, a.out_proj) == (layers, attn, out)
    assert a.call == "attention_interface_1"
    W = m.out_proj(0)                                       # (d_model, H * D)
    assert tuple(W.shape) == (m.d_model, m.n_heads * m.head_dim)


@pytest.mark.parametrize("name,expected", [("olmo2", True), ("stablelm", True), ("cohere", True),
                                           ("gpt_neox", False), ("mixtral", False)])
def test_qk_norm_read_from_modules_of_new_architectures(name, expected):
    assert wrap(tiny.model(name)).qk_norm is expected


WHY = {"t5": r"'t5' is an encoder-decoder model",
       "deepseek_v3": r"multi-latent attention.*head_dim is the rotary part",
       "mamba": r"'mamba' has no attention in its layers.*no attention probabilities",
       "falcon": r"'falcon' computes attention inline.*without transformers' eager attention call",
       "qwen3_next": r"'qwen3_next' is a hybrid: layers \[0\] have no attention",
       "diffllama": r"through groupnorm.*before the output projection.*not the per-head outputs A V",
       "jetmoe": r"no linear output projection after its attention call"}


@pytest.mark.parametrize("name", list(tiny.UNSUPPORTED))
def test_what_cannot_work_is_refused_with_its_reason(name):
    assert set(WHY) == set(tiny.UNSUPPORTED)
    with pytest.raises(arch.UnsupportedArchitecture, match=WHY[name]):
        wrap(tiny.unsupported(name))


class _Doubled(ml.LlamaAttention):
    """Llama attention that doubles the head outputs between the eager call and W_O: arithmetic
    that no module call reveals, so only the forward self-check can see it."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = ml.apply_rotary_pos_emb(q, k, cos, sin)
        attention_interface = ml.eager_attention_forward
        attn_output, attn_weights = attention_interface(self, q, k, v, attention_mask,
                                                        dropout=0.0, scaling=self.scaling)
        attn_output = 2.0 * attn_output.reshape(*input_shape, -1)
        return self.o_proj(attn_output), attn_weights


def test_self_check_refuses_head_outputs_changed_before_w_o():
    hf = tiny.model("llama")
    for layer in hf.model.layers:
        layer.self_attn.__class__ = _Doubled
    with pytest.raises(arch.UnsupportedArchitecture, match=r"input of W_O \(o_proj\) is not the output"):
        wrap(hf)
    hf.config.model_type = "llama"          # the unmodified model still passes afterwards
    assert arch.arch_of(wrap(tiny.model("llama")).config).out_proj == "o_proj"


def test_hand_entry_is_used_as_written(monkeypatch):
    hf = tiny.model("llama")
    hand = arch.Arch(layers="model.layers", attn="self_attn", out_proj="o_proj")
    monkeypatch.setitem(arch.ARCHS, "llama", hand)
    m = wrap(hf)
    assert arch.arch_of(m.config) is hand and m.out_proj(1).shape == (32, 32)


def test_arch_of_an_unseen_model_type_says_to_wrap_first():
    cfg = tiny.config("llama")
    cfg.model_type = "never-wrapped"
    with pytest.raises(arch.UnsupportedArchitecture, match=r"'never-wrapped'.*wrap the model first"):
        arch.arch_of(cfg)


def test_config_facts_under_other_names():
    falcon = tf.FalconConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=8,
                             multi_query=True, new_decoder_architecture=False)
    assert (arch.n_layers(falcon), arch.n_heads(falcon), arch.n_kv_heads(falcon),
            arch.head_dim(falcon), arch.d_model(falcon)) == (3, 8, 1, 8, 64)
    gptj = tiny.config("gptj")
    assert (arch.n_layers(gptj), arch.n_heads(gptj), arch.n_kv_heads(gptj), arch.head_dim(gptj),
            arch.context_length(gptj)) == (2, 4, 4, 8, 512)
    bigcode = wrap(tiny.model("gpt_bigcode"))            # multi-query: one K/V head
    assert bigcode.n_kv_heads == 1 and bigcode.hf.transformer.h[0].attn.c_attn.out_features == 32 + 2 * 8


def test_layer_list_is_the_decoders_not_another_list_of_the_same_length():
    hf = tiny.model("llama")
    hf.extra = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])   # a decoy
    assert arch.arch_of(wrap(hf).config).layers == "model.layers"


@pytest.mark.parametrize("name,has_norm", [("llama", False), ("qwen2", False), ("gemma3", True),
                                           ("gemma2", True), ("olmo2", True)])
def test_post_attention_scale_is_the_norm_between_w_o_and_the_residual(name, has_norm):
    """The norm found is the one whose input is the attention output (hooks on a forward pass),
    and its effect on any vector is that vector times post_attn_scale, up to a per-token factor."""
    hf = tiny.model(name)
    m = models.wrap(f"tiny-random-{name}", hf, tiny.tokenizer())
    scale = m.post_attn_scale(0)
    assert (scale is not None) == has_norm
    if not has_norm:
        return
    block = hf.model.layers[0]
    norm = getattr(block, arch.post_attention_norm(block, "self_attn"))
    seen = {}
    h1 = block.self_attn.register_forward_hook(lambda mod, i, o: seen.update(attn=o[0]))
    h2 = norm.register_forward_hook(lambda mod, i, o: seen.update(norm_in=i[0]))
    hf(torch.tensor([[1, 2, 3, 4, 5]]))
    h1.remove(), h2.remove()
    assert torch.equal(seen["attn"], seen["norm_in"])
    y = torch.randn(4, m.d_model)
    cos = torch.nn.functional.cosine_similarity(norm(y), y * scale, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
