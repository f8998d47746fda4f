r"""The minimal problem of paper Sec. 7 (SPEC 3.6): catch, tag, release in two attention layers.

Task. T tokens: numbers x_i ~ N(0, 1) and one [SEP] at a random position p (1 <= p <= T-2, so at
least one number comes before and one after it). Target at the last position (always a number):
    y = mean{x_i : i > p}.
Model. A residual stream of width D = 4 with coordinates (VAL, ONE, A, OUT).
    number x  ->  h = (x, 1, 0, 0)              the 2-D number embedding (x, 1), zero-padded
    [SEP]     ->  h = s_tag * e_SEP             learned direction e_SEP, learnable tag scale s_tag
Two layers l = 1, 2 of causal single-head attention, no 1/sqrt(d) scaling, residual connections:
    h <- h + softmax(Q K^T + causal mask) V,    Q = h W_Q^T, K = h W_K^T, V = h W_V^T
and the prediction y_hat = w_out . h_T (last position). The paper leaves D, T, the number
distribution and the readout open: these are our choices (the chapter says so).

Construction (our analogue of Theorem 7.1; the chapter gives the argument):
    e_SEP = (0, -1, 1, 0)
    layer 1:  q = ONE, k = A, v = A e_A                      (catch at [SEP], tag A += s_tag)
    layer 2:  q = ONE, k = A + 2 ONE, v = VAL e_OUT          (release: average the tagged tokens)
    w_out = e_OUT
The error vanishes as s_tag grows (exponentially in s_tag).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import definitions as defs
from ..extract import one_thread

VAL, ONE, A, OUT = 0, 1, 2, 3
NUM, SEP, SEP2 = 0, 1, 2          # token kinds
D = 4


def derive(*key) -> int:
    """A seed from a key such as (seed, "model", run): independent of process and run order."""
    return int(hashlib.sha256(repr(key).encode()).hexdigest()[:12], 16)


# --- task ------------------------------------------------------------------------------------

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
        return (self.kind == SEP).float().argmax(1)


def make_task(n: int, T: int = 16, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, generator=g)
    p = torch.randint(1, T - 1, (n,), generator=g)
    pos = torch.arange(T)
    kind = (pos == p[:, None]).long() * SEP
    x = x.masked_fill(kind != NUM, 0.0)
    after = pos > p[:, None]
    return Task(x, kind, (x * after).sum(1) / after.sum(1))


# --- model -----------------------------------------------------------------------------------

class AttentionOnly(nn.Module):
    """Two layers of causal attention on a residual stream of width d, with H heads of size
    d_head and, if out_proj, an output projection W_O per layer (without: single-head
    softmax(QK^T)V, d_head = d), number embedding (x, 1, 0, ...), separators s_tag * e_SEP[k] and
    a linear readout of the last position. ToyModel and the multi-head toy are instances."""

    def __init__(self, d=D, heads=1, d_head=D, n_sep=1, out_proj=False, s_tag=10.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.arch = dict(d=d, heads=heads, d_head=d_head, n_sep=n_sep, out_proj=out_proj)
        self.d, self.heads, self.d_head = d, heads, d_head
        e = torch.randn(n_sep, d, generator=g)
        self.s_tag = nn.Parameter(torch.tensor(float(s_tag)))
        self.e_SEP = nn.Parameter(e / e.norm(dim=1, keepdim=True))  # s_tag = separator norm at init
        # W[l, h] = (W_Q, W_K, W_V) of layer l+1, head h; default-Linear scale 1/sqrt(d)
        self.W = nn.Parameter(torch.randn(2, heads, 3, d_head, d, generator=g) / math.sqrt(d))
        self.W_O = (nn.Parameter(torch.randn(2, d, heads * d_head, generator=g)
                                 / math.sqrt(heads * d_head)) if out_proj else None)
        self.w_out = nn.Parameter(torch.randn(d, generator=g) / math.sqrt(d))

    def embed(self, x, kind):
        """h^(0), features first: (d, N, T)."""
        h = torch.cat([x[None], torch.ones_like(x)[None], x.new_zeros(self.d - 2, *x.shape)])
        for k in range(self.e_SEP.shape[0]):
            h = torch.where(kind == SEP + k, (self.s_tag * self.e_SEP[k])[:, None, None], h)
        return h

    def forward(self, x, kind, trace: bool = False):
        """y_hat (N,). With trace=True also each layer's attention A (N, H, T, T), values
        v (N, H, T, d_head), output o (N, T, d) and residual h (N, T, d), at every position."""
        N, T = x.shape
        H, dh = self.heads, self.d_head
        # Features first, h: (d, N, T). With a handful of features, every product then has its
        # long axis last, which runs several times faster on CPU than the (N, T, d) layout.
        h = self.embed(x, kind)
        mask = torch.full((T, T), float("-inf")).triu(1)           # causal: key j > query i
        out = {"h0": h.permute(1, 2, 0)}
        for l in range(2):
            P = (self.W[l].reshape(-1, self.d) @ h.reshape(self.d, -1)).reshape(H, 3, dh, N, T)
            As, os = [], []
            for q, k, v in P:                                          # heads; (dh, N, T) each
                if l == 1 and not trace:
                    # the loss reads only the last position: one query row, nothing to mask
                    A_ = (k * q[:, :, -1:]).sum(0).softmax(-1)           # (N, T)
                    os.append((A_ * v).sum(-1, keepdim=True))           # (dh, N, 1)
                else:
                    A_ = (q.permute(1, 2, 0) @ k.permute(1, 0, 2) + mask).softmax(-1)
                    os.append((v.permute(1, 0, 2) @ A_.transpose(1, 2)).permute(1, 0, 2))
                As.append(A_)
            o = torch.cat(os, 0)                                       # (H * dh, N, T')
            if self.W_O is not None:
                o = (self.W_O[l] @ o.reshape(H * dh, -1)).reshape(self.d, N, -1)
            h = h[:, :, -o.shape[2]:] + o
            if trace:                                 # back to (N, ...) for the analysis code
                out.update({f"A{l + 1}": torch.stack(As, 1),
                            f"v{l + 1}": P[:, 2].permute(2, 0, 3, 1),
                            f"o{l + 1}": o.permute(1, 2, 0), f"h{l + 1}": h.permute(1, 2, 0)})
        y = self.w_out @ h[:, :, -1]
        return (y, out) if trace else y


class ToyModel(AttentionOnly):
    """Paper Sec. 7: one head per layer, d = 4, one [SEP]."""

    def __init__(self, s_tag: float = 10.0, seed: int = 0):
        super().__init__(D, 1, D, 1, False, s_tag, seed)


def construction(s_tag: float = 20.0) -> ToyModel:
    """The hand-set solution: catch at [SEP], tag along A, release by layer-2 averaging."""
    m = ToyModel(s_tag)
    e = torch.eye(D)
    W = torch.zeros(2, 1, 3, D, D)                     # (layer, head, Q/K/V, row, column)
    W[0, 0, 0, 0], W[0, 0, 1, 0], W[0, 0, 2, A] = e[ONE], e[A], e[A]           # q=ONE, k=A, v->A
    W[1, 0, 0, 0], W[1, 0, 1, 0], W[1, 0, 2, OUT] = e[ONE], e[A] + 2 * e[ONE], e[VAL]  # VAL->OUT
    with torch.no_grad():
        m.e_SEP.copy_(torch.tensor([[0.0, -1.0, 1.0, 0.0]]))
        m.W.copy_(W)
        m.w_out.copy_(e[OUT])
    return m


# --- training --------------------------------------------------------------------------------

def r2(y_hat, y) -> float:
    if not torch.isfinite(y_hat).all():
        return float("nan")
    return float(1 - ((y_hat - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def train(model, data: Task, test: Task, epochs=50, lr=5e-2, weight_decay=1e-3, batch_size=512,
          seed=0):
    """AdamW on the MSE at the last position. Returns per-epoch losses and parameter snapshots
    (every epoch: the models are tiny) so the emergence of the mechanism can be replayed."""
    with one_thread():
        return _train(model, data, test, epochs, lr, weight_decay, batch_size, seed)


def _train(model, data, test, epochs, lr, weight_decay, batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    snap = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731
    hist = {"loss": [], "test_loss": [], "snapshots": [snap()]}
    with torch.enable_grad():                       # the test suite disables grad globally
        for _ in range(epochs):
            shuffled = data[torch.randperm(len(data), generator=g)]
            total = torch.zeros(())
            for i in range(0, len(data), batch_size):
                b = shuffled[i:i + batch_size]
                loss = F.mse_loss(model(b.x, b.kind), b.y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.detach() * len(b)
            with torch.no_grad():
                hist["loss"].append(float(total) / len(data))
                hist["test_loss"].append(float(F.mse_loss(model(test.x, test.kind), test.y)))
            hist["snapshots"].append(snap())
    return hist


# --- mechanism detection ---------------------------------------------------------------------

def tv_uniform(row, support):
    """Total-variation distance between attention rows (N, T) and uniform over `support`."""
    u = support.float() / support.sum(-1, keepdim=True)
    return 0.5 * (row - u).abs().sum(-1)


def tag_direction(o, after, before):
    """Mass-mean direction (the paper's probe) of layer-1 outputs: after minus before [SEP]."""
    return o[after].mean(0) - o[before].mean(0)


@torch.no_grad()
def mechanism(model: ToyModel, task: Task, eps: float = defs.EPS, tv_max: float = 0.2) -> dict:
    """Catch, tag, release measured on `task`, with pass/fail flags.

    catch:   alpha of [SEP] in layer 1 (the paper's sink score), mean over sequences, > eps
    tag:     tau_i = o1_i . theta, theta the mass-mean direction of the layer-1 outputs of the
             numbers after [SEP] minus those before; share of sequences in which every number
             after [SEP] has a larger tau than every number before, >= 0.9
    release: layer-2 attention of the last token vs uniform over the numbers after [SEP]:
             mean total-variation distance < tv_max
    """
    _, tr = model(task.x, task.kind, trace=True)
    N, T = task.x.shape
    pos, p = torch.arange(T), task.sep
    after, before = pos > p[:, None], pos < p[:, None]
    alpha_sep = defs.alpha(tr["A1"][:, 0])[torch.arange(N), p]
    theta = tag_direction(tr["o1"], after, before)
    tau = tr["o1"] @ (theta / theta.norm().clamp_min(1e-12))
    separated = (tau.masked_fill(~after, float("inf")).min(1).values
                 > tau.masked_fill(~before, float("-inf")).max(1).values)
    tv = tv_uniform(tr["A2"][:, 0, -1], after)
    out = {"alpha_sep": float(alpha_sep.mean()), "tag_separated": float(separated.float().mean()),
           "tv_layer2": float(tv.mean())}
    out["catch"] = out["alpha_sep"] > eps
    out["tag"] = out["tag_separated"] >= 0.9
    out["release"] = out["tv_layer2"] < tv_max
    out["mechanism"] = out["catch"] and out["tag"] and out["release"]
    return out


# --- runs (one per seed and s_tag init), in parallel processes --------------------------------

def configs(seed=0, n_seeds=10, s_tag_inits=(10.0, 6.0, 1.0), **train) -> list[dict]:
    """One cfg per (s_tag init, run). train: T, n_sequences, n_test, epochs, lr, weight_decay,
    batch_size, r2_min, and optionally eps, tv_max (the detection thresholds)."""
    return [dict(seed=seed, run=r, s_tag_init=float(s), **train)
            for s in s_tag_inits for r in range(n_seeds)]


def run(cfg: dict) -> dict:
    """One training run. Data depend on the seed only; the run index gives the initialisation
    and batch order, the same for every s_tag init (only s_tag's starting value differs)."""
    t0 = time.process_time()
    data = make_task(cfg["n_sequences"], cfg["T"], derive(cfg["seed"], "train"))
    test = make_task(cfg["n_test"], cfg["T"], derive(cfg["seed"], "test"))
    model = ToyModel(cfg["s_tag_init"], seed=derive(cfg["seed"], "model", cfg["run"]))
    # the per-epoch held-out curve uses 512 of the held-out sequences (cheaper); R^2 uses all
    hist = train(model, data, test[:512], cfg["epochs"], cfg["lr"], cfg["weight_decay"],
                 cfg["batch_size"], seed=derive(cfg["seed"], "order", cfg["run"]))
    with torch.no_grad():
        score = r2(model(test.x, test.kind), test.y)
    found = mechanism(model, test, cfg.get("eps", defs.EPS), cfg.get("tv_max", 0.2))
    return {"cfg": cfg, "r2": score, "success": bool(score > cfg["r2_min"]),
            "s_tag_final": float(model.s_tag.detach()), "mechanism": found, **hist,
            "cpu_seconds": time.process_time() - t0}


def _worker(fn, cfg):
    with one_thread():                 # one core per process
        return fn(cfg)


def run_many(fn, cfgs: list[dict], workers: int = 2, desc: str = "runs") -> list[dict]:
    """fn(cfg) for every cfg, in `workers` spawned processes (order kept). Every run is seeded by
    its cfg alone and uses one thread, so results do not depend on `workers`."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial
    from multiprocessing import get_context

    from tqdm import tqdm   # text bars: they go to the log, never into the HTML

    if workers <= 1:
        return [_worker(fn, c) for c in tqdm(cfgs, desc=desc)]
    # spawn, not fork: forking a process whose torch thread pool has run can hang
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
        return list(tqdm(ex.map(partial(_worker, fn), cfgs), total=len(cfgs), desc=desc))


def fisher_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact test: are k1/n1 and k2/n2 successes compatible?"""
    from scipy.stats import fisher_exact

    return float(fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue)


def pick(results: list[dict], order=(10.0, 6.0, 1.0)) -> tuple[dict, bool]:
    """The run to show: the first successful run, trying the s_tag inits in `order`; if none
    succeeded, the run with the highest R^2. Returns (run, succeeded)."""
    for s in order:
        for r in results:
            if r["cfg"]["s_tag_init"] == s and r["success"]:
                return r, True
    ok = [r for r in results if r["r2"] == r["r2"]]     # drop NaN (diverged) runs
    return max(ok or results, key=lambda r: r["r2"] if r["r2"] == r["r2"] else -1e9), False


def emergence_epochs(hist: dict, var_y: float, r2_min: float = 0.9) -> list[int]:
    """Epochs to show: start, halfway to success, the first epoch with held-out R^2 > r2_min,
    the end (without a success: start, one third, two thirds, end)."""
    n = len(hist["test_loss"])
    r2s = [1 - l / var_y for l in hist["test_loss"]]
    done = next((e + 1 for e, v in enumerate(r2s) if v > r2_min), None)
    if done is None:
        return sorted({0, n // 3, 2 * n // 3, n})
    return sorted({0, max(1, done // 2), done, n})


# --- figures -----------------------------------------------------------------------------------

def sweep_construction(s_tags, task: Task) -> list[dict]:
    """Max and mean absolute error of the construction for each s_tag."""
    rows = []
    with torch.no_grad():
        for s in s_tags:
            err = (construction(s)(task.x, task.kind) - task.y).abs()
            rows.append({"s_tag": float(s), "max_abs_error": float(err.max()),
                         "mean_abs_error": float(err.mean())})
    return rows


def snapshot_model(state: dict, **arch) -> AttentionOnly:
    """A model from a saved state (arch: AttentionOnly's shape arguments; default ToyModel)."""
    m = AttentionOnly(**arch) if arch else ToyModel()
    m.load_state_dict(state)
    return m


def emergence_curves(hist: dict, task: Task) -> dict:
    """The mechanism's measurements after every epoch of one run."""
    rows = [mechanism(snapshot_model(s), task) for s in hist["snapshots"]]
    return {k: np.array([r[k] for r in rows], dtype=float) for k in rows[0]}


def draw_mechanism(fig, spec, model: ToyModel, ex: Task, title: str = ""):
    """Three stacked panels for one sequence: layer-1 attention (catch), the tag coordinate tau
    of every token (tag), the last token's layer-2 attention (release)."""
    p, T = int(ex.sep[0]), ex.x.shape[1]
    with torch.no_grad():
        _, tr = model(ex.x, ex.kind, trace=True)
    after, before = torch.arange(T) > p, torch.arange(T) < p
    theta = tag_direction(tr["o1"][0], after, before)
    tau = (tr["o1"][0] @ (theta / theta.norm().clamp_min(1e-12))).numpy()
    colors = np.where(after.numpy(), "#C44E52", "#4C72B0").astype(object)
    colors[p] = "#222222"
    gs = spec.subgridspec(3, 1, height_ratios=[1.5, 1, 1], hspace=0.55)
    a1 = fig.add_subplot(gs[0])
    a1.imshow(tr["A1"][0, 0].numpy(), cmap="magma", vmin=0, vmax=1)
    a1.set_title(f"{title}\nlayer 1: attention" if title else "layer 1: attention", fontsize=10)
    a1.set_xticks([p], ["[SEP]"], fontsize=9)
    a1.set_yticks([p], ["[SEP]"], fontsize=9)
    a2 = fig.add_subplot(gs[1])
    a2.bar(np.arange(T), tau, color=colors)
    a2.axhline(0, color="k", lw=0.5)
    a2.set_title("tag tau per token", fontsize=10)
    a2.set_xticks([])
    a3 = fig.add_subplot(gs[2])
    a3.bar(np.arange(T), tr["A2"][0, 0, -1].numpy(), color=colors)
    a3.axhline(1 / (T - 1 - p), color="k", lw=0.8, ls="--")
    a3.set_ylim(0, 1)
    a3.set_title("layer 2: last token", fontsize=10)
    a3.set_xticks([p], ["[SEP]"], fontsize=9)
    return a1, a2, a3


LEGEND = ("blue: numbers before [SEP]; red: numbers after [SEP]; black: [SEP]; dashed: uniform "
          "weight over the numbers after [SEP]")


def example(task: Task) -> int:
    """A sequence to draw: the first with [SEP] between a quarter and half of the way in."""
    T = task.x.shape[1]
    ok = (task.sep >= T // 4) & (task.sep <= T // 2)
    return int(ok.float().argmax())


def figure_construction(s_tags, errors: list[dict], task: Task, s_shown=(2.0, 20.0)):
    """Left: the construction's error against s_tag. Right: its mechanism at two s_tag."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 5.6))
    gs = fig.add_gridspec(1, 1 + len(s_shown), width_ratios=[1.6] + [1] * len(s_shown),
                          wspace=0.35)
    ax = fig.add_subplot(gs[0])
    ax.semilogy(s_tags, [r["max_abs_error"] for r in errors], "o-", label="max |error|")
    ax.semilogy(s_tags, [r["mean_abs_error"] for r in errors], "s-", label="mean |error|")
    ax.axhline(1e-3, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="s_tag", ylabel="|y_hat - y| on held-out sequences",
           title="construction: error vs s_tag")
    ax.legend(fontsize=9)
    for i, s in enumerate(s_shown):
        i0 = example(task)
        draw_mechanism(fig, gs[1 + i], construction(s), task[i0:i0 + 1], f"s_tag = {s:g}")
    fig.text(0.5, -0.02, LEGEND, ha="center", fontsize=9)
    return fig


def figure_emergence(hist: dict, task: Task, epochs_shown):
    """Top: losses and the three measurements per epoch. Below, one column per shown epoch."""
    import matplotlib.pyplot as plt

    curves = emergence_curves(hist, task)
    fig = plt.figure(figsize=(10, 10))
    gs = fig.add_gridspec(2, len(epochs_shown), height_ratios=[1, 2.6], hspace=0.3, wspace=0.35)
    top = gs[0, :].subgridspec(1, 2, wspace=0.25)
    ax = fig.add_subplot(top[0])
    ep = np.arange(1, len(hist["loss"]) + 1)
    ax.semilogy(ep, hist["loss"], label="train")
    ax.semilogy(ep, hist["test_loss"], label="held-out")
    ax.set(xlabel="epoch", ylabel="MSE", title="loss")
    ax.legend(fontsize=9)
    ax2 = fig.add_subplot(top[1])
    e0 = np.arange(len(curves["alpha_sep"]))
    ax2.plot(e0, curves["alpha_sep"], label="catch: alpha of [SEP]")
    ax2.plot(e0, curves["tag_separated"], label="tag: share separated")
    ax2.plot(e0, 1 - curves["tv_layer2"], label="release: 1 - TV")
    ax2.set(xlabel="epoch", ylim=(-0.05, 1.05), title="mechanism (held-out)")
    ax2.legend(fontsize=8, loc="lower right")
    for e in epochs_shown:
        for a in (ax, ax2):
            a.axvline(e, color="grey", lw=0.6, ls=":")
    i0 = example(task)
    for c, e in enumerate(epochs_shown):
        draw_mechanism(fig, gs[1, c], snapshot_model(hist["snapshots"][e]), task[i0:i0 + 1],
                       f"epoch {e}")
    fig.text(0.5, 0.06, LEGEND, ha="center", fontsize=9)
    return fig


def figure_r2(groups: dict, r2_min: float = 0.9, flag: str = "mechanism", reference=None):
    """Held-out 1 - R^2 (= MSE / variance of y; log scale, lower is better) of every run, one
    column per group (a DataFrame with columns R2 and `flag`); filled markers: runs whose `flag`
    is true. reference: {label: 1 - R^2} drawn as dotted lines (e.g. a construction)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 + 1.7 * len(groups), 3.8))
    rng = np.random.default_rng(0)                      # horizontal jitter only
    for i, (name, g) in enumerate(groups.items()):
        y = np.clip(np.nan_to_num(1 - g["R2"].to_numpy(float), nan=10.0), 1e-9, 10.0)
        x = i + rng.uniform(-0.15, 0.15, len(y))
        on = g[flag].to_numpy(bool)
        ax.scatter(x[on], y[on], color="#C44E52", s=36, label=flag if i == 0 else None)
        ax.scatter(x[~on], y[~on], facecolor="none", edgecolor="#4C72B0", s=36,
                   label=f"no {flag}" if i == 0 else None)
    ax.set_yscale("log")
    ax.axhline(1 - r2_min, color="k", lw=0.8, ls="--")
    ax.text(-0.45, 1 - r2_min, f"success: R² > {r2_min}", va="bottom", ha="left", fontsize=8)
    for label, v in (reference or {}).items():
        ax.axhline(v, color="grey", lw=0.8, ls=":")
        ax.text(-0.45, v, label, va="bottom", ha="left", fontsize=8, color="grey")
    ax.set_xticks(range(len(groups)), list(groups), fontsize=10)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylabel("held-out 1 − R²  (lower is better)")
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
