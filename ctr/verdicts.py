"""The verdict vocabulary and the rules shared by every chapter.

A verdict is a rule applied to a measurement with its interval:

- **reproduced**: the whole 95% interval lies where the paper's claim puts it;
- **compatible (underpowered)**: the interval holds values that support the claim and values
  that contradict it (more data could go either way);
- **partly**: a claim with several parts, some reproduced and some not;
- **not reproduced**: the whole interval lies where the claim is false;
- **not testable here**: nothing here can measure it (no such head, no such model, too few pairs).

Each chapter states its rules in prose, implements them as functions that return one of these
words, and tests each function on fabricated results for every outcome it can return.
"""
from __future__ import annotations

import math

REPRODUCED = "reproduced"
COMPATIBLE = "compatible (underpowered)"
PARTLY = "partly"
NOT = "not reproduced"
UNTESTABLE = "not testable here"
VERDICTS = (REPRODUCED, COMPATIBLE, PARTLY, NOT, UNTESTABLE)

COLUMNS = ("id", "model", "claim", "paper", "ours", "interval", "rule", "verdict")


def check(v: str) -> str:
    if v not in VERDICTS:
        raise ValueError(f"unknown verdict {v!r}; use one of: {', '.join(VERDICTS)}")
    return v


def _bad(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def by_interval(lo: float | None, hi: float | None, low: float = -math.inf,
                high: float = math.inf) -> str:
    """The claim "the quantity lies in [low, high]", judged on its interval [lo, hi]."""
    if _bad(lo) or _bad(hi):
        return UNTESTABLE
    if lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] is reversed")
    if low <= lo and hi <= high:
        return REPRODUCED
    if hi < low or lo > high:
        return NOT
    return COMPATIBLE


def all_of(*parts: str) -> str:
    """A claim made of several parts, each with its own verdict (same rule as `combine`)."""
    return combine(parts)


def combine(verdicts) -> str:
    """One claim over several models: the models that could test it decide."""
    vs = [check(v) for v in verdicts]
    tested = [v for v in vs if v != UNTESTABLE]
    if not tested:
        return UNTESTABLE
    if all(v == REPRODUCED for v in tested):
        return REPRODUCED
    if all(v == NOT for v in tested):
        return NOT
    if all(v in (REPRODUCED, COMPATIBLE) for v in tested):
        return COMPATIBLE
    return PARTLY


def interval(lo, hi, fmt: str = "{:.2f}", what: str = "95% CI") -> str:
    if _bad(lo) or _bad(hi):
        return "-"
    return f"{what} [{fmt.format(lo)}, {fmt.format(hi)}]"


def row(id: str, model: str, claim: str, paper: str, ours: str, interval: str, rule: str,
        verdict: str) -> dict:
    """One line of a chapter's paper / ours / verdict table (and of the scorecard)."""
    return {"id": id, "model": model, "claim": claim, "paper": paper, "ours": ours,
            "interval": interval, "rule": rule, "verdict": check(verdict)}
