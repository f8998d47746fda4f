"""Which tokens act as sinks on long text, and how much their tags explain (paper Sec. 5).

``run`` streams long prompts through a model and records every sink instance: (prompt, layer,
head, position, token string, alpha, the head's VE). ``table`` turns instances into the paper's
taxonomy: per token string, how often it is a sink and the mean VE of the heads where it is.
``differences`` and ``compare`` put two models side by side (the paper's base vs
distilled-reasoning pairs). In sliding-window layers a key's score is averaged over the queries
that can see it (``definitions.alpha`` with the layer's window), so Gemma-3's local layers are
not penalised for keys that late queries cannot reach. What kind of token a sink is, and the
verdicts, are in ``taxonomy.verdicts``; the figure in ``taxonomy.figures``.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm   # text bars: they go to the log, never into the HTML

from ... import analysis
from ... import definitions as D
from ... import extract
from ... import models as M
from ... import stats as S
from ...models import Model

COLUMNS = ["prompt", "layer", "head", "position", "token", "alpha", "ve"]


@dataclass
class Result:
    model: str
    instances: pd.DataFrame      # one row per sink instance (COLUMNS)
    n_sinks: np.ndarray          # (P, L, H) sinks per head
    ve: np.ndarray               # (P, L, H) VE (NaN: no sink)
    windows: list
    seconds: float
    tokens: int
    sliding: tuple = ()          # the model's sliding-window layers


def _f32(x: torch.Tensor) -> torch.Tensor:
    # float32 on the CPU at the point of use: a bfloat16 (or GPU) run gives bf16 activations;
    # sink scores, VE and the counts are computed in fp32
    return x.to("cpu", torch.float32)


def run(model: Model, texts: list[str], max_tokens: int = 1024, eps: float = D.EPS,
        min_queries: int = 32, progress: bool = True) -> Result:
    """Every sink instance of ``model`` on ``texts`` (truncated to ``max_tokens``), one prompt
    at a time, one layer at a time."""
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
            O = _f32(rec.head_out[0]).transpose(0, 1)
            new, n[p, rec.layer], ve[p, rec.layer] = layer_instances(
                _f32(rec.A[0]), _f32(rec.V[0]), O, rec.window, toks, eps, min_queries, p,
                rec.layer)
            rows += new
            bar.update(1)
    bar.close()
    inst = pd.DataFrame(rows, columns=COLUMNS)
    return Result(model.name, inst, n, ve, model.windows, time.time() - t0,
                  int(sum(batch.lengths)), tuple(model.sliding_layers))


def run_models(names: list[str], texts: list[str], max_tokens: int = 1024, eps: float = D.EPS,
               min_queries: int = 32, device: str = "cpu", dtype: str = "float32"
               ) -> dict[str, Result]:
    """``run`` for each model, loaded once (``device``, ``dtype`` as in ``ctr.models.load``)."""
    out = {}
    for name in names:
        m = M.load(name, device=device, dtype=dtype, T=max_tokens)
        out[name] = run(m, texts, max_tokens=max_tokens, eps=eps, min_queries=min_queries)
        del m
        gc.collect()
    return out


def layer_instances(A, V, O, window, tokens, eps, min_queries, prompt=0, layer=0):
    """Sink instances of one layer of one prompt: rows (prompt, layer, head, position, token,
    alpha, ve), plus the sinks per head and the VE per head. A (H,T,T), V and O (H,T,D)."""
    s = analysis.layer_summary(A.float(), V.float(), O.float(), window, eps, min_queries,
                               random=False)
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
    inst = r.instances.assign(key=[label(t, p) for t, p in
                                   zip(r.instances.token, r.instances.position)])
    g = inst.groupby("key").agg(frequency=("ve", "size"), mean_ve=("ve", "mean"))
    g["share"] = g.frequency / max(len(inst), 1)
    return (g.sort_values(["frequency", "mean_ve"], ascending=False).head(top).reset_index()
            .rename(columns={"key": "token", "mean_ve": "mean VE"}))


def stats(r: Result, high_ve: float = 0.5) -> dict:
    """Sinks per head, the share of sink-holding heads with VE above ``high_ve``, the median VE,
    and the instance and token counts (descriptive)."""
    has = ~np.isnan(r.ve)
    return {"sinks per head": float(r.n_sinks.mean()),
            f"share of heads with VE > {high_ve}":
                float((r.ve[has] > high_ve).mean()) if has.any() else None,
            "median VE": float(np.nanmedian(r.ve)) if has.any() else None,
            "sink instances": int(len(r.instances)),
            "distinct tokens": int(r.instances.token.nunique()) if len(r.instances) else 0,
            "tokens read": r.tokens}


def stats_table(runs: dict, high_ve: float = 0.5) -> pd.DataFrame:
    """``stats`` of every model, formatted (counts as integers, shares with two decimals)."""
    def fmt(v):
        return "-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.2f}"
    return pd.DataFrame({name: {k: fmt(v) for k, v in stats(r, high_ve).items()}
                         for name, r in runs.items()})


def sliding_note(r: Result) -> str | None:
    """For a model with sliding-window layers: how often the first token is a sink, and how
    often in those layers."""
    if not r.sliding:
        return None
    first = r.instances[r.instances.position == 0]
    sl = int(first.layer.isin(r.sliding).sum())
    return (f"**{r.model}** has sliding-window layers ({len(r.sliding)} of {r.n_sinks.shape[1]})."
            f" The first token is a sink {len(first)} times, {sl} of them in sliding layers.")


def differences(base: Result, other: Result, high_ve: float = 0.5, n_boot: int = S.N_BOOT,
                seed: int = 0) -> dict:
    """other - base, per prompt (the same prompts), with bootstrap intervals over prompts."""
    def per_prompt(r):
        P = r.n_sinks.shape[0]
        has = ~np.isnan(r.ve)
        return (r.n_sinks.reshape(P, -1).mean(1),
                np.c_[(np.nan_to_num(r.ve) > high_ve).reshape(P, -1).sum(1),
                      has.reshape(P, -1).sum(1)])
    (nb, hb), (no, ho) = per_prompt(base), per_prompt(other)
    d_sinks = no - nb
    ratio = lambda u: u[:, 0].sum() / max(u[:, 1].sum(), 1)  # noqa: E731
    d_high = lambda u: ratio(u[:, 2:]) - ratio(u[:, :2])  # noqa: E731
    units = np.c_[hb, ho]
    return {"sinks": (float(d_sinks.mean()), *S.bootstrap(d_sinks, np.mean, n_boot, seed)),
            "high_ve": (float(d_high(units)), *S.bootstrap(units, d_high, n_boot, seed))}


def compare(base: Result, other: Result, high_ve: float = 0.5, top: int = 10) -> dict:
    """Base vs reasoning (or any two models): the paper's three comparisons."""
    return {"stats": pd.DataFrame({base.model: stats(base, high_ve),
                                   other.model: stats(other, high_ve)}),
            "taxonomy": pd.concat({base.model: table(base, top), other.model: table(other, top)},
                                  axis=1)}


def line(r: Result, high_ve: float = 0.5) -> str:
    """One line per model for the run cell's output."""
    s = stats(r, high_ve)
    return (f"{r.model}: {s['sink instances']} sink instances, {s['distinct tokens']} distinct "
            f"tokens, {s['sinks per head']:.2f} sinks per head; {r.seconds:.0f} s for "
            f"{s['tokens read']} tokens")


def run_pairs(pairs, runs: dict, texts: list[str], high_ve: float = 0.5, n_boot: int = S.N_BOOT,
              seed: int = 0, top: int = 10, **run_kw) -> dict:
    """Base vs reasoning, for each [base, reasoning] pair: the differences and the side-by-side
    taxonomy; a model not in ``runs`` is run here (``run_kw``: max_tokens, eps, min_queries,
    device, dtype)."""
    out = {}
    for base, reasoning in pairs:
        missing = [m for m in (base, reasoning) if m not in runs]
        runs = {**runs, **run_models(missing, texts, **run_kw)} if missing else runs
        rb, rr = runs[base], runs[reasoning]
        out[f"{base} vs {reasoning}"] = {
            "differences": differences(rb, rr, high_ve, n_boot, seed),
            "taxonomy": compare(rb, rr, high_ve, top)["taxonomy"]}
    return out
