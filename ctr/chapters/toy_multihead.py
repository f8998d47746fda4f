r"""The multi-head toy (the paper's rebuttal experiment; SPEC 3.7).

Task. T tokens: numbers x_i ~ N(0, 1), [SEP] at p1 and [SEP2] at p2 with 1 <= p1, p1 + 2 <= p2
<= T - 2 (at least one number before [SEP], between the separators and after [SEP2]; the pair is
uniform over the allowed pairs). Target at the last position:
    y = mean{x_i : i > p1} + mean{x_i : p1 < i < p2}.
Model. ctr.toy.AttentionOnly with a residual stream one wider than the first toy (d = 5), H heads
of size 3 per layer, an output projection W_O per layer, [SEP] and [SEP2] embedded as
s_tag * e_SEP and s_tag * e_SEP2 (learned), numbers as (x, 1, 0, 0, 0).

Construction (coordinates VAL, ONE, A, B, OUT; e_SEP = (0,-1,1,0,0), e_SEP2 = (0,-1,0,1,0)):
    layer 1, head 0: q = ONE, k = A,        v = A     -> A    every number after [SEP] is tagged A
    layer 1, head 1: q = ONE, k = A + 2B,   v = A - B -> B    between: +s_tag (sink [SEP]),
                                                              after [SEP2]: -s_tag (sink [SEP2])
    layer 2, head 0: q = ONE, k = A + 2 ONE, v = VAL  -> OUT  mean of the numbers after [SEP]
    layer 2, head 1: q = ONE, k = B + 2 ONE, v = VAL  -> OUT  mean of the numbers in between
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import definitions as defs
from . import toy_theory as toy
from .toy_theory import NUM, SEP, SEP2, Task, derive

VAL, ONE, A, B, OUT = 0, 1, 2, 3, 4
D, D_HEAD = toy.D + 1, 3
ROLES_L1 = ("sink at [SEP]", "sinks at [SEP] and [SEP2]")
ROLES_L2 = ("averages after [SEP]", "averages between")


def make_task(n: int, T: int = 16, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, generator=g)
    pairs = torch.tensor([(a, b) for a in range(1, T - 3) for b in range(a + 2, T - 1)])
    p1, p2 = pairs[torch.randint(len(pairs), (n,), generator=g)].T
    pos = torch.arange(T)
    kind = (pos == p1[:, None]).long() * SEP + (pos == p2[:, None]).long() * SEP2
    x = x.masked_fill(kind != NUM, 0.0)
    after = pos > p1[:, None]
    between = after & (pos < p2[:, None])
    y = (x * after).sum(1) / (after & (kind == NUM)).sum(1) + (x * between).sum(1) / between.sum(1)
    return Task(x, kind, y)


def model(heads: int = 2, s_tag: float = 10.0, seed: int = 0) -> toy.AttentionOnly:
    return toy.AttentionOnly(D, heads, D_HEAD, n_sep=2, out_proj=True, s_tag=s_tag, seed=seed)


def construction(s_tag: float = 20.0) -> toy.AttentionOnly:
    """The hand-set two-head solution (module docstring)."""
    m = model(2, s_tag)
    e = torch.eye(D)
    # W[layer, head, Q/K/V] is (D_HEAD, D); each head uses only its first row (a 1-D key space)
    W, W_O = torch.zeros(2, 2, 3, D_HEAD, D), torch.zeros(2, D, 2 * D_HEAD)
    W[0, 0, :, 0] = torch.stack([e[ONE], e[A], e[A]])
    W[0, 1, :, 0] = torch.stack([e[ONE], e[A] + 2 * e[B], e[A] - e[B]])
    W[1, 0, :, 0] = torch.stack([e[ONE], e[A] + 2 * e[ONE], e[VAL]])
    W[1, 1, :, 0] = torch.stack([e[ONE], e[B] + 2 * e[ONE], e[VAL]])
    W_O[0, A, 0] = W_O[0, B, D_HEAD] = 1.0              # W_O columns: head h at h * D_HEAD
    W_O[1, OUT, 0] = W_O[1, OUT, D_HEAD] = 1.0
    with torch.no_grad():
        m.e_SEP.copy_(torch.tensor([[0.0, -1.0, 1.0, 0.0, 0.0], [0.0, -1.0, 0.0, 1.0, 0.0]]))
        m.W.copy_(W)
        m.W_O.copy_(W_O)
        m.w_out.copy_(e[OUT])
    return m


def segments(task: Task) -> dict:
    """Boolean (N, T) masks of the numbers before [SEP], between the separators, after [SEP2]."""
    T = task.x.shape[1]
    pos = torch.arange(T)
    p1 = (task.kind == SEP).float().argmax(1)[:, None]
    p2 = (task.kind == SEP2).float().argmax(1)[:, None]
    return {"p1": p1[:, 0], "p2": p2[:, 0], "before": pos < p1,
            "between": (pos > p1) & (pos < p2), "after2": pos > p2}


@torch.no_grad()
def roles(m: toy.AttentionOnly, task: Task, eps: float = defs.EPS, tv_max: float = 0.2) -> dict:
    """Each head's role, from its attention on `task`.

    Layer 1 (catch): c_between = mean attention of the numbers between the separators on [SEP];
    c_after and c_after2 = mean attention of the numbers after [SEP2] on [SEP] and on [SEP2].
      "sink at [SEP]":              c_between > eps, c_after > eps, c_after2 <= eps
      "sinks at [SEP] and [SEP2]":  c_between > eps, c_after2 > eps
      "sink at [SEP2]":             c_after2 > eps, c_between <= eps
    Layer 2 (release): the last token's attention against uniform over the numbers after [SEP]
    and over the numbers in between (mean total-variation distance); a head "averages" over the
    closer one if that distance is < tv_max.
    """
    _, tr = m(task.x, task.kind, trace=True)
    s = segments(task)
    N = len(task)
    ar = torch.arange(N)
    post = s["between"] | s["after2"]
    out = {"layer1": [], "layer2": []}

    def seg_mean(att, mask):                            # att (N, T): mean over masked queries
        return float((att * mask).sum() / mask.sum())

    for h in range(m.heads):
        A1 = tr["A1"][:, h]
        c_b = seg_mean(A1[ar, :, s["p1"]], s["between"])
        c_a = seg_mean(A1[ar, :, s["p1"]], s["after2"])
        c_a2 = seg_mean(A1[ar, :, s["p2"]], s["after2"])
        if c_b > eps and c_a2 > eps:
            role = ROLES_L1[1]
        elif c_b > eps and c_a > eps:
            role = ROLES_L1[0]
        elif c_a2 > eps and c_b <= eps:
            role = "sink at [SEP2]"
        else:
            role = "no separator sink"
        out["layer1"].append({"head": h, "c_between_SEP": c_b, "c_after_SEP": c_a,
                              "c_after_SEP2": c_a2, "role": role})
        row = tr["A2"][:, h, -1]
        tv_a = float(toy.tv_uniform(row, post).mean())
        tv_b = float(toy.tv_uniform(row, s["between"]).mean())
        role = ("other" if min(tv_a, tv_b) >= tv_max
                else ROLES_L2[0] if tv_a <= tv_b else ROLES_L2[1])
        out["layer2"].append({"head": h, "tv_after_SEP": tv_a, "tv_between": tv_b, "role": role})
    out["paper_roles"] = (sorted(r["role"] for r in out["layer1"]) == sorted(ROLES_L1)
                          and sorted(r["role"] for r in out["layer2"]) == sorted(ROLES_L2))
    return out


def configs(seed=0, n_seeds=15, heads=(2, 1), s_tag_init=10.0, **train) -> list[dict]:
    """One cfg per (heads, run); train as in ctr.toy.configs."""
    return [dict(seed=seed, run=r, heads=int(h), s_tag_init=float(s_tag_init), **train)
            for h in heads for r in range(n_seeds)]


def run(cfg: dict) -> dict:
    """One training run (cfg from configs). Data depend on the seed only."""
    t0 = time.process_time()
    data = make_task(cfg["n_sequences"], cfg["T"], derive(cfg["seed"], "mh-train"))
    test = make_task(cfg["n_test"], cfg["T"], derive(cfg["seed"], "mh-test"))
    m = model(cfg["heads"], cfg["s_tag_init"], derive(cfg["seed"], "mh-model", cfg["heads"],
                                                      cfg["run"]))
    order = derive(cfg["seed"], "mh-order", cfg["heads"], cfg["run"])
    hist = toy.train(m, data, test[:512], cfg["epochs"], cfg["lr"], cfg["weight_decay"],
                     cfg["batch_size"], seed=order)
    with torch.no_grad():
        score = toy.r2(m(test.x, test.kind), test.y)
    found = roles(m, test, cfg.get("eps", defs.EPS), cfg.get("tv_max", 0.2))
    return {"cfg": cfg, "arch": m.arch, "r2": score, "success": bool(score > cfg["r2_min"]),
            "roles": found, "loss": hist["loss"], "test_loss": hist["test_loss"],
            "state": hist["snapshots"][-1], "cpu_seconds": time.process_time() - t0}


def figure_heads(m: toy.AttentionOnly, task: Task, example: int = 0, role: dict | None = None):
    """Layer-1 attention maps and layer-2 last-token attention, per head, on one sequence."""
    import matplotlib.pyplot as plt

    ex = task[example:example + 1]
    with torch.no_grad():
        _, tr = m(ex.x, ex.kind, trace=True)
    s = segments(ex)
    p1, p2, T = int(s["p1"][0]), int(s["p2"][0]), ex.x.shape[1]
    colors = np.array(["#8C8C8C"] * T, dtype=object)
    colors[s["between"][0].numpy()] = "#DD8452"
    colors[s["after2"][0].numpy()] = "#C44E52"
    colors[[p1, p2]] = "#222222"
    fig, axes = plt.subplots(2, m.heads, figsize=(4.6 * m.heads, 8.2), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.4], "hspace": 0.4})
    for h in range(m.heads):
        ax = axes[0, h]
        ax.imshow(tr["A1"][0, h].numpy(), cmap="magma", vmin=0, vmax=1)
        ax.set_xticks([p1, p2], ["[SEP]", "[SEP2]"], fontsize=8)
        ax.set_yticks([p1, p2], ["[SEP]", "[SEP2]"], fontsize=8)
        title = f"layer 1, head {h}"
        if role:
            title += f"\n{role['layer1'][h]['role']}"
        ax.set_title(title, fontsize=10)
        ax = axes[1, h]
        ax.bar(np.arange(T), tr["A2"][0, h, -1].numpy(), color=colors)
        ax.set_xticks([p1, p2], ["[SEP]", "[SEP2]"], fontsize=8)
        ax.set_ylim(0, 1)
        title = f"layer 2, head {h}: last token"
        if role:
            title += f"\n{role['layer2'][h]['role']}"
        ax.set_title(title, fontsize=10)
    fig.text(0.5, 0.01, "layer 2 bars: grey before [SEP], orange between the separators, red after "
             "[SEP2], black separators", ha="center", fontsize=8)
    return fig


def run_all(cfgs: list[dict], workers: int = 2) -> list[dict]:
    return toy.run_many(run, cfgs, workers, desc="multi-head runs")


def pick(runs: list[dict]) -> tuple[dict, str]:
    """The two-head run to show, by rule: the first successful one with the paper's roles, else
    the first successful one, else the best. Returns (run, how it was chosen)."""
    two = [r for r in runs if r["cfg"]["heads"] == 2]
    for r in two:
        if r["success"] and r["roles"]["paper_roles"]:
            return r, "the first successful two-head run with the paper's roles"
    for r in two:
        if r["success"]:
            return r, "no successful run has the paper's roles: the first successful run"
    best = max(two, key=lambda r: r["r2"] if r["r2"] == r["r2"] else -1e9)
    return best, "**no two-head run succeeded**: the run with the highest R²"


def example(task: Task) -> int:
    """A sequence to draw: the first with at least three numbers in each of the three segments."""
    s = segments(task)
    ok = (s["before"].sum(1) >= 3) & (s["between"].sum(1) >= 3) & (s["after2"].sum(1) >= 3)
    return int(ok.float().argmax())
