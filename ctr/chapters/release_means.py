"""The clean pass's bookkeeping for the release chapter's ablations (``release``): per layer,
the sinks of every prompt and the mean value vector of each (head, token id) over that token's
occurrences as a sink of the head (the mean-ablation's "that sink token's mean value"), and the
check that the first token's value depends on its token id alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def select(S: torch.Tensor, which: str) -> torch.Tensor:
    """The sinks at position 0 ("bos"), at every other position ("mid"), or all ("all")."""
    out = S.clone()
    if which == "bos":
        out[..., 1:] = False
    elif which == "mid":
        out[..., 0] = False
    elif which != "all":
        raise ValueError(f"which={which!r}: use 'bos', 'mid' or 'all'")
    return out


@dataclass
class LayerStats:
    """What the clean pass keeps of one layer: its sinks and the mean value of each
    (head, token id) over that token's sink occurrences."""
    S: torch.Tensor                  # (P, H, T) sinks, all prompts
    tokens: torch.Tensor             # (U,) token ids that are a mid-prompt sink somewhere
    mean: torch.Tensor               # (H, U, D) mean value of (head, token) over its sinks
    n_prompts: torch.Tensor          # (H, U) prompts in which (head, token) is a sink
    bos_spread: float = 0.0          # max over prompts and heads of ||v_0 - m|| / ||m||, m the
    #                                  mean v_0 of the prompts with the same first token


class _Accumulator:
    def __init__(self, P, H, T, Dh):
        self.S = torch.zeros(P, H, T, dtype=torch.bool)
        self.sums: dict[tuple[int, int], torch.Tensor] = {}      # (h, tok) -> (D,) float64
        self.counts: dict[tuple[int, int], int] = {}
        self.prompts: dict[tuple[int, int], set] = {}
        self.bos: list[torch.Tensor] = []                        # (b, H, D) first-token values
        self.first: list[torch.Tensor] = []                      # (b,) first token ids
        self.Dh = Dh

    def add(self, idx, ids, S, V):
        self.S[idx, :, :S.shape[-1]] = S
        b, h, t = torch.nonzero(select(S, "mid"), as_tuple=True)
        vals = V[b, h, t].double()
        for j, (bb, hh, tt) in enumerate(zip(b.tolist(), h.tolist(), t.tolist())):
            key = (hh, int(ids[bb, tt]))
            self.sums[key] = self.sums.get(key, 0) + vals[j]
            self.counts[key] = self.counts.get(key, 0) + 1
            self.prompts.setdefault(key, set()).add(idx[bb])
        self.bos.append(V[:, :, 0].double())
        self.first.append(ids[:, 0])

    def done(self) -> LayerStats:
        H = self.S.shape[1]
        toks = sorted({t for _, t in self.sums})
        pos = {t: i for i, t in enumerate(toks)}
        mean = torch.zeros(H, len(toks), self.Dh, dtype=torch.float64)
        npr = torch.zeros(H, len(toks), dtype=torch.long)
        for (h, t), s in self.sums.items():
            mean[h, pos[t]] = s / self.counts[(h, t)]
            npr[h, pos[t]] = len(self.prompts[(h, t)])
        v0, first = torch.cat(self.bos), torch.cat(self.first)             # (P, H, D), (P,)
        spread = 0.0
        for tok in first.unique():
            g = v0[first == tok]
            m0 = g.mean(0)
            spread = max(spread, float(((g - m0).norm(dim=-1) / m0.norm(dim=-1).clamp_min(1e-30)).max()))
        return LayerStats(self.S, torch.tensor(toks, dtype=torch.long), mean, npr, spread)


def means_at(st: LayerStats, idx, ids: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """M (B, H, T, D): at each mid-prompt sink, the mean value of its (head, token id); zeros
    elsewhere. ids (B, T) token ids of the prompts ``idx``; S (B, H, T) the sinks ablated."""
    B, H, T = S.shape
    M = torch.zeros(B, H, T, st.mean.shape[-1], dtype=torch.float64)
    b, h, t = torch.nonzero(S, as_tuple=True)
    if len(b):
        u = torch.searchsorted(st.tokens, ids[b, t])
        M[b, h, t] = st.mean[h, u]
    return M
