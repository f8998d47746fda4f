r"""Semantic probes on the tag / no-tag split of every head (paper Sec. 4, Table 1).

For each prompt only the final token is kept: per (layer, head), its head output
o = z_tag + z_notag, split by the sinks found in *that prompt's own* attention
(``definitions.alpha`` with the tail guard ``min_queries``). Three mass-mean probes per head:
theta_tag on z_tag, theta_no_tag on z_notag, theta_activation on o.

Head selection (the paper's rule, made exact): on the training split only, maximise
acc(theta_tag) - acc(theta_no_tag); ties go to the higher acc(theta_tag), then to the lower
(layer, head). Where the final token attends to no sink, z_tag = 0 (the empty sum, as defined);
such heads stay eligible, and the share of prompts in which the chosen head has a sink is
reported. Features are extracted once for several guards, so "with and without the guard"
costs one set of forward passes.

Speed: the prompts of a task share their first tokens (the two-shot examples of the sentiment
template, "The city of" in the cities). That common prefix is run once; each batch continues
from a copy of its key/value cache, and the prompt's full attention matrix is put back together
(prefix rows are the same in every prompt, by causality) before the definitions are applied,
so alpha, the sinks and z_tag are those of the whole prompt. ``shared_prefix=False`` runs every
prompt in full through ``ctr.extract`` instead; the tests check both give the same features.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm   # text bars: they go to the log, never into the HTML

from .. import arch as _arch
from .. import definitions as D
from .. import extract
from ..data import Labelled
from ..models import Model

KINDS = ("tag", "no_tag", "activation")


def guard_for(eps: float = D.EPS) -> int:
    """The smallest number of queries n with 1/n <= eps: below it, one query attending fully
    to a key is enough to push the key's alpha over eps (5 for eps = 0.2)."""
    return max(1, math.ceil(1 / eps - 1e-9))


def chance_level(n: int, p: float = 0.05) -> float:
    """Smallest accuracy on n balanced test prompts that a coin reaches with probability < p."""
    tail, k = 0.0, n
    while k >= 0:
        tail += math.comb(n, k) / 2 ** n
        if tail >= p:
            return (k + 1) / n
        k -= 1
    return 0.0


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


# --- probes --------------------------------------------------------------------------------

def _acc(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).double().mean())


def head_accuracies(X: torch.Tensor, y: torch.Tensor, train: torch.Tensor
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Mass-mean probe per head: X (N, L, H, D). Returns train and test accuracy, (L, H) each."""
    _, L, H, _ = X.shape
    Xh = X.to(torch.float64).permute(1, 2, 0, 3)            # (L, H, N, D): one block per head
    Xtr, Xte = Xh[:, :, train].contiguous(), Xh[:, :, ~train].contiguous()
    ytr, yte = y[train].bool(), y[~train].bool()
    acc_tr, acc_te = np.zeros((L, H)), np.zeros((L, H))
    with extract.one_thread():
        for l in range(L):
            for h in range(H):
                theta, thr = D.mass_mean_fit(Xtr[l, h], ytr)
                acc_tr[l, h] = _acc(D.mass_mean_predict(Xtr[l, h], theta, thr), ytr)
                acc_te[l, h] = _acc(D.mass_mean_predict(Xte[l, h], theta, thr), yte)
    return acc_tr, acc_te


def select_head(train_tag: np.ndarray, train_notag: np.ndarray) -> tuple[int, int]:
    """max acc(tag) - acc(no_tag) on the training split; ties: higher acc(tag), then lower (l, h)."""
    L, H = train_tag.shape
    keys = [(-(train_tag[l, h] - train_notag[l, h]), -train_tag[l, h], l, h)
            for l in range(L) for h in range(H)]
    _, _, l, h = min(keys)
    return l, h


def logistic(Xtr: torch.Tensor, ytr: torch.Tensor, Xte: torch.Tensor, yte: torch.Tensor,
             C: float = 1.0) -> float:
    """Standardised L2 logistic regression (scikit-learn, lbfgs: deterministic); test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
    clf.fit(Xtr.double().numpy(), ytr.numpy())
    return float((clf.predict(Xte.double().numpy()) == yte.numpy()).mean())


@dataclass
class Probe:
    """Every head's probes for one guard, and the chosen head."""
    min_queries: int
    train: dict[str, np.ndarray]      # kind -> (L, H) accuracy on the training split
    test: dict[str, np.ndarray]       # kind -> (L, H) accuracy on the test split
    head: tuple[int, int]             # chosen (layer, head)
    logistic: dict[str, float]        # kind -> test accuracy of the logistic baseline, chosen head
    #                                   (empty when not computed)
    sink_coverage: float              # share of prompts whose final token, in the chosen head,
    #                                   puts weight on a sink at all (elsewhere z_tag = 0)
    top_sinks: list[tuple[str, float]]   # chosen head: the sink its final token attends to most
    tail_share: float                 # chosen head: share of its tag weight on tail keys
    best_activation: tuple[int, int]  # the head with the best theta_activation on the train split
    sinks_per_head: float             # mean #sinks over prompts, layers and heads
    self_sink: float                  # share of (prompt, layer, head) where the final token is a sink

    @property
    def chosen(self) -> dict[str, float]:
        l, h = self.head
        return {k: float(self.test[k][l, h]) for k in KINDS}


def _top_sinks(f: Features, guard: int, l: int, h: int, k: int = 3) -> list[tuple[str, float]]:
    """Which token the head's final query takes its tag from, most often: BOS, a tail token named
    by its offset from the end (T-1 = the final token itself), or a token in between ("mid")."""
    tail_from = guard_for(f.eps)
    count: dict[str, int] = {}
    for i, toks in enumerate(f.tokens):
        t, T = int(f.top_sink[guard][i, l, h]), len(toks)
        key = ("no sink" if t < 0 else f"{toks[t]!r} (BOS)" if t == 0
               else f"{toks[t]!r} (T-{T - t})" if T - t < tail_from else f"{toks[t]!r} (mid)")
        count[key] = count.get(key, 0) + 1
    top = sorted(count.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [(key, n / len(f.tokens)) for key, n in top]


def probe(f: Features, labelled: Labelled, guard: int, activation=None,
          with_logistic: bool = True) -> Probe:
    """Every head's probes under one guard. ``activation``: the (train, test) accuracies of
    theta_activation, which do not depend on the guard, if already computed."""
    y = torch.tensor(labelled.labels)
    train = torch.tensor([s == "train" for s in labelled.split])
    tr, te = {}, {}
    for k in KINDS:
        tr[k], te[k] = (activation if k == "activation" and activation is not None
                        else head_accuracies(f.X(k, guard), y, train))
    l, h = select_head(tr["tag"], tr["no_tag"])
    lr = ({k: logistic(f.X(k, guard)[train, l, h], y[train], f.X(k, guard)[~train, l, h], y[~train])
           for k in KINDS} if with_logistic else {})
    has = f.sink_mass[guard][:, l, h] > 0
    tail = float(f.tail_mass[guard][:, l, h].sum() / f.sink_mass[guard][:, l, h].sum().clamp_min(1e-12))
    ba = select_head(tr["activation"], np.zeros_like(tr["activation"]))
    return Probe(guard, tr, te, (l, h), lr, float(has.double().mean()), _top_sinks(f, guard, l, h),
                 tail, ba,
                 float(f.n_sinks[guard].double().mean()), float(f.self_sink[guard].double().mean()))


@dataclass
class TaskResult:
    model: str
    task: str
    min_queries: int
    by_guard: dict[int, Probe]
    n_test: int
    last_tokens: dict[str, int] = field(default_factory=dict)   # final token string -> count
    mean_length: float = 0.0
    shared_prefix: int = 0

    @property
    def main(self) -> Probe:
        return self.by_guard[self.min_queries]

    def summary(self) -> dict:
        """JSON-ready numbers (accuracies in %) for the results file."""
        def pct(x):
            return round(100 * float(x), 2)

        out = {"min_queries": self.min_queries, "n_test": self.n_test,
               "last_tokens": self.last_tokens, "mean_length": round(self.mean_length, 2),
               "shared_prefix_tokens": self.shared_prefix, "by_guard": {}}
        for g, p in self.by_guard.items():
            l, h = p.head
            bl, bh = p.best_activation
            out["by_guard"][str(g)] = {
                "layer": l, "head": h,
                **{f"theta_{k}": pct(v) for k, v in p.chosen.items()},
                **{f"train_theta_{k}": pct(p.train[k][l, h]) for k in KINDS},
                **{f"logistic_{k}": pct(v) for k, v in p.logistic.items()},
                "sink_coverage": round(p.sink_coverage, 4), "tail_share": round(p.tail_share, 4),
                "top_sinks": [[k, round(v, 4)] for k, v in p.top_sinks],
                "best_activation_head": [bl, bh],
                "best_activation_theta": pct(p.test["activation"][bl, bh]),
                "sinks_per_head": round(p.sinks_per_head, 4), "self_sink": round(p.self_sink, 4)}
        return out


def probe_task(model: Model, labelled: Labelled, eps: float = D.EPS, min_queries: int | None = None,
               batch_size: int = 32, also=(), task: str = "", progress: bool = True) -> TaskResult:
    """Truth or sentiment probes of ``model`` on ``labelled`` (texts, labels, train/test split).

    ``min_queries``: the tail guard (default ``guard_for(eps)``); ``also``: further guards (e.g.
    1 = none) evaluated on the same forward passes, in ``by_guard``.
    """
    mq = guard_for(eps) if min_queries is None else int(min_queries)
    guards = tuple(dict.fromkeys((mq, *also)))
    f = features(model, labelled.texts, eps, guards, batch_size, progress=progress,
                 desc=f"{model.name} {task}".strip())
    counts: dict[str, int] = {}
    for toks in f.tokens:
        counts[toks[-1]] = counts.get(toks[-1], 0) + 1
    y = torch.tensor(labelled.labels)
    act = head_accuracies(f.o, y, torch.tensor([s == "train" for s in labelled.split]))
    # the logistic baseline only for the guard in use and for none (the tables show those)
    by = {g: probe(f, labelled, g, act, with_logistic=g in (mq, 1)) for g in guards}
    return TaskResult(model.name, task, mq, by, labelled.split.count("test"), counts,
                      float(np.mean(f.lengths)), f.shared)


def country_baseline(labelled: Labelled) -> float:
    """Cities: test accuracy of a rule that sees only the stated country (its majority label on
    the training split; ties and unseen countries: false). Near 50% when the set is fair."""
    votes: dict[str, list[int]] = {}
    for m, y, s in zip(labelled.meta, labelled.labels, labelled.split):
        if s == "train":
            votes.setdefault(m["stated"], [0, 0])[y] += 1
    test = [(m, y) for m, y, s in zip(labelled.meta, labelled.labels, labelled.split) if s == "test"]
    hits = [int(votes.get(m["stated"], [1, 0])[1] > votes.get(m["stated"], [1, 0])[0]) == y for m, y in test]
    return sum(hits) / len(hits)


# --- verdict and figure ----------------------------------------------------------------------

def verdict(tag: float, no_tag: float, n_test: int) -> str:
    """Test accuracies (fractions) of the chosen head -> the chapter's verdict (rules stated there)."""
    if tag >= 0.70 and tag - no_tag >= 0.15:
        return "reproduced"
    if tag >= chance_level(n_test) and tag > no_tag:
        return "partly reproduced"
    return "not reproduced"


def figure_heads(res: dict[str, TaskResult], guards: list[int], title: str = ""):
    """Train accuracy of theta_tag against theta_no_tag for every head: rows = tasks, columns =
    guards; the chosen head is starred. Heads above the diagonal carry more in their tag."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(res), len(guards), figsize=(4.3 * len(guards) + 1.2, 4.1 * len(res)),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    for i, (task, r) in enumerate(res.items()):
        for j, g in enumerate(guards):
            ax, p = axes[i, j], r.by_guard[g]
            L, H = p.train["tag"].shape
            layer = np.repeat(np.arange(L), H)
            sc = ax.scatter(100 * p.train["no_tag"].ravel(), 100 * p.train["tag"].ravel(), c=layer,
                            cmap="viridis", vmin=0, vmax=L - 1, s=16, alpha=0.8, edgecolors="none")
            l, h = p.head
            ax.scatter([100 * p.train["no_tag"][l, h]], [100 * p.train["tag"][l, h]], marker="*",
                       s=260, color="#C44E52", edgecolors="k", linewidths=0.6, zorder=3,
                       label=f"chosen: layer {l}, head {h}")
            ax.plot([30, 100], [30, 100], color="k", lw=0.7, ls="--")
            ax.set_xlim(30, 100)
            ax.set_ylim(30, 100)
            ax.set_aspect("equal")
            guard = "no guard (min_queries=1)" if g == 1 else f"guard: min_queries={g}"
            ax.set_title(f"{task}, {guard}", fontsize=10)
            if i == len(res) - 1:
                ax.set_xlabel("train accuracy, theta_no_tag (%)")
            if j == 0:
                ax.set_ylabel("train accuracy, theta_tag (%)")
            ax.legend(fontsize=8, loc="lower right", frameon=False)
    fig.colorbar(sc, ax=axes, shrink=0.5, label="layer")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
