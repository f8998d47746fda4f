"""An interactive attention explorer for one prompt: pick a layer and a head, see its attention
map (rows = queries, columns = keys), the sink scores alpha_t above it with the eps line, the
sinks marked, and the tokens on hover.

    tokens, A, windows = explorer.attention(model, text, max_tokens=128)
    explorer.show(tokens, A, eps=0.2, min_queries=16, windows=windows, layer=3, head=5)

``show`` returns an object Jupyter displays as HTML: a ``<div class="ctr-explorer">`` holding the
data; ``ctr/book/static/ctr-explorer.js`` (served from the book's own ``_static``, no CDN) draws
it on canvases when the page loads. To keep a page light, the attention is sent as one byte per
entry (A = q / 255, within 0.002), lower triangle only (the upper one is masked by causality),
deflated: SmolLM2-135M's 30 x 9 heads over 128 tokens take 0.8 MB of HTML. (A square-root code,
finer near 0, took 1.9 MB.) alpha travels as 16-bit codes (within 1e-5). Outside the book (plain
Jupyter), ``standalone=True`` inlines the script and style into the output.
"""
from __future__ import annotations

import base64
import hashlib
import json
import zlib
from pathlib import Path

import numpy as np

from .. import definitions as D

STATIC = Path(__file__).parent / "static"
MAX_BYTES = 2_000_000       # per explorer; a page should stay well under a few MB


class ExplorerError(ValueError):
    """Input the explorer cannot show; the message says what to change."""


def attention(model, text: str, max_tokens: int | None = None):
    """(tokens, A (L, H, T, T) float32, windows) of one prompt, every layer and head."""
    from .. import extract

    batch = model.encode([text], max_tokens=max_tokens)
    A, windows = [], []
    for rec in extract.layers(model, batch):
        A.append(rec.A[0].float().numpy())      # (H, T, T)
        windows.append(rec.window)
    return batch.tokens[0], np.stack(A), windows


def scores(A: np.ndarray, windows=None, min_queries: int = 1) -> np.ndarray:
    """alpha (L, H, T) from A (L, H, T, T) with the paper's definition (ctr.definitions.alpha)."""
    import torch

    windows = windows or [None] * A.shape[0]
    return np.stack([D.alpha(torch.from_numpy(np.ascontiguousarray(A[l])), windows[l],
                             min_queries).numpy() for l in range(A.shape[0])])


def _check(tokens, A, alpha, eps, layers, layer, head):
    if A.ndim != 4 or A.shape[-1] != A.shape[-2]:
        raise ExplorerError(f"A must be (layers, heads, T, T) attention of one prompt; got shape "
                            f"{tuple(A.shape)}")
    L, H, T, _ = A.shape
    if len(tokens) != T:
        raise ExplorerError(f"{len(tokens)} tokens for attention over {T} positions")
    if not np.isfinite(A).all() or A.min() < -1e-6 or A.max() > 1 + 1e-6:
        raise ExplorerError("A must hold attention probabilities in [0, 1] (finite)")
    if alpha.shape != (L, H, T):
        raise ExplorerError(f"alpha must be (layers, heads, T) = {(L, H, T)}; got {alpha.shape}")
    if not 0 < eps < 1:
        raise ExplorerError(f"eps must lie in (0, 1); got {eps}")
    if len(layers) != L:
        raise ExplorerError(f"{len(layers)} layer numbers for {L} layers of attention")
    if not (0 <= layer < L and 0 <= head < H):
        raise ExplorerError(f"layer {layer}, head {head} is outside {L} layers x {H} heads")


def payload(tokens, A, alpha=None, eps: float = D.EPS, *, min_queries: int = 1, windows=None,
            layers=None, layer: int = 0, head: int = 0, title: str = "") -> dict:
    """The JSON the script reads (``blob``: deflated, base64)."""
    A = np.asarray(A, dtype=np.float32)
    if alpha is None and A.ndim == 4:
        alpha = scores(A, windows, min_queries)
    alpha = np.asarray(alpha, dtype=np.float64)
    layers = list(range(A.shape[0])) if layers is None else [int(x) for x in layers]
    _check(tokens, A, alpha, eps, layers, layer, head)
    L, H, T, _ = A.shape
    rows, cols = np.tril_indices(T)
    q = np.rint(np.clip(A[..., rows, cols], 0, 1) * 255).astype(np.uint8)    # (L, H, T(T+1)/2)
    a = np.where(np.isnan(alpha), 65535, np.rint(np.clip(alpha, 0, 1) * 65534)).astype("<u2")
    blob = zlib.compress(q.tobytes() + a.tobytes(), 9)
    return {"L": L, "H": H, "T": T, "layers": layers, "tokens": [str(t) for t in tokens],
            "eps": float(eps), "min_queries": int(min_queries),
            "windows": [None if w is None else int(w) for w in (windows or [None] * L)],
            "layer": int(layer), "head": int(head), "title": title,
            "blob": base64.b64encode(blob).decode("ascii")}


def html(tokens, A, alpha=None, eps: float = D.EPS, *, standalone: bool = False,
         max_bytes: int = MAX_BYTES, **kw) -> str:
    """The HTML of one explorer (see ``show``)."""
    data = json.dumps(payload(tokens, A, alpha, eps, **kw), separators=(",", ":"))
    data = data.replace("</", "<\\/")            # never close the <script> early
    if len(data) > max_bytes:
        raise ExplorerError(f"this explorer would put {len(data) / 1e6:.1f} MB into the page "
                            f"(limit {max_bytes / 1e6:.1f} MB): show fewer layers (A[some] with "
                            "layers=[...]) or a shorter prompt, or raise max_bytes")
    uid = "ctr-explorer-" + hashlib.sha256(data.encode()).hexdigest()[:10]   # stable across runs
    out = (f'<div class="ctr-explorer" id="{uid}">'
           f'<script type="application/json" class="ctr-explorer-data">{data}</script>'
           '<p class="ctr-explorer-fallback">Interactive attention explorer: it is drawn by the '
           "book's ctr-explorer.js. Open the HTML book, or in Jupyter call "
           "<code>show(..., standalone=True)</code>.</p></div>")
    if standalone:
        css = (STATIC / "ctr-explorer.css").read_text()
        js = (STATIC / "ctr-explorer.js").read_text()
        out = f"<style>{css}</style>{out}<script>{js}</script>"
    return out


class Explorer:
    def __init__(self, text: str):
        self.html = text

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"<ctr attention explorer, {len(self.html) / 1e3:.0f} kB of HTML>"


def show(tokens, A, alpha=None, eps: float = D.EPS, *, min_queries: int = 1, windows=None,
         layers=None, layer: int = 0, head: int = 0, title: str = "", standalone: bool = False,
         max_bytes: int = MAX_BYTES) -> Explorer:
    """Display an explorer of one prompt's attention.

    tokens: the T token strings. A: (L, H, T, T) attention probabilities (rows = queries).
    alpha: (L, H, T) sink scores, or None to compute them here (``ctr.definitions.alpha`` with
    ``windows`` and ``min_queries``; NaN = too few queries see the key). eps: the sink threshold
    (sinks: alpha > eps). layers: the model's layer numbers of A's first axis (default 0..L-1).
    layer, head: the index shown first. Returns an object Jupyter renders (last line of a cell,
    or ``display(...)``).
    """
    return Explorer(html(tokens, A, alpha, eps, min_queries=min_queries, windows=windows,
                         layers=layers, layer=layer, head=head, title=title,
                         standalone=standalone, max_bytes=max_bytes))


def decode(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """(A, alpha) back from a payload, as the script reads it (for tests and checks)."""
    L, H, T = p["L"], p["H"], p["T"]
    n = T * (T + 1) // 2
    raw = zlib.decompress(base64.b64decode(p["blob"]))
    q = np.frombuffer(raw[:L * H * n], np.uint8).reshape(L, H, n)
    a = np.frombuffer(raw[L * H * n:], "<u2").reshape(L, H, T).astype(np.float64)
    A = np.zeros((L, H, T, T))
    rows, cols = np.tril_indices(T)
    A[..., rows, cols] = q / 255.0
    return A, np.where(a == 65535, np.nan, a / 65534)
