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


FUNCTION = {"the", "a", "an", "of", "to", "and", "in", "is", "it", "i", "that", "for", "on",
            "with", "as", "was", "this", "but", "be", "at", "by", "he", "she", "they", "you",
            "his", "her", "not", "are", "have", "so"}
KINDS = ("first token", "punctuation / space", "function word", "content / other")


def kind(token: str, position: int) -> str:
    """What a sink token is. Case-sensitive, as the paper's table is: "the" and "The" are function
    words (lower or title case of a word in FUNCTION, and "I"); "THE" is not. A leading space
    (GPT-2 style "Ġ") is not part of the word."""
    if position == 0:
        return "first token"
    w = token.replace("Ġ", " ").strip()
    if w == "" or all(not c.isalnum() for c in w):
        return "punctuation / space"
    if w.lower() in FUNCTION and w in (w.lower(), w.capitalize()):
        return "function word"
    return "content / other"


def kinds(r: Result, first: bool = True) -> dict:
    """Share of sink instances of each kind; ``first=False``: over the instances that are not
    the first token (the paper's claim is about those: BOS is most of every model's instances)."""
    inst = r.instances if first else r.instances[r.instances.position != 0]
    if len(inst) == 0:
        return {}
    k = pd.Series([kind(t, p) for t, p in zip(inst.token, inst.position)])
    return (k.value_counts() / len(k)).to_dict()


def base_share(r: Result, n_boot: int = 1000, seed: int = 0) -> dict:
    """Share of non-first sink instances that are punctuation or function words, with a 95%
    bootstrap interval over prompts (the instances of one prompt are not independent)."""
    from .. import stats as S

    inst = r.instances[r.instances.position != 0]
    hit = np.array([kind(t, p) in ("punctuation / space", "function word")
                    for t, p in zip(inst.token, inst.position)], bool)
    P = r.n_sinks.shape[0]
    units = np.zeros((P, 2))
    np.add.at(units, (inst.prompt.to_numpy(), 0), hit)
    np.add.at(units, (inst.prompt.to_numpy(), 1), 1)
    ratio = lambda u: u[:, 0].sum() / u[:, 1].sum() if u[:, 1].sum() else np.nan  # noqa: E731
    lo, hi = S.bootstrap(units, ratio, n_boot, seed)
    return {"share": float(ratio(units)) if len(inst) else None, "lo": lo, "hi": hi,
            "instances": int(len(inst)), "prompts_with_any": int((units[:, 1] > 0).sum())}


def paper_base_share(rows: list[dict]) -> float:
    """The same share on the paper's own top-10 table (its non-BOS rows, weighted by frequency)."""
    rows = [x for x in rows if x["token"] != "BOS"]
    hit = sum(x["freq"] for x in rows if kind(x["token"], 1) in ("punctuation / space", "function word"))
    return hit / sum(x["freq"] for x in rows)


MIN_INSTANCES = 30


def rule_base_sinks(instances: int, lo, hi, min_instances: int = MIN_INSTANCES) -> str:
    """Base-model sinks beyond the first token are punctuation and function words: their share
    of the non-first sink instances lies above 1/2. No verdict on fewer than 30 instances."""
    from .. import verdicts as V

    return V.UNTESTABLE if instances < min_instances else V.by_interval(lo, hi, 0.5, 1.0)


def rule_reasoning(more_sinks: tuple, more_high_ve: tuple) -> str:
    """Reasoning model vs its base: more sinks per head and a larger share of high-VE heads
    (each a 95% interval of the difference, over the same prompts, above 0)."""
    from .. import verdicts as V

    return V.all_of(V.by_interval(*more_sinks, low=0.0), V.by_interval(*more_high_ve, low=0.0))


def differences(base: Result, other: Result, high_ve: float = 0.5, n_boot: int = 1000,
                seed: int = 0) -> dict:
    """other - base, per prompt (the same prompts), with bootstrap intervals over prompts."""
    from .. import stats as S

    def per_prompt(r):
        P = r.n_sinks.shape[0]
        has = ~np.isnan(r.ve)
        return (r.n_sinks.reshape(P, -1).mean(1),
                np.c_[(np.nan_to_num(r.ve) > high_ve).reshape(P, -1).sum(1), has.reshape(P, -1).sum(1)])
    (nb, hb), (no, ho) = per_prompt(base), per_prompt(other)
    d_sinks = no - nb
    ratio = lambda u: u[:, 0].sum() / max(u[:, 1].sum(), 1)  # noqa: E731
    d_high = lambda u: ratio(u[:, 2:]) - ratio(u[:, :2])  # noqa: E731
    units = np.c_[hb, ho]
    return {"sinks": (float(d_sinks.mean()), *S.bootstrap(d_sinks, np.mean, n_boot, seed)),
            "high_ve": (float(d_high(units)), *S.bootstrap(units, d_high, n_boot, seed))}


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


def claims(shares: dict, diffs: dict, paper: dict, high_ve: float) -> list[dict]:
    """paper / ours / verdict rows: ``shares`` = model -> ``base_share`` (plus "top": its top
    tokens), ``diffs`` = "base vs reasoning" -> ``differences``; ``paper`` = results.paper()."""
    from .. import verdicts as V

    pt = paper["taxonomy"]["tables"]["Qwen2.5-14B"]
    ps = paper_base_share(pt)
    rows = []
    for name, b in shares.items():
        rows.append(V.row(
            "base_sinks", name, "beyond the first token, sinks are punctuation and function words",
            f"Qwen2.5-14B: {ps:.0%} of the non-BOS instances of its top-10 table ('.', ',', "
            "'the', 'I', 'to', ...)",
            (f"{b['share']:.0%} of {b['instances']} non-first sink instances; top: {b['top']}"
             if b["instances"] else "no sink beyond the first token"),
            V.interval(b["lo"], b["hi"]),
            "share of non-first sink instances that are punctuation or function words above 1/2 "
            f"(bootstrap over prompts); no verdict on fewer than {MIN_INSTANCES} instances",
            rule_base_sinks(b["instances"], b["lo"], b["hi"])))
    paper_pairs = "; ".join(f"{p['base']} {p['base_sinks']} -> {p['reasoning']} {p['reasoning_sinks']}"
                            for p in paper["reasoning"]["pairs"])
    rule = (f"reasoning minus base, over the same prompts: sinks per head and share of heads with "
            f"VE > {high_ve} both above 0")
    for key, d in diffs.items():
        rows.append(V.row("reasoning", key, "reasoning models: more sinks per head, more high-VE heads",
                          paper_pairs, f"sinks per head {d['sinks'][0]:+.3f}, high-VE share "
                          f"{d['high_ve'][0]:+.3f}",
                          f"{V.interval(*d['sinks'][1:], '{:+.3f}')}; "
                          f"{V.interval(*d['high_ve'][1:], '{:+.3f}')}", rule,
                          rule_reasoning(d["sinks"][1:], d["high_ve"][1:])))
    if not diffs:
        rows.append(V.row("reasoning", "-", "reasoning models: more sinks per head, more high-VE heads",
                          paper_pairs, "no base/reasoning pair can be installed offline", "-", rule,
                          V.UNTESTABLE))
    return rows
