r"""The multi-head toy (the paper's rebuttal experiment): task, model, construction, the low-loss
threshold, head roles and training. The verdict rules are in ``toy_multihead.verdicts``.

Task. T tokens: numbers x_i ~ N(0, 1), [SEP] at p1 and [SEP2] at p2 with 1 <= p1, p1 + 2 <= p2
<= T - 2 (at least one number before [SEP], between the separators and after [SEP2]; the pair is
uniform over the allowed pairs). Target at the last position:
    y = m_after + m_between,  m_after = mean{x_i : i > p1, x_i a number},
                              m_between = mean{x_i : p1 < i < p2}.
Model (as the rebuttal describes it). toy_model.Toys of width d = 3, the single-head toy's
width plus one: numbers enter as (x, 1, 0); H heads of dimension 3 per layer and a learned output
projection W_O per layer; [SEP] and [SEP2] as s_tag * e_SEP, s_tag * e_SEP2 with learned
directions (unit norm at initialisation, so s_tag is their initial norm).

Construction (coordinates VAL, ONE, Z; e_SEP = (0, -2, 1), e_SEP2 = (0, -1, -1), s = s_tag):
    layer 1, head 0: q = ONE, k = Z,         v = Z - ONE -> Z    every number after [SEP] gets
                                                                 Z = 3s (sink [SEP])
    layer 1, head 1: q = ONE, k = -ONE - Z,  v = -ONE    -> ONE  between: ONE = 1 + 2s (sink
                                                                 [SEP]), after [SEP2]: 1 + s
                                                                 (sink [SEP2])
    layer 2, head 0: q = ONE, k = Z,         v = VAL     -> ONE  m_after
    layer 2, head 1: q = ONE, k = ONE,       v = VAL     -> ONE  m_between
    w_out = e_ONE - (1 + s) / (3 s) e_Z: cancels the last token's own tags (1 + s, 3s).
Without its layer-1 head, layer-2 head 0 attends to [SEP] (VAL = 0), so that ablation removes
m_after alone.
"""
from __future__ import annotations

import torch

from ... import definitions as defs
from ..toy_model import NUM, SEP, SEP2, Plateau, Task, Toys, cpu_seconds, derive, r2, train
from ..toy_theory import tv_uniform

VAL, ONE, Z = 0, 1, 2
D, D_HEAD = 3, 3
ROLES_L1 = ("sink at [SEP]", "sinks at [SEP] and [SEP2]")
ROLES_L2 = ("averages after [SEP]", "averages between")
CARRIES = ("m_after", "m_between")       # what a head carries, by the ablation test
MIN_COEF, MIN_SHARE = 0.2, 0.8           # RULES.md, roles


def make_task(n: int, T: int = 16, seed: int = 0) -> Task:
    """n sequences of T tokens (module docstring), seeded."""
    if T < 5:
        raise ValueError(f"the two-separator task needs T >= 5 tokens, got {T}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, generator=g)
    pairs = torch.tensor([(a, b) for a in range(1, T - 3) for b in range(a + 2, T - 1)])
    p1, p2 = pairs[torch.randint(len(pairs), (n,), generator=g)].T
    pos = torch.arange(T)
    kind = (pos == p1[:, None]).long() * SEP + (pos == p2[:, None]).long() * SEP2
    x = x.masked_fill(kind != NUM, 0.0)
    return Task(x, kind, sum(components(Task(x, kind, None), torch.float32)))


def components(task: Task, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(m_after, m_between), each (N,): the two parts of the target, computed in `dtype`."""
    s = segments(task)
    x = task.x.to(dtype)
    after = s["between"] | s["after2"]
    return ((x * after).sum(1) / after.sum(1), (x * s["between"]).sum(1) / s["between"].sum(1))


def target(task: Task, dtype=torch.float64) -> torch.Tensor:
    """y recomputed in `dtype`."""
    return sum(components(task, dtype))


def segments(task: Task) -> dict:
    """Boolean (N, T) masks of the numbers before [SEP], between the separators, after [SEP2]."""
    T = task.x.shape[1]
    pos = torch.arange(T)
    p1 = (task.kind == SEP).float().argmax(1)[:, None]
    p2 = (task.kind == SEP2).float().argmax(1)[:, None]
    return {"p1": p1[:, 0], "p2": p2[:, 0], "before": pos < p1,
            "between": (pos > p1) & (pos < p2), "after2": pos > p2}


def model(heads: int = 2, s_tag: float = 10.0, seeds=(0,), scale: float = 1.0) -> Toys:
    """The rebuttal's model with `heads` heads per layer, one run per seed."""
    if int(heads) != heads or heads < 1:
        raise ValueError(f"heads per layer must be a positive integer, got {heads!r}")
    return Toys(list(seeds), s_tag, d=D, heads=int(heads), d_head=D_HEAD, n_sep=2,
                out_proj=True, scale=scale)


def construction(s_tag: float = 20.0, dtype=torch.float32) -> Toys:
    """The hand-set two-head solution (module docstring), as a model with one run."""
    m = model(2, s_tag).to(dtype)
    e, s = torch.eye(D, dtype=dtype), torch.tensor(float(s_tag), dtype=dtype)
    # W[layer, head, Q/K/V] is (D_HEAD, D); each head uses only its first row (a 1-D key space)
    W, W_O = torch.zeros(2, 2, 3, D_HEAD, D, dtype=dtype), torch.zeros(2, D, 2 * D_HEAD,
                                                                        dtype=dtype)
    W[0, 0, :, 0] = torch.stack([e[ONE], e[Z], e[Z] - e[ONE]])
    W[0, 1, :, 0] = torch.stack([e[ONE], -e[ONE] - e[Z], -e[ONE]])
    W[1, 0, :, 0] = torch.stack([e[ONE], e[Z], e[VAL]])
    W[1, 1, :, 0] = torch.stack([e[ONE], e[ONE], e[VAL]])
    W_O[0, Z, 0] = W_O[0, ONE, D_HEAD] = 1.0            # W_O columns: head h at h * D_HEAD
    W_O[1, ONE, 0] = W_O[1, ONE, D_HEAD] = 1.0
    with torch.no_grad():
        m.e_SEP.copy_(torch.tensor([[[0.0, -2.0, 1.0], [0.0, -1.0, -1.0]]], dtype=dtype))
        m.W.copy_(W[None])
        m.W_O.copy_(W_O[None])
        m.w_out.copy_((e[ONE] - (1 + s) / (3 * s) * e[Z])[None])
    return m


# --- the low-loss threshold (RULES.md, multi-head toy) ---------------------------------------

def r2_fit(y: torch.Tensor, x: torch.Tensor) -> float:
    """R^2 of the least-squares fit of y on x with an intercept (= squared correlation)."""
    y, x = y.double() - y.double().mean(), x.double() - x.double().mean()
    sxy, sxx, syy = float((x * y).sum()), float((x * x).sum()), float((y * y).sum())
    return sxy * sxy / (sxx * syy) if sxx > 0 and syy > 0 else 0.0


def r2_short(task: Task) -> dict:
    """R^2_short: the best held-out R^2 of a predictor using one target component only, the
    least-squares fit of y on m_after alone and on m_between alone, the larger; on `task` (the
    held-out sequences)."""
    m_a, m_b = components(task)
    y = target(task)
    fits = {"m_after": r2_fit(y, m_a), "m_between": r2_fit(y, m_b)}
    best = max(fits, key=fits.get)
    return {"r2_short": fits[best], "component": best, "fits": fits}


def low_loss_threshold(r2s: float) -> float:
    """Held-out R^2 above which a run is at low loss: ten times less unexplained variance than
    the best one-component shortcut, 1 - (1 - R^2_short) / 10."""
    return 1 - (1 - r2s) / 10


# --- head roles ----------------------------------------------------------------------------------

@torch.no_grad()
def roles(m: Toys, task: Task, eps: float = defs.EPS, tv_max: float = 0.2) -> list[dict]:
    """Each head's role in every run, from its attention on `task` (the chapter states the
    rule): layer 1 by where the numbers of each segment put their attention (sinks), layer 2
    by the last token's distance from uniform over each segment."""
    _, tr = m(task.x, task.kind, trace=True)
    s = segments(task)
    post = s["between"] | s["after2"]

    def on(att, p):                              # att (R, N, T, T) -> (R, N, T): column p[n]
        return att.gather(3, p[None, :, None, None].expand(*att.shape[:3], 1))[..., 0]

    def seg_mean(att, mask):                     # att (R, N, T): mean over masked queries
        return ((att * mask).sum((1, 2)) / mask.sum()).tolist()

    out = [{"layer1": [], "layer2": []} for _ in range(m.runs)]
    for h in range(m.heads):
        A1 = tr["A1"][:, h]                                                # (R, N, T, T)
        cols = [seg_mean(on(A1, s["p1"]), s["between"]), seg_mean(on(A1, s["p1"]), s["after2"]),
                seg_mean(on(A1, s["p2"]), s["after2"])]
        row = tr["A2"][:, h, :, -1]                                        # (R, N, T)
        tvs = [tv_uniform(row, post).mean(1).tolist(),
               tv_uniform(row, s["between"]).mean(1).tolist()]
        for r in range(m.runs):
            c_b, c_a, c_a2 = (c[r] for c in cols)
            role = (ROLES_L1[1] if c_b > eps and c_a2 > eps else
                    ROLES_L1[0] if c_b > eps and c_a > eps else
                    "sink at [SEP2]" if c_a2 > eps else "no separator sink")
            out[r]["layer1"].append({"head": h, "c_between_SEP": c_b, "c_after_SEP": c_a,
                                     "c_after_SEP2": c_a2, "role": role})
            tv_a, tv_b = tvs[0][r], tvs[1][r]
            role = ("other" if min(tv_a, tv_b) >= tv_max
                    else ROLES_L2[0] if tv_a <= tv_b else ROLES_L2[1])
            out[r]["layer2"].append({"head": h, "tv_after_SEP": tv_a, "tv_between": tv_b,
                                     "role": role})
    for o in out:
        o["paper_roles"] = (sorted(x["role"] for x in o["layer1"]) == sorted(ROLES_L1)
                            and sorted(x["role"] for x in o["layer2"]) == sorted(ROLES_L2))
    return out


def carries(b_after: float, b_between: float, share_after: float, share_between: float,
            min_coef: float = MIN_COEF, min_share: float = MIN_SHARE) -> str:
    """What a head carries (RULES.md, roles): the target component its ablation moves, with a
    regression coefficient >= min_coef and at least min_share of the explained change on that
    component; "both" when both coefficients reach min_coef without such a share; "neither"
    otherwise."""
    for c, b, share in ((CARRIES[0], b_after, share_after), (CARRIES[1], b_between,
                                                            share_between)):
        if b >= min_coef and share >= min_share:
            return c
    return "both" if min(b_after, b_between) >= min_coef else "neither"


@torch.no_grad()
def explain(delta: torch.Tensor, task: Task) -> list[dict]:
    """Least-squares fit of each row of delta (R, N) as b0 + b_after m_after + b_between
    m_between over the sequences of `task`, with each component's share of the explained
    change: share_c = b_c^2 Var(m_c) / sum_k b_k^2 Var(m_k) (the variance each term explains
    on its own). NaN rows (a diverged run) give NaN."""
    m_a, m_b = components(task)
    X = torch.stack([torch.ones_like(m_a), m_a, m_b], 1)                   # (N, 3)
    ok = torch.isfinite(delta).all(1)
    coef = torch.linalg.lstsq(X, delta.double().nan_to_num().T).solution.T  # (R, 3)
    var = torch.stack([m_a.var(), m_b.var()])
    out = []
    for r in range(len(delta)):
        if not ok[r]:
            out.append({"b_after": float("nan"), "b_between": float("nan"),
                        "share_after": float("nan"), "share_between": float("nan")})
            continue
        b = coef[r, 1:]
        part = b * b * var
        share = part / part.sum() if float(part.sum()) > 0 else torch.zeros(2, dtype=part.dtype)
        out.append({"b_after": float(b[0]), "b_between": float(b[1]),
                    "share_after": float(share[0]), "share_between": float(share[1])})
    return out


@torch.no_grad()
def functional_roles(m: Toys, task: Task) -> list[dict]:
    """Each head's role by function, in every run: delta = y_hat - y_hat(head zeroed), fitted by
    ``explain``; the head carries what ``carries`` reads from it. The paper's four roles, by
    function: in each layer one head carries m_after and the other m_between."""
    y = m(task.x, task.kind).double()                                      # (R, N)
    out = [{"layer1": [], "layer2": []} for _ in range(m.runs)]
    for layer in (1, 2):
        for h in range(m.heads):
            fits = explain(y - m(task.x, task.kind, ablate=(layer, h)).double(), task)
            for r, f in enumerate(fits):
                c = carries(**f) if f["b_after"] == f["b_after"] else "neither"
                out[r][f"layer{layer}"].append({"head": h, **f, "carries": c})
    for o in out:
        o["paper_roles"] = all(sorted(x["carries"] for x in o[f"layer{l}"]) == sorted(CARRIES)
                               for l in (1, 2))
    return out


@torch.no_grad()
def learned(m: Toys, task: Task) -> list[dict]:
    """What each run's prediction carries (``explain`` on y_hat itself): both components, or
    only one (a shortcut)."""
    fits = explain(m(task.x, task.kind).double(), task)
    return [{**f, "carries": carries(**f) if f["b_after"] == f["b_after"] else "neither"}
            for f in fits]


# --- training: the runs of one (head count, initial s_tag) as one batched model -------------

def train_heads(cfg: dict) -> dict:
    """cfg["n_seeds"] runs with cfg["heads"] heads per layer from s_tag = cfg["s_tag_init"],
    trained together: the first cfg["epochs"] epochs, then on while the held-out R^2 on a
    validation set improves (``toy_model.Plateau``), at most cfg["max_epochs"]. Data depend on
    the seed only; each run's weights and batch order on (seed, heads, init, run). cfg: heads,
    s_tag_init, seed, n_seeds, T, n_sequences, n_test, epochs, max_epochs, patience, min_gain,
    lr, weight_decay, batch_size, threshold (the low-loss R^2), eps, tv_max."""
    t0 = cpu_seconds()
    seed, H, s0 = cfg["seed"], cfg["heads"], float(cfg["s_tag_init"])
    data = make_task(cfg["n_sequences"], cfg["T"], derive(seed, "mh-train"))
    val = make_task(512, cfg["T"], derive(seed, "mh-val"))
    test = make_task(cfg["n_test"], cfg["T"], derive(seed, "mh-test"))
    runs = range(cfg["n_seeds"])
    m = model(H, s0, [derive(seed, "mh-model", H, s0, r) for r in runs])
    plateau = Plateau(cfg["max_epochs"], cfg["patience"], cfg["min_gain"])
    hist = train(m, data, val, [derive(seed, "mh-order", H, s0, r) for r in runs],
                 cfg["epochs"], cfg["lr"], cfg["weight_decay"], cfg["batch_size"], plateau,
                 snapshots=False)
    var_val = float(((val.y - val.y.mean()) ** 2).mean())
    curves = [[1 - v / var_val for v in (e[r] for e in hist["test_loss"]) if v == v]
              for r in runs]
    out = measure(m, test, s0, cfg["threshold"], cfg["eps"], cfg["tv_max"], curves,
                  hist["epochs"])
    return {"cfg": cfg, "arch": m.arch, "runs": out, "state": m.state_dict(),
            "cpu_seconds": cpu_seconds() - t0}


@torch.no_grad()
def measure(m: Toys, test: Task, s_tag_init: float, threshold: float, eps: float = defs.EPS,
            tv_max: float = 0.2, curves=None, epochs=None) -> list[dict]:
    """One record per run of a trained (or constructed) model: held-out R^2, low loss (R^2 >
    threshold), the roles by attention pattern and by ablation, what its prediction carries,
    and (if given) its per-epoch validation R^2 curve and epochs trained."""
    score = r2(m(test.x, test.kind), test.y)
    pattern, function, what = roles(m, test, eps, tv_max), functional_roles(m, test), learned(
        m, test)
    out = []
    for r in range(m.runs):
        curve = curves[r] if curves else []
        out.append({"heads": m.heads, "s_tag_init": float(s_tag_init), "run": r,
                    "r2": float(score[r]), "best_val_r2": max(curve) if curve else float("nan"),
                    "epochs": epochs[r] if epochs else 0,
                    "low_loss": bool(score[r] > threshold), "s_tag_final": float(m.s_tag[r]),
                    "roles": pattern[r], "function": function[r], "learned": what[r],
                    "val_r2": curve})
    return out


def pick(runs: list[dict]) -> tuple[int, str]:
    """The two-head run to show, by rule: the first low-loss run with the paper's roles by
    function, else the first low-loss run; without any, the two-head run with the highest
    R^2. Returns (index into runs, how it was chosen)."""
    two = [i for i, r in enumerate(runs) if r["heads"] == 2]
    if not two:
        raise ValueError("no two-head run to show: add 2 to `heads`")
    for i in two:
        if runs[i]["low_loss"] and runs[i]["function"]["paper_roles"]:
            return i, "the first low-loss two-head run with the paper's roles by ablation"
    for i in two:
        if runs[i]["low_loss"]:
            return i, "no low-loss run has the paper's roles by ablation: the first low-loss run"
    best = max(two, key=lambda i: runs[i]["r2"] if runs[i]["r2"] == runs[i]["r2"] else -1e9)
    return best, "**no two-head run reached low loss**: the run with the highest R²"
