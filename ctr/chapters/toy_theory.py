r"""The minimal problem of paper Sec. 7 (Theorem 7.1, Fig. 7): catch, tag, release in two
attention layers, in two parametrisations, and the chapter's verdict rules.

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
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from .. import definitions as defs
from .. import stats
from .. import verdicts as V
from .toy_model import Task, Toys, derive, from_state, make_task, r2, train

VARIANTS = {
    "width2": {"label": "width 2, fixed [SEP] direction", "arch": {"d": 2,
                                                                   "sep_dirs": [[0.0, 1.0]]}},
    "width4": {"label": "width 4, learned [SEP] direction", "arch": {"d": 4}},
}
VAL, ONE, A, OUT = 0, 1, 2, 3


def check_variants(variants) -> list[str]:
    """The variant names, or one clear error naming the known ones."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"unknown toy variant(s) {bad or variants!r}; use some of "
                         f"{', '.join(VARIANTS)}")
    return list(variants)


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
        err = (build(s, dtype)(task.x, task.kind)[0] - y).abs()
        rows.append({"s_tag": float(s), "max_abs_error": float(err.max()),
                     "mean_abs_error": float(err.mean())})
    return rows


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


# --- training: every run of one variant as one batched model ----------------------------------

def train_variant(cfg: dict) -> dict:
    """n_seeds runs per s_tag init of cfg["variant"], trained together. Run r has the same
    initial weights and batch order at every init (only s_tag's starting value differs); the
    data depend on the seed only, the same for both variants. cfg: variant, seed, n_seeds,
    s_tag_inits, T, n_sequences, n_test, epochs, lr, weight_decay, batch_size, r2_min, eps,
    tv_max."""
    t0 = time.process_time()
    seed = cfg["seed"]
    check_variants([cfg["variant"]])
    data = make_task(cfg["n_sequences"], cfg["T"], derive(seed, "train"))
    test = make_task(cfg["n_test"], cfg["T"], derive(seed, "test"))
    slots = [(float(s), r) for s in cfg["s_tag_inits"] for r in range(cfg["n_seeds"])]
    model = Toys([derive(seed, "model", r) for _, r in slots], [s for s, _ in slots],
                 **VARIANTS[cfg["variant"]]["arch"])
    # the per-epoch held-out curve uses 512 of the held-out sequences (cheaper); R^2 uses all
    hist = train(model, data, test[:512], [derive(seed, "order", r) for _, r in slots],
                 cfg["epochs"], cfg["lr"], cfg["weight_decay"], cfg["batch_size"])
    with torch.no_grad():
        score = r2(model(test.x, test.kind), test.y)
    found = mechanism(model, test, cfg["eps"], cfg["tv_max"])
    s_tag = model.s_tag.detach()
    sep_norm = s_tag * model.e_SEP.detach()[:, 0].norm(dim=-1)
    runs = [{"variant": cfg["variant"], "s_tag_init": s, "run": r, "r2": float(score[i]),
             "success": bool(score[i] > cfg["r2_min"]), "s_tag_final": float(s_tag[i]),
             "sep_norm_final": float(sep_norm[i]),
             "mechanism": found[i], "loss": [e[i] for e in hist["loss"]],
             "test_loss": [e[i] for e in hist["test_loss"]]} for i, (s, r) in enumerate(slots)]
    snaps = {k: torch.stack([s[k] for s in hist["snapshots"]]) for k in hist["snapshots"][0]}
    return {"cfg": cfg, "arch": model.arch, "runs": runs, "snapshots": snaps,   # (E+1, R, ...)
            "cpu_seconds": time.process_time() - t0}


def replay(trained: dict, i: int) -> Toys:
    """Run i of a train_variant result after every epoch, as one model whose runs are epochs."""
    return from_state(trained["arch"], {k: v[:, i] for k, v in trained["snapshots"].items()})


def pick(runs: list[dict], order=(10.0, 6.0, 1.0)) -> tuple[int, bool]:
    """The run to show: the first successful run, trying the s_tag inits in `order`; if none
    succeeded, the run with the highest R^2. Returns (index, succeeded)."""
    for s in order:
        for i, r in enumerate(runs):
            if r["s_tag_init"] == s and r["success"]:
                return i, True
    key = [r["r2"] if r["r2"] == r["r2"] else -math.inf for r in runs]    # NaN: diverged
    return int(np.argmax(key)), False


def emergence_epochs(test_loss: list[float], var_y: float, r2_min: float = 0.9) -> list[int]:
    """Epochs to show: start, halfway to success, the first epoch with held-out R^2 > r2_min,
    the end (without a success: start, one third, two thirds, end)."""
    n = len(test_loss)
    done = next((e + 1 for e, v in enumerate(test_loss) if 1 - v / var_y > r2_min), None)
    if done is None:
        return sorted({0, n // 3, 2 * n // 3, n})
    return sorted({0, max(1, done // 2), done, n})


# --- verdict rules (each tested on fabricated results for every outcome) -----------------------

RATE_MARGIN = 0.25    # success rates count as the same when they differ by at most this
RULES = {
    "construction": "reproduced when the largest error is below 1e-4 at the largest s_tag and "
                    "never increases from s_tag = 3 on (where the proof's bound starts to "
                    "fall); else not reproduced",
    "rate": "95% Newcombe interval of (ours - paper): inside [-0.25, 0.25] reproduced, "
            "entirely outside it not reproduced, else compatible (underpowered)",
    "trend": "Cochran-Armitage trend test of our counts over the init: rising with p < 0.05 "
             "reproduced, falling with p < 0.05 not reproduced, else compatible (underpowered)",
    "emergence": "95% Wilson interval of the share of successful runs passing all three "
                 "checks: above 0.5 reproduced, below 0.5 not reproduced, else compatible "
                 "(underpowered); no successful run: not testable here",
}


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """95% interval of p1 - p2 for two independent proportions (Newcombe 1998, method 10: the
    hybrid of the two Wilson score intervals)."""
    (l1, u1), (l2, u2) = stats.wilson(k1, n1), stats.wilson(k2, n2)
    p1, p2 = k1 / n1, k2 / n2
    return (p1 - p2 - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            p1 - p2 + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def rule_construction(s_grid, max_errors, s_from: float = 3.0, tol: float = 1e-4) -> str:
    tail = [e for s, e in zip(s_grid, max_errors) if s >= s_from]
    falls = all(b <= a for a, b in zip(tail, tail[1:]))
    return V.REPRODUCED if tail and tail[-1] < tol and falls else V.NOT


def rule_rate(k: int, n: int, pk: int, pn: int, margin: float = RATE_MARGIN) -> str:
    if not n or not pn:
        return V.UNTESTABLE
    return V.by_interval(*newcombe(k, n, pk, pn), -margin, margin)


def rule_trend(successes, runs, inits) -> str:
    if len(inits) < 2 or not sum(runs):
        return V.UNTESTABLE
    t = stats.cochran_armitage(successes, runs, inits)
    if t["p"] < 0.05:
        return V.REPRODUCED if t["z"] > 0 else V.NOT
    return V.COMPATIBLE


def rule_emergence(n_mechanism: int, n_success: int) -> str:
    if not n_success:
        return V.UNTESTABLE
    return V.by_interval(*stats.wilson(n_mechanism, n_success), low=0.5)


def claim_rows(variant: str, runs: list[dict], s_grid, max_errors, paper: dict) -> list[dict]:
    """The paper / ours / verdict rows of one variant. paper: results.paper()["toy"].

    The width-2 variant is the model the paper's page describes; its rows carry the claims'
    plain ids. Any other variant's rows get ids of their own ("..._width4"), so the scorecard
    lists them as separate rows instead of mixing two models into one verdict."""
    label = VARIANTS[variant]["label"]
    suffix = "" if variant == "width2" else f"_{variant}"
    rows = [V.row("construction" + suffix, label, "a construction solves the task; its error -> 0 as "
                  "s_tag grows (Theorem 7.1)", "Theorem 7.1",
                  f"max |error| {max_errors[0]:.2g} at s_tag = {s_grid[0]:g}, "
                  f"{max_errors[-1]:.1e} at {s_grid[-1]:g}", "-", RULES["construction"],
                  rule_construction(s_grid, max_errors))]
    ks, ns, inits = [], [], []
    for p in paper["success"]:
        s, pk, pn = float(p["s_tag_init"]), p["successes"], p["runs"]
        mine = [r for r in runs if r["s_tag_init"] == s]
        k, n = sum(r["success"] for r in mine), len(mine)
        if not n:
            continue
        ks, ns, inits = ks + [k], ns + [n], inits + [s]
        lo, hi = stats.wilson(k, n)
        rows.append(V.row(f"success_init_{s:g}{suffix}", label,
                          f"success rate (R^2 > 0.9) with s_tag initialised at {s:g}",
                          f"{pk}/{pn}", f"{k}/{n} (Wilson [{lo:.2f}, {hi:.2f}])",
                          V.interval(*newcombe(k, n, pk, pn), what="95% CI ours - paper"),
                          RULES["rate"], rule_rate(k, n, pk, pn)))
    pt = stats.cochran_armitage([p["successes"] for p in paper["success"]],
                                [p["runs"] for p in paper["success"]],
                                [p["s_tag_init"] for p in paper["success"]])
    t = stats.cochran_armitage(ks, ns, inits)
    rows.append(V.row("success_trend" + suffix, label, "success rises with the initial s_tag",
                      " > ".join(f"{p['successes']}/{p['runs']}" for p in paper["success"])
                      + f" (trend z = {pt['z']:.2f}, p = {pt['p']:.2f})",
                      ", ".join(f"{k}/{n}" for k, n in zip(ks, ns)),
                      f"Cochran-Armitage z = {t['z']:.2f}, p = {t['p']:.2g}", RULES["trend"],
                      rule_trend(ks, ns, inits)))
    ok = [r for r in runs if r["success"]]
    k = sum(r["mechanism"]["mechanism"] for r in ok)
    rows.append(V.row("emergence" + suffix, label, "successful runs show catch, tag, release (Fig. 7)",
                      "yes (Fig. 7)", f"{k} of {len(ok)} successful runs",
                      V.interval(*stats.wilson(k, len(ok))) if ok else "-",
                      RULES["emergence"], rule_emergence(k, len(ok))))
    return rows


def emergence_curves(trained: dict, i: int, task: Task) -> dict:
    """The mechanism's measurements of run i after every epoch (one batched pass)."""
    rows = mechanism(replay(trained, i), task)
    return {k: np.array([r[k] for r in rows], dtype=float) for k in rows[0]}
