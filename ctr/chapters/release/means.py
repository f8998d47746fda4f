r"""What the release chapter's ablations (``release``) remove, and the control.

The clean pass keeps, per layer: the sinks of every prompt; the mean value vector of each
(head, token id) over that token's occurrences as a sink of the head (the mid-prompt
mean-ablation's "that sink token's mean value"); and the sum over prompts of every head's
first-token tag at each position (the first-token mean-ablation's leave-one-out mean).

Ablations of head (l, h), S its sinks in a prompt, o(t) = sum_k A[t,k] v_k its output:

- zero: remove z_tag(t) = sum_{s in S} A[t,s] v_s;
- mean, mid-prompt sinks: replace each sink's value by its (head, token) mean;
- mean, first token: replace x_p(t) = [0 in S] A[t,0] v_0, the first-token tag of prompt p at
  position t, by its mean over the other prompts at t (leave-one-out; prompts shorter than t+1
  do not count, and a position that only one prompt reaches is left alone).

The control (RULES.md, Release, "control"): a direction drawn uniformly in the head's value
space, a fresh draw per token, rescaled so that after W_O (and the post-attention norm's
per-dimension scale, Gemma-3) its norm equals that of what the ablation removes there.
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


def removed_part(A: torch.Tensor, V: torch.Tensor, S: torch.Tensor,
                 M: torch.Tensor | None = None) -> torch.Tensor:
    """What an ablation takes out of the head outputs, (B, T, H, D), in float64.

    A (B, H, T, T), V (B, H, T, D), S (B, H, T) the sinks ablated. M None: z_tag =
    sum_{s in S} A[t,s] v_s. M (B, H, T, D) the mean value at each sink: sum A[t,s] (v_s - m_s).
    """
    W = A.double() * S.unsqueeze(-2).double()                               # (B, H, T, T)
    X = V.double() if M is None else V.double() - M.double()
    return (W @ X).transpose(1, 2)


def first_token_tag(A: torch.Tensor, V: torch.Tensor, S: torch.Tensor, lengths) -> torch.Tensor:
    """x(t) = [0 is a sink] A[t,0] v_0 of every head, (B, T, H, D) float64; 0 past a prompt's
    end. A (B, H, T, T), V (B, H, T, D), S (B, H, T) sinks."""
    T = A.shape[-1]
    x = (S[..., :1].double() * A[..., 0].double()).unsqueeze(-1) * V[:, :, :1].double()
    valid = torch.arange(T, device=A.device).unsqueeze(0) < torch.tensor(lengths, device=A.device).unsqueeze(1)
    return x.transpose(1, 2) * valid[:, :, None, None]                      # (B, T, H, D)


def residual_gram(W_O: torch.Tensor, scale: torch.Tensor | None, H: int) -> torch.Tensor:
    """G_h = M_h^T M_h (H, D, D) in float64, M_h = diag(scale) W_O[:, h-th slice]: the squared
    norm in the residual stream of what a head-output change u adds there is u^T G_h u."""
    d = W_O.shape[0]
    M = W_O.detach().double().reshape(d, H, -1)                             # (d_model, H, D)
    if scale is not None:
        M = M * scale.double().to(M.device).view(d, 1, 1)
    return torch.einsum("dhk,dhj->hkj", M, M)


def residual_norm(x: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """||M_h x_h|| for x (B, T, H, D): the norm in the residual stream, (B, T, H)."""
    q = torch.einsum("bthk,hkj,bthj->bth", x.double(), G.to(x.device), x.double())
    return q.clamp_min(0).sqrt()


def residual_control(removed: torch.Tensor, G: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The control for ``removed`` (B, T, H, D): at every (prompt, token, head) a direction
    drawn uniformly in the head's value space (a fresh draw each), rescaled so that its norm in
    the residual stream (``residual_norm`` with G from ``residual_gram``) equals that of
    ``removed`` there. Returns (B, T, H, D) float64; zero where nothing is removed."""
    u = torch.randn(removed.shape, generator=generator, dtype=torch.float64).to(removed.device)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)                  # uniform on the sphere
    want, have = residual_norm(removed, G), residual_norm(u, G)
    scale = torch.where(have > 0, want / have.clamp_min(1e-300), torch.zeros_like(have))
    return u * scale.unsqueeze(-1)


def attention_write(model, layer: int):
    """f(head outputs (B, T, H, D)) -> what the layer adds to the residual stream from its
    attention, (B, T, d_model) float32: W_O, then the post-attention norm where there is one
    (Gemma-3's RMSNorm, with its per-token normalisation). A diagnostic of the control: the
    rule matches norms through the norm's per-dimension scale only."""
    from ... import arch as _arch

    a = _arch.arch_of(model.config)
    block = _arch.getpath(model.hf, a.layers)[layer]
    o_proj = _arch.getpath(_arch.getpath(block, a.attn), a.out_proj)
    name = _arch.post_attention_norm(block, a.attn)
    norm = getattr(block, name) if name else None

    w = next(o_proj.parameters())

    def proj(o: torch.Tensor) -> torch.Tensor:
        return o_proj(o.reshape(*o.shape[:2], -1).to(device=w.device, dtype=w.dtype))

    def after(y: torch.Tensor) -> torch.Tensor:
        return (norm(y.to(w.dtype)) if norm is not None else y).float()

    def f(o: torch.Tensor) -> torch.Tensor:
        return after(proj(o))
    f.proj, f.after = proj, after
    return f


def matched_control(removed: torch.Tensor, out: torch.Tensor, write, gram: torch.Tensor,
                    generator: torch.Generator | None = None, iters: int = 30) -> torch.Tensor:
    """An alternative control (not pre-registered): the rule's control (``residual_control``)
    times one factor k(t) per token, found by bisection so that the actual change of what the
    attention writes into the residual stream (``attention_write``: W_O, then the
    post-attention norm with its per-token RMS) equals the tag's, token by token over all heads.
    removed, out (B, T, H, D): what the ablation removes, the head outputs. Where even a factor
    of 2^30 cannot reach the tag's change, the largest factor is kept."""
    r = residual_control(removed, gram, generator)
    base = write(out)
    y0 = write.proj(out).double()                                           # (B, T, d_model)
    yr = y0 - write.proj((out.double() - r).to(out.dtype)).double()        # W_O's image of r

    def change(k):                                  # (B, T) for factors k (B, T): the norm only
        return (write.after(y0 - k[..., None] * yr) - base).norm(dim=-1).double()
    want = (write((out.double() - removed).to(out.dtype)) - base).norm(dim=-1).double()
    lo = torch.zeros(want.shape, dtype=torch.float64, device=want.device)
    hi = torch.ones_like(lo)
    for _ in range(30):                             # grow hi until it reaches the target
        short = change(hi) < want
        if not short.any():
            break
        hi = torch.where(short, hi * 2, hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        under = change(mid) < want
        lo, hi = torch.where(under, mid, lo), torch.where(under, hi, mid)
    k = torch.where(want > 0, (lo + hi) / 2, torch.zeros_like(lo))
    return r * k[..., None, None].to(r.device)


@dataclass
class LayerStats:
    """What the clean pass keeps of one layer: its sinks, the mean value of each (head, token
    id) over that token's mid-prompt sink occurrences, and the first-token tags' sums."""
    S: torch.Tensor                  # (P, H, T) sinks, all prompts
    tokens: torch.Tensor             # (U,) token ids that are a mid-prompt sink somewhere
    mean: torch.Tensor               # (H, U, D) mean value of (head, token) over its sinks
    n_prompts: torch.Tensor          # (H, U) prompts in which (head, token) is a sink
    bos_spread: float = 0.0          # max over prompts and heads of ||v_0 - m|| / ||m||, m the
    #                                  mean v_0 of the prompts with the same first token
    first_sum: torch.Tensor | None = None   # (T, H, D) sum over prompts of x(t) (first_token_tag)
    first_n: torch.Tensor | None = None     # (T,) prompts at least t + 1 tokens long


class _Accumulator:
    def __init__(self, P, H, T, Dh):
        self.S = torch.zeros(P, H, T, dtype=torch.bool)
        self.sums: dict[tuple[int, int], torch.Tensor] = {}      # (h, tok) -> (D,) float64
        self.counts: dict[tuple[int, int], int] = {}
        self.prompts: dict[tuple[int, int], set] = {}
        self.bos: list[torch.Tensor] = []                        # (b, H, D) first-token values
        self.first: list[torch.Tensor] = []                      # (b,) first token ids
        self.first_sum = torch.zeros(T, H, Dh, dtype=torch.float64)
        self.first_n = torch.zeros(T, dtype=torch.long)
        self.Dh = Dh

    def add(self, idx, ids, S, V, A=None, lengths=None):
        """One chunk of prompts ``idx``: sinks S (b, H, T'), values V (b, H, T', D), and with A
        (b, H, T', T') and ``lengths`` the first-token tags' sums."""
        S, V = S.cpu(), V.cpu()
        self.S[idx, :, :S.shape[-1]] = S
        b, h, t = torch.nonzero(select(S, "mid"), as_tuple=True)
        vals = V[b, h, t].double()
        for j, (bb, hh, tt) in enumerate(zip(b.tolist(), h.tolist(), t.tolist())):
            key = (hh, int(ids[bb, tt]))
            self.sums[key] = self.sums.get(key, 0) + vals[j]
            self.counts[key] = self.counts.get(key, 0) + 1
            self.prompts.setdefault(key, set()).add(idx[bb])
        self.bos.append(V[:, :, 0].double())
        self.first.append(ids[:, 0].cpu())
        if A is not None:
            x = first_token_tag(A.cpu(), V, S, lengths)                    # (b, T', H, D)
            self.first_sum[:x.shape[1]] += x.sum(0)
            for n in lengths:
                self.first_n[:n] += 1

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
        return LayerStats(self.S, torch.tensor(toks, dtype=torch.long), mean, npr, spread,
                          self.first_sum, self.first_n)


def means_at(st: LayerStats, idx, ids: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """M (B, H, T, D): at each mid-prompt sink, the mean value of its (head, token id); zeros
    elsewhere. ids (B, T) token ids of the prompts ``idx``; S (B, H, T) the sinks ablated."""
    B, H, T = S.shape
    M = torch.zeros(B, H, T, st.mean.shape[-1], dtype=torch.float64)
    b, h, t = torch.nonzero(S, as_tuple=True)
    if len(b):
        u = torch.searchsorted(st.tokens, ids[b, t].cpu())
        M[b, h, t] = st.mean[h, u]
    return M


def first_token_removed(st: LayerStats, A: torch.Tensor, V: torch.Tensor, S: torch.Tensor,
                        lengths) -> torch.Tensor:
    """What the first-token mean-ablation removes, (B, T, H, D) float64: x_p(t) minus the mean
    of x over the other prompts at t. A, V, S of the prompts being run (S their clean sinks)."""
    x = first_token_tag(A, V, S, lengths)                                   # (B, T, H, D)
    T = x.shape[1]
    total = st.first_sum[:T].to(x.device)                                  # (T, H, D)
    n = st.first_n[:T].to(x.device).double()
    others = (total.unsqueeze(0) - x) / (n - 1).clamp_min(1).view(1, T, 1, 1)
    valid = torch.arange(T, device=x.device).unsqueeze(0) < torch.tensor(lengths, device=x.device).unsqueeze(1)
    keep = (n >= 2).view(1, T) & valid                 # a position only one prompt reaches: left alone
    return torch.where(keep[:, :, None, None], x - others, torch.zeros_like(x))


def sink_summary(stats: dict[int, LayerStats], layers, ids: torch.Tensor) -> dict:
    """Per ablated layer: first-token and mid-prompt sinks per head, and the share of
    mid-prompt sink occurrences whose (head, token) mean is taken over at least two prompts
    (elsewhere the mean ablation removes nothing)."""
    out = {}
    for l in layers:
        st = stats[l]
        S = st.S
        mid = select(S, "mid")
        b, h, t = torch.nonzero(mid, as_tuple=True)
        shared = None
        if len(b):
            support = st.n_prompts[h, torch.searchsorted(st.tokens, ids[b, t].cpu())]
            shared = float(support.ge(2).double().mean())
        out[l] = {"bos_per_head": float(S[..., 0].double().mean()),
                  "mid_per_head": float(mid.sum(-1).double().mean()),
                  "mean_over_2_prompts": shared}
    return out
