r"""Release, tested (beyond the paper), part 2: swap a tag, watch the answer.

Few-shot label prompts whose answer is one token (its first token: ``answer_ids``), built in
pairs with opposite labels and the same number of tokens, so that every position of one prompt
has a counterpart at the same index in the other:

- sentiment: the paper's two-shot template (``data.sentiment_prompt``) around two Rotten
  Tomatoes sentences of opposite labels whose prompts tokenise to the same length; answers
  " POSITIVE" / " NEGATIVE";
- cities: two demonstrations, then one city with its true country or with another country of
  the same token length (a minimal pair: only the country differs); answers " TRUE" / " FALSE".

In each directed pair (recipient r, donor d) the recipient runs with, in one layer, the value
vectors of some (head, position) cells replaced by the donor's at the same positions:

- ``head_sink``: the probe-selected head, at its sinks in r (eps, the probes chapter's guard);
- ``head_ctrl``: the same head, at the non-sink token nearest each sink (s-1, s+1, s-2, ...;
  never position 0): as many cells, as close to the answer;
- ``layer_sink`` / ``layer_ctrl``: the same for every head of that layer;
- ``layer_all``: every position of every head of the layer (a reference: what the layer's
  values carry at all).

The tokens both prompts share before their first difference have the same values in both
(causal attention), so swapping them is exactly a no-op; BOS included. With LD = logit(answer
of label 1) - logit(answer of label 0) at the final token and s = +1 if the donor's label is 1
(else -1), the label gap of a directed pair is s (LD_d - LD_r) and the swap moves
s (LD_{r<-d} - LD_r); the fraction moved is sum(moved) / sum(gap), bootstrapped over pairs. The
same with s = sign(LD_d - LD_r) measures how much of the difference between the two prompts'
answers, whatever its cause, the swap carries over (``Swap.moved(by="answer")``).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import data
from .. import definitions as D
from .. import extract
from ..models import Model
from .release import cpu_seconds, sink_mask

TASKS = {"sentiment": (" POSITIVE", " NEGATIVE"), "cities": (" TRUE", " FALSE")}
CITY_TEMPLATE = ("{0} This statement is: TRUE.\n{1} This statement is: FALSE.\n"
                 "{statement} This statement is:")
CONDITIONS = ("head_sink", "head_ctrl", "layer_sink", "layer_ctrl", "layer_all")


@dataclass
class Pairs:
    task: str
    texts: list[str]                 # 2N prompts; pair i = (2i, 2i + 1), labels 1 then 0
    labels: list[int]
    answers: tuple[str, str]         # (label 1, label 0)
    answer_ids: tuple[int, int]      # first token of each answer
    differ_from: list[int]           # per pair: first position where the prompts differ
    lengths: list[int]               # per pair: tokens (BOS included)

    def __len__(self) -> int:
        return len(self.differ_from)


def answer_ids(model: Model, answers: tuple[str, str]) -> tuple[int, int]:
    """The first token of each answer (after the prompt's final ':'); they must differ. A
    tokenizer whose spaced answers share their first token (a byte-level one: the space) is
    scored on the answers without the space."""
    for a in (answers, tuple(x.strip() for x in answers)):
        ids = [model.tokenizer(x, add_special_tokens=False).input_ids[0] for x in a]
        if ids[0] != ids[1]:
            return ids[0], ids[1]
    raise ValueError(f"{model.name}: the answers {answers} start with the same token; a "
                     "one-token logit difference cannot tell them apart")


def _aligned(model: Model, a: str, b: str) -> tuple[int, int] | None:
    """(length, first differing position) when a and b tokenise to the same length and
    differ somewhere; else None."""
    x, y = model.ids(a), model.ids(b)
    if len(x) != len(y) or x == y or x[-1] != y[-1]:
        return None
    return len(x), next(i for i, (p, q) in enumerate(zip(x, y)) if p != q)


def _pairs(model, task, candidates, n_pairs) -> Pairs:
    """Pairs from (text of label 1, text of label 0) candidates, in order, aligned only."""
    texts, diff, lens = [], [], []
    for a, b in candidates:
        al = _aligned(model, a, b)
        if al is None:
            continue
        texts += [a, b]
        lens.append(al[0])
        diff.append(al[1])
        if len(diff) == n_pairs:
            break
    if len(diff) < n_pairs:
        raise data.DataError(f"{task}: only {len(diff)} aligned pairs for {model.name}; ask for "
                             f"fewer (n_pairs={len(diff)})")
    return Pairs(task, texts, [1, 0] * n_pairs, TASKS[task], answer_ids(model, TASKS[task]),
                 diff, lens)


def sentiment_pairs(model: Model, n_pairs: int = 200, seed: int = 0, max_words: int = 40) -> Pairs:
    """Positive and negative Rotten Tomatoes sentences in the paper's two-shot template, paired
    greedily (in seeded order) when their prompts have the same number of tokens."""
    demos = ("it's a charming and often affecting journey .", "unflinchingly bleak and desperate")

    def candidates():
        waiting: dict[tuple[int, int], list[str]] = {}
        for s, y in data.rotten_tomatoes(seed):
            if len(s.split()) > max_words or s in demos:
                continue
            p = data.sentiment_prompt(s)
            n = len(model.ids(p))
            other = waiting.get((n, 1 - y))
            if other:
                q = other.pop(0)
                yield (p, q) if y == 1 else (q, p)
            else:
                waiting.setdefault((n, y), []).append(p)
    return _pairs(model, "sentiment", candidates(), n_pairs)


def city_pairs(model: Model, n_pairs: int = 200, seed: int = 0) -> Pairs:
    """Minimal pairs "The city of X is in Y." (true) / "... is in Z." (false), Z the first
    country of the cities set, in a seeded order, whose prompt has as many tokens, after two
    demonstrations (one true, one false) drawn from the same set and never used in a pair."""
    c = data.cities(600, 400, seed=seed)
    cities = [(m["city"], m["country"]) for m in c.meta]
    countries = sorted({k for _, k in cities})
    rng = random.Random(seed)
    (c1, k1), (c2, k2) = cities[0], cities[1]
    wrong = next(k for k in countries if k not in (k1, k2))
    demo = [f"The city of {c1} is in {data._country(k1)}.",
            f"The city of {c2} is in {data._country(wrong)}."]

    def prompt(city, country):
        return CITY_TEMPLATE.format(*demo, statement=f"The city of {city} is in {data._country(country)}.")

    def candidates():
        for city, true in cities[2:]:
            n = len(model.ids(prompt(city, true)))
            for k in rng.sample(countries, len(countries)):
                if k != true and len(model.ids(prompt(city, k))) == n:
                    yield prompt(city, true), prompt(city, k)
                    break
    return _pairs(model, "cities", candidates(), n_pairs)


# --- which head: the probes chapter's choice ----------------------------------------------------

PROBE_TASK = {"sentiment": ("sentiment",), "cities": ("cities_suffix", "cities")}


def probe_head(probes_results: dict | None, model: str, task: str) -> dict | None:
    """The head the probes chapter selected for ``task`` (its guarded protocol), read from its
    results file: {layer, head, min_queries, from}. For cities its position-controlled task
    (the statement followed by a question, as here) is preferred to the bare statement.
    None when the file has no such model or task; {"layer": None, ...} when it chose no head."""
    models = (probes_results or {}).get("models", {})
    for key in PROBE_TASK[task]:
        rec = models.get(model, {}).get(key)
        if rec is None:
            continue
        g = rec.get("guard") or {}
        chosen = bool(g.get("selected"))
        return {"layer": g.get("layer") if chosen else None, "head": g.get("head") if chosen else None,
                "min_queries": g.get("min_queries", rec.get("min_queries")),
                "from": f"probes results, task {key!r}, guarded protocol"}
    return None


def select_head(model: Model, task: str, eps: float = D.EPS, n: int = 200, n_train: int = 100,
                seed: int = 0, batch_size: int = 32) -> dict:
    """The same choice made here with the probes module's public functions (when the probes
    results lack this model): the probes chapter's task data, its guard, its rule."""
    from . import probes

    ds = (data.sentiment(n, n_train, seed=seed) if task == "sentiment"
          else data.cities_suffixed(n, n_train, seed=seed))
    guard = probes.guard_for(eps)
    r = probes.probe_task(model, ds, eps=eps, min_queries=guard, batch_size=batch_size,
                          task=task, progress=False, n_resplits=0, n_null=0, seed=seed)
    head = r.main.head
    return {"layer": head[0] if head else None, "head": head[1] if head else None,
            "min_queries": guard,
            "from": f"probes.probe_task here ({n} prompts, {n_train} for training), guarded protocol"}


# --- the swap -------------------------------------------------------------------------------------

def control_positions(S: torch.Tensor, n: int) -> torch.Tensor:
    """For sinks S (T,) of one head in a prompt of n tokens: the non-sink token nearest each
    sink (s-1, s+1, s-2, ...; never position 0, each used once), as a mask (T,)."""
    T = S.shape[0]
    out = torch.zeros(T, dtype=torch.bool)
    for s in torch.nonzero(S[:n]).flatten().tolist():
        for d in range(1, n):
            hit = next((c for c in (s - d, s + d) if 1 <= c < n and not S[c] and not out[c]), None)
            if hit is not None:
                out[hit] = True
                break
    return out


def cells(condition: str, S: torch.Tensor, head: int, lengths) -> torch.Tensor:
    """The (head, position) cells (B, H, T) a condition swaps, from the recipients' sinks
    S (B, H, T) at the layer."""
    B, H, T = S.shape
    if condition == "layer_all":
        return torch.arange(T).view(1, 1, T).expand(B, H, T) < torch.tensor(lengths).view(B, 1, 1)
    heads = [head] if condition.startswith("head") else range(H)
    out = torch.zeros_like(S)
    for h in heads:
        for b, n in enumerate(lengths):
            out[b, h] = S[b, h] if condition.endswith("sink") else control_positions(S[b, h], n)
    return out


def swap_edit(V_donor: torch.Tensor, C: torch.Tensor):
    """Edit: the values of cells C (B, H, T) replaced by the donor's V_donor (B, H, T, D);
    outputs change by A (V' - V) only where C is set (every other output is kept exactly)."""
    def edit(rec):
        T = rec.head_out.shape[1]
        dV = (V_donor[:, :, :T].to(rec.V.dtype) - rec.V) * C[:, :, :T].unsqueeze(-1).to(rec.V.dtype)
        return rec.head_out + (rec.A @ dV).transpose(1, 2)
    return edit


@dataclass
class Swap:
    task: str
    model: str
    layer: int | None
    head: int | None
    source: str
    min_queries: int
    ld: np.ndarray                   # (2N,) clean logit difference, label-1 answer minus label-0
    directed: list[tuple[int, int]]  # (recipient, donor) prompt indices
    swapped: dict[str, np.ndarray] = field(default_factory=dict)   # condition -> (M,) LD after
    n_cells: dict[str, np.ndarray] = field(default_factory=dict)   # condition -> (M,) cells swapped
    n_cells_differ: dict[str, np.ndarray] = field(default_factory=dict)   # ... at or after the difference
    mass: dict[str, np.ndarray] = field(default_factory=dict)      # condition -> (M,) final token's
    #                                                                attention on them (head mean)
    run: dict[str, int] = field(default_factory=dict)   # condition -> directed pairs run (the rest
    #                                                     swap only cells before the difference)
    seconds: float = 0.0
    cpu: float = 0.0

    def moved(self, condition: str, by: str = "label") -> tuple[np.ndarray, np.ndarray]:
        """Per directed pair: (how far the swap moved LD toward the donor, the gap to the donor).

        ``by="label"``: signed by the donor's label (+1 for label 1): the gap is the label gap,
        and a model that does not tell the labels apart has none. ``by="answer"``: signed by the
        donor's own answer, sign(LD_d - LD_r): the gap is |LD_d - LD_r|, whatever made the two
        prompts' answers differ."""
        r, d = np.array(self.directed).T
        if by == "label":
            s = np.where(np.array([1, 0] * (len(self.ld) // 2))[d] == 1, 1.0, -1.0)
        elif by == "answer":
            s = np.sign(self.ld[d] - self.ld[r])
        else:
            raise ValueError(f"by={by!r}: use 'label' or 'answer'")
        return s * (self.swapped[condition] - self.ld[r]), s * (self.ld[d] - self.ld[r])


def _stack(rows: list[torch.Tensor], T: int, axis: int) -> torch.Tensor:
    """Per-prompt tensors right-padded with zeros to T along their token ``axis``, stacked."""
    out = []
    for x in rows:
        pad = [0, 0] * (x.dim() - axis - 1) + [0, T - x.shape[axis]]
        y = torch.nn.functional.pad(x.to(torch.uint8) if x.dtype == torch.bool else x, pad)
        out.append(y.bool() if x.dtype == torch.bool else y)
    return torch.stack(out)


def swap(model: Model, pairs: Pairs, layer: int | None, head: int | None, eps: float = D.EPS,
         min_queries: int = 5, conditions=CONDITIONS, both_directions: bool = True,
         batch_size: int = 32, source: str = "") -> Swap:
    """Clean logit differences of every prompt, then each condition on every directed pair."""
    t0, c0 = time.time(), cpu_seconds()
    N2 = len(pairs.texts)
    directed = [(2 * i, 2 * i + 1) for i in range(len(pairs))]
    directed = ([(r, d) for a, b in directed for r, d in ((a, b), (b, a))] if both_directions
                else [(a, b) if i % 2 == 0 else (b, a) for i, (a, b) in enumerate(directed)])
    out = Swap(pairs.task, model.name, layer, head, source, min_queries, np.zeros(N2), directed)
    order = sorted(range(N2), key=lambda i: (len(model.ids(pairs.texts[i])), i))
    V, S, R, A = {}, {}, {}, {}
    for k in range(0, N2, batch_size):
        idx = order[k:k + batch_size]
        batch = model.encode([pairs.texts[i] for i in idx])

        def keep(rec, idx=idx):
            if rec.layer != layer:
                return
            Sb = sink_mask(rec.A, rec.lengths, rec.window, eps, min_queries)
            for b, i in enumerate(idx):
                n = rec.lengths[b]
                V[i], S[i] = rec.V[b, :, :n].clone(), Sb[b, :, :n].clone()
                A[i] = rec.A[b, :, n - 1, :n].double()          # (H, n) the final token's row
        r = extract.run(model, batch, loss=False, positions="last", vocab=list(pairs.answer_ids),
                        keep_resid=[] if layer is None else [layer], on_layer=keep)
        out.ld[idx] = (r.logits[:, 0, 0] - r.logits[:, 0, 1]).double().numpy()
        if layer is not None:
            for b, i in enumerate(idx):
                R[i] = r.resid[layer][b, :batch.lengths[b]].clone()
    if layer is None:                        # no head chosen: nothing to swap
        out.seconds, out.cpu = time.time() - t0, cpu_seconds() - c0
        return out
    M = len(directed)
    for cond in conditions:
        if cond.startswith("head") and head is None:
            continue
        Cs = [cells(cond, S[r][None], head or 0, [S[r].shape[1]])[0] for r, _ in directed]
        first = [pairs.differ_from[r // 2] for r, _ in directed]
        hs = [head] if cond.startswith("head") else list(range(model.n_heads))
        ld = out.ld[[r for r, _ in directed]].copy()    # a swap before the difference: no change
        out.n_cells[cond] = np.array([int(c.sum()) for c in Cs])
        out.n_cells_differ[cond] = np.array([int(c[:, f:].sum()) for c, f in zip(Cs, first)])
        out.mass[cond] = np.array([float((A[r] * C)[hs].sum(-1).mean()) for (r, _), C in zip(directed, Cs)])
        # cells before the first difference hold the same values in both prompts (causality):
        # swapping only those is exactly a no-op, so those pairs are not run
        todo = sorted((j for j in range(M) if out.n_cells_differ[cond][j]),
                      key=lambda j: (Cs[j].shape[1], j))
        out.run[cond] = len(todo)
        for k in range(0, len(todo), batch_size):
            js = todo[k:k + batch_size]
            rs, ds = [directed[j][0] for j in js], [directed[j][1] for j in js]
            batch = model.encode([pairs.texts[i] for i in rs])
            T = batch.input_ids.shape[1]
            f = swap_edit(_stack([V[i] for i in ds], T, 1), _stack([Cs[j] for j in js], T, 1))
            r = extract.run(model, batch, loss=False, positions="last",
                            vocab=list(pairs.answer_ids), edits={layer: f},
                            start=(layer, _stack([R[i] for i in rs], T, 0)))
            ld[js] = (r.logits[:, 0, 0] - r.logits[:, 0, 1]).double().numpy()
        out.swapped[cond] = ld
    out.seconds, out.cpu = time.time() - t0, cpu_seconds() - c0
    return out
