"""Find, by code, one head that shows catch-tag-release clearly, and capture what it did.

The rule (stated in the sinks chapter): over the candidate prompts and every head, keep heads
whose sinks are exactly BOS (position 0) and one more token p in the middle of the prompt
(max(4, T/10) <= p < 2T/3: not the first words, and early enough that many later tokens can be
caught by it); pick the head whose second sink is strongest (largest alpha_p). If no head qualifies, fall back to the head with the largest
non-BOS score and say that it is below eps. The second head, for "each head picks its own
sinks", is the head of the same prompt with the strongest non-BOS sink at another position
(or, failing that, a BOS-only head).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import definitions as D
from .. import extract
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


@dataclass
class Search:
    main: Pick
    other: Pick
    candidates: int              # heads that met the rule
    heads_seen: int
    per_prompt: dict = field(repr=False, default_factory=dict)


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
            a = D.alpha(rec.A[0].float(), rec.window, min_queries)
            S = D.sinks(a, eps)
            for h in range(a.shape[0]):
                seen += 1
                pos = torch.nonzero(S[h]).flatten().tolist()
                al = [float(a[h, p]) for p in pos]
                nb = a[h, lo:hi].nan_to_num(-1.0)
                q = int(nb.argmax()) + lo if nb.numel() else None
                second = q if q is not None and q in pos else None
                pick = Pick(b, rec.layer, h, pos, al, second, False)
                picks.append(pick)
                if pos == [0, q] and q is not None:
                    n_ok += 1
                    pick.qualifies = True
                    if best is None or a[h, q] > best[0]:
                        best = (float(a[h, q]), pick)
                elif q is not None and (fallback is None or a[h, q] > fallback[0]):
                    fallback = (float(a[h, q]), Pick(b, rec.layer, h, pos, al, q, False))
        per_prompt[b] = picks
    main = best[1] if best else fallback[1]
    # second head: same prompt, strongest non-BOS sink at another position
    others = [p for p in per_prompt[main.prompt]
              if (p.layer, p.head) != (main.layer, main.head) and p.sinks]
    diff = [p for p in others if any(s not in (0, main.second) for s in p.sinks)]
    if diff:
        other = max(diff, key=lambda p: max(al for s, al in zip(p.sinks, p.alphas)
                                            if s not in (0, main.second)))
        other.second = max((s for s in other.sinks if s not in (0, main.second)),
                           key=lambda s: other.alphas[other.sinks.index(s)])
    else:
        bos_only = [p for p in others if p.sinks == [0]] or others
        other = max(bos_only, key=lambda p: p.alphas[0])
    return Search(main, other, n_ok, seen, per_prompt)


@dataclass
class Capture:
    tokens: list[str]
    A: torch.Tensor            # (T, T) the head's attention
    V: torch.Tensor            # (T, D) its value vectors
    out: torch.Tensor          # (T, D) its outputs
    resid_in: torch.Tensor     # (T, d_model) residual entering the layer (the head's input)
    deeper: torch.Tensor       # (T, d_model) residual leaving layer + ``depth``
    deeper_layer: int
    A_other: torch.Tensor      # (T, T) the second head's attention
    window: int | None


def capture(model: Model, text: str, pick: Pick, other: Pick, depth: int = 3,
            max_tokens: int = 128) -> Capture:
    batch = model.encode([text], max_tokens=max_tokens)
    deeper_layer = min(pick.layer + depth, model.n_layers - 1)
    got = {}
    for rec in extract.layers(model, batch):
        if rec.layer == pick.layer:
            got.update(A=rec.A[0, pick.head].clone(), V=rec.V[0, pick.head].clone(),
                       out=rec.head_out[0, :, pick.head].clone(), resid_in=rec.resid_in[0].clone(),
                       window=rec.window)
        if rec.layer == other.layer:
            got["A_other"] = rec.A[0, other.head].clone()
        if rec.layer == deeper_layer:
            got["deeper"] = rec.resid_out[0].clone()
        if rec.layer >= max(deeper_layer, other.layer, pick.layer):
            break
    return Capture(batch.tokens[0], deeper_layer=deeper_layer, **got)


def dominant_sink(A: torch.Tensor, sinks: list[int]) -> np.ndarray:
    """For each query token, the sink (among ``sinks``) it gives most attention to."""
    cols = A[:, sinks]
    return np.asarray(sinks)[cols.argmax(-1).numpy()]


def separation(X: torch.Tensor, labels: np.ndarray) -> float:
    """Silhouette score of ``labels`` on the rows of X (NaN with fewer than two groups)."""
    from sklearn.metrics import silhouette_score

    if len(set(labels.tolist())) < 2:
        return float("nan")
    return float(silhouette_score(X.numpy(), labels))


# --- one model, end to end: what the sinks chapter shows ------------------------------------

@dataclass
class Found:
    model: str
    n_layers: int
    n_heads: int
    search: Search
    cap: Capture
    alpha: torch.Tensor          # (T,) the chosen head's sink scores
    alpha_other: torch.Tensor    # (T,) the second head's
    shown: list[int]             # the sinks the figures colour by: BOS and the second sink
    keep: torch.Tensor           # the tokens in the PCA clouds (all but the shown sinks)
    labels: np.ndarray           # dominant sink of each kept token
    silhouette: dict             # input / output / deeper
    eps: float


def _found(m, s: Search, cap: Capture, min_queries: int, eps: float, silhouette=None) -> Found:
    """Everything the figures need from one captured head (``silhouette``: reuse saved ones)."""
    alpha = D.alpha(cap.A, cap.window, min_queries)
    alpha_other = D.alpha(cap.A_other, m.windows[s.other.layer], min_queries)
    shown = [0] + ([s.main.second] if s.main.second is not None else [])
    # The sinks themselves are left out of the clouds: their residuals carry very large norms
    # (massive activations) that would dominate every PCA. What remains are the caught tokens.
    keep = torch.tensor([t for t in range(len(cap.tokens)) if t not in shown])
    labels = dominant_sink(cap.A[keep], shown)
    sil = silhouette or {"input": separation(cap.resid_in[keep], labels),
                         "output": separation(cap.out[keep], labels),
                         "deeper": separation(cap.deeper[keep], labels)}
    return Found(m.name, m.n_layers, m.n_heads, s, cap, alpha, alpha_other, shown, keep, labels,
                 sil, eps)


def run(name: str, texts: list[str], eps: float = D.EPS, min_queries: int = 16,
        max_tokens: int = 128, depth: int = 3) -> Found:
    """Load ``name``, search for the head, capture it, and free the model again."""
    import gc

    from .. import models as M

    m = M.load(name)
    s = search(m, texts, eps=eps, min_queries=min_queries, max_tokens=max_tokens)
    cap = capture(m, texts[s.main.prompt], s.main, s.other, depth=depth, max_tokens=max_tokens)
    f = _found(m, s, cap, min_queries, eps)
    del m
    gc.collect()
    return f


def figure_attention(f: Found):
    from .. import plots

    p = f.search.main
    return plots.attention_map(f.cap.A, f.cap.tokens, f.alpha, f.shown, eps=f.eps,
                               title=f"{f.model}: layer {p.layer}, head {p.head}, prompt {p.prompt}")


def figure_pca(f: Found):
    import matplotlib.pyplot as plt

    from .. import plots

    tok, c = f.cap.tokens, f.cap
    names = {p: f"attends most to {plots.short(tok[p])!s} ({p})" for p in f.shown}
    k = f.keep
    panels = {f"head input (residual into layer {f.search.main.layer})": (c.resid_in[k], "input"),
              "head output o = A V": (c.out[k], "output"),
              f"residual out of layer {c.deeper_layer}": (c.deeper[k], "deeper")}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for ax, (title, (X, key)) in zip(axes, panels.items()):
        Y, pca = plots.pca2(X)
        plots.scatter(ax, Y, f.labels, names, title=f"{title}\nsilhouette {f.silhouette[key]:.2f}")
        if key == "output":
            plots.arrows(ax, pca, {f"tag {plots.short(tok[p])}": c.V[p] for p in f.shown})
    fig.tight_layout()
    return fig


def figure_two_heads(f: Found):
    import matplotlib.pyplot as plt

    from .. import plots

    tok, p, o = f.cap.tokens, f.search.main, f.search.other
    fig = plt.figure(figsize=(11, 5.6))
    gs = fig.add_gridspec(1, 2, wspace=0.25)
    for spec, A, a, pk in ((gs[0], f.cap.A, f.alpha, p), (gs[1], f.cap.A_other, f.alpha_other, o)):
        plots.attention_map(A, tok, a, pk.sinks, eps=f.eps, fig=fig, spec=spec,
                            title=f"layer {pk.layer} head {pk.head}: sinks "
                                  + ", ".join(f"{plots.short(tok[t])}@{t}" for t in pk.sinks))
    return fig


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
            "other": {"layer": o.layer, "head": o.head, "sinks": o.sinks,
                      "sink_tokens": [tok[t] for t in o.sinks]},
            "other_differs": set(o.sinks) != set(p.sinks)}


def replay(name: str, saved: dict, texts: list[str], eps: float, min_queries: int,
           max_tokens: int, depth: int) -> Found:
    """Rebuild a ``Found`` from the sinks chapter's saved summary (no search: one forward pass)."""
    import gc

    from .. import models as M

    m = M.load(name)
    pick = Pick(saved["prompt"], saved["layer"], saved["head"], saved["sinks"], [],
                saved["second_sink"], saved["qualifies"])
    o = saved["other"]
    other = Pick(saved["prompt"], o["layer"], o["head"], o["sinks"], [], None, False)
    s = Search(pick, other, saved["candidates"], saved["heads_seen"])
    cap = capture(m, texts[pick.prompt], pick, other, depth=depth, max_tokens=max_tokens)
    sil = {k: saved[f"silhouette_{k}"] for k in ("input", "output", "deeper")}
    f = _found(m, s, cap, min_queries, eps, silhouette=sil)
    del m
    gc.collect()
    return f


def figure_mechanism(f: Found):
    """One figure for the front page: the head's attention and its outputs clustered by sink."""
    import matplotlib.pyplot as plt

    from .. import plots

    tok, c, p = f.cap.tokens, f.cap, f.search.main
    fig = plt.figure(figsize=(11, 4.6))
    gs = fig.add_gridspec(1, 2, width_ratios=[1, 1.1], wspace=0.3)
    plots.attention_map(c.A, tok, f.alpha, f.shown, eps=f.eps, fig=fig, spec=gs[0],
                        title=f"catch: {f.model} layer {p.layer} head {p.head}")
    ax = fig.add_subplot(gs[1])
    Y, pca = plots.pca2(c.out[f.keep])
    names = {t: f"caught by {plots.short(tok[t])} ({t})" for t in f.shown}
    plots.scatter(ax, Y, f.labels, names, title="tag: the head's outputs, PCA, by sink")
    plots.arrows(ax, pca, {f"tag {plots.short(tok[t])}": c.V[t] for t in f.shown})
    return fig
