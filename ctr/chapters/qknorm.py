"""Sinks with and without QK-norm (paper Sec. 6): the numbers, reused where they exist.

QK-norm is read from the modules (``Model.qk_norm``: the attention normalises queries and keys
with ``q_norm``/``k_norm``), never from a model's name. The sink and VE statistics are the
variance chapter's, and the truth probes the probes chapter's, on the same prompts: when their
results files hold a model with the same parameters they are reused, otherwise this module runs
the same code for that model (``reuse``). The rules that judge the paper's two claims follow.
"""
from __future__ import annotations

import gc

import numpy as np

from .. import arch, stats
from .. import verdicts as V
from .. import models as M


def detect(name: str) -> dict:
    m = M.load(name)
    where = arch.arch_of(m.config)
    a = arch.getpath(arch.getpath(m.hf, where.layers)[0], where.attn)
    out = {"model": name, "architecture": m.architecture, "qk_norm": m.qk_norm,
           "evidence": (f"{type(a).__name__} has q_norm={type(a.q_norm).__name__}, "
                        f"k_norm={type(a.k_norm).__name__}") if m.qk_norm
           else f"{type(a).__name__} has no q_norm / k_norm"}
    del m
    gc.collect()
    return out


# --- the rules -----------------------------------------------------------------------------------

RATIO = 0.8     # "not reduced": at least 80% of the sinks per head of the models without QK-norm


def sinks_ratio(qk: list[float], others: list[list[float]], n_boot: int = 1000,
                seed: int = 0) -> tuple[float, float, float]:
    """Sinks per head of a QK-norm model over the mean of the models without it, on the same
    prompts (per-prompt values), with a 95% bootstrap interval over prompts."""
    units = np.c_[np.asarray(qk), np.mean(np.asarray(others), axis=0)]
    ratio = lambda u: u[:, 0].mean() / u[:, 1].mean()  # noqa: E731
    return (float(ratio(units)), *stats.bootstrap(units, ratio, n_boot, seed))


def rule_not_reduced(lo, hi, ratio: float = RATIO) -> str:
    """QK-norm does not reduce sink counts: the ratio's interval lies at or above 0.8."""
    return V.by_interval(lo, hi, ratio)


def rule_mechanism(beats_random: tuple, probe_verdict: str) -> str:
    """The mechanism is present under QK-norm: its tags explain more than random subspaces
    (interval above 0) and the truth of a statement is carried by a tag (the probes chapter's
    verdict under the paper's protocol)."""
    return V.all_of(V.by_interval(*beats_random, low=0.0), probe_verdict)
