"""Where a decoder-only model keeps its layers, attention and output projection, found by looking.

Extraction needs, per architecture: the list of decoder layers, the attention module inside a
layer, the output projection W_O inside the attention module (its input is the concatenation of
the per-head outputs) and the op name of the eager attention call in the module's source. None
of these is listed by hand: ``discover(lm)`` reads them from a loaded model, wrapped by nnsight
(``models.wrap`` calls it and ``register``s the result under the config's ``model_type``):

- layers: the ``nn.ModuleList`` of the base model with one entry per ``num_hidden_layers``;
- attention: the module inside a layer whose source calls transformers' ``attention_interface``
  (``eager_attention_forward`` under eager attention, which returns the probabilities A);
- W_O: the first linear child the attention module calls after that call (from ``.source``).

What cannot work is refused with the reason (``UnsupportedArchitecture``): encoder-decoder
models, multi-latent attention, models without attention (state-space, recurrent), hybrids
whose layers are not all attention layers, and attention written without the eager call.
``ARCHS`` also takes hand entries, for a model discovery gets wrong.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Arch:
    layers: str          # attribute path from the *ForCausalLM model to the ModuleList of layers
    attn: str            # attribute path inside a decoder layer to the attention module
    out_proj: str        # attribute of the attention module: W_O, input = per-head outputs
    call: str = ""       # op name of the eager attention call in the module's .source


# model_type -> Arch: filled by ``register`` when a model is wrapped; hand entries go here too.
ARCHS: dict[str, Arch] = {}


class UnsupportedArchitecture(ValueError):
    pass


def arch_of(config) -> Arch:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise UnsupportedArchitecture(
            f"ctr has not seen architecture {mt!r} yet: wrap the model first (ctr.models.wrap or "
            "ctr.models.load find its layers, attention and W_O). If discovery fails for it, add a "
            "hand entry to ctr.arch.ARCHS with those paths.")
    return ARCHS[mt]


def getpath(obj, path: str):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


# --- facts read from the config ---------------------------------------------------------------

def _first(config, *names):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return None


def n_heads(config) -> int:
    return _first(config, "num_attention_heads", "n_head", "n_heads")


def n_kv_heads(config) -> int:
    # Multi-query models (GPT-BigCode, the original Falcon) share one key/value head.
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1
    return _first(config, "num_key_value_heads", "num_kv_heads") or n_heads(config)


def head_dim(config) -> int:
    # Qwen2Config has no head_dim attribute; derive it as the model does.
    hd = getattr(config, "head_dim", None)
    return hd or d_model(config) // n_heads(config)


def d_model(config) -> int:
    return _first(config, "hidden_size", "n_embd", "d_model")


def n_layers(config) -> int:
    return _first(config, "num_hidden_layers", "n_layer", "n_layers")


def context_length(config) -> int:
    return _first(config, "max_position_embeddings", "n_positions", "seq_length")


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
    a = arch_of(model.config)
    attn = getpath(getpath(model, a.layers)[0], a.attn)
    return any(hasattr(attn, q) and hasattr(attn, k) for q, k in
               (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"), ("query_layernorm", "key_layernorm")))


# --- discovery ----------------------------------------------------------------------------------

_CALL = re.compile(r"attention_interface_(\d+)$")
_SELF_CALL = re.compile(r"^self_(.+)_(\d+)$")


def attention_call(attn_envoy) -> str:
    """The op name of the eager attention call in an attention module's source (nnsight envoy).

    transformers assigns ``attention_interface = ...get_interface(...)`` (op ``_0``) and then
    calls it (the last ``attention_interface_N``). Resolved from ``.source``, never assumed.
    """
    names = [n for n in attn_envoy.source.names if _CALL.match(n)]
    if not names:
        raise UnsupportedArchitecture(
            f"{type(attn_envoy._module).__name__} computes attention without transformers' eager "
            "attention call (no attention_interface in its source), so ctr cannot read its "
            "attention probabilities and values there. Add a hand entry to ctr.arch.ARCHS only "
            "if you also extend ctr.arch.attention_call.")
    return max(names, key=lambda n: int(_CALL.match(n).group(1)))


def post_attention_norm(layer: torch.nn.Module, attn: str) -> str | None:
    """The norm a decoder layer applies to the attention output before adding it to the residual
    stream (Gemma-2/3's and OLMo-2's ``post_attention_layernorm``), read from the layer's
    ``forward`` source: a ``hidden_states = self.<norm>(hidden_states)`` between the attention
    call and the first ``residual +``. None for pre-norm layers (Llama's
    ``post_attention_layernorm`` is the MLP's input norm and comes after the residual add)."""
    try:
        src = inspect.getsource(type(layer).forward)
    except (OSError, TypeError):
        return None
    i = src.find(f"self.{attn.split('.')[-1]}(")
    j = src.find("residual +", i) if i >= 0 else -1
    if i < 0 or j < 0:
        return None
    found = re.findall(r"hidden_states\s*=\s*self\.(\w+)\(hidden_states\)", src[i:j])
    return found[0] if found else None


def refuse_by_config(config) -> None:
    """Refuse, from the config alone, what cannot work whatever the modules look like."""
    mt = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitecture(
            f"{mt!r} is an encoder-decoder model: ctr reads the causal self-attention of a "
            "decoder-only language model (the paper's setting); use a decoder-only model")
    if getattr(config, "kv_lora_rank", None):
        raise UnsupportedArchitecture(
            f"{mt!r} uses multi-latent attention: keys and values are decompressed from one shared "
            "latent per token, and its head_dim is the rotary part of queries and keys, not the "
            "value dimension; ctr's per-head value geometry (tags, VE against sqrt(k/D)) is "
            "defined for multi-head and grouped-query attention only")


def _calls_attention(module) -> bool:
    try:
        return "attention_interface(" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def layer_list(hf) -> tuple[str, torch.nn.ModuleList]:
    """(path, the ModuleList of decoder layers) of a transformers model (see the module doc)."""
    L = n_layers(hf.config)
    base = getattr(hf, "base_model_prefix", "") or ""
    found = [(n, m) for n, m in hf.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == L and n]
    # prefer the base model's list (the decoder), then the shortest path
    found.sort(key=lambda nm: (not nm[0].startswith(base), nm[0].count("."), nm[0]))
    if not found:
        raise UnsupportedArchitecture(
            f"{hf.config.model_type!r}: no list of {L} decoder layers (nn.ModuleList) in "
            f"{type(hf).__name__}; add a hand entry to ctr.arch.ARCHS")
    return found[0]


def _attention_path(layers, mt: str) -> str:
    paths = []
    for i, layer in enumerate(layers):
        hits = [n for n, m in layer.named_modules() if n and _calls_attention(m)]
        paths.append(hits[0] if len(hits) == 1 else None)
        if len(hits) > 1:
            raise UnsupportedArchitecture(
                f"{mt!r}: layer {i} has several attention modules ({', '.join(hits)}), e.g. "
                "cross-attention; ctr reads one causal self-attention per layer")
    if all(p is None for p in paths):
        named = [n for n, m in layers[0].named_modules() if re.search(r"att", type(m).__name__, re.I)]
        if named:
            raise UnsupportedArchitecture(
                f"{mt!r} computes attention inline in {type(layers[0].get_submodule(named[0])).__name__}, "
                "without transformers' eager attention call (attention_interface), so ctr cannot "
                "read its attention probabilities and values; not supported")
        raise UnsupportedArchitecture(
            f"{mt!r} has no attention in its layers (a state-space or recurrent model): there are "
            "no attention probabilities, hence no sinks in the paper's sense")
    if None in paths or len(set(paths)) > 1:
        plain = [i for i, p in enumerate(paths) if p is None]
        raise UnsupportedArchitecture(
            f"{mt!r} is a hybrid: layers {plain} have no attention (state-space or linear "
            "layers); ctr needs softmax attention in every decoder layer")
    return paths[0]


def _out_proj(attn_envoy, call: str) -> str:
    """The first module the attention calls after the eager call: W_O, a linear map."""
    names = list(attn_envoy.source.names)
    module = attn_envoy._module
    for n in names[names.index(call) + 1:]:
        m = _SELF_CALL.match(n)
        child = getattr(module, m.group(1), None) if m else None
        if not isinstance(child, torch.nn.Module) or isinstance(child, torch.nn.Dropout):
            continue
        if isinstance(child, torch.nn.Linear) or type(child).__name__ == "Conv1D":
            return m.group(1)
        raise UnsupportedArchitecture(
            f"{type(module).__name__} passes its head outputs through {m.group(1)} "
            f"({type(child).__name__}) before the output projection, so the input of W_O is not "
            "the per-head outputs A V that ctr splits into tag and non-tag parts; not supported")
    raise UnsupportedArchitecture(
        f"{type(module).__name__} applies no linear output projection after its attention call "
        "(e.g. a mixture of attention experts maps the heads instead); ctr needs W_O, one linear "
        "map whose input is the per-head outputs. If it has one under another name, add a hand "
        "entry to ctr.arch.ARCHS")


def _self_check(lm, a: Arch) -> None:
    """One 3-token forward: the eager call's output must be exactly what W_O reads, A V.

    Catches what reading the source cannot: arithmetic between the call and W_O (differential
    attention mixes two attention maps there)."""
    envoy = getpath(getpath(lm, a.layers)[0], a.attn)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), lm.trace(ids, use_cache=False):
        out = getattr(envoy.source, a.call).output[0].save()         # (B, T, H, D)
        z = getpath(envoy, a.out_proj).input.save()                   # (B, T, H * D)
    if out.reshape(z.shape).shape != z.shape or not torch.allclose(out.reshape(z.shape), z, atol=1e-5):
        raise UnsupportedArchitecture(
            f"{type(envoy._module).__name__}: the input of W_O ({a.out_proj}) is not the output of "
            "the eager attention call (the head outputs are transformed in between, e.g. "
            "differential attention); ctr's split of A V into tag and non-tag parts does not apply")


def discover(lm) -> Arch:
    """Find the paths of an nnsight-wrapped transformers model (see the module docstring)."""
    hf = lm._module
    config = hf.config
    mt = config.model_type
    refuse_by_config(config)
    layers_path, layers = layer_list(hf)
    attn = _attention_path(layers, mt)
    envoy = getpath(getpath(lm, layers_path)[0], attn)
    call = attention_call(envoy)
    out = _out_proj(envoy, call)
    w = getpath(getpath(layers[0], attn), out)
    width = w.in_features if isinstance(w, torch.nn.Linear) else w.weight.shape[0]
    if width != n_heads(config) * head_dim(config):
        raise UnsupportedArchitecture(
            f"{mt!r}: W_O ({attn}.{out}) reads {width} features, but the config gives "
            f"{n_heads(config)} heads x {head_dim(config)} dims; ctr cannot split its input "
            "into heads")
    a = Arch(layers=layers_path, attn=attn, out_proj=out, call=call)
    _self_check(lm, a)
    return a


def register(lm) -> Arch:
    """The model's Arch: a hand entry of ``ARCHS`` if there is one, else discovered and stored."""
    mt = lm._module.config.model_type
    if mt in ARCHS and not ARCHS[mt].call:        # hand entry: trusted as written
        return ARCHS[mt]
    ARCHS[mt] = discover(lm)
    return ARCHS[mt]
