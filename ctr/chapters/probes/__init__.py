r"""Semantic probes on the tag / no-tag split of every head (paper Sec. 4, Table 1).

For each prompt only the final token is kept: per (layer, head), its head output
o = z_tag + z_notag, split by the sinks found in *that prompt's own* attention
(``probes.features``). Three mass-mean probes per head: theta_tag on z_tag, theta_no_tag on
z_notag, theta_activation on o. Two protocols, from the same forward passes:

- the paper's: the sink score as written (``min_queries=1``);
- the guarded one: a sink must be seen by at least ceil(1/eps) queries (5 at eps = 0.2), so no
  key becomes a sink through one query's attention. In "The city of X is in Y." no such key
  follows the country, so its value vector cannot hold the statement's truth; the truth can
  reach z_tag only through the final token's attention weights.

Head selection (the paper's rule, as RULES.md makes it exact, ``probes.stats.select_head``): on
the training split only, among heads whose theta_tag beats their theta_no_tag, the largest gap,
then the higher theta_tag, then the lower (layer, head); none may qualify. Its statistics
(one-sided McNemar, re-splits, the label-shuffle null) are in ``probes.stats``, the verdict rules
in ``probes.verdicts``, tables and figures in ``probes.tables`` and ``probes.figures``.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ... import definitions as D
from ... import models as M
from ...data import Labelled
from ...models import Model
from . import stats as PS
# ``probes.features`` is the function (it shadows the submodule of that name on the package;
# ``ctr.chapters.probes.features`` in sys.modules and ``from .features import`` still reach it)
from .features import Features, features, guard_for  # noqa: F401
from .stats import KINDS, chance_level, logistic  # noqa: F401


@dataclass
class Probe:
    """Every head's probes under one guard, the chosen head and the statistics of the choice."""
    min_queries: int
    sel: PS.Selection
    logistic: dict[str, float]        # kind -> test accuracy of the logistic baseline, chosen head
    sink_coverage: float | None       # chosen head: share of prompts whose final token puts
    #                                   weight on a sink at all (elsewhere z_tag = 0)
    top_sinks: list[tuple[str, float]]   # chosen head: the sink its final token attends to most
    tail_share: float | None          # chosen head: share of its tag weight on tail keys
    sinks_per_head: float             # mean #sinks over prompts, layers and heads
    self_sink: float                  # share of (prompt, layer, head) where the final token is a sink
    heads_with_sink: int              # heads whose final token attends to a sink in some prompt
    constant: dict | None = None      # chosen head, test prompts: how much of z_tag is token 0's

    train = property(lambda self: self.sel.train)
    test = property(lambda self: self.sel.test)
    head = property(lambda self: self.sel.head)
    best_tag = property(lambda self: self.sel.best_tag)
    best_activation = property(lambda self: self.sel.best_activation)

    @property
    def chosen(self) -> dict[str, float] | None:
        """Test accuracies (fractions) of the chosen head; None when no head satisfies the rule."""
        if self.head is None:
            return None
        return {k: float(self.test[k][self.head]) for k in KINDS}


def _top_sinks(f: Features, guard: int, l: int, h: int, k: int = 3) -> list[tuple[str, float]]:
    """Which token the head's final query takes its tag from, most often: token 0 (BOS where the
    model prepends one), a tail token named by its offset from the end (T-1 = the final token
    itself), or a token in between ("mid")."""
    tail_from = guard_for(f.eps)
    count: dict[str, int] = {}
    for i, toks in enumerate(f.tokens):
        t, T = int(f.top_sink[guard][i, l, h]), len(toks)
        key = ("no sink" if t < 0 else f"{toks[t]!r} (token 0)" if t == 0
               else f"{toks[t]!r} (T-{T - t})" if T - t < tail_from else f"{toks[t]!r} (mid)")
        count[key] = count.get(key, 0) + 1
    top = sorted(count.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [(key, n / len(f.tokens)) for key, n in top]


def probe(f: Features, labelled: Labelled, guard: int, resplit_masks=None, null_labels=None,
          with_logistic: bool = True) -> Probe:
    """Every head's probes under one guard; re-splits and the null when their masks are given."""
    y = torch.tensor(labelled.labels).bool()
    train = torch.tensor([s == "train" for s in labelled.split])
    X = {k: f.X(k, guard) for k in KINDS}
    sel = PS.select(X, y, train, resplit_masks, null_labels)
    lr, cov, top, tail = {}, None, [], None
    if sel.head is not None:
        l, h = sel.head
        if with_logistic:
            lr = {k: logistic(X[k][train, l, h], y[train], X[k][~train, l, h], y[~train]) for k in KINDS}
        mass = f.sink_mass[guard][:, l, h]
        cov = float((mass > 0).double().mean())
        tail = float(f.tail_mass[guard][:, l, h].sum() / mass.sum().clamp_min(1e-12))
        top = _top_sinks(f, guard, l, h)
    const = constant_tag(f, guard, sel.head, ~train) if sel.head is not None else None
    return Probe(guard, sel, lr, cov, top, tail, float(f.n_sinks[guard].double().mean()),
                 float(f.self_sink[guard].double().mean()),
                 int((f.sink_mass[guard] > 0).any(0).sum()), const)


def constant_tag(f: Features, guard: int, head: tuple[int, int], prompts) -> dict:
    """RULES.md, constant-value tags: for one head on ``prompts`` (a mask), the share of the
    z_tag norm that comes from a token-0 sink whose token is the same in every prompt,
    sum ||A[T,0] v_0|| / sum (||A[T,0] v_0|| + ||z_tag - A[T,0] v_0||) (1 exactly when token 0 is
    the only sink the final token attends to), and whether that is so in every prompt
    (``constant``: then z_tag = A[T,0] v_0 is one vector times one number)."""
    l, h = head
    m = torch.as_tensor(prompts).bool()
    first, rest = f.first_norm[guard][m, l, h].double(), f.rest_norm[guard][m, l, h].double()
    other = f.other_sink[guard][m, l, h]
    has_first = first > 0
    total = float((first + rest).sum())
    share = float(first.sum()) / total if total > 0 else None
    return {"same_first_token": f.same_first, "first_token": f.tokens[0][0],
            "norm_share": None if share is None or not f.same_first else round(share, 4),
            "prompts_first_only": round(float((has_first & ~other).double().mean()), 4),
            "constant": bool(f.same_first and has_first.any() and not other.any())}


@dataclass
class TaskResult:
    model: str
    task: str
    min_queries: int                  # the guard; the paper's protocol is min_queries = 1
    by_guard: dict[int, Probe]
    n_test: int
    last_tokens: dict[str, int] = field(default_factory=dict)   # final token string -> count
    mean_length: float = 0.0
    shared_prefix: int = 0
    eps: float = D.EPS

    @property
    def main(self) -> Probe:
        return self.by_guard[self.min_queries]

    @property
    def paper(self) -> Probe:
        return self.by_guard[1]

    def protocol(self, g: int) -> dict:
        """One guard's full record for the results file (accuracies in %; layer/head and the
        accuracies are None when no head satisfies the rule)."""
        p = self.by_guard[g]
        out = {"min_queries": g, "eps": self.eps, **p.sel.summary()}
        out["n_test"] = self.n_test
        for k, v in p.logistic.items():
            out[f"logistic_{k}"] = PS._pct(v)
        out.update(sink_coverage=None if p.sink_coverage is None else round(p.sink_coverage, 4),
                   tail_share=None if p.tail_share is None else round(p.tail_share, 4),
                   top_sinks=[[k, round(v, 4)] for k, v in p.top_sinks],
                   sinks_per_head=round(p.sinks_per_head, 4), self_sink=round(p.self_sink, 4),
                   heads_with_sink=p.heads_with_sink, constant_tag=p.constant)
        return out

    def summary(self) -> dict:
        """JSON-ready record: "paper" (min_queries=1) and "guard" in full, every guard's chosen
        head and accuracies in "by_guard" (the sweep)."""
        light = ("selected", "layer", "head", "theta_tag", "theta_no_tag", "theta_activation")
        out = {"task": self.task, "min_queries": self.min_queries, "n_test": self.n_test,
               "last_tokens": self.last_tokens, "mean_length": round(self.mean_length, 2),
               "shared_prefix_tokens": self.shared_prefix,
               "paper": self.protocol(1), "guard": self.protocol(self.min_queries), "by_guard": {}}
        for g in self.by_guard:
            full = out["paper"] if g == 1 else out["guard"] if g == self.min_queries else self.protocol(g)
            out["by_guard"][str(g)] = {k: full[k] for k in light}
        return out


def probe_task(model: Model, labelled: Labelled, eps: float = D.EPS, min_queries: int | None = None,
               batch_size: int = 32, also=(), task: str = "", progress: bool = True,
               n_resplits: int = 10, n_null: int = 100, seed: int = 0) -> TaskResult:
    """Truth or sentiment probes of ``model`` on ``labelled`` (texts, labels, train/test split).

    Both protocols, the paper's (``min_queries=1``) and the guard (default ``guard_for(eps)``),
    get the full statistics: McNemar, ``n_resplits`` random re-splits of the same sizes and an
    ``n_null``-fold label-shuffle null (both seeded). ``also``: further guards for the sweep
    (chosen head and accuracies only), from the same forward passes.
    """
    mq = guard_for(eps) if min_queries is None else int(min_queries)
    guards = tuple(dict.fromkeys((mq, 1, *also)))
    f = features(model, labelled.texts, eps, guards, batch_size, progress=progress,
                 desc=f"{model.name} {task}".strip())
    counts: dict[str, int] = {}
    for toks in f.tokens:
        counts[toks[-1]] = counts.get(toks[-1], 0) + 1
    train = [s == "train" for s in labelled.split]
    masks = PS.balanced_splits(labelled.labels, sum(train), n_resplits, seed) if n_resplits else None
    null = PS.shuffled_labels(labelled.labels, train, n_null, seed) if n_null else None
    by = {g: (probe(f, labelled, g, masks, null) if g in (mq, 1)
              else probe(f, labelled, g, with_logistic=False)) for g in guards}
    return TaskResult(model.name, task, mq, by, labelled.split.count("test"), counts,
                      float(np.mean(f.lengths)), f.shared, eps)


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


def country_from_end(model: Model, texts: list[str]) -> list[int | None]:
    """Cities: per prompt, how many tokens from the stated country's first token to the end
    (country, full stop and any suffix); None where the tokenisation of "... is in" is not a
    prefix of the prompt's. Under a guard g, every key that can be a sink precedes the country
    exactly when this is below g."""
    full = model.encode(texts)
    pre = model.encode([t[:t.rindex(" is in") + len(" is in")] for t in texts])
    out = []
    for i, (n, m) in enumerate(zip(full.lengths, pre.lengths)):
        same = torch.equal(full.input_ids[i, :m], pre.input_ids[i, :m])
        out.append(n - m if same else None)
    return out


@dataclass
class Chapter:
    """Every model's runs of the chapter: model -> task -> TaskResult, and per model what the
    page prints about it."""
    runs: dict[str, dict[str, TaskResult]]
    country_before: dict[str, int]    # city statements whose guarded keys all precede the country
    seconds: dict[str, float]
    cpu: dict[str, float]
    lines: dict[str, str]             # one line per model: layers, BOS policy, final tokens, time


def run(names: list[str], tasks: dict[str, Labelled], *, eps: float = D.EPS, guard: int = 5,
        guard_sweep=(), n_resplits: int = 10, n_null: int = 100, batch_size: int = 32,
        seed: int = 0, device: str = "cpu", dtype: str = "float32") -> Chapter:
    """The chapter's experiment: each model loaded once (``device``, ``dtype`` as in
    ``ctr.models.load``), every task probed under the paper's protocol, the guard and the sweep."""
    out = Chapter({}, {}, {}, {}, {})
    for name in names:
        t0, c0 = time.time(), time.process_time()
        # T: a city statement or a sentiment prompt is far below 256 tokens (the plan's bound)
        m = M.load(name, device=device, dtype=dtype, T=256, batch=batch_size)
        out.runs[name] = {task: probe_task(m, ds, eps=eps, min_queries=guard,
                                           batch_size=batch_size, also=guard_sweep, task=task,
                                           n_resplits=n_resplits, n_null=n_null, seed=seed)
                          for task, ds in tasks.items()}
        before = 0
        if "cities" in tasks:
            country = country_from_end(m, tasks["cities"].texts)
            before = sum(k is not None and k < guard for k in country)
        out.country_before[name] = before
        out.seconds[name], out.cpu[name] = time.time() - t0, time.process_time() - c0
        last = "; ".join(f"{task} " + ", ".join(f"{t!r} ({k})" for t, k in r.last_tokens.items())
                         for task, r in out.runs[name].items())
        out.lines[name] = (f"{name}: {m.n_layers} layers x {m.n_heads} heads; {m.bos_policy}; "
                           f"final tokens: {last}; in {before} of {len(tasks.get('cities') or [])} "
                           f"city statements every key the guard leaves precedes the country; "
                           f"{out.seconds[name]:.0f} s wall, {out.cpu[name]:.0f} s CPU")
        del m
        gc.collect()
    return out
