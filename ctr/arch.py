"""Where each supported architecture keeps its decoder layers, attention and output projection.

Extraction needs three paths per architecture: the list of decoder layers, the attention module
inside a layer, and the output projection W_O inside the attention module (its input is the
concatenation of the per-head outputs). Everything else is read from the model's config.
To support a new architecture, add one entry to ``ARCHS`` and one tiny config to
``tests/tiny.py``; the tests then check the extraction identities for it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    layers: str      # attribute path from the *ForCausalLM model to the ModuleList of layers
    attn: str        # attribute of a decoder layer holding the attention module
    out_proj: str    # attribute of the attention module: W_O, input = per-head outputs


_LLAMA_LIKE = Arch(layers="model.layers", attn="self_attn", out_proj="o_proj")

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gpt2": Arch(layers="transformer.h", attn="attn", out_proj="c_proj"),
}


class UnsupportedArchitecture(ValueError):
    pass


def arch_of(config) -> Arch:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise UnsupportedArchitecture(
            f"ctr cannot read architecture {mt!r} yet (supported: {', '.join(sorted(ARCHS))}). "
            "Add an entry to ctr.arch.ARCHS with the paths of its decoder layers, attention module "
            "and output projection, and a tiny config to tests/tiny.py so the tests check it.")
    return ARCHS[mt]


def getpath(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def n_heads(config) -> int:
    return getattr(config, "num_attention_heads", None) or config.n_head


def n_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or n_heads(config)


def head_dim(config) -> int:
    # Qwen2Config has no head_dim attribute; derive it as the model does.
    hd = getattr(config, "head_dim", None)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return hd or hidden // n_heads(config)


def n_layers(config) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def context_length(config) -> int:
    return getattr(config, "max_position_embeddings", None) or config.n_positions


def windows(config) -> list[int | None]:
    """Sliding-window size per layer (None = full causal attention).

    Query i sees key j when 0 <= i - j < window (transformers' sliding_window_overlay).
    Layers listed as "sliding_attention" in ``layer_types`` use ``sliding_window``; without
    ``layer_types`` a set ``sliding_window`` applies to every layer (Mistral, Phi-3).
    """
    L = n_layers(config)
    w = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [w if t == "sliding_attention" else None for t in types]
    return [w] * L


def has_qk_norm(model) -> bool:
    """QK-norm read from the modules, not the name: the attention normalises queries and keys."""
    attn = getpath(getpath(model, arch_of(model.config).layers)[0], arch_of(model.config).attn)
    return hasattr(attn, "q_norm") and hasattr(attn, "k_norm")


_CALL = re.compile(r"attention_interface_(\d+)$")


def attention_call(attn_envoy) -> str:
    """The op name of the eager attention call in an attention module's source (nnsight envoy).

    transformers assigns ``attention_interface = ...get_interface(...)`` (op ``_0``) and then
    calls it (the last ``attention_interface_N``). Resolved from ``.source``, never assumed.
    """
    names = [n for n in attn_envoy.source.names if _CALL.match(n)]
    if not names:
        raise UnsupportedArchitecture(
            f"no attention_interface call in {type(attn_envoy._module).__name__}'s source; print "
            "the attention module's .source to find the attention call and extend "
            "ctr.arch.attention_call")
    return max(names, key=lambda n: int(_CALL.match(n).group(1)))
