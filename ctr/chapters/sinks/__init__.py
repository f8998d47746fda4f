"""The sinks chapter (paper Sec. 3, Fig. 1-2): every case measured, one head shown.

``scan`` runs every prompt through the model, one layer at a time (``ctr.extract.layers``),
and hands each layer to ``sinks.measures.PromptScan``, which finds the two-sink heads (sinks
exactly the first token and one mid-prompt token p) and measures every case the rules judge.

The figures show one head, chosen by code (``pick``): the two-sink head whose second sink is
strongest (largest alpha_p) among those whose case is not skipped (at least 5 tokens in each
group; any two-sink head if none); if no head has two sinks, the head with the largest
mid-prompt score, said to be below eps. ``capture`` re-runs its prompt and keeps its arrays.
The two-heads figure shows a *pair*: that head and the strongest head of its prompt whose
mid-prompt sinks are all different from its own; if there is none, the strongest such pair of
any prompt; if there is none either, the shown head and the strongest head of its prompt
that shares a mid-prompt sink (``pair_attention`` re-runs the pair's prompt).

``run`` loads a model and does all of this; ``summary`` is what the results file keeps;
``replay`` rebuilds the shown head from a saved summary (the front page).
Measures: ``sinks.measures``; rules and rows: ``sinks.verdicts``; figures: ``sinks.figures``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ... import definitions as D
from ... import extract
from ...models import Model
from . import measures as SM


@dataclass
class Pick:
    prompt: int
    layer: int
    head: int
    sinks: list[int]
    alphas: list[float]          # alpha at each sink
    second: int | None           # the mid-prompt position shown (None: no candidate at all)
    qualifies: bool              # False: fallback, the second position is below eps


@dataclass
class Search:
    main: Pick
    pair: list[Pick]             # the two heads of the two-heads figure ([]: no such pair)
    candidates: int              # (prompt, head) pairs with two sinks
    heads_seen: int
    heads_with_mid_sink: int = 0  # heads of the pair's prompt with a mid-prompt sink
    other_disjoint: bool = False  # the pair's mid-prompt sinks are all different

    @property
    def other(self) -> Pick | None:
        """The pair's second head."""
        return self.pair[1] if self.pair else None


def writes(model: Model, layer: int) -> torch.Tensor:
    """(H, d_model, D): what each head adds to the residual stream per unit of its output,
    W_O's slice, times the post-attention norm's scale where the model has one (Gemma-3)."""
    H, Dh = model.n_heads, model.head_dim
    W = model.out_proj(layer).detach().float().cpu().reshape(model.d_model, H, Dh)
    s = model.post_attn_scale(layer)
    if s is not None:
        W = W * s.float().cpu()[:, None, None]
    return W.permute(1, 0, 2)


def layer_of(model: Model, rec, b: int) -> SM.Layer:
    """Prompt ``b`` of a streamed ``LayerRecord`` as the measures take it (padding cut)."""
    r = rec.prompt(b)
    return SM.Layer(r.layer, r.A[0].float().cpu(), r.head_out[0].transpose(0, 1).float().cpu(),
                    r.resid_in[0].float().cpu(), r.resid_out[0].float().cpu(), r.window,
                    r.V[0].float().cpu(), writes(model, r.layer))


def scan(model: Model, texts: list[str], eps: float = D.EPS, min_queries: int = 16,
         max_tokens: int = 128, depth: int = 3, batch: int = 8) -> list[SM.PromptScan]:
    """Every prompt's heads and cases (``sinks.measures.PromptScan``), ``batch`` prompts per
    forward pass; one layer's records are held at a time."""
    enc = model.encode(texts, max_tokens=max_tokens)
    out = []
    for i in range(0, len(texts), batch):
        idx = list(range(i, min(i + batch, len(texts))))
        scans = [SM.PromptScan(j, model.n_layers, eps, min_queries, depth) for j in idx]
        for rec in extract.layers(model, enc.select(idx)):
            rec = rec.cpu()          # numpy below; a no-op for float32 on the CPU
            for b, s in enumerate(scans):
                s.add(layer_of(model, rec, b))
        out += scans
    return out


def _pick(h: SM.Head) -> Pick:
    return Pick(h.prompt, h.layer, h.head, h.sinks, h.alphas, h.p if h.p is not None else h.q,
                h.p is not None)


def _strength(h: SM.Head) -> float:
    return max(a for s, a in zip(h.sinks, h.alphas) if s in h.mid)


def _partners(h: SM.Head, heads: list[SM.Head], disjoint: bool = True) -> list[SM.Head]:
    """Other heads of h's prompt with mid-prompt sinks, strongest first: those with none of
    h's mid-prompt sinks (``disjoint``), or those sharing one."""
    mine = set(h.mid) | ({h.q} if h.q is not None else set())
    return sorted((o for o in heads if o.prompt == h.prompt and o.mid and o is not h
                   and bool(set(o.mid) & mine) != disjoint), key=lambda o: -_strength(o))


def _second(h: SM.Head) -> Pick:
    p = _pick(h)
    p.second = max(h.mid, key=lambda s: h.alphas[h.sinks.index(s)])
    return p


def pick(scans: list[SM.PromptScan]) -> Search:
    """The head the figures show and the pair of the two-heads figure (module docstring)."""
    heads = [h for s in scans for h in s.heads]
    two = [h for h in heads if h.p is not None]
    some = [h for h in heads if h.q is not None]
    full = {(c["prompt"], c["layer"], c["heads"][0]) for s in scans for c in s.clusters
            if not c["skipped"]}
    shown = [h for h in two if (h.prompt, h.layer, h.head) in full] or two
    main = (max(shown, key=lambda h: h.alphas[1]) if two else
            max(some, key=lambda h: h.alpha_q) if some else heads[0])
    pair, disjoint = [], True
    if main.mid and _partners(main, heads):
        pair = [_pick(main), _second(_partners(main, heads)[0])]
    else:
        found = [p for p in (SM.disjoint_pair(s.heads) for s in scans) if p]
        if found:
            a, b = max(found, key=lambda p: _strength(p[0]))
            pair = [_second(a), _second(b)]
        elif main.mid and _partners(main, heads, disjoint=False):
            pair, disjoint = [_pick(main), _second(_partners(main, heads, False)[0])], False
    where = pair[0].prompt if pair else main.prompt
    n_mid = sum(1 for h in heads if h.prompt == where and h.mid)
    return Search(_pick(main), pair, len(two), len(heads), n_mid, bool(pair) and disjoint)


@dataclass
class Capture:
    tokens: list[str]
    A: torch.Tensor            # (T, T) the head's attention
    V: torch.Tensor            # (T, D) its value vectors
    out: torch.Tensor          # (T, D) its outputs
    resid_in: torch.Tensor     # (T, d_model) residual entering the layer (before its norm)
    deeper: torch.Tensor       # (T, d_model) residual leaving layer + ``depth``
    last: torch.Tensor         # (T, d_model) residual leaving the last layer
    deeper_layer: int
    write: torch.Tensor        # (d_model, D) the head's slice of W_O (times the norm's scale)
    window: int | None


def capture(model: Model, text: str, pick: Pick, depth: int = 3,
            max_tokens: int = 128) -> Capture:
    """One forward pass of the shown prompt, keeping the shown head's arrays."""
    batch = model.encode([text], max_tokens=max_tokens)
    deeper_layer = min(pick.layer + depth, model.n_layers - 1)
    got = {}
    for rec in extract.layers(model, batch):
        r = rec.cpu().prompt(0)
        if r.layer == pick.layer:
            got.update(A=r.A[0, pick.head].float().cpu().clone(),
                       V=r.V[0, pick.head].float().cpu().clone(),
                       out=r.head_out[0, :, pick.head].float().cpu().clone(),
                       resid_in=r.resid_in[0].float().cpu().clone(), window=r.window)
        if r.layer == deeper_layer:
            got["deeper"] = r.resid_out[0].float().cpu().clone()
        if r.layer == model.n_layers - 1:
            got["last"] = r.resid_out[0].float().cpu().clone()
    return Capture(batch.tokens[0], deeper_layer=deeper_layer,
                   write=writes(model, pick.layer)[pick.head], **got)


def pair_attention(model: Model, text: str, pair: list[Pick], min_queries: int,
                   max_tokens: int = 128) -> dict:
    """The attention (T, T) and sink scores (T,) of each head of the pair, on its prompt."""
    want = {(p.layer, p.head) for p in pair}
    A = {}
    for rec in extract.layers(model, model.encode([text], max_tokens=max_tokens)):
        r = rec.cpu().prompt(0)
        for l, h in want:
            if l == r.layer:
                A[l, h] = (r.A[0, h].float().cpu().clone(), r.window)
    tokens = model.encode([text], max_tokens=max_tokens).tokens[0]
    return {"tokens": tokens, "A": [A[p.layer, p.head][0] for p in pair],
            "alpha": [D.alpha(*A[p.layer, p.head], min_queries) for p in pair]}


@dataclass
class Found:
    model: str
    n_layers: int
    n_heads: int
    search: Search
    cap: Capture
    alpha: torch.Tensor          # (T,) the shown head's sink scores
    shown: list[int]             # the sinks the figures colour by: 0 and the second position
    keep: torch.Tensor           # the tokens in the PCA clouds: t > the second position
    labels: np.ndarray           # the sink each kept token attends to most
    silhouette: dict             # 3-PC silhouette: input / output / deeper / last
    gain: float | None           # output minus input (the shown head's own case)
    persist: dict                # deeper minus input, and Cohen's d along its write direction
    eps: float
    cases: dict | None = None    # measures.aggregate: every case, what the rules judge
    pair: dict | None = None     # pair_attention of the two-heads figure's pair


def _found(m, s: Search, cap: Capture, min_queries: int, eps: float,
           saved: dict | None = None, cases: dict | None = None, pair=None) -> Found:
    """The shown head's measures, by the same functions as every case (``saved``: a saved
    summary's values instead)."""
    alpha = D.alpha(cap.A, cap.window, min_queries)
    q = s.main.second
    shown = [0] + ([q] if q is not None else [])
    t, labels = SM.case_tokens(cap.A[None].numpy(), q if q is not None else 0)
    if saved is not None:
        sil = {k: saved.get(f"silhouette_{k}") for k in ("input", "output", "deeper", "last")}
        gain, persist = saved.get("cluster_gain"), saved.get("persist") or {}
    else:
        X = {"input": cap.resid_in, "output": cap.out, "deeper": cap.deeper, "last": cap.last}
        sil = {k: SM.pc3_silhouette(x[t].numpy(), labels) for k, x in X.items()}
        gain = sil["output"] - sil["input"]
        persist = {"gain": sil["deeper"] - sil["input"]}
        if q is not None:
            u = (cap.write @ (cap.V[q] - cap.V[0])).numpy()
            u = u / (np.linalg.norm(u) or 1.0)
            persist.update(d_in=SM.along(u, cap.resid_in[t].numpy(), labels, q),
                           d_deeper=SM.along(u, cap.deeper[t].numpy(), labels, q))
    return Found(m.name, m.n_layers, m.n_heads, s, cap, alpha, shown, torch.as_tensor(t),
                 labels, sil, gain, persist, eps, cases, pair)


def run(name: str, texts: list[str], eps: float = D.EPS, min_queries: int = 16,
        max_tokens: int = 128, depth: int = 3, seed: int = 0, device: str = "cpu",
        dtype: str = "float32", batch: int = 8) -> Found:
    """Load ``name``, measure every case, capture the shown head, and free the model again."""
    import gc

    from ... import models as M

    m = M.load(name, device=device, dtype=dtype, T=max_tokens, batch=batch)  # plan checked first
    scans = scan(m, texts, eps=eps, min_queries=min_queries, max_tokens=max_tokens,
                 depth=depth, batch=batch)
    s = pick(scans)
    cap = capture(m, texts[s.main.prompt], s.main, depth=depth, max_tokens=max_tokens)
    pair = (pair_attention(m, texts[s.pair[0].prompt], s.pair, min_queries, max_tokens)
            if s.pair else None)
    f = _found(m, s, cap, min_queries, eps, cases=SM.aggregate(scans, seed=seed), pair=pair)
    del m
    gc.collect()
    return f


def _head(p: Pick, tok: list[str]) -> dict:
    return {"prompt": p.prompt, "layer": p.layer, "head": p.head, "sinks": p.sinks,
            "sink_tokens": [tok[t] for t in p.sinks]}


def summary(f: Found) -> dict:
    """What the results file keeps for one model (the front page replays the shown head)."""
    p, tok = f.search.main, f.cap.tokens
    q = p.second
    pt = f.pair["tokens"] if f.pair else tok
    return {"prompt": p.prompt, "layer": p.layer, "head": p.head, "qualifies": p.qualifies,
            "sinks": p.sinks, "sink_tokens": [tok[t] for t in p.sinks],
            "second_sink": q, "second_token": tok[q] if q is not None else None,
            "alpha_bos": float(f.alpha[0]),
            "alpha_second": float(f.alpha[q]) if q is not None else None,
            "candidates": f.search.candidates, "heads_seen": f.search.heads_seen,
            **{f"silhouette_{k}": v for k, v in f.silhouette.items()},
            "deeper_layer": f.cap.deeper_layer, "cluster_gain": f.gain, "persist": f.persist,
            "pair": [_head(x, pt) for x in f.search.pair],
            "other": _head(f.search.other, pt) if f.search.other else None,
            "heads_with_mid_sink": f.search.heads_with_mid_sink,
            "other_disjoint": f.search.other_disjoint, "n_layers": f.n_layers,
            "n_heads": f.n_heads, "all": f.cases}


def replay(name: str, saved: dict, texts: list[str], eps: float, min_queries: int,
           max_tokens: int, depth: int, device: str = "cpu", dtype: str = "float32") -> Found:
    """Rebuild the shown head from the chapter's saved summary (one forward pass, no scan;
    the two-heads pair is not rebuilt)."""
    import gc

    from ... import models as M

    m = M.load(name, device=device, dtype=dtype, T=max_tokens)
    pick_ = Pick(saved["prompt"], saved["layer"], saved["head"], saved["sinks"], [],
                 saved["second_sink"], saved["qualifies"])
    s = Search(pick_, [], saved["candidates"], saved["heads_seen"])
    cap = capture(m, texts[pick_.prompt], pick_, depth=depth, max_tokens=max_tokens)
    f = _found(m, s, cap, min_queries, eps, saved=saved, cases=saved.get("all"))
    del m
    gc.collect()
    return f
