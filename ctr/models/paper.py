"""The paper's models as transformers configs, built offline from their published hyperparameters
(``paper_model_architectures`` in ``ctr/paper_numbers.yaml``, each from the model's public
config.json): what the memory plan needs to say, before anything is downloaded, whether a model
fits, and what the adapt page's "paper models" table is computed from.

    config("Llama-3.1-8B")          # a LlamaConfig; no weights, no network
    n_params(config("Qwen3-8B"))    # counted on the meta device: 8,190,735,360
"""
from __future__ import annotations

import functools
import json

import torch

from ..results import paper as _paper_numbers


def table() -> dict[str, dict]:
    """name -> the published hyperparameters (hub id, layers, heads, ...)."""
    return dict(_paper_numbers()["paper_model_architectures"]["models"])


def names() -> list[str]:
    return list(table())


def hub_id(name: str) -> str:
    return table()[name]["hub"]


def config(name: str):
    """A transformers config of paper model ``name`` (a key of ``table()`` or its hub id)."""
    import transformers as tf

    t = table()
    by_hub = {v["hub"]: k for k, v in t.items()}
    if name not in t and name not in by_hub:
        raise KeyError(f"{name!r} is not one of the paper's models: {', '.join(t)}")
    p = t[by_hub.get(name, name)]
    kw = dict(vocab_size=p["vocab"], hidden_size=p["d_model"], intermediate_size=p["d_ff"],
              num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
              num_key_value_heads=p["kv_heads"], max_position_embeddings=p["context"],
              tie_word_embeddings=p["tied"])
    if "head_dim" in p:
        kw["head_dim"] = p["head_dim"]
    if "window" in p:
        kw["sliding_window"] = p["window"]
    cfg = tf.CONFIG_MAPPING[p["model_type"]](**kw)
    cfg.dtype = p["dtype"]              # the checkpoint's dtype (config.json "torch_dtype")
    cfg.name_or_path = p["hub"]
    return cfg


def _key(config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


@functools.lru_cache(maxsize=64)
def _count(key: str, model_type: str) -> int:
    import transformers as tf
    from accelerate import init_empty_weights

    cfg = tf.CONFIG_MAPPING[model_type].from_dict(json.loads(key))
    with init_empty_weights(include_buffers=False):
        m = tf.AutoModelForCausalLM.from_config(cfg)
    m.tie_weights()              # not done inside init_empty_weights
    # parameters() lists a tied embedding once
    return sum(p.numel() for p in m.parameters())


def n_params(config) -> int:
    """Exact parameter count of the model a config describes, counted on the meta device (the
    model's modules are built without memory; tied embeddings counted once)."""
    return _count(_key(config), config.model_type)


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype the weights are stored in (config.json "dtype"/"torch_dtype"), if stated."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if d is None or isinstance(d, torch.dtype):
        return d
    return getattr(torch, str(d).removeprefix("torch."), None)
