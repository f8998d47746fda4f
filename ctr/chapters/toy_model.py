r"""The attention-only model of the toy chapters (paper Sec. 7 and its multi-head rebuttal), many
runs at once, and the training loop.

One model: a residual stream of width d; a number x enters as (x, 1, 0, ..., 0), separator k
([SEP], [SEP2]) as s_tag * e_k, with e_k either a fixed unit direction or learned (unit norm at
initialisation); two layers of causal softmax(Q K^T) V attention without 1/sqrt(d) scaling, H
heads of size d_head, an output projection W_O per layer if out_proj (else one head with
d_head = d whose output is added as it is), residual connections, and the prediction
y_hat = w_out . h_T at the last position.

``Toys`` holds R such models (runs) with every parameter stacked on a leading run axis, so one
batched forward and backward trains them all. Run r's loss depends only on run r's slice and
AdamW acts elementwise, so each run follows its own trajectory: the batch only saves time.
Shapes use R runs, H heads, N sequences, T positions, D = d features.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..extract import one_thread

NUM, SEP, SEP2 = 0, 1, 2          # token kinds


def derive(*key) -> int:
    """A seed from a key such as (seed, "model", run): independent of process and run order."""
    return int(hashlib.sha256(repr(key).encode()).hexdigest()[:12], 16)


@dataclass
class Task:
    x: torch.Tensor      # (N, T) numbers, 0 at separators
    kind: torch.Tensor   # (N, T) NUM / SEP / SEP2
    y: torch.Tensor      # (N,) target at the last position

    def __len__(self):
        return len(self.y)

    def __getitem__(self, idx):
        return Task(self.x[idx], self.kind[idx], self.y[idx])

    @property
    def sep(self):       # (N,) position of [SEP]
        return (self.kind == SEP).float().argmax(-1)


def make_task(n: int, T: int = 16, seed: int = 0) -> Task:
    """Numbers x ~ N(0, 1), one [SEP] at p uniform in 1..T-2; y = mean of the numbers after p."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, generator=g)
    p = torch.randint(1, T - 1, (n,), generator=g)
    pos = torch.arange(T)
    kind = (pos == p[:, None]).long() * SEP
    x = x.masked_fill(kind != NUM, 0.0)
    after = pos > p[:, None]
    return Task(x, kind, (x * after).sum(1) / after.sum(1))


class Toys(nn.Module):
    """R toy models, one per seed (module docstring). sep_dirs: (n_sep, d) fixed unit
    directions of the separators, or None for learned ones drawn per run. s_tag: the initial tag
    scale, one value or one per run. Run r's initial weights depend on seeds[r] only."""

    def __init__(self, seeds, s_tag=10.0, d=2, heads=1, d_head=None, n_sep=1, out_proj=False,
                 sep_dirs=None):
        super().__init__()
        d_head = d_head or d
        if not out_proj and (heads != 1 or d_head != d):
            raise ValueError("without an output projection a layer has one head of size d")
        R = len(seeds)
        s = torch.as_tensor(s_tag, dtype=torch.float32).expand(R).clone()
        self.arch = dict(d=d, heads=heads, d_head=d_head, n_sep=n_sep, out_proj=out_proj,
                         sep_dirs=None if sep_dirs is None else torch.as_tensor(sep_dirs).tolist())
        self.d, self.heads, self.d_head = d, heads, d_head
        draws = {"e": [], "W": [], "W_O": [], "w_out": []}
        for seed in seeds:
            g = torch.Generator().manual_seed(int(seed))
            e = torch.randn(n_sep, d, generator=g)
            draws["e"].append(e / e.norm(dim=1, keepdim=True))
            # W[l, h] = (W_Q, W_K, W_V) of layer l+1, head h, each (d_head, d): N(0, 1/d)
            draws["W"].append(torch.randn(2, heads, 3, d_head, d, generator=g) / math.sqrt(d))
            if out_proj:
                draws["W_O"].append(torch.randn(2, d, heads * d_head, generator=g)
                                    / math.sqrt(heads * d_head))
            draws["w_out"].append(torch.randn(d, generator=g) / math.sqrt(d))
        self.s_tag = nn.Parameter(s)                                        # (R,)
        if sep_dirs is None:
            self.e_SEP = nn.Parameter(torch.stack(draws["e"]))              # (R, n_sep, D)
        else:
            e = torch.as_tensor(sep_dirs, dtype=torch.float32).reshape(n_sep, d)
            self.register_buffer("e_SEP", e.expand(R, n_sep, d).clone())
        self.W = nn.Parameter(torch.stack(draws["W"]))                      # (R, 2, H, 3, dh, D)
        self.W_O = nn.Parameter(torch.stack(draws["W_O"])) if out_proj else None  # (R, 2, D, H dh)
        self.w_out = nn.Parameter(torch.stack(draws["w_out"]))              # (R, D)

    @property
    def runs(self) -> int:
        return self.W.shape[0]

    def take(self, r: int) -> "Toys":
        """Run r alone, as a model with one run (a copy)."""
        m = Toys([0], 1.0, **{k: v for k, v in self.arch.items()})
        m.load_state_dict({k: v[r:r + 1].clone() for k, v in self.state_dict().items()})
        return m.to(self.W.dtype)

    def embed(self, x, kind):
        """h^(0): (R, N, T, D) from x, kind (N, T) or (R, N, T)."""
        R, D = self.runs, self.d
        x = x.to(self.W.dtype).expand(R, *x.shape[-2:])                    # (R, N, T)
        kind = kind.expand(R, *kind.shape[-2:])
        h = torch.cat([x[..., None], torch.ones_like(x)[..., None],
                       x.new_zeros(*x.shape, D - 2)], -1)
        sep = self.s_tag[:, None, None] * self.e_SEP.to(self.W.dtype)      # (R, n_sep, D)
        for k in range(sep.shape[1]):
            h = torch.where((kind == SEP + k)[..., None], sep[:, k, None, None, :], h)
        return h

    def forward(self, x, kind, trace: bool = False, ablate=None):
        """y_hat (R, N). ablate = (layer, head): that head's output is zeroed (layer 1 or 2).
        With trace=True also, per layer l: the attention A{l} (R, H, N, T, T) (query, key),
        each head's output after W_O, o{l}_heads (R, H, N, T, D), and the residual h{l}
        (R, N, T, D); h0 is the embedding."""
        R, H, dh, D = self.runs, self.heads, self.d_head, self.d
        h = self.embed(x, kind)                                            # (R, N, T, D)
        N, T = h.shape[1:3]
        mask = torch.full((T, T), float("-inf"), dtype=h.dtype).triu(1)    # key j > query i
        out = {"h0": h}
        for l in range(2):
            Wl = self.W[:, l].reshape(R, H * 3 * dh, D)
            P = (h.reshape(R, N * T, D) @ Wl.transpose(1, 2)).reshape(R, N, T, H, 3, dh)
            q, k, v = P.permute(4, 0, 3, 1, 2, 5)                          # (R, H, N, T, dh)
            if l == 1 and not trace:
                q = q[:, :, :, -1:]   # the loss reads only the last position: one query row
                A = (q @ k.transpose(-1, -2)).softmax(-1)                  # (R, H, N, 1, T)
            else:
                # (timed: bmm and softmax over the last axis beat keys-first layouts here)
                A = (q @ k.transpose(-1, -2) + mask).softmax(-1)           # (R, H, N, T, T)
            o = A @ v                                                      # (R, H, N, T', dh)
            if ablate is not None and ablate[0] == l + 1:
                keep = torch.ones(H, dtype=o.dtype)
                keep[ablate[1]] = 0.0
                o = o * keep[:, None, None, None]
            Tq = o.shape[3]
            if self.W_O is not None:     # head h's share of W_O: columns h dh .. (h + 1) dh
                WO = self.W_O[:, l].reshape(R, D, H, dh).transpose(1, 2)   # (R, H, D, dh)
                heads = (o.reshape(R, H, N * Tq, dh) @ WO.transpose(-1, -2))
                heads = heads.reshape(R, H, N, Tq, D)                      # (R, H, N, T', D)
            else:
                heads = o                                                  # (R, 1, N, T', D)
            h = h[:, :, -Tq:] + heads.sum(1)
            if trace:
                out.update({f"A{l + 1}": A, f"o{l + 1}_heads": heads, f"h{l + 1}": h})
        y = (h[:, :, -1] * self.w_out[:, None]).sum(-1)                    # (R, N)
        return (y, out) if trace else y


def r2(y_hat, y) -> torch.Tensor:
    """Held-out R^2 per run: y_hat (R, N), y (N,) -> (R,); NaN where a run diverged."""
    y = y.to(y_hat.dtype)
    out = 1 - ((y_hat - y) ** 2).sum(-1) / ((y - y.mean()) ** 2).sum()
    return torch.where(torch.isfinite(y_hat).all(-1), out, torch.nan)


def train(model: Toys, data: Task, test: Task, order_seeds, epochs=50, lr=5e-2,
          weight_decay=1e-3, batch_size=512) -> dict:
    """AdamW on each run's MSE at the last position; run r draws its batch order from
    order_seeds[r]. One thread, so the bits do not depend on the machine. Returns per-epoch
    losses (epochs, R) and the parameters after every epoch (epochs + 1 snapshots), so the
    emergence of the mechanism can be replayed."""
    if len(order_seeds) != model.runs:
        raise ValueError(f"one batch-order seed per run: got {len(order_seeds)} for {model.runs}")
    with one_thread(), torch.enable_grad():          # the test suite disables grad globally
        return _train(model, data, test, order_seeds, epochs, lr, weight_decay, batch_size)


def _train(model, data, test, order_seeds, epochs, lr, weight_decay, batch_size):
    gens = [torch.Generator().manual_seed(int(s)) for s in order_seeds]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    snap = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731
    hist = {"loss": [], "test_loss": [], "snapshots": [snap()]}
    n = len(data)
    for _ in range(epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens])   # (R, n)
        total = torch.zeros(model.runs, dtype=model.W.dtype)
        for i in range(0, n, batch_size):
            idx = order[:, i:i + batch_size]                                  # (R, B)
            err = (model(data.x[idx], data.kind[idx]) - data.y[idx]) ** 2     # (R, B)
            opt.zero_grad()
            err.mean(1).sum().backward()           # run r's gradient is its own loss's
            opt.step()
            total += err.detach().sum(1)
        with torch.no_grad():
            test_err = ((model(test.x, test.kind) - test.y) ** 2).mean(1)
        hist["loss"].append((total / n).tolist())
        hist["test_loss"].append(test_err.tolist())
        hist["snapshots"].append(snap())
    return hist


def from_state(arch: dict, state: dict) -> Toys:
    """A model from `arch` (Toys.arch) and a state dict (e.g. a snapshot)."""
    R = state["W"].shape[0]
    m = Toys([0] * R, 1.0, **arch)
    m.load_state_dict(state)
    return m.to(state["W"].dtype)


def _worker(fn, cfg):
    with one_thread():                 # one core per process
        return fn(cfg)


def run_many(fn, cfgs: list[dict], workers: int = 2) -> list[dict]:
    """fn(cfg) for every cfg (e.g. one batched training each), in `workers` spawned processes,
    order kept. Each is seeded by its cfg alone and uses one thread, so results do not depend
    on `workers`."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial
    from multiprocessing import get_context

    if workers <= 1 or len(cfgs) <= 1:
        return [_worker(fn, c) for c in cfgs]
    # spawn, not fork: forking a process whose torch thread pool has run can hang
    with ProcessPoolExecutor(min(workers, len(cfgs)), mp_context=get_context("spawn")) as ex:
        return list(ex.map(partial(_worker, fn), cfgs))
