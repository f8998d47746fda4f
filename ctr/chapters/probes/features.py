r"""Final-token features of the semantic probes (paper Sec. 4): per prompt, layer and head, the
final token's head output o and its split o = z_tag + z_notag by the sinks of that prompt's own
attention (``definitions.alpha`` with the tail guard ``min_queries``), for several guards from
one set of forward passes.

Speed: the prompts of a task share their first tokens (the two-shot examples of the sentiment
template, "The city of" in the cities). ``ctr.extract`` runs that common prefix once and each
batch on a copy of its key/value cache, and hands back records of the whole prompts (the full
attention matrix put back together), so alpha, the sinks and z_tag are those of the whole
prompt. ``shared_prefix=False`` runs every prompt in full; the tests check both give the same
features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm   # text bars: they go to the log, never into the HTML

from ... import definitions as D
from ... import extract
from ...models import Model


def guard_for(eps: float = D.EPS) -> int:
    """The smallest number of queries n with 1/n <= eps: below it, one query attending fully
    to a key is enough to push the key's alpha over eps (5 for eps = 0.2)."""
    return max(1, math.ceil(1 / eps - 1e-9))


# --- final-token features --------------------------------------------------------------------

@dataclass
class Features:
    """Final-token features of N prompts at every (layer, head); one set per guard."""
    o: torch.Tensor                          # (N, L, H, D) head output
    z_tag: dict[int, torch.Tensor]           # min_queries -> (N, L, H, D)
    z_notag: dict[int, torch.Tensor]
    n_sinks: dict[int, torch.Tensor]         # (N, L, H) sinks of the head in the whole prompt
    self_sink: dict[int, torch.Tensor]       # (N, L, H) the final token is one of its own sinks
    top_sink: dict[int, torch.Tensor]        # (N, L, H) the sink the final token attends to most
    #                                          (position; -1: it attends to no sink)
    sink_mass: dict[int, torch.Tensor]       # (N, L, H) its attention on all its sinks
    tail_mass: dict[int, torch.Tensor]       # (N, L, H) ... on sinks in the tail (keys seen by
    #                                          fewer than guard_for(eps) queries)
    first_norm: dict[int, torch.Tensor]      # (N, L, H) ||A[T,0] v_0|| if token 0 is a sink, else 0
    rest_norm: dict[int, torch.Tensor]       # (N, L, H) ||z_tag - A[T,0] v_0||: other sinks' part
    other_sink: dict[int, torch.Tensor]      # (N, L, H) the final token attends to a sink other
    #                                          than token 0
    tokens: list[list[str]]
    eps: float
    shared: int = 0                          # tokens of the common prefix run once (0 = none)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    @property
    def same_first(self) -> bool:
        """Token 0 is the same token in every prompt (Gemma's <bos>; SmolLM2's first word when
        every prompt starts with it): then v_0 is the same vector in every prompt (it sees only
        itself), and a tag from token 0 alone is that vector times one attention weight."""
        return len({t[0] for t in self.tokens}) == 1

    def X(self, kind: str, guard: int) -> torch.Tensor:
        return {"tag": self.z_tag[guard], "no_tag": self.z_notag[guard], "activation": self.o}[kind]


class _Store:
    """Preallocated outputs; every guard's features are written in one op per group."""

    def __init__(self, N, L, H, Dh, guards, eps):
        G = len(guards)
        self.guards, self.eps, self.tail_from = guards, eps, guard_for(eps)
        self.o = torch.zeros(N, L, H, Dh)
        self.zt, self.zn = torch.zeros(G, N, L, H, Dh), torch.zeros(G, N, L, H, Dh)
        self.ns = torch.zeros(G, N, L, H, dtype=torch.int16)
        self.ss = torch.zeros(G, N, L, H, dtype=torch.bool)
        self.top = torch.zeros(G, N, L, H, dtype=torch.int16)
        self.mass, self.tail = torch.zeros(G, N, L, H), torch.zeros(G, N, L, H)
        self.first, self.rest = torch.zeros(G, N, L, H), torch.zeros(G, N, L, H)
        self.other = torch.zeros(G, N, L, H, dtype=torch.bool)

    def add(self, p: list[int], l: int, A, V, o_last, window):
        """Prompts ``p`` of equal length T: A (b, H, T, T), V (b, H, T, D), o_last (b, H, D)."""
        T = A.shape[-1]
        last = A[:, :, T - 1:T, :]                      # the final query's row, (b, H, 1, T)
        self.o[p, l] = o_last
        S = torch.stack([D.sinks(D.alpha(A, window, g), self.eps) for g in self.guards])
        for i in range(len(self.guards)):
            zt = D.z_tag(last, V, S[i])[:, :, 0]                       # (b, H, D)
            self.zt[i, p, l] = zt
            self.zn[i, p, l] = D.z_notag(last, V, S[i])[:, :, 0]
            # the part of z_tag that comes from token 0 (RULES.md, constant-value tags)
            z0 = (last[:, :, 0, 0] * S[i][..., 0])[..., None] * V[:, :, 0]
            self.first[i, p, l] = z0.norm(dim=-1)
            self.rest[i, p, l] = (zt - z0).norm(dim=-1)
        self.ns[:, p, l] = S.sum(-1).to(torch.int16)
        self.ss[:, p, l] = S[..., T - 1]
        w = last[:, :, 0] * S                            # final query's weight on each sink
        self.top[:, p, l] = torch.where(S.any(-1), w.argmax(-1), -1).to(torch.int16)
        self.mass[:, p, l] = w.sum(-1)
        self.tail[:, p, l] = (w * (D.visible_queries(T, window) < self.tail_from)).sum(-1)
        self.other[:, p, l] = (w[..., 1:] > 0).any(-1)

    def by_guard(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return {g: x[i] for i, g in enumerate(self.guards)}


def _groups(lengths: list[int]) -> dict[int, list[int]]:
    """Batch rows by length: prompts of equal length share one (b, H, T, T) block."""
    g: dict[int, list[int]] = {}
    for b, n in enumerate(lengths):
        g.setdefault(n, []).append(b)
    return g


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to("cpu", torch.float32)


def _run(model, batch_all, order, batch_size, st: _Store, bar, pre):
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        sub = batch_all.select(idx)
        groups = _groups(sub.lengths)
        for rec in extract.layers(model, sub, prefix=pre):
            with extract.one_thread():
                for n, bs in groups.items():
                    # float32 on the CPU at the point of use: a model run in bfloat16 (or on a
                    # GPU) gives bf16 activations; sinks, splits and probes are computed in fp32
                    st.add([idx[b] for b in bs], rec.layer, _f32(rec.A[bs, :, :n, :n]),
                           _f32(rec.V[bs, :, :n]), _f32(rec.head_out[bs, n - 1]), rec.window)
            bar.update(len(idx))


def features(model: Model, texts: list[str], eps: float = D.EPS, guards=(1,),
             batch_size: int = 32, shared_prefix: bool = True, progress: bool = True,
             desc: str | None = None) -> Features:
    """Run the model over ``texts`` and keep only the final token's split, per guard."""
    batch_all = model.encode(texts)              # validates every prompt, gives the token strings
    N, L = len(texts), model.n_layers
    st = _Store(N, L, model.n_heads, model.head_dim, sorted(set(guards)), eps)
    # Sorting by length keeps padding (wasted compute) small; the order is fixed, so reruns match.
    order = sorted(range(N), key=lambda i: (batch_all.lengths[i], i))
    P = extract.common_prefix(batch_all) if shared_prefix and N > 1 else 0
    pre = extract.prefix(model, batch_all.input_ids[0, :P]) if P else None
    bar = tqdm(total=N * L, desc=desc or model.name, unit="layer", disable=not progress,
               leave=False)
    _run(model, batch_all, order, batch_size, st, bar, pre)
    bar.close()
    G = st.by_guard
    return Features(st.o, G(st.zt), G(st.zn), G(st.ns), G(st.ss), G(st.top), G(st.mass),
                    G(st.tail), G(st.first), G(st.rest), G(st.other), batch_all.tokens, eps, P)
