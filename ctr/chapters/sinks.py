"""Find, by code, one head that shows catch-tag-release clearly, and measure what it did.

The rule (stated in the sinks chapter): over the candidate prompts and every head, keep heads
whose sinks are exactly BOS (position 0) and one more token p in the middle of the prompt
(max(4, T/10) <= p < 2T/3: not the first words, and early enough that many later tokens can be
caught by it); pick the head whose second sink is strongest (largest alpha_p). If no head
qualifies, fall back to the head with the largest non-BOS score and say that it is below eps.

The second head, for "each head picks its own sinks", is a head of the same prompt with a
non-BOS sink: one whose non-BOS sinks are all different from the first head's if there is one
(the strongest such), else the one whose caught tokens overlap least with the first head's.
A head's *caught tokens* are the non-sink tokens that attend most to one of its non-BOS sinks.

``run`` loads a model, searches, captures the chosen head and measures it; ``summary`` is what
the results file keeps; ``replay`` rebuilds the figures from a saved summary (front page).
The measures and the verdict rules are in ``sinks_verdicts``, the figures in ``sinks_figures``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import definitions as D
from .. import extract
from . import sinks_verdicts as SV
from ..models import Model


@dataclass
class Pick:
    prompt: int
    layer: int
    head: int
    sinks: list[int]
    alphas: list[float]          # alpha at each sink
    second: int | None           # the non-BOS position that made the pick (None: BOS only)
    qualifies: bool              # False: fallback, the second position is below eps
    caught: list[int] = field(default_factory=list)   # tokens attending most to a non-BOS sink


@dataclass
class Search:
    main: Pick
    other: Pick | None           # None: no other head of the prompt has a non-BOS sink
    candidates: int              # heads that met the rule
    heads_seen: int
    heads_with_mid_sink: int = 0  # heads of the chosen prompt with a non-BOS sink
    other_disjoint: bool = False  # the other head's non-BOS sinks are all different
    jaccard: float | None = None  # overlap of the two heads' caught tokens


def caught(A: torch.Tensor, sinks: list[int]) -> list[int]:
    """Non-sink tokens whose most-attended sink (among ``sinks``, position 0 included) is not
    the first token."""
    mid = [s for s in sinks if s != 0]
    if not mid:
        return []
    cols = A[:, sinks]                                           # (T, k)
    dom = torch.tensor(sinks)[cols.argmax(-1)]
    T = A.shape[0]
    return [t for t in range(min(mid) + 1, T) if t not in sinks and int(dom[t]) != 0]


def jaccard(a: list[int], b: list[int]) -> float:
    a, b = set(a), set(b)
    return 1.0 if not (a | b) else len(a & b) / len(a | b)


def search(model: Model, texts: list[str], eps: float = D.EPS, min_queries: int = 16,
           max_tokens: int = 128) -> Search:
    batch = model.encode(texts, max_tokens=max_tokens)
    best, fallback, n_ok, seen = None, None, 0, 0
    per_prompt: dict[int, list[Pick]] = {}
    for b in range(len(texts)):
        one = batch.select([b])
        T = one.lengths[0]
        lo, hi = max(4, T // 10), (2 * T) // 3
        picks = []
        for rec in extract.layers(model, one):
            A = rec.A[0].float()                                 # (H, T, T)
            a = D.alpha(A, rec.window, min_queries)
            S = D.sinks(a, eps)
            for h in range(a.shape[0]):
                seen += 1
                pos = torch.nonzero(S[h]).flatten().tolist()
                al = [float(a[h, p]) for p in pos]
                nb = a[h, lo:hi].nan_to_num(-1.0)
                q = int(nb.argmax()) + lo if nb.numel() else None
                second = q if q is not None and q in pos else None
                pick = Pick(b, rec.layer, h, pos, al, second, False, caught(A[h], pos))
                picks.append(pick)
                if pos == [0, q] and q is not None:
                    n_ok += 1
                    pick.qualifies = True
                    if best is None or a[h, q] > best[0]:
                        best = (float(a[h, q]), pick)
                elif q is not None and (fallback is None or a[h, q] > fallback[0]):
                    fallback = (float(a[h, q]), Pick(b, rec.layer, h, pos, al, q, False,
                                                     caught(A[h], pos)))
        per_prompt[b] = picks
    main = best[1] if best else fallback[1]
    mid = [p for p in per_prompt[main.prompt] if any(s != 0 for s in p.sinks)]
    others = [p for p in mid if (p.layer, p.head) != (main.layer, main.head)]
    mine = {s for s in main.sinks if s != 0} | ({main.second} if main.second else set())
    disjoint = [p for p in others if not ({s for s in p.sinks if s != 0} & mine)]
    other, jac = None, None
    if disjoint:
        other = max(disjoint, key=lambda p: max(al for s, al in zip(p.sinks, p.alphas) if s))
    elif others:
        other = min(others, key=lambda p: (jaccard(p.caught, main.caught), p.layer, p.head))
    if other is not None:
        other.second = max((s for s in other.sinks if s), key=lambda s: other.alphas[other.sinks.index(s)])
        jac = jaccard(other.caught, main.caught)
    return Search(main, other, n_ok, seen, len(mid), bool(disjoint), jac)


@dataclass
class Capture:
    tokens: list[str]
    A: torch.Tensor            # (T, T) the head's attention
    V: torch.Tensor            # (T, D) its value vectors
    out: torch.Tensor          # (T, D) its outputs
    resid_in: torch.Tensor     # (T, d_model) residual entering the layer (the head's input)
    resid_after: torch.Tensor  # (T, d_model) residual leaving the head's layer
    deeper: torch.Tensor       # (T, d_model) residual leaving layer + ``depth``
    deeper_layer: int
    W_O: torch.Tensor          # (d_model, D) the head's slice of the output projection
    A_other: torch.Tensor | None   # (T, T) the second head's attention
    window: int | None


def capture(model: Model, text: str, pick: Pick, other: Pick | None, depth: int = 3,
            max_tokens: int = 128) -> Capture:
    batch = model.encode([text], max_tokens=max_tokens)
    deeper_layer = min(pick.layer + depth, model.n_layers - 1)
    got = {"A_other": None}
    Dh = model.head_dim
    last = max(deeper_layer, pick.layer, other.layer if other else 0)
    for rec in extract.layers(model, batch):
        if rec.layer == pick.layer:
            got.update(A=rec.A[0, pick.head].clone(), V=rec.V[0, pick.head].clone(),
                       out=rec.head_out[0, :, pick.head].clone(), resid_in=rec.resid_in[0].clone(),
                       resid_after=rec.resid_out[0].clone(), window=rec.window)
        if other is not None and rec.layer == other.layer:
            got["A_other"] = rec.A[0, other.head].clone()
        if rec.layer == deeper_layer:
            got["deeper"] = rec.resid_out[0].clone()
        if rec.layer >= last:
            break
    W = model.out_proj(pick.layer).detach()[:, pick.head * Dh:(pick.head + 1) * Dh].float()
    return Capture(batch.tokens[0], deeper_layer=deeper_layer, W_O=W.clone(), **got)


def dominant_sink(A: torch.Tensor, sinks: list[int]) -> np.ndarray:
    """For each query token, the sink (among ``sinks``) it gives most attention to."""
    cols = A[:, sinks]
    return np.asarray(sinks)[cols.argmax(-1).numpy()]


def separation(X: torch.Tensor, labels: np.ndarray) -> float:
    """Silhouette score of ``labels`` on the rows of X (NaN with fewer than two groups)."""
    from sklearn.metrics import silhouette_score

    if len(set(labels.tolist())) < 2 or min(np.unique(labels, return_counts=True)[1]) < 2:
        return float("nan")
    return float(silhouette_score(np.asarray(X), labels))


# --- one model, end to end: what the sinks chapter shows ------------------------------------

@dataclass
class Found:
    model: str
    n_layers: int
    n_heads: int
    search: Search
    cap: Capture
    alpha: torch.Tensor          # (T,) the chosen head's sink scores
    alpha_other: torch.Tensor | None   # (T,) the second head's
    shown: list[int]             # the sinks the figures colour by: BOS and the second sink
    keep: torch.Tensor           # the tokens in the PCA clouds (all but the shown sinks)
    labels: np.ndarray           # dominant sink of each kept token
    silhouette: dict             # input / output / deeper
    gain: dict                   # silhouette of the output minus the input's, with its interval
    persist: dict                # separation along the tags before / after / deeper (sinks_verdicts)
    eps: float


def _found(m, s: Search, cap: Capture, min_queries: int, eps: float, saved: dict | None = None,
           seed: int = 0) -> Found:
    """Everything the figures and the verdicts need from one captured head (``saved``: reuse a
    saved summary's measures instead of recomputing them)."""
    alpha = D.alpha(cap.A, cap.window, min_queries)
    alpha_other = (D.alpha(cap.A_other, m.windows[s.other.layer], min_queries)
                   if s.other is not None else None)
    shown = [0] + ([s.main.second] if s.main.second is not None else [])
    # The sinks themselves are left out of the clouds: their residuals carry very large norms
    # (massive activations) that would dominate every PCA. What remains are the caught tokens.
    keep = torch.tensor([t for t in range(len(cap.tokens)) if t not in shown])
    labels = dominant_sink(cap.A[keep], shown)
    if saved is not None:
        sil = {k: saved[f"silhouette_{k}"] for k in ("input", "output", "deeper")}
        gain, persist = saved["cluster_gain"], saved["persist"]
    else:
        X = {"input": cap.resid_in[keep], "output": cap.out[keep], "deeper": cap.deeper[keep]}
        sil = {k: separation(x, labels) for k, x in X.items()}
        gain = SV.cluster_gain(X["input"], X["output"], labels, seed=seed)
        persist = (SV.persistence(cap, keep, labels, s.main.second, seed=seed)
                   if s.main.second is not None and len(set(labels.tolist())) > 1 else {})
    return Found(m.name, m.n_layers, m.n_heads, s, cap, alpha, alpha_other, shown, keep, labels,
                 sil, gain, persist, eps)


def run(name: str, texts: list[str], eps: float = D.EPS, min_queries: int = 16,
        max_tokens: int = 128, depth: int = 3, seed: int = 0) -> Found:
    """Load ``name``, search for the head, capture and measure it, and free the model again."""
    import gc

    from .. import models as M

    m = M.load(name)
    s = search(m, texts, eps=eps, min_queries=min_queries, max_tokens=max_tokens)
    cap = capture(m, texts[s.main.prompt], s.main, s.other, depth=depth, max_tokens=max_tokens)
    f = _found(m, s, cap, min_queries, eps, seed=seed)
    del m
    gc.collect()
    return f


def summary(f: Found) -> dict:
    p, o, tok = f.search.main, f.search.other, f.cap.tokens
    q = p.second
    return {"prompt": p.prompt, "layer": p.layer, "head": p.head, "qualifies": p.qualifies,
            "sinks": p.sinks, "sink_tokens": [tok[t] for t in p.sinks],
            "second_sink": q, "second_token": tok[q] if q is not None else None,
            "alpha_bos": float(f.alpha[0]),
            "alpha_second": float(f.alpha[q]) if q is not None else None,
            "candidates": f.search.candidates, "heads_seen": f.search.heads_seen,
            "silhouette_input": f.silhouette["input"], "silhouette_output": f.silhouette["output"],
            "silhouette_deeper": f.silhouette["deeper"], "deeper_layer": f.cap.deeper_layer,
            "cluster_gain": f.gain, "persist": f.persist,
            "caught": len(p.caught), "heads_with_mid_sink": f.search.heads_with_mid_sink,
            "other": None if o is None else {
                "layer": o.layer, "head": o.head, "sinks": o.sinks,
                "sink_tokens": [tok[t] for t in o.sinks], "caught": len(o.caught)},
            "other_disjoint": f.search.other_disjoint, "jaccard": f.search.jaccard}


def replay(name: str, saved: dict, texts: list[str], eps: float, min_queries: int,
           max_tokens: int, depth: int) -> Found:
    """Rebuild a ``Found`` from the sinks chapter's saved summary (no search: one forward pass)."""
    import gc

    from .. import models as M

    m = M.load(name)
    pick = Pick(saved["prompt"], saved["layer"], saved["head"], saved["sinks"], [],
                saved["second_sink"], saved["qualifies"])
    o = saved["other"]
    other = None if o is None else Pick(saved["prompt"], o["layer"], o["head"], o["sinks"], [],
                                        None, False)
    s = Search(pick, other, saved["candidates"], saved["heads_seen"])
    cap = capture(m, texts[pick.prompt], pick, other, depth=depth, max_tokens=max_tokens)
    f = _found(m, s, cap, min_queries, eps, saved=saved)
    del m
    gc.collect()
    return f
