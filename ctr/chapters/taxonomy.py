"""Which tokens act as sinks on long text, and how much their tags explain (paper Sec. 5).

``run`` streams long prompts through a model and records every sink instance: (prompt, layer,
head, position, token string, the head's VE). ``table`` turns instances into the paper's
taxonomy: per token string, how often it is a sink and the mean VE of the heads where it is.
``compare`` puts two models side by side (the paper's base vs distilled-reasoning pairs).
In sliding-window layers a key's score is averaged over the queries that can see it
(``definitions.alpha`` with the layer's window), so Gemma-3's local layers are not penalised for
keys that late queries cannot reach.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm   # text bars: they go to the log, never into the HTML

from .. import analysis
from .. import definitions as D
from .. import extract
from ..models import Model


@dataclass
class Result:
    model: str
    instances: pd.DataFrame      # one row per sink instance
    n_sinks: np.ndarray          # (P, L, H) sinks per head
    ve: np.ndarray               # (P, L, H) VE (NaN: no sink)
    windows: list
    seconds: float
    tokens: int


def run(model: Model, texts: list[str], max_tokens: int = 1024, eps: float = D.EPS,
        min_queries: int = 32, progress: bool = True) -> Result:
    batch = model.encode(texts, max_tokens=max_tokens)
    P, L, H = len(texts), model.n_layers, model.n_heads
    n = np.zeros((P, L, H), np.int16)
    ve = np.full((P, L, H), np.nan)
    rows = []
    t0 = time.time()
    bar = tqdm(total=P * L, desc=f"{model.name}: taxonomy", unit="layer", disable=not progress)
    for p in range(P):
        toks = batch.tokens[p]
        for rec in extract.layers(model, batch.select([p])):
            O = rec.head_out[0].transpose(0, 1)
            new, n[p, rec.layer], ve[p, rec.layer] = layer_instances(
                rec.A[0], rec.V[0], O, rec.window, toks, eps, min_queries, p, rec.layer)
            rows += new
            bar.update(1)
    bar.close()
    inst = pd.DataFrame(rows, columns=["prompt", "layer", "head", "position", "token", "alpha", "ve"])
    return Result(model.name, inst, n, ve, model.windows, time.time() - t0, int(sum(batch.lengths)))


def layer_instances(A, V, O, window, tokens, eps, min_queries, prompt=0, layer=0):
    """Sink instances of one layer of one prompt: rows (prompt, layer, head, position, token,
    alpha, ve), plus the sinks per head and the VE per head. A (H,T,T), V and O (H,T,D)."""
    s = analysis.layer_summary(A.float(), V.float(), O.float(), window, eps, min_queries, random=False)
    ve = s["ve"].numpy()
    rows = [(prompt, layer, h, t, tokens[t], float(s["alpha"][h, t]), float(ve[h]))
            for h, t in torch.nonzero(s["S"]).tolist()]
    return rows, s["n_sinks"].numpy(), ve


def label(token: str, position: int) -> str:
    """How a sink token is shown: position 0 is marked as the first token."""
    shown = repr(token)
    return f"{shown} (first token)" if position == 0 else shown


def table(r: Result, top: int = 10) -> pd.DataFrame:
    """The paper's taxonomy table: token string, times it is a sink, mean VE when it is.

    The first token of the prompt is counted apart from the same string elsewhere (it is a sink
    for a different reason: it is seen by every query)."""
    inst = r.instances.assign(key=[label(t, p) for t, p in zip(r.instances.token, r.instances.position)])
    g = inst.groupby("key").agg(frequency=("ve", "size"), mean_ve=("ve", "mean"))
    g["share"] = g.frequency / max(len(inst), 1)
    return g.sort_values(["frequency", "mean_ve"], ascending=False).head(top).reset_index() \
            .rename(columns={"key": "token"})


def kinds(r: Result) -> dict:
    """Share of sink instances that are the first token, punctuation, function words, other."""
    function = {"the", "a", "an", "of", "to", "and", "in", "is", "it", "i", "that", "for", "on",
                "with", "as", "was", "this", "but", "be", "at", "by", "he", "she", "they", "you",
                "his", "her", "not", "are", "have", "so"}
    inst = r.instances
    if len(inst) == 0:
        return {}
    def kind(tok, pos):
        w = tok.strip().lower()
        if pos == 0:
            return "first token"
        if w == "" or all(not c.isalnum() for c in w):
            return "punctuation / space"
        if w in function:
            return "function word"
        return "content / other"
    k = pd.Series([kind(t, p) for t, p in zip(inst.token, inst.position)])
    return (k.value_counts() / len(k)).to_dict()


def stats(r: Result, high_ve: float = 0.5) -> dict:
    has = ~np.isnan(r.ve)
    return {"sinks_per_head": float(r.n_sinks.mean()),
            "share_heads_high_ve": float((r.ve[has] > high_ve).mean()) if has.any() else None,
            "ve_median": float(np.nanmedian(r.ve)) if has.any() else None,
            "high_ve": high_ve, "instances": int(len(r.instances)),
            "distinct_tokens": int(r.instances.token.nunique()) if len(r.instances) else 0,
            "tokens": r.tokens}


def compare(base: Result, other: Result, high_ve: float = 0.5, top: int = 10) -> dict:
    """Base vs reasoning (or any two models): the paper's three comparisons."""
    return {"stats": pd.DataFrame({base.model: stats(base, high_ve), other.model: stats(other, high_ve)}),
            "taxonomy": pd.concat({base.model: table(base, top), other.model: table(other, top)}, axis=1)}
