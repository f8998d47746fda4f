r"""Final-token features of the semantic probes (paper Sec. 4): per prompt, layer and head, the
final token's head output o and its split o = z_tag + z_notag by the sinks of that prompt's own
attention (``definitions.alpha`` with the tail guard ``min_queries``), for several guards from
one set of forward passes.

Speed: the prompts of a task share their first tokens (the two-shot examples of the sentiment
template, "The city of" in the cities). That common prefix is run once; each batch continues
from a copy of its key/value cache, and the prompt's full attention matrix is put back together
(prefix rows are the same in every prompt, by causality) before the definitions are applied,
so alpha, the sinks and z_tag are those of the whole prompt. ``shared_prefix=False`` runs every
prompt in full through ``ctr.extract`` instead; the tests check both give the same features.
(This module is moved unchanged out of ``probes.py``; the extraction engine will replace it.)
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm   # text bars: they go to the log, never into the HTML

from .. import arch as _arch
from .. import definitions as D
from .. import extract
from ..models import Model


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
    tokens: list[list[str]]
    eps: float
    shared: int = 0                          # tokens of the common prefix run once (0 = none)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

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

    def add(self, p: list[int], l: int, A, V, o_last, window):
        """Prompts ``p`` of equal length T: A (b, H, T, T), V (b, H, T, D), o_last (b, H, D)."""
        T = A.shape[-1]
        last = A[:, :, T - 1:T, :]                      # the final query's row, (b, H, 1, T)
        self.o[p, l] = o_last.float()
        S = torch.stack([D.sinks(D.alpha(A, window, g), self.eps) for g in self.guards])
        for i in range(len(self.guards)):
            self.zt[i, p, l] = D.z_tag(last, V, S[i])[:, :, 0]
            self.zn[i, p, l] = D.z_notag(last, V, S[i])[:, :, 0]
        self.ns[:, p, l] = S.sum(-1).to(torch.int16)
        self.ss[:, p, l] = S[..., T - 1]
        w = last[:, :, 0] * S                            # final query's weight on each sink
        self.top[:, p, l] = torch.where(S.any(-1), w.argmax(-1), -1).to(torch.int16)
        self.mass[:, p, l] = w.sum(-1)
        self.tail[:, p, l] = (w * (D.visible_queries(T, window) < self.tail_from)).sum(-1)

    def by_guard(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return {g: x[i] for i, g in enumerate(self.guards)}


def _groups(lengths: list[int]) -> dict[int, list[int]]:
    """Batch rows by length: prompts of equal length share one (b, H, T, T) block."""
    g: dict[int, list[int]] = {}
    for b, n in enumerate(lengths):
        g.setdefault(n, []).append(b)
    return g


def _common_prefix(seqs: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving at least one token (the final one) to each."""
    k = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        while k and s[:k] != first[:k]:
            k -= 1
    return k


def _run_full(model, batch_all, order, batch_size, st: _Store, bar):
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        sub = batch_all.select(idx)
        groups = _groups(sub.lengths)
        for rec in extract.layers(model, sub):
            with extract.one_thread():
                for n, bs in groups.items():
                    st.add([idx[b] for b in bs], rec.layer, rec.A[bs, :, :n, :n].float(),
                           rec.V[bs, :, :n].float(), rec.head_out[bs, n - 1], rec.window)
            bar.update(len(idx))


class _Stop(Exception):
    pass


def _forward(base, ids, mask, kw, cache):
    try:
        base(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: cache})
    except _Stop:
        pass


def _run_shared(model, seqs, P, order, batch_size, st: _Store, bar):
    """The common prefix (P tokens) once, then each batch from a copy of its cache."""
    from transformers import DynamicCache

    a = _arch.arch_of(model.config)
    layers = _arch.getpath(model.hf, a.layers)
    base = _arch.getpath(model.hf, a.layers.rsplit(".", 1)[0])   # decoder without the LM head
    kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    H, KV, windows = model.n_heads, model.n_kv_heads, model.windows
    state: dict = {}

    def pre_o(l):
        def hook(mod, args):
            state["o"] = args[0]                         # (B, Ts, H * D): per-head outputs
        return hook

    def post_attn(l):
        def hook(mod, args, out):
            A = out[1]                                   # (B, H, Ts, P + Ts) eager weights
            if state["phase"] == "prefix":
                state["A_pre"][l] = A[0]
                if l == len(layers) - 1:
                    raise _Stop()
                return
            Vall = state["cache"].layers[l].values       # (B, KV, P + Ts, D) incl. the prefix
            Vall = Vall.repeat_interleave(H // KV, dim=1) if KV != H else Vall
            O = state["o"].unflatten(-1, (H, -1))
            A_pre = state["A_pre"][l]
            with extract.one_thread():
                for n, bs in state["groups"].items():       # n = suffix length
                    T = P + n
                    Af = A.new_zeros(len(bs), H, T, T)
                    Af[:, :, :P, :P] = A_pre                 # prefix rows: the same in every prompt
                    Af[:, :, P:, :] = A[bs, :, :n, :T]
                    st.add([state["idx"][b] for b in bs], l, Af.float(), Vall[bs, :, :T].float(),
                           O[bs, n - 1], windows[l])
            if l == len(layers) - 1:
                raise _Stop()                            # the last MLP and norm are not needed
        return hook

    hooks = []
    for l, layer in enumerate(layers):
        att = getattr(layer, a.attn)
        hooks.append(_arch.getpath(att, a.out_proj).register_forward_pre_hook(pre_o(l)))
        hooks.append(att.register_forward_hook(post_attn(l)))
    try:
        with torch.inference_mode():
            prefix = DynamicCache(config=model.config)
            state.update(phase="prefix", A_pre={})
            ids = torch.tensor([seqs[0][:P]])
            _forward(base, ids, torch.ones_like(ids), kw, prefix)
            state["phase"] = "suffix"
            pad = model.tokenizer.pad_token_id or 0
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                suf = [seqs[i][P:] for i in idx]
                Ts = max(len(s) for s in suf)
                ids = torch.full((len(idx), Ts), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), P + Ts), dtype=torch.long)
                mask[:, :P] = 1
                for b, s in enumerate(suf):
                    ids[b, :len(s)] = torch.tensor(s)
                    mask[b, P:P + len(s)] = 1
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(idx))
                state.update(cache=cache, idx=idx, groups=_groups([len(s) for s in suf]))
                _forward(base, ids, mask, kw, cache)
                bar.update(len(idx) * len(layers))
    finally:
        for h in hooks:
            h.remove()


def features(model: Model, texts: list[str], eps: float = D.EPS, guards=(1,),
             batch_size: int = 32, shared_prefix: bool = True, progress: bool = True,
             desc: str | None = None) -> Features:
    """Run the model over ``texts`` and keep only the final token's split, per guard."""
    batch_all = model.encode(texts)              # validates every prompt, gives the token strings
    N, L = len(texts), model.n_layers
    st = _Store(N, L, model.n_heads, model.head_dim, sorted(set(guards)), eps)
    # Sorting by length keeps padding (wasted compute) small; the order is fixed, so reruns match.
    order = sorted(range(N), key=lambda i: (batch_all.lengths[i], i))
    seqs = [batch_all.input_ids[i, :n].tolist() for i, n in enumerate(batch_all.lengths)]
    P = _common_prefix(seqs) if shared_prefix and N > 1 else 0
    window = min((w for w in model.windows if w), default=None)
    if window is not None and max(batch_all.lengths) >= window - 1:
        P = 0                    # a sliding cache would drop keys: run the prompts in full
    bar = tqdm(total=N * L, desc=desc or model.name, unit="layer", disable=not progress,
               leave=False)
    if P:
        _run_shared(model, seqs, P, order, batch_size, st, bar)
    else:
        _run_full(model, batch_all, order, batch_size, st, bar)
    bar.close()
    G = st.by_guard
    return Features(st.o, G(st.zt), G(st.zn), G(st.ns), G(st.ss), G(st.top), G(st.mass),
                    G(st.tail), batch_all.tokens, eps, P)
