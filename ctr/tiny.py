"""Tiny randomly initialised models for tests and `smoke=True` chapter runs (no download).

One config per supported architecture, all with grouped-query attention where the
architecture has it, and a byte-level tokenizer (one token per byte) with a <bos> token.
Weights are drawn with a fixed seed and a large init scale so attention is peaked and
random heads still show sinks for the chapters' code paths to exercise.
"""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 259  # <pad>, <bos>, <eos> + 256 byte symbols


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                      pad_token="<pad>")


def config(arch: str, layers: int = 2, window: int | None = None):
    common = dict(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=32, intermediate_size=64, vocab_size=VOCAB,
                  max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.3)
    if arch == "gpt2":
        return tf.GPT2Config(n_layer=layers, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=512,
                             bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "mistral": tf.MistralConfig, "phi3": tf.Phi3Config, "gemma2": tf.Gemma2Config,
           "gemma3": tf.Gemma3TextConfig}[arch]
    if arch in ("qwen3", "gemma2", "gemma3"):
        common["head_dim"] = 8
    if arch == "mistral":
        common["sliding_window"] = window
    if arch in ("gemma2", "gemma3"):
        common["sliding_window"] = window or 512
        if arch == "gemma3":
            # sliding, then full: both kinds of layer in two layers
            common["layer_types"] = (["sliding_attention", "full_attention"] * layers)[:layers]
    return cls(**common)


ARCHS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "gpt2")


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
