"""Tiny randomly initialised models for tests and `smoke=True` chapter runs (no download).

One config per architecture in ``ARCHS`` (built offline from transformers' config classes),
with grouped-query attention where the architecture has it, and a byte-level tokenizer (one
token per byte) that puts <bos> first by itself, as Llama's and Gemma's do.
Weights are drawn with a fixed seed and a large init scale so attention is peaked and
random heads still show sinks for the chapters' code paths to exercise.
"""
from __future__ import annotations

import inspect

import torch
import transformers as tf

VOCAB = 259  # <pad>, <bos>, <eos> + 256 byte symbols


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                      special_tokens=[("<bos>", 1)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                      pad_token="<pad>")


_MOE = dict(num_local_experts=2, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
            shared_expert_intermediate_size=16)
_GPT = dict(n_head=4, n_embd=32, n_positions=512)        # GPT-2-style names

# name -> (model_type, settings beyond the common ones). The first 8 are the hand-listed ones
# of earlier versions; the rest are found by ctr.arch.discover and checked by the same tests.
_ARCH = {
    "llama": ("llama", {}), "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}), "phi3": ("phi3", {}), "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3_text", {}), "gpt2": ("gpt2", _GPT),
    "gemma": ("gemma", {}), "olmo": ("olmo", {}), "olmo2": ("olmo2", {}), "olmo3": ("olmo3", {}),
    "gpt_neox": ("gpt_neox", {}), "phi": ("phi", {}), "stablelm": ("stablelm", {"qk_layernorm": True}),
    "cohere": ("cohere", {"use_qk_norm": True}), "cohere2": ("cohere2", {}),
    "granite": ("granite", {}), "glm": ("glm", {}), "glm4": ("glm4", {}),
    "starcoder2": ("starcoder2", {}), "mixtral": ("mixtral", _MOE), "qwen2_moe": ("qwen2_moe", _MOE),
    "qwen3_moe": ("qwen3_moe", _MOE), "smollm3": ("smollm3", {}), "helium": ("helium", {}),
    "exaone4": ("exaone4", {}), "persimmon": ("persimmon", {}), "opt": ("opt", {"ffn_dim": 64}),
    "gpt_bigcode": ("gpt_bigcode", {**_GPT, "multi_query": True}),
    "gptj": ("gptj", {**_GPT, "rotary_dim": 4}), "gpt_oss": ("gpt_oss", _MOE),
    "llama4_text": ("llama4_text", _MOE), "ministral": ("ministral", {}),
}
ARCHS = tuple(_ARCH)


def config(arch: str, layers: int = 2, window: int | None = None):
    if arch not in _ARCH:
        raise ValueError(f"no tiny config for {arch!r}; tiny architectures: {', '.join(ARCHS)}")
    model_type, extra = _ARCH[arch]
    common = dict(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=32, intermediate_size=64, head_dim=8, vocab_size=VOCAB,
                  max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.3)
    if "n_embd" in extra:    # GPT-2-style configs name these differently
        common = dict(n_layer=layers, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.3)
    if model_type == "mistral":
        common["sliding_window"] = window
    if model_type in ("gemma2", "gemma3_text"):
        common["sliding_window"] = window or 512
        if model_type == "gemma3_text":
            # sliding, then full: both kinds of layer in two layers
            common["layer_types"] = (["sliding_attention", "full_attention"] * layers)[:layers]
    cls = tf.CONFIG_MAPPING[model_type]
    # A config class stores any keyword it is given; one whose model has no grouped-query
    # attention (GPT-NeoX, OPT, Persimmon) would then report 2 key/value heads it does not have.
    if "num_key_value_heads" not in inspect.signature(cls.__init__).parameters \
            and "num_key_value_heads" not in extra:
        common.pop("num_key_value_heads", None)
    return cls(**{**common, **extra})


# Architectures ctr refuses, each with a tiny config: name -> (why, model_type, settings).
_SMALL = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
              vocab_size=VOCAB, max_position_embeddings=64)
UNSUPPORTED = {
    "t5": ("encoder-decoder", "t5", dict(num_layers=1, num_heads=2, d_model=16, d_kv=8, d_ff=32,
                                        vocab_size=VOCAB)),
    "deepseek_v3": ("multi-latent attention", "deepseek_v3",
                    {**_SMALL, "num_key_value_heads": 4, "kv_lora_rank": 8, "q_lora_rank": 8,
                     "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
                     "n_routed_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16,
                     "first_k_dense_replace": 2, "n_group": 1, "topk_group": 1}),
    "mamba": ("no attention (state-space)", "mamba",
              dict(num_hidden_layers=2, hidden_size=32, state_size=4, vocab_size=VOCAB)),
    "falcon": ("attention computed inline", "falcon", {**_SMALL, "new_decoder_architecture": False}),
    "qwen3_next": ("hybrid (linear-attention layers)", "qwen3_next",
                   {**_SMALL, "num_key_value_heads": 2, "head_dim": 8,
                    "layer_types": ["linear_attention", "full_attention"], "num_experts": 2,
                    "num_experts_per_tok": 1, "moe_intermediate_size": 16,
                    "shared_expert_intermediate_size": 16, "linear_num_key_heads": 2,
                    "linear_num_value_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8}),
    "diffllama": ("differential attention", "diffllama", {**_SMALL, "num_key_value_heads": 2}),
    "jetmoe": ("no linear output projection", "jetmoe",
               dict(num_hidden_layers=2, hidden_size=32, num_key_value_heads=2, kv_channels=8,
                    intermediate_size=64, num_local_experts=2, num_experts_per_tok=1,
                    vocab_size=VOCAB, max_position_embeddings=64)),
}


def unsupported(name: str, seed: int = 0):
    """A tiny model of an architecture ctr refuses (``UNSUPPORTED``), eager attention."""
    _, model_type, kw = UNSUPPORTED[name]
    cfg = tf.CONFIG_MAPPING[model_type](**kw)
    torch.manual_seed(seed)
    cls = tf.AutoModelForSeq2SeqLM if getattr(cfg, "is_encoder_decoder", False) else tf.AutoModelForCausalLM
    return cls.from_config(cfg, attn_implementation="eager").eval()


def model(arch: str = "llama", seed: int = 0, layers: int = 2, window: int | None = None):
    cfg = config(arch, layers=layers, window=window)
    torch.manual_seed(seed)
    m = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return m.eval()


def planted(seed: int = 0, layers: int = 3, strength: float = 5.0):
    """A tiny random Llama with two planted sinks, for smoke runs and end-to-end tests.

    Query heads 0-1 (KV head 0) sink on <bos>; query heads 2-3 (KV head 1) sink on every "."
    and, more weakly, on <bos>.
    How: <bos> and "." get large embeddings along their own residual direction (dims 0 and 1,
    zeroed in every other token), so after RMSNorm they dominate those coordinates in every
    layer. Each KV head's key reads its direction into the slowest-rotating RoPE pair
    (dims 3 and 7 of the head), and every query head carries a constant bias there, so all
    queries score the planted tokens highly whatever their content or (nearly) position.
    """
    cfg = config("llama", layers=layers)
    cfg.attention_bias = True
    torch.manual_seed(seed)
    m = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    tok = tokenizer()
    bos, dot = tok.bos_token_id, tok.convert_tokens_to_ids(".")
    D, H = 8, 4
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb[:, :2] = 0.0
        emb[bos] = 0.0
        emb[bos, 0] = 50.0
        emb[dot] = 0.0
        emb[dot, 1] = 50.0
        for layer in m.model.layers:
            att = layer.self_attn
            layer.input_layernorm.weight.fill_(1.0)
            for g, reads in ((0, {0: 1.0}), (1, {0: 0.6, 1: 1.0})):
                for d in (3, 7):
                    row = g * D + d
                    att.k_proj.weight[row] = 0.0
                    att.k_proj.bias[row] = 0.0
                    if d == 3:
                        for direction, w in reads.items():
                            att.k_proj.weight[row, direction] = w
            for h in range(H):
                for d in (3, 7):
                    row = h * D + d
                    att.q_proj.weight[row] = 0.0
                    att.q_proj.bias[row] = strength if d == 3 else 0.0
    return m
