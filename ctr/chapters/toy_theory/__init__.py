r"""The minimal problem of paper Sec. 7 (Theorem 7.1, Fig. 7): catch, tag, release in two
attention layers, in two parametrisations: constructions, training and the mechanism detector.
The verdict rules are in ``toy_theory.verdicts``, the figures in ``toy_theory.figures``.

Task (toy_model.make_task): numbers x_i ~ N(0, 1) and one [SEP] at p; y = mean{x_i : i > p}.

Variants of toy_model.Toys (two layers, one head each, no 1/sqrt(d), residual connections):
- ``width2``, the paper's as its OpenReview page describes it: residual width 2 (VAL, ONE), a
  number x enters as (x, 1), [SEP] as s_tag * (0, 1): a fixed direction, the axis of the
  numbers' constant, so s_tag competes with that constant 1. At s_tag = 1, [SEP] IS the number 0.
- ``width4``, the book's earlier model: width 4 (VAL, ONE, A, OUT), number (x, 1, 0, 0), [SEP]
  s_tag * e_SEP with e_SEP learned (unit norm at initialisation).

Constructions (the chapter argues both; the first is our width-2 Theorem 7.1):
  width2: layer 1 score ONE_i ONE_j, value -ONE_j -> ONE;  layer 2 score ONE_i ONE_j,
          value VAL_j - ONE_j -> ONE;  w_out = e_ONE.
  width4: e_SEP = (0, -1, 1, 0); layer 1 q = ONE, k = A, v = A -> A; layer 2 q = ONE,
          k = A + 2 ONE, v = VAL -> OUT; w_out = e_OUT.

Training configurations (``SETTINGS``): the paper's recipe with our batch size, weight scale and
sequence length (``default``), and the choices the paper leaves open, one at a time.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ... import definitions as defs
from ..toy_model import Task, Toys, cpu_seconds, derive, from_state, make_task, r2, train

VARIANTS = {
    "width2": {"label": "width 2, fixed [SEP] direction", "arch": {"d": 2,
                                                                   "sep_dirs": [[0.0, 1.0]]}},
    "width4": {"label": "width 4, learned [SEP] direction", "arch": {"d": 4}},
}
VAL, ONE, A, OUT = 0, 1, 2, 3
C_NUMBERS = 1.0       # the numbers' constant second coordinate (the [SEP] axis in width 2)

# The choices the paper leaves open, one at a time around the default (RULES.md, unstated).
DEFAULT = {"batch_size": 512, "scale": 1.0, "T": 16}
SETTINGS = {
    "default": {},
    "batch 32": {"batch_size": 32}, "batch 128": {"batch_size": 128},
    "weight scale 0.1": {"scale": 0.1}, "weight scale 0.5": {"scale": 0.5},
    "length 8": {"T": 8}, "length 32": {"T": 32},
}


def check_variants(variants) -> list[str]:
    """The variant names, or one clear error naming the known ones."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"unknown toy variant(s) {bad or variants!r}; use some of "
                         f"{', '.join(VARIANTS)}")
    return list(variants)


def setting(name: str) -> dict:
    """The batch size, weight scale and sequence length of a named setting."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; use one of {', '.join(SETTINGS)}")
    return {**DEFAULT, **SETTINGS[name]}


def construction(variant: str, s_tag: float = 20.0, dtype=torch.float32) -> Toys:
    """The hand-set solution of `variant` (module docstring), as a model with one run."""
    m = Toys([0], s_tag, **VARIANTS[check_variants([variant])[0]]["arch"])
    e = torch.eye(m.d)
    W = torch.zeros(2, 1, 3, m.d, m.d)               # (layer, head, Q/K/V, row, column)
    if variant == "width2":
        for l in range(2):
            W[l, 0, 0, 0] = W[l, 0, 1, 0] = e[ONE]    # score ONE_i ONE_j (a 1-D key space)
        W[0, 0, 2, ONE] = -e[ONE]                     # tag:  ONE_i -= weighted ONE_j
        W[1, 0, 2, ONE] = e[VAL] - e[ONE]             # release: ONE_T += weighted (VAL - ONE)
        w_out = e[ONE]
    else:
        W[0, 0, 0, 0], W[0, 0, 1, 0], W[0, 0, 2, A] = e[ONE], e[A], e[A]
        W[1, 0, 0, 0], W[1, 0, 1, 0], W[1, 0, 2, OUT] = e[ONE], e[A] + 2 * e[ONE], e[VAL]
        w_out = e[OUT]
        with torch.no_grad():
            m.e_SEP.copy_(torch.tensor([[[0.0, -1.0, 1.0, 0.0]]]))
    with torch.no_grad():
        m.W.copy_(W[None])
        m.w_out.copy_(w_out[None])
    return m.to(dtype)


def target(task: Task, dtype=torch.float64) -> torch.Tensor:
    """y of the task recomputed in `dtype` (the stored y is float32)."""
    after = torch.arange(task.x.shape[1]) > task.sep[:, None]
    return (task.x.to(dtype) * after).sum(1) / after.sum(1)


@torch.no_grad()
def sweep_construction(build, s_grid, task: Task, target=target, dtype=torch.float64) -> list:
    """Max and mean |y_hat - y| of build(s_tag, dtype) at each s_tag. In float64 by default: in
    float32 the width-2 construction's last step, ONE_T - sum_j w_j ONE_j with both terms near
    -s_tag, leaves a rounding floor of about 1e-6."""
    rows, y = [], target(task, dtype)
    for s in s_grid:
        err = (build(s, dtype)(task.x, task.kind) - y).abs()
        rows.append({"s_tag": float(s), "max_abs_error": float(err.max()),
                     "mean_abs_error": float(err.mean())})
    return rows


def construction_ok(s_grid, max_errors, s_from: float = 3.0, tol: float = 1e-4) -> bool:
    """Theorem 7.1's check: the largest error is below `tol` at the largest s_tag and never
    increases from s_from on (where the proof's bound starts to fall). No verdict row: RULES.md
    judges the training claims; this is the numerical check of the chapter's proof."""
    tail = [e for s, e in zip(s_grid, max_errors) if s >= s_from]
    return bool(tail) and tail[-1] < tol and all(b <= a for a, b in zip(tail, tail[1:]))


# --- mechanism detection ---------------------------------------------------------------------

def tv_uniform(row, support):
    """Total-variation distance between attention rows (..., T) and uniform over `support`."""
    u = support.to(row.dtype) / support.sum(-1, keepdim=True)
    return 0.5 * (row - u).abs().sum(-1)


@torch.no_grad()
def mechanism(model: Toys, task: Task, eps: float = defs.EPS, tv_max: float = 0.2) -> list[dict]:
    """Catch, tag, release of every run of `model`, measured on `task`, with pass/fail flags.

    catch:   alpha of [SEP] in layer 1 (the paper's sink score), mean over sequences, > eps
    tag:     tau_i = o1_i . theta, theta the mass-mean direction (the paper's probe) of the
             layer-1 outputs: numbers after [SEP] minus numbers before; share of sequences in
             which every number after [SEP] has a larger tau than every number before, >= 0.9
    release: the last token's layer-2 attention vs uniform over the numbers after [SEP]: mean
             total-variation distance < tv_max
    """
    _, tr = model(task.x, task.kind, trace=True)
    N, T = task.x.shape
    pos, p = torch.arange(T), task.sep
    after, before = pos > p[:, None], pos < p[:, None]                     # (N, T)
    alpha_sep = defs.alpha(tr["A1"][:, 0])[:, torch.arange(N), p]          # (R, N)
    o1 = tr["o1_heads"].sum(1)                                             # (R, N, T, D)
    theta = o1[:, after].mean(1) - o1[:, before].mean(1)                   # (R, D)
    unit = theta / theta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    tau = torch.einsum("rntd,rd->rnt", o1, unit)                           # (R, N, T)
    separated = (tau.masked_fill(~after, float("inf")).amin(-1)
                 > tau.masked_fill(~before, float("-inf")).amax(-1))       # (R, N)
    tv = tv_uniform(tr["A2"][:, 0, :, -1], after)                          # (R, N)
    out = []
    for r in range(model.runs):
        f = {"alpha_sep": float(alpha_sep[r].mean()),
             "tag_separated": float(separated[r].float().mean()), "tv_layer2": float(tv[r].mean())}
        f.update(catch=f["alpha_sep"] > eps, tag=f["tag_separated"] >= 0.9,
                 release=f["tv_layer2"] < tv_max)
        f["mechanism"] = f["catch"] and f["tag"] and f["release"]
        out.append(f)
    return out


def solution(sep_norm: float, c: float = C_NUMBERS) -> str:
    """Which solution a run found, from the final norm of [SEP] (RULES.md, emergence):
    Theorem 7.1's (larger than the numbers' constant c), "[SEP] near 0" (below c / 2), or
    "neither" in between."""
    if sep_norm != sep_norm:
        return "neither"
    return "Theorem 7.1" if sep_norm > c else "[SEP] near 0" if sep_norm < 0.5 * c else "neither"


# --- training: the runs of one configuration as one batched model -----------------------------

def slots(inits, n_seeds: int) -> list[tuple[float, int]]:
    """(initial s_tag, seed index) of every run of a configuration."""
    return [(float(s), r) for s in inits for r in range(n_seeds)]


def train_runs(cfg: dict) -> dict:
    """The runs cfg["slots"] of cfg["variant"] under cfg["setting"], trained together. Run
    (init, r) draws its initial weights and batch order from (seed, variant, init, r) alone:
    independent across inits and seeds, the same across settings (so settings are compared on
    the same draws). The data depend on the seed and the sequence length. cfg: variant,
    setting, seed, slots, n_sequences, n_test, epochs, lr, weight_decay, r2_min, eps, tv_max,
    snapshots."""
    t0 = cpu_seconds()
    seed, variant = cfg["seed"], check_variants([cfg["variant"]])[0]
    st = setting(cfg["setting"])
    data = make_task(cfg["n_sequences"], st["T"], derive(seed, "train", st["T"]))
    test = make_task(cfg["n_test"], st["T"], derive(seed, "test", st["T"]))
    sl = [(float(s), int(r)) for s, r in cfg["slots"]]
    model = Toys([derive(seed, "model", variant, s, r) for s, r in sl], [s for s, _ in sl],
                 scale=st["scale"], **VARIANTS[variant]["arch"])
    # the per-epoch held-out curve uses 512 of the held-out sequences (cheaper); R^2 uses all
    hist = train(model, data, test[:512], [derive(seed, "order", variant, s, r) for s, r in sl],
                 cfg["epochs"], cfg["lr"], cfg["weight_decay"], st["batch_size"],
                 snapshots=cfg.get("snapshots", False))
    runs = measure(model, test, sl, variant, cfg["setting"], cfg["r2_min"], cfg["eps"],
                   cfg["tv_max"], hist)
    out = {"cfg": cfg, "arch": model.arch, "runs": runs, "cpu_seconds": cpu_seconds() - t0}
    if hist["snapshots"]:
        out["snapshots"] = {k: torch.stack([s[k] for s in hist["snapshots"]])    # (E+1, R, ...)
                            for k in hist["snapshots"][0]}
    return out


@torch.no_grad()
def measure(model: Toys, test: Task, sl, variant: str, setting_name: str = "default",
            r2_min: float = 0.9, eps: float = defs.EPS, tv_max: float = 0.2,
            hist: dict | None = None) -> list[dict]:
    """One record per run of a trained (or constructed) model: held-out R^2, success (R^2 >
    r2_min), final s_tag and [SEP] norm, the solution it found, the mechanism checks, and the
    loss curves of `hist` (toy_model.train's) if given. sl: (initial s_tag, seed index) per
    run."""
    score = r2(model(test.x, test.kind), test.y)
    found = mechanism(model, test, eps, tv_max)
    s_tag = model.s_tag.detach()
    sep_norm = s_tag.abs() * model.e_SEP.detach()[:, 0].norm(dim=-1)
    return [{"variant": variant, "setting": setting_name, "s_tag_init": float(s), "run": int(r),
             "r2": float(score[i]), "success": bool(score[i] > r2_min),
             "s_tag_final": float(s_tag[i]), "sep_norm_final": float(sep_norm[i]),
             "solution": solution(float(sep_norm[i])), "mechanism": found[i],
             "loss": [e[i] for e in hist["loss"]] if hist else [],
             "test_loss": [e[i] for e in hist["test_loss"]] if hist else []}
            for i, (s, r) in enumerate(sl)]


def configs(base: dict, variants, inits, n_seeds: int, settings=(), n_sens: int = 0) -> list:
    """The training configurations of the chapter: each variant's main runs under the default
    setting (one configuration per init, so two processes share the work evenly), then every
    other setting of the width-2 model with the first n_sens seeds per init. The most
    expensive come first (the pool hands them out in order)."""
    out = [dict(base, variant=v, setting="default", slots=slots([s], n_seeds),
                snapshots=v == "width2") for v in variants for s in inits]
    out += [dict(base, variant="width2", setting=name, slots=slots(inits, n_sens))
            for name in settings if name != "default" and n_sens]
    return sorted(out, key=lambda c: -cost(c))


def cost(cfg: dict) -> float:
    """Relative training cost of a configuration (run-epochs of the attention map's size)."""
    st = setting(cfg["setting"])
    per_step = 1.0 + 0.3 * max(st["T"], 16) ** 2 / 256 * st["batch_size"] / 512
    d = VARIANTS[cfg["variant"]]["arch"]["d"]
    return len(cfg["slots"]) * per_step * 512 / st["batch_size"] * (1 + 0.1 * d)


def merge(trained: list[dict]) -> list[dict]:
    """Every run of a list of train_runs results."""
    return [r for t in trained for r in t["runs"]]


def replay(trained: dict, i: int) -> Toys:
    """Run i of a train_runs result after every epoch, as one model whose runs are epochs."""
    return from_state(trained["arch"], {k: v[:, i] for k, v in trained["snapshots"].items()})


def pick(trained: list[dict], order=(10.0, 6.0, 1.0)) -> tuple[int, int, bool]:
    """The width-2 run to show (results with snapshots): the first successful run, trying the
    s_tag inits in `order`; if none succeeded, the run with the highest R^2. Returns (which
    result, which run in it, succeeded)."""
    have = [(t, i, r) for t, res in enumerate(trained) if "snapshots" in res
            for i, r in enumerate(res["runs"])]
    for s in order:
        for t, i, r in have:
            if r["s_tag_init"] == s and r["success"]:
                return t, i, True
    best = max(have, key=lambda x: x[2]["r2"] if x[2]["r2"] == x[2]["r2"] else -math.inf)
    return best[0], best[1], False


def emergence_epochs(test_loss: list[float], var_y: float, r2_min: float = 0.9) -> list[int]:
    """Epochs to show: start, halfway to success, the first epoch with held-out R^2 > r2_min,
    the end (without a success: start, one third, two thirds, end)."""
    n = len(test_loss)
    done = next((e + 1 for e, v in enumerate(test_loss) if 1 - v / var_y > r2_min), None)
    if done is None:
        return sorted({0, n // 3, 2 * n // 3, n})
    return sorted({0, max(1, done // 2), done, n})


def emergence_curves(trained: dict, i: int, task: Task) -> dict:
    """The mechanism's measurements of run i after every epoch (one batched pass)."""
    rows = mechanism(replay(trained, i), task)
    return {k: np.array([r[k] for r in rows], dtype=float) for k in rows[0]}
