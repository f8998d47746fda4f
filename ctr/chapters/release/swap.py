r"""Release, tested (beyond the paper), part 2: swap a tag, watch the answer.

The prompts are pairs of few-shot label prompts with opposite labels, aligned token by token
(``release.prompts``).

In each directed pair (recipient r, donor d) the recipient runs with, in one layer, the value
vectors of some (head, position) cells replaced by the donor's at the same positions:

- ``head_sink``: the probe-selected head, at its sinks in r (eps, the probes chapter's guard);
- ``head_ctrl``: the same head, at the non-sink token nearest each sink (s-1, s+1, s-2, ...;
  never position 0): as many cells, as close to the answer;
- ``layer_sink`` / ``layer_ctrl``: the same for every head of that layer;
- ``layer_all``: every position of every head of the layer (a reference: what the layer's
  values carry at all).

The tokens both prompts share before their first difference have the same values in both
(causal attention), so swapping them is a no-op; position 0 included. Which swapped cells are
no-ops is read from the data (``differing_cells``: the donor's and the recipient's values
compared), not inferred from positions: a value can also agree after the difference (at the
first layer a value depends on its token alone). A directed pair whose swapped cells all agree
is not run (it moves nothing). With LD = logit(answer
of label 1) - logit(answer of label 0) at the final token and s = +1 if the donor's label is 1
(else -1), the label gap of a directed pair is s (LD_d - LD_r) and the swap moves
s (LD_{r<-d} - LD_r); the fraction moved is sum(moved) / sum(gap), bootstrapped over pairs. The
same with s = sign(LD_d - LD_r) measures how much of the difference between the two prompts'
answers, whatever its cause, the swap carries over (``Swap.moved(by="answer")``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ... import data
from ... import definitions as D
from ... import extract
from ...models import Model
from . import cpu_seconds, sink_mask
from .prompts import TASKS, Pairs, city_pairs, pairs_for  # noqa: F401

CONDITIONS = ("head_sink", "head_ctrl", "layer_sink", "layer_ctrl", "layer_all")


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
    from .. import probes

    ds = (data.sentiment(n, n_train, seed=seed) if task == "sentiment"
          else data.cities_suffixed(n, n_train, seed=seed))
    guard = probes.guard_for(eps)
    r = probes.probe_task(model, ds, eps=eps, min_queries=guard, batch_size=batch_size,
                          task=task, progress=False, n_resplits=0, n_null=0, seed=seed)
    head = r.main.head
    return {"layer": head[0] if head else None, "head": head[1] if head else None,
            "min_queries": guard,
            "from": f"probes.probe_task here ({n} prompts, {n_train} for training), guarded protocol"}


def head_for(probes_results: dict | None, model: Model, task: str, eps: float = D.EPS,
             n: int = 200, seed: int = 0, batch_size: int = 32) -> dict:
    """The head to swap for ``task``: the probes chapter's choice (``probe_head``) where its
    results have this model, else the same choice made here (``select_head``, ``n`` prompts,
    half for training); with the guard it was chosen under and the time it took."""
    from ..probes.features import guard_for

    t0, c0 = time.time(), cpu_seconds()
    h = probe_head(probes_results, model.name, task)
    if h is None:
        h = select_head(model, task, eps=eps, n=n, n_train=n // 2, seed=seed, batch_size=batch_size)
    h["min_queries"] = h.get("min_queries") or guard_for(eps)
    h["seconds"], h["cpu_seconds"] = round(time.time() - t0, 1), round(cpu_seconds() - c0, 1)
    return h


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


NOOP_RTOL = {torch.float32: 1e-5, torch.float64: 1e-9}   # 16-bit dtypes: 1e-2


def differing_cells(V_donor: torch.Tensor, V_recipient: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The swapped cells (H, T) whose donor value differs from the recipient's: ||v_d - v_r||
    above ``NOOP_RTOL`` (by dtype) times ||v_r||, so that two computations of the same value in
    different batches count as the same. V_donor, V_recipient (H, T, D); C (H, T) swapped."""
    rtol = NOOP_RTOL.get(V_recipient.dtype, 1e-2)
    diff = (V_donor.float() - V_recipient.float()).norm(dim=-1)
    return C & (diff > rtol * V_recipient.float().norm(dim=-1))


def swap_edit(V_donor: torch.Tensor, C: torch.Tensor):
    """Edit: the values of cells C (B, H, T) replaced by the donor's V_donor (B, H, T, D);
    outputs change by A (V' - V) only where C is set (every other output is kept exactly)."""
    def edit(rec):
        T = rec.head_out.shape[1]
        Vd = V_donor[:, :, :T].to(device=rec.V.device, dtype=rec.V.dtype)
        dV = (Vd - rec.V) * C[:, :, :T].unsqueeze(-1).to(device=rec.V.device, dtype=rec.V.dtype)
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
    n_cells_differ: dict[str, np.ndarray] = field(default_factory=dict)   # ... at or after the
    #                                                                first difference (positions)
    n_cells_changed: dict[str, np.ndarray] = field(default_factory=dict)  # ... whose donor value
    #                                                                differs (data): 0 = a no-op
    mass: dict[str, np.ndarray] = field(default_factory=dict)      # condition -> (M,) final token's
    #                                                                attention on them (head mean)
    run: dict[str, int] = field(default_factory=dict)   # condition -> directed pairs run (the rest
    #                                                     are no-ops: every swapped value agrees)
    seconds: float = 0.0
    cpu: float = 0.0
    eps: float = D.EPS

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
    out = Swap(pairs.task, model.name, layer, head, source, min_queries, np.zeros(N2), directed,
               eps=eps)
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
                V[i], S[i] = rec.V[b, :, :n].cpu().clone(), Sb[b, :, :n].clone()
                A[i] = rec.A[b, :, n - 1, :n].double().cpu()    # (H, n) the final token's row
        r = extract.run(model, batch, loss=False, positions="last", vocab=list(pairs.answer_ids),
                        keep_resid=[] if layer is None else [layer], on_layer=keep)
        out.ld[idx] = (r.logits[:, 0, 0] - r.logits[:, 0, 1]).double().cpu().numpy()
        if layer is not None:
            for b, i in enumerate(idx):
                R[i] = r.resid[layer][b, :batch.lengths[b]].cpu().clone()
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
        ld = out.ld[[r for r, _ in directed]].copy()    # a no-op swap: no change
        out.n_cells[cond] = np.array([int(c.sum()) for c in Cs])
        out.n_cells_differ[cond] = np.array([int(c[:, f:].sum()) for c, f in zip(Cs, first)])
        out.n_cells_changed[cond] = np.array([int(differing_cells(V[d], V[r], C).sum())
                                              for (r, d), C in zip(directed, Cs)])
        out.mass[cond] = np.array([float((A[r] * C)[hs].sum(-1).mean()) for (r, _), C in zip(directed, Cs)])
        # a pair whose swapped values all agree with the donor's is a no-op: it is not run
        todo = sorted((j for j in range(M) if out.n_cells_changed[cond][j]),
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
                            start=(layer, _stack([R[i] for i in rs], T, 0).to(model.hf.device)))
            ld[js] = (r.logits[:, 0, 0] - r.logits[:, 0, 1]).double().cpu().numpy()
        out.swapped[cond] = ld
    out.seconds, out.cpu = time.time() - t0, cpu_seconds() - c0
    return out
