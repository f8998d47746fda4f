r"""The attention-only model of the toy chapters (paper Sec. 7 and its multi-head rebuttal), many
runs at once, and the training loop.

One model: a residual stream of width d; a number x enters as (x, 1, 0, ..., 0), separator k
([SEP], [SEP2]) as s_tag * e_k, with e_k either a fixed unit direction or learned (unit norm at
initialisation); two layers of causal softmax(Q K^T) V attention without 1/sqrt(d) scaling, H
heads of size d_head, an output projection W_O per layer if out_proj (else one head with
d_head = d whose output is added as it is), residual connections, and the prediction
y_hat = w_out . h_T at the last position. The weight matrices start from N(0, scale^2 / fan_in)
(scale 1: N(0, 1/d)); s_tag starts at the value given, e_k at unit norm.

``Toys`` holds R such models (runs) with every parameter stacked on a leading run axis, so one
batched forward and backward trains them all. Run r's loss depends only on run r's slice and
AdamW acts elementwise, so each run follows its own trajectory: the batch only saves time (the
tests train a run alone and inside a batch and compare the bits). Training processes the runs
in groups of a few at a time, because attention tensors that fit in the cache are several times
faster than one large one.
Shapes use R runs, H heads, N sequences, T positions, D = d features.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..extract import one_thread

NUM, SEP, SEP2 = 0, 1, 2          # token kinds
GROUP_ENTRIES = 2 ** 20           # attention entries (sequences x heads x T^2) per training
                                  # chunk: large enough to amortise the per-op cost, small
                                  # enough for the cache (timed)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (the training workers)."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


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
    if T < 3:
        raise ValueError(f"a sequence needs at least 3 tokens (a number, [SEP], a number): T={T}")
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
    scale, one value or one per run. scale: the initial weights' standard deviation in units of
    1/sqrt(fan_in). Run r's initial weights depend on seeds[r] (and scale) only."""

    def __init__(self, seeds, s_tag=10.0, d=2, heads=1, d_head=None, n_sep=1, out_proj=False,
                 sep_dirs=None, scale=1.0):
        super().__init__()
        d_head = d_head or d
        if not out_proj and (heads != 1 or d_head != d):
            raise ValueError("without an output projection a layer has one head of size d")
        if d < 2 or not scale > 0:
            raise ValueError(f"need width d >= 2 and a positive weight scale (got d={d}, "
                             f"scale={scale})")
        R = len(seeds)
        s = torch.as_tensor(s_tag, dtype=torch.float32).expand(R).clone()
        self.arch = dict(d=d, heads=heads, d_head=d_head, n_sep=n_sep, out_proj=out_proj,
                         sep_dirs=None if sep_dirs is None else torch.as_tensor(sep_dirs).tolist(),
                         scale=float(scale))
        self.d, self.heads, self.d_head = d, heads, d_head
        draws = {"e": [], "W": [], "W_O": [], "w_out": []}
        for seed in seeds:
            g = torch.Generator().manual_seed(int(seed))
            e = torch.randn(n_sep, d, generator=g)
            draws["e"].append(e / e.norm(dim=1, keepdim=True))
            # W[l, h] = (W_Q, W_K, W_V) of layer l+1, head h, each (d_head, d)
            draws["W"].append(torch.randn(2, heads, 3, d_head, d, generator=g) * scale
                              / math.sqrt(d))
            if out_proj:
                draws["W_O"].append(torch.randn(2, d, heads * d_head, generator=g) * scale
                                    / math.sqrt(heads * d_head))
            draws["w_out"].append(torch.randn(d, generator=g) * scale / math.sqrt(d))
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

    def take(self, r) -> "Toys":
        """Run r (an index, or a slice / list of indices) alone, as a new model (a copy)."""
        idx = [r] if isinstance(r, int) else r
        state = {k: v[idx].clone() for k, v in self.state_dict().items()}
        return from_state(self.arch, state)

    def embed(self, x, kind, runs=slice(None)):
        """h^(0): (R, N, T, D) from x, kind (N, T) or (R, N, T)."""
        s_tag, e = self.s_tag[runs], self.e_SEP[runs]
        R, D = len(s_tag), self.d
        x = x.to(self.W.dtype).expand(R, *x.shape[-2:])                    # (R, N, T)
        kind = kind.expand(R, *kind.shape[-2:])
        # one-hot token features times an embedding table: (x, is_num, is_SEP, ...) @ E
        feats = [x, (kind == NUM).to(x.dtype)] + [(kind == SEP + k).to(x.dtype)
                                                   for k in range(e.shape[1])]
        F = torch.stack(feats, -1)                                         # (R, N, T, 2+n_sep)
        E = torch.cat([torch.eye(2, D, dtype=x.dtype).expand(R, 2, D),
                       s_tag[:, None, None] * e.to(x.dtype)], 1)           # (R, 2+n_sep, D)
        return (F.reshape(R, -1, F.shape[-1]) @ E).reshape(*F.shape[:-1], D)

    def forward(self, x, kind, trace: bool = False, ablate=None, runs=slice(None)):
        """y_hat (R, N). ablate = (layer, head): that head's output is zeroed (layer 1 or 2).
        runs: a slice of the runs to compute (training passes groups of runs). With trace=True
        also, per layer l: the attention A{l} (R, H, N, T, T) (query, key), each head's output
        after W_O, o{l}_heads (R, H, N, T, D), and the residual h{l} (R, N, T, D); h0 is the
        embedding."""
        H, dh, D = self.heads, self.d_head, self.d
        W, w_out = self.W[runs], self.w_out[runs]
        W_O = None if self.W_O is None else self.W_O[runs]
        h = self.embed(x, kind, runs)                                      # (R, N, T, D)
        R, N, T = h.shape[:3]
        mask = torch.full((T, T), float("-inf"), dtype=h.dtype).triu(1)    # key j > query i
        out = {"h0": h}
        for l in range(2):
            # the loss reads only the last position: layer 2 needs one query row (unless traced)
            Tq = 1 if l == 1 and not trace else T
            Wl = W[:, l].permute(2, 0, 1, 3, 4).reshape(3, R * H, dh, D)    # (Q/K/V, R H, dh, D)
            # every head of every run is one batch entry: (R H, N T, D) inputs (a copy if H > 1)
            hh = h.reshape(R, 1, N * T, D).expand(R, H, N * T, D).reshape(R * H, N * T, D)
            hq = hh if Tq == T else h[:, :, -Tq:].reshape(R, 1, N * Tq, D).expand(
                R, H, N * Tq, D).reshape(R * H, N * Tq, D)
            # one matmul per projection gives contiguous (R H N, T, dh) operands (timed)
            q, k, v = ((hq if j == 0 else hh) @ Wl[j].transpose(1, 2) for j in range(3))
            o, A = attend(q.reshape(R * H * N, Tq, dh), k.reshape(R * H * N, T, dh),
                          v.reshape(R * H * N, T, dh), mask[-Tq:], keep_map=trace)
            o = o.reshape(R, H, N * Tq, dh)
            if ablate is not None and ablate[0] == l + 1:
                keep = torch.ones(H, dtype=o.dtype)
                keep[ablate[1]] = 0.0
                o = o * keep[:, None, None]
            if W_O is not None:          # head i's share of W_O: columns i dh .. (i + 1) dh
                WO = W_O[:, l].reshape(R, D, H, dh).permute(0, 2, 3, 1).reshape(R * H, dh, D)
                heads = (o.reshape(R * H, N * Tq, dh) @ WO).reshape(R, H, N, Tq, D)
            else:
                heads = o.reshape(R, H, N, Tq, D)                          # (R, 1, N, T', D)
            h = h[:, :, -Tq:] + (heads[:, 0] if H == 1 else heads.sum(1))
            if trace:
                out.update({f"A{l + 1}": A.reshape(R, H, N, Tq, T), f"o{l + 1}_heads": heads,
                            f"h{l + 1}": h})
        y = (h[:, :, -1] * w_out[:, None]).sum(-1)                         # (R, N)
        return (y, out) if trace else y


def attend(q, k, v, mask, keep_map: bool = False):
    """Causal attention softmax(q k^T + mask) v of every sequence: q (B, T', C), k and v
    (B, T, C), mask (T', T) (-inf where a key lies after its query). Returns the output
    (B, T', C) and, with keep_map, the attention (B, T', T) (else None). Under autograd the
    backward is written out (_Attention): autograd's own runs bmm on strided views and on
    outer products (an inner size of 1), each several times slower here (timed). Fewer than
    16 keys are padded to 16 with keys of weight 0: torch's softmax over a last axis shorter
    than 16 is about 20 times slower than over 16 (timed)."""
    T = k.shape[1]
    if T < 16:
        k, v = (torch.nn.functional.pad(t, (0, 0, 0, 16 - T)) for t in (k, v))
        mask = torch.nn.functional.pad(mask, (0, 16 - T), value=float("-inf"))
    if keep_map or not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                     or v.requires_grad)):
        A = torch.baddbmm(mask, q, k.transpose(1, 2)).softmax(-1)
        return torch.bmm(A, v), (A[..., :T] if keep_map else None)
    return _Attention.apply(q, k, v, mask), None


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        A = torch.baddbmm(mask, q, k.transpose(1, 2)).softmax(-1)          # (B, T', T)
        ctx.save_for_backward(q, k, v, A)
        return torch.bmm(A, v)

    @staticmethod
    def backward(ctx, do):
        q, k, v, A = ctx.saved_tensors
        do = do.contiguous()
        dA = torch.bmm(do, v.transpose(1, 2))
        dS = torch._softmax_backward_data(dA, A, -1, A.dtype)             # (B, T', T)
        dq = torch.bmm(dS, k)
        if q.shape[1] == 1:          # one query row: the key and value gradients are outer
            dk = dS.transpose(1, 2) * q                                    # products
            dv = A.transpose(1, 2) * do
        else:
            dk = torch.bmm(dS.transpose(1, 2), q)
            dv = torch.bmm(A.transpose(1, 2), do)
        return dq, dk, dv, None


def r2(y_hat, y) -> torch.Tensor:
    """Held-out R^2 per run: y_hat (R, N), y (N,) -> (R,); NaN where a run diverged."""
    y = y.to(y_hat.dtype)
    out = 1 - ((y_hat - y) ** 2).sum(-1) / ((y - y.mean()) ** 2).sum()
    return torch.where(torch.isfinite(y_hat).all(-1), out, torch.nan)


@dataclass
class Plateau:
    """Train past the first `epochs` while held-out R^2 improves: after every epoch from
    `epochs` on, a run stops when its best held-out MSE of the last `patience` epochs is not
    below (1 - min_gain) times its best before them; every run stops at max_epochs."""
    max_epochs: int
    patience: int = 10
    min_gain: float = 0.01

    def stopped(self, test_loss: list[float]) -> bool:
        """Whether a run with this per-epoch held-out MSE history stops now."""
        e = len(test_loss)
        if e >= self.max_epochs:
            return True
        if e <= self.patience:
            return False
        before = [v for v in test_loss[:e - self.patience] if v == v]
        recent = [v for v in test_loss[e - self.patience:] if v == v]
        if not before or not recent:          # diverged (NaN): nothing left to improve
            return True
        return min(recent) >= (1 - self.min_gain) * min(before)


def train(model: Toys, data: Task, test: Task, order_seeds, epochs=50, lr=5e-2,
          weight_decay=1e-3, batch_size=512, plateau: Plateau | None = None,
          snapshots: bool = True) -> dict:
    """AdamW on each run's MSE at the last position; run r draws its batch order from
    order_seeds[r]. One thread, so the bits do not depend on the machine. `epochs` epochs, then
    (with `plateau`) more for the runs whose held-out MSE on `test` still improves; a stopped
    run is frozen and leaves the computation. Returns per-epoch train and held-out losses
    (epochs, R; NaN once a run stopped), each run's number of epochs, and, with snapshots, the
    parameters after every epoch (epochs + 1 snapshots), so the emergence of the mechanism can
    be replayed."""
    if len(order_seeds) != model.runs:
        raise ValueError(f"one batch-order seed per run: got {len(order_seeds)} for {model.runs}")
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"need batch_size and epochs of at least 1 (got {batch_size}, {epochs})")
    with one_thread(), torch.enable_grad():          # the test suite disables grad globally
        # flush denormals to zero: sharp attention makes exp() underflow into the denormal
        # range, where arithmetic is many times slower (timed); the weights change by < 1e-37
        torch.set_flush_denormal(True)
        try:
            return _train(model, data, test, order_seeds, epochs, lr, weight_decay, batch_size,
                          plateau, snapshots)
        finally:
            torch.set_flush_denormal(False)


def _groups(active: list[int], size: int) -> list[slice]:
    """Consecutive runs of `active` as slices of at most `size` runs."""
    out, start = [], None
    for i, r in enumerate(active):
        if start is None:
            start = r
        last = i + 1 == len(active) or active[i + 1] != r + 1 or r + 1 - start >= size
        if last:
            out.append(slice(start, r + 1))
            start = None
    return out


def _train(model, data, test, order_seeds, epochs, lr, weight_decay, batch_size, plateau,
           snapshots):
    R = model.runs
    gens = [torch.Generator().manual_seed(int(s)) for s in order_seeds]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    snap = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731
    hist = {"loss": [], "test_loss": [], "epochs": [0] * R,
            "snapshots": [snap()] if snapshots else None}
    T = data.x.shape[1]
    n = len(data)
    size = max(1, GROUP_ENTRIES // (min(batch_size, n) * model.heads * max(T, 16) ** 2))
    active, cap = list(range(R)), plateau.max_epochs if plateau else epochs
    for epoch in range(cap):
        frozen = {k: v.detach().clone() for k, v in model.named_parameters()}
        groups = _groups(active, size)
        orders = {r: torch.randperm(n, generator=gens[r]) for r in active}
        total = torch.full((R,), float("nan"), dtype=model.W.dtype)
        total[active] = 0.0
        for i in range(0, n, batch_size):
            opt.zero_grad()
            for g in groups:
                idx = torch.stack([orders[r][i:i + batch_size] for r in range(g.start, g.stop)])
                err = (model(data.x[idx], data.kind[idx], runs=g) - data.y[idx]) ** 2   # (r, B)
                err.mean(1).sum().backward()       # run r's gradient is its own loss's
                total[g] += err.detach().sum(1)
            opt.step()
        with torch.no_grad():
            for k, v in model.named_parameters():  # stopped runs stay as they were
                keep = [r for r in range(R) if r not in set(active)]
                v[keep] = frozen[k][keep]
            test_err = torch.full((R,), float("nan"), dtype=model.W.dtype)
            for g in _groups(active, size):
                test_err[g] = ((model(test.x, test.kind, runs=g) - test.y) ** 2).mean(1)
        hist["loss"].append((total / n).tolist())
        hist["test_loss"].append(test_err.tolist())
        for r in active:
            hist["epochs"][r] += 1
        if snapshots:
            hist["snapshots"].append(snap())
        if epoch + 1 >= epochs:
            if plateau is None:
                break
            active = [r for r in active
                      if not plateau.stopped([e[r] for e in hist["test_loss"]])]
            if not active:
                break
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
