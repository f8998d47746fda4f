"""The verdict vocabulary and the rules shared by every chapter.

A verdict is a rule applied to a measurement with its interval:

- **reproduced**: the whole 95% interval lies where the paper's claim puts it;
- **compatible (underpowered)**: the interval holds values that support the claim and values
  that contradict it (more data could go either way);
- **partly**: a claim with several parts, some reproduced and some not;
- **not reproduced**: the whole interval lies where the claim is false;
- **not testable here**: nothing here can measure it (no such head, no such model, too few pairs).

The rules are the pre-registered ones of ``RULES.md`` (a copy of the project's rules file, at the
repository root; the scorecard names the commit it applied). Each chapter implements its rules as
functions that return one of these words, and tests each function on fabricated results and on
its real measurement code run on a constructed case, for every outcome it can return.

The General part of RULES.md lives here: ``parts`` (two-part claims), ``combine`` (across
models), ``by_bootstrap`` (the 20-prompt floor), and the row format, whose optional fields carry
the settings, the raw and Holm-adjusted p, the parts of a claim, and the "alternative reading,
not pre-registered" mark.
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
# Optional fields of a row (RULES.md, General): the eps / min_queries it was measured with; the
# choice the paper leaves open that the verdict depends on; raw and Holm-adjusted p; the parts'
# verdicts of a two-part claim; a note (e.g. the constant-value-tag flag); whether the row is
# the pre-registered rule or an alternative reading of ours; a headline (the decisive number
# with its interval in one short line, for the front page's table).
EXTRAS = ("settings", "choice", "p_raw", "p_adj", "parts", "note", "reading", "headline")
PREREGISTERED = "pre-registered"
ALTERNATIVE = "alternative reading, not pre-registered"


def check(v: str) -> str:
    if v not in VERDICTS:
        raise ValueError(f"unknown verdict {v!r}; use one of: {', '.join(VERDICTS)}")
    return v


def _bad(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def by_interval(lo: float | None, hi: float | None, low: float = -math.inf,
                high: float = math.inf, strict: bool = False) -> str:
    """The claim "the quantity lies in [low, high]", judged on its interval [lo, hi].
    ``strict``: RULES.md's "CI > x" / "CI < x", the whole interval strictly beyond the bound
    (an interval that touches it, e.g. [0, 0] against 0, is compatible)."""
    if _bad(lo) or _bad(hi):
        return UNTESTABLE
    if lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] is reversed")
    inside = (low < lo and hi < high) if strict else (low <= lo and hi <= high)
    if inside:
        return REPRODUCED
    if hi < low or lo > high:
        return NOT
    return COMPATIBLE


def by_bootstrap(lo: float | None, hi: float | None, n_units: int, low: float = -math.inf,
                 high: float = math.inf, min_units: int = 20, strict: bool = False) -> str:
    """``by_interval`` on a bootstrap interval over prompts: fewer than ``min_units`` (20)
    contributing prompts is not testable here (RULES.md, Intervals)."""
    if n_units < min_units:
        return UNTESTABLE
    return by_interval(lo, hi, low, high, strict)


def parts(*verdicts: str) -> str:
    """A claim with several parts ("A and B"), each judged by its own rule (RULES.md, General):
    any part not testable -> not testable here; all reproduced -> reproduced; some not
    reproduced and the rest reproduced -> partly; not reproduced beside a compatible part, or all
    not reproduced -> not reproduced; otherwise compatible (underpowered). A part that is itself
    "partly" makes the claim partly (unless a part is not testable)."""
    vs = [check(v) for v in verdicts]
    if not vs or UNTESTABLE in vs:
        return UNTESTABLE
    if all(v == REPRODUCED for v in vs):
        return REPRODUCED
    if NOT in vs:
        if COMPATIBLE in vs or all(v == NOT for v in vs):
            return NOT
        return PARTLY
    if PARTLY in vs:
        return PARTLY
    return COMPATIBLE


def all_of(*verdicts: str) -> str:
    """Alias of ``parts``: a claim made of several parts."""
    return parts(*verdicts)


def combine(verdicts) -> str:
    """One claim over several models (RULES.md, Across models): reproduced (not reproduced) when
    every model that could test it says so; not testable here when none could; partly when the
    models disagree (one reproduced and another not, or a model's own verdict is partly);
    compatible (underpowered) otherwise (every other mix with an underpowered model)."""
    vs = [check(v) for v in verdicts]
    tested = [v for v in vs if v != UNTESTABLE]
    if not tested:
        return UNTESTABLE
    if all(v == REPRODUCED for v in tested):
        return REPRODUCED
    if all(v == NOT for v in tested):
        return NOT
    if PARTLY in tested or (REPRODUCED in tested and NOT in tested):
        return PARTLY
    return COMPATIBLE


def agree(verdicts, overall: str) -> int:
    """How many models' own verdicts equal the claim's overall verdict."""
    return sum(1 for v in verdicts if v == overall)


def interval(lo, hi, fmt: str = "{:.2f}", what: str = "95% CI") -> str:
    if _bad(lo) or _bad(hi):
        return "-"
    return f"{what} [{fmt.format(lo)}, {fmt.format(hi)}]"


def row(id: str, model: str, claim: str, paper: str, ours: str, interval: str, rule: str,
        verdict: str, **extras) -> dict:
    """One line of a chapter's paper / ours / verdict table (and of the scorecard).

    ``extras`` (all optional, see ``EXTRAS``): headline="gain +0.12 [+0.08, +0.15]",
    settings="eps 0.2, min_queries 16", choice=...,
    p_raw=..., p_adj=..., parts={"in range": verdict, ...}, note=..., and
    reading=ALTERNATIVE for a row that is our reading, not the pre-registered rule (its id must
    end in "_alt" so the scorecard never merges it with the rule's row)."""
    unknown = set(extras) - set(EXTRAS)
    if unknown:
        raise ValueError(f"unknown row fields {sorted(unknown)}; use {', '.join(EXTRAS)}")
    reading = extras.pop("reading", PREREGISTERED)
    if reading not in (PREREGISTERED, ALTERNATIVE):
        raise ValueError(f"reading must be {PREREGISTERED!r} or {ALTERNATIVE!r}")
    if (reading == ALTERNATIVE) != id.endswith("_alt"):
        raise ValueError(f"row {id!r}: an alternative reading's id ends in '_alt', and only its")
    if "parts" in extras:
        extras["parts"] = {k: check(v) for k, v in extras["parts"].items()}
    return {"id": id, "model": model, "claim": claim, "paper": paper, "ours": ours,
            "interval": interval, "rule": rule, "verdict": check(verdict), "reading": reading,
            **extras}
