r"""Statistics of the probes' head selection (paper Sec. 4, Table 1): every head at once.

The paper trains three mass-mean probes in every head, picks the head with high theta_tag and
low theta_no_tag on the training split, and reports that head's test accuracies. Three
questions decide what such a number means, and this module answers them:

- does the chosen head's theta_tag beat its own theta_no_tag on the same test prompts? An exact
  McNemar test on the paired predictions (``ctr.stats.mcnemar``; the rules read its one-sided
  ``p_greater``), and against theta_activation for Table 1's other comparison;
- does the result depend on the split? Random 400/200 re-splits, the head re-selected on each,
  each with its own McNemar test;
- how much does picking the best of hundreds of heads give by itself? The whole select-then-test
  pipeline on labels shuffled within each split (the label-shuffle null). Selection inflates the
  chosen head's *training* accuracy; its test accuracy stays a fair draw around 50%.

The probe (``definitions.mass_mean_fit``) is run for all heads and for S labellings or splits
in one batched product, so re-splits and the null cost little more than one split.
Accuracies here are fractions; the summaries for the results file are in percent.
"""
from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ... import stats
from ...extract import one_thread

KINDS = ("tag", "no_tag", "activation")


def mass_mean_heads(X: torch.Tensor, Y, train) -> torch.Tensor:
    """The mass-mean probe of every head, for S labellings (or splits) at once.

    X (N, L, H, D) features of N prompts; Y (S, N) or (N,) labels (1 = true); train (S, N) or
    (N,) training masks. Per head and labelling: theta = mu_true - mu_false on the training
    prompts, true iff theta . x > theta . (mu_true + mu_false) / 2, as in
    ``definitions.mass_mean_fit``. Returns ``correct`` (S, N, L, H): prediction == label.
    """
    N, L, H, Dh = X.shape
    Y, train = torch.broadcast_tensors(torch.as_tensor(Y).bool().reshape(-1, N),
                                       torch.as_tensor(train).bool().reshape(-1, N))
    pos, neg = (Y & train).double(), (~Y & train).double()           # (S, N)
    if (pos.sum(1) == 0).any() or (neg.sum(1) == 0).any():
        raise ValueError("mass-mean probe needs both classes in the training split")
    W = torch.stack([pos / pos.sum(1, keepdim=True), neg / neg.sum(1, keepdim=True)], 1)
    Xh = X.to(torch.float64).reshape(N, L * H, Dh).transpose(0, 1)   # (LH, N, D)
    with one_thread():
        mu = torch.einsum("scn,knd->sckd", W, Xh)                    # (S, 2, LH, D) class means
        theta = mu[:, 0] - mu[:, 1]                                  # (S, LH, D)
        thr = (theta * (mu[:, 0] + mu[:, 1])).sum(-1) / 2            # (S, LH)
        score = torch.einsum("knd,skd->snk", Xh, theta)              # (S, N, LH)
    correct = (score > thr[:, None]) == Y[:, :, None]
    return correct.reshape(-1, N, L, H)


def accuracy(correct: torch.Tensor, mask) -> np.ndarray:
    """(S, N, L, H) correctness, (S, N) or (N,) prompt mask -> (S, L, H) accuracy on the mask."""
    m = torch.as_tensor(mask).bool().reshape(-1, correct.shape[1]).expand(correct.shape[:2])
    hits = (correct & m[..., None, None]).sum(1).double()
    return (hits / m.sum(1).double()[:, None, None]).numpy()


def head_accuracies(X: torch.Tensor, y, train) -> tuple[np.ndarray, np.ndarray]:
    """One split: train and test accuracy of every head's probe, (L, H) each."""
    c = mass_mean_heads(X, y, train)
    t = torch.as_tensor(train).bool()
    return accuracy(c, t)[0], accuracy(c, ~t)[0]


def _key(x: np.ndarray) -> np.ndarray:
    # accuracies are k / n; rounding makes equal gaps compare equal despite float error
    return np.round(np.asarray(x, float).ravel(), 9)


def select_head(train_tag: np.ndarray, train_notag: np.ndarray) -> tuple[int, int] | None:
    """The paper's rule, made exact and able to say no. Among heads whose training theta_tag is
    above their training theta_no_tag: the largest gap, then the higher theta_tag, then the lower
    (layer, head). None when no head qualifies."""
    gap, tag = _key(train_tag - train_notag), _key(train_tag)
    if not (gap > 0).any():
        return None
    i = np.lexsort((np.arange(gap.size), -tag, -gap))[0]
    return tuple(int(v) for v in divmod(int(i), train_tag.shape[1]))


def best_head(acc: np.ndarray) -> tuple[int, int]:
    """The head with the highest accuracy (ties: the lower (layer, head))."""
    a = _key(acc)
    i = np.lexsort((np.arange(a.size), -a))[0]
    return tuple(int(v) for v in divmod(int(i), acc.shape[1]))


def balanced_splits(y, n_train: int, k: int, seed: int = 0) -> torch.Tensor:
    """k random training masks (k, N), each with n_train / 2 prompts of each class (seeded)."""
    y = np.asarray(y).astype(bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if n_train % 2 or not 0 < n_train // 2 < min(len(pos), len(neg)):
        raise ValueError(f"cannot draw balanced splits of {n_train} training prompts from "
                         f"{len(pos)} true and {len(neg)} false ones")
    rng = np.random.default_rng(seed)
    out = np.zeros((k, len(y)), bool)
    for i in range(k):
        out[i, rng.permutation(pos)[:n_train // 2]] = True
        out[i, rng.permutation(neg)[:n_train // 2]] = True
    return torch.from_numpy(out)


def shuffled_labels(y, train, k: int, seed: int = 0) -> torch.Tensor:
    """k label vectors (k, N): y permuted within the training and within the test prompts, so
    each split keeps its class balance and only the link between features and labels breaks."""
    y, train = np.asarray(y).astype(bool), np.asarray(train).astype(bool)
    rng = np.random.default_rng(seed)
    out = np.repeat(y[None], k, 0)
    for part in (np.flatnonzero(train), np.flatnonzero(~train)):
        for i in range(k):
            out[i, part] = y[rng.permutation(part)]
    return torch.from_numpy(out)


def paired(correct: dict[str, torch.Tensor], mask, head) -> dict:
    """McNemar of the head's theta_tag against its theta_no_tag on the prompts of ``mask`` (and
    against theta_activation when ``correct`` has it): ``correct`` maps a kind to (N, L, H)."""
    l, h = head
    m = torch.as_tensor(mask).bool()
    t = correct["tag"][m, l, h].numpy()
    r = stats.mcnemar(t, correct["no_tag"][m, l, h].numpy())
    out = {"mcnemar": {"only_tag": r["only_a"], "only_no_tag": r["only_b"], "n": r["n"],
                       "p": r["p"], "p_greater": r["p_greater"], "p_less": r["p_less"]}}
    if "activation" in correct:
        a = stats.mcnemar(t, correct["activation"][m, l, h].numpy())
        out["tag_vs_activation"] = {"only_tag": a["only_a"], "only_activation": a["only_b"],
                                    "n": a["n"], "p": a["p"], "p_greater": a["p_greater"],
                                    "p_less": a["p_less"]}
    return out


def select_then_test(correct: dict[str, torch.Tensor], train) -> list[dict]:
    """The paper's pipeline on S splits: ``correct`` maps a kind ("tag", "no_tag", ...) to its
    (S, N, L, H) correctness. Per split: the head the rule picks on the training prompts (None
    when none qualifies), its train and test accuracies per kind, and the one-sided McNemar p
    of theta_tag > theta_no_tag on that split's test prompts (``p_greater``)."""
    S, N = next(iter(correct.values())).shape[:2]
    tr_mask = torch.as_tensor(train).bool().reshape(-1, N).expand(S, N)
    tr = {k: accuracy(c, tr_mask) for k, c in correct.items()}
    te = {k: accuracy(c, ~tr_mask) for k, c in correct.items()}
    out = []
    for s in range(S):
        head = select_head(tr["tag"][s], tr["no_tag"][s])
        row: dict = {"head": head}
        if head is not None:
            for k in correct:
                row[f"train_{k}"], row[f"test_{k}"] = float(tr[k][s][head]), float(te[k][s][head])
            pr = paired({k: c[s] for k, c in correct.items()}, ~tr_mask[s], head)
            row["p_greater"] = pr["mcnemar"]["p_greater"]
        out.append(row)
    return out


def _above(a: float, b: float) -> bool:
    return bool(_key(a)[0] > _key(b)[0])       # equal accuracies (k / n) compare equal


def resplit_summary(rows: list[dict], main_head=None, alpha: float = 0.05) -> dict:
    """Over the re-splits (percent): mean, standard deviation and range of the chosen head's test
    accuracies over those with a head; the counts the rules use (RULES.md, semantic probes):
    ``n_pass`` theta_tag > theta_no_tag with one-sided McNemar p < alpha; ``n_tag_le_no_tag``
    theta_tag <= theta_no_tag, a re-split with no selectable head counted here too (there every
    head's training theta_tag is at most its theta_no_tag); ``n_tag_ge_activation`` theta_tag >=
    theta_activation (ties count for the tag; no head: not counted); and how stable the choice
    is."""
    sel = [r for r in rows if r["head"] is not None]
    out: dict = {"n": len(rows), "n_selected": len(sel), "n_no_head": len(rows) - len(sel)}
    kinds = [k[5:] for k in (sel[0] if sel else {}) if k.startswith("test_")]
    for k in kinds:
        v = 100 * np.array([r[f"test_{k}"] for r in sel])
        sd = v.std(ddof=1) if len(v) > 1 else 0.0
        for stat, x in (("mean", v.mean()), ("sd", sd), ("min", v.min()), ("max", v.max())):
            out[f"theta_{k}_{stat}"] = round(float(x), 2)
    out["n_pass"] = int(sum(_above(r["test_tag"], r["test_no_tag"]) and r["p_greater"] < alpha
                            for r in sel))
    out["n_tag_le_no_tag"] = out["n_no_head"] + int(sum(
        not _above(r["test_tag"], r["test_no_tag"]) for r in sel))
    if "activation" in kinds:
        out["n_tag_ge_activation"] = int(sum(not _above(r["test_activation"], r["test_tag"])
                                             for r in sel))
    out["splits"] = [None if r["head"] is None else
                     {"head": list(r["head"]), "p_greater": r["p_greater"],
                      **{f"theta_{k}": round(100 * r[f"test_{k}"], 2) for k in kinds}}
                     for r in rows]
    heads = [tuple(r["head"]) for r in sel]
    out["heads"] = [list(h) for h in heads]
    if heads:
        (modal, count), = Counter(heads).most_common(1)
        out["modal_head"], out["modal_count"] = list(modal), count
        out["same_as_main"] = sum(h == tuple(main_head) for h in heads) if main_head else 0
    return out


def null_summary(rows: list[dict]) -> dict:
    """The label-shuffle null of the pipeline (percent): what selection alone gives. One split
    (the main one) with shuffled labels: it leaves out the split-to-split spread that the
    re-split mean averages over, so its 95th percentile is a conservative bar for that mean."""
    sel = [r for r in rows if r["head"] is not None]
    out: dict = {"n": len(rows), "n_selected": len(sel)}
    for key, name in (("test_tag", "theta_tag"), ("train_tag", "train_theta_tag"),
                      ("test_no_tag", "theta_no_tag")):
        v = 100 * np.array([r[key] for r in sel]) if sel else np.array([np.nan])
        out[f"{name}_mean"] = round(float(v.mean()), 2)
        out[f"{name}_p95"] = round(float(np.quantile(v, 0.95)), 2)
    return out


def chance_level(n: int, p: float = 0.05) -> float:
    """Smallest accuracy on n balanced test prompts that a coin reaches with probability < p
    (one head; the label-shuffle null is the bar for a head chosen among many)."""
    tail, k = 0.0, n
    while k >= 0:
        tail += math.comb(n, k) / 2 ** n
        if tail >= p:
            return (k + 1) / n
        k -= 1
    return 0.0


def logistic(Xtr: torch.Tensor, ytr: torch.Tensor, Xte: torch.Tensor, yte: torch.Tensor,
             C: float = 1.0) -> float:
    """Standardised L2 logistic regression (scikit-learn, lbfgs: deterministic); test accuracy.
    A baseline that can use every direction, not only the difference of the class means."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
    clf.fit(Xtr.double().numpy(), ytr.numpy())
    return float((clf.predict(Xte.double().numpy()) == yte.numpy()).mean())


def _pct(x):
    return None if x is None else round(100 * float(x), 2)


@dataclass
class Selection:
    """One protocol (one tail guard): every head's probes on the main split, the chosen head,
    the comparison heads, and the statistics of the selection."""
    train: dict[str, np.ndarray]      # kind -> (L, H) training accuracy, main split
    test: dict[str, np.ndarray]       # kind -> (L, H) test accuracy
    correct: dict[str, torch.Tensor]  # kind -> (N, L, H) prediction == label, main split
    head: tuple[int, int] | None      # the rule's head; None: no head satisfies the rule
    best_tag: tuple[int, int]         # highest training theta_tag, whatever its theta_no_tag
    best_activation: tuple[int, int] | None   # highest training theta_activation
    mcnemar: dict | None              # chosen head, test prompts: tag vs no_tag (exact, paired)
    resplits: dict | None             # resplit_summary, or None when not run
    null: dict | None                 # null_summary, or None when not run
    tag_vs_activation: dict | None = None   # chosen head, test prompts: tag vs activation
    n_test: int = 0

    def summary(self) -> dict:
        """What the verdict rules read (accuracies in percent; layer, head and accuracies None
        when no head satisfies the rule)."""
        head = self.head
        out = {"n_test": self.n_test, "selected": head is not None,
               "layer": head[0] if head else None, "head": head[1] if head else None}
        for k in self.test:
            out[f"theta_{k}"] = _pct(self.test[k][head]) if head else None
            out[f"train_theta_{k}"] = _pct(self.train[k][head]) if head else None
        best = [("best_tag", self.best_tag, "tag")]
        if self.best_activation is not None:
            best.append(("best_activation", self.best_activation, "activation"))
        for name, (bl, bh), k in best:
            out[name] = {"layer": bl, "head": bh, f"theta_{k}": _pct(self.test[k][bl, bh]),
                         f"train_theta_{k}": _pct(self.train[k][bl, bh]),
                         "theta_no_tag": _pct(self.test["no_tag"][bl, bh])}
        gap = np.round(self.train["tag"] - self.train["no_tag"], 9)
        # copies: the Holm step writes its p_adj into the summary, never into the selection
        out.update(mcnemar=copy.deepcopy(self.mcnemar),
                   tag_vs_activation=copy.deepcopy(self.tag_vs_activation),
                   resplits=copy.deepcopy(self.resplits), null=copy.deepcopy(self.null),
                   heads_above_diagonal=int((gap > 0).sum()), n_heads=int(gap.size))
        return out


def select(X: dict[str, torch.Tensor], y, train, resplit_masks=None, null_labels=None,
           alpha: float = 0.05) -> Selection:
    """Probes of every head on the main split, the rule's head, McNemar (tag vs no-tag and tag
    vs activation), re-splits and null.

    X: kind -> (N, L, H, D) features; ``resplit_masks`` (k, N) training masks for the
    re-splits; ``null_labels`` (k, N) shuffled labels, tested on the main split."""
    y, train = torch.as_tensor(y).bool(), torch.as_tensor(train).bool()
    c = {k: mass_mean_heads(x, y, train)[0] for k, x in X.items()}
    tr = {k: accuracy(v[None], train)[0] for k, v in c.items()}
    te = {k: accuracy(v[None], ~train)[0] for k, v in c.items()}
    head = select_head(tr["tag"], tr["no_tag"])
    pr = paired(c, ~train, head) if head is not None else {}
    rs = nl = None
    if resplit_masks is not None and len(resplit_masks):
        rows = select_then_test({k: mass_mean_heads(x, y, resplit_masks) for k, x in X.items()},
                                resplit_masks)
        rs = resplit_summary(rows, head, alpha)
    if null_labels is not None and len(null_labels):
        rows = select_then_test({k: mass_mean_heads(X[k], null_labels, train)
                                 for k in ("tag", "no_tag")}, train)
        nl = null_summary(rows)
    return Selection(tr, te, c, head, best_head(tr["tag"]),
                     best_head(tr["activation"]) if "activation" in tr else None,
                     pr.get("mcnemar"), rs, nl, pr.get("tag_vs_activation"),
                     int((~train).sum()))
