"""Results files (one JSON per chapter) and the paper's numbers.

Chapters write their key numbers with ``save(name, data, results_dir)``; later chapters and the
scorecard read them with ``load``. Writes are atomic (temporary file, then rename), so a chapter
that fails half-way leaves the previous complete file, never a truncated one.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import yaml


class MissingResults(FileNotFoundError):
    pass


def _clean(x):
    """JSON-safe: numpy/torch scalars to Python, NaN to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "tolist"):
        return _clean(x.tolist())
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class ResultsDirError(OSError):
    pass


def check_dir(results_dir) -> Path:
    """The results directory exists (or can be made) and can be written; one clear error if not."""
    d = Path(results_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=d, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ResultsDirError(f"cannot write results to {d} ({e.strerror or e}): pass a results_dir "
                              "you can write to (chapters: results_dir=...)") from e
    return d


def save(name: str, data: dict, results_dir) -> Path:
    path = check_dir(results_dir) / f"{name}.json"
    write_atomic(path, json.dumps(_clean(data), indent=1, sort_keys=True))
    return path


def load(name: str, results_dir) -> dict:
    path = Path(results_dir) / f"{name}.json"
    if not path.exists():
        raise MissingResults(f"no results file {path}: run the {name!r} chapter first "
                             f"(make chapter NAME={name})")
    return json.loads(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def paper() -> dict:
    """The paper's reported numbers (ctr/paper_numbers.yaml)."""
    return yaml.safe_load((Path(__file__).with_name("paper_numbers.yaml")).read_text())
