"""The pre-registered verdict rules, read from ``RULES.md`` at the repository root.

RULES.md was written before the numbers it judges (a verbatim copy of the project's rules file;
``tests/test_rules.py`` checks the copy). Chapters show each rule's own text beside its verdict
by asking this module for it, so the words on a page cannot drift from the file, and the
scorecard names the commit of RULES.md it applied (``commit``).

Rule ids are the file's claim ids. A table cell may name several ids ("tags_lm_mid,
tags_lm_specific"), a pattern ("swap_*", "*_tag_*") or a placeholder ("success_init_k" for
success_init_10, _6, _1); anything in parentheses after the id is a remark, not part of it.
"""
from __future__ import annotations

import fnmatch
import hashlib
import re
import subprocess
from functools import lru_cache
from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "RULES.md"


class UnknownRule(KeyError):
    pass


def _ids(cell: str) -> list[str]:
    head = re.split(r"\s*\(", cell, maxsplit=1)[0]
    return [i.strip() for i in head.split(",") if i.strip()]


@lru_cache(maxsize=4)
def _parse(text: str) -> list[dict]:
    out, section, header = [], None, None
    for line in text.splitlines():
        if line.startswith("## "):
            section, header = line[3:].strip(), None
            continue
        if not line.startswith("| ") or set(line.replace("|", "").strip()) <= {"-", " "}:
            if not line.startswith("|"):
                header = None
            continue
        # Cells are separated by " | "; a bare "|s_tag|" inside a cell is not a separator.
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if len(cells) != len(header):
            raise ValueError(f"RULES.md, section {section!r}: a row has {len(cells)} cells, the "
                             f"header {len(header)}: {line[:60]}...")
        rec = dict(zip(header, cells))
        for i in _ids(rec["id"]):
            out.append({"id": i, "section": section, "measurement": rec.get("measurement", ""),
                        "rule": rec["rule"], "cell": rec["id"]})
    return out


def table(path: Path = PATH) -> list[dict]:
    """Every rule row of the file: id, section, measurement ("" where the table has none), rule."""
    return _parse(Path(path).read_text(encoding="utf-8"))


def _match(pattern: str, claim_id: str) -> bool:
    if "*" in pattern:
        return fnmatch.fnmatchcase(claim_id, pattern)
    if pattern.endswith("_k"):
        return bool(re.fullmatch(re.escape(pattern[:-2]) + r"_\d+", claim_id))
    return claim_id == pattern


def get(claim_id: str, path: Path = PATH) -> dict:
    """The rule row for ``claim_id``: the exact id first, then patterns, then a rule id followed
    by a suffix (a per-task row, "tag_vs_activation_cities"). Alternative readings ("<id>_alt")
    have no rule in the file: asking for one is an error."""
    rows = table(path)
    exact = [r for r in rows if r["id"] == claim_id]
    hits = exact or [r for r in rows if _match(r["id"], claim_id)]
    if not hits:        # a per-task row of one rule: "tag_vs_activation_cities"
        hits = sorted((r for r in rows if "*" not in r["id"] and not claim_id.endswith("_alt")
                       and claim_id.startswith(r["id"] + "_")), key=lambda r: -len(r["id"]))
    if not hits:
        raise UnknownRule(f"no rule for claim id {claim_id!r} in {Path(path).name}; ids: "
                          + ", ".join(r["id"] for r in rows))
    return hits[0]


REFERS = ("same rule", "the same ordered rule")


def text(claim_id: str, path: Path = PATH) -> str:
    """The rule's words for ``claim_id``, as RULES.md writes them (Markdown). A rule written as
    "same rule" / "the same ordered rule" gets the words of the rule it refers to (the nearest
    row above it in its section) after it."""
    r = get(claim_id, path)
    if r["rule"] not in REFERS:
        return r["rule"]
    rows = [x for x in table(path) if x["section"] == r["section"]]
    above = rows[:rows.index(r)]
    base = next(x for x in reversed(above) if x["rule"] not in REFERS)
    return f"{r['rule']} as {base['id']}: {base['rule']}"


def measurement(claim_id: str, path: Path = PATH) -> str:
    """The measurement column of the rule's row ("" where the section's table has none)."""
    return get(claim_id, path)["measurement"]


def commit(path: Path = PATH) -> str:
    """The git commit that last changed RULES.md (short hash), and the first 12 hex digits of
    the file's SHA-256, so a copy without git history still names the version it applied."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    try:
        h = subprocess.run(["git", "log", "-1", "--format=%h", "--", Path(path).name],
                           cwd=Path(path).parent, capture_output=True, text=True, timeout=10)
        rev = h.stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", Path(path).name],
                               cwd=Path(path).parent, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "", False
    rev = rev + ("+uncommitted" if rev and dirty else "")
    return f"{rev or 'no git'} (sha256 {digest})"
