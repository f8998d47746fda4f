"""Results files (one JSON per chapter) and the paper's numbers.

Chapters write their key numbers with ``save(name, data, results_dir)``; later chapters and the
scorecard read them with ``load``. Writes are atomic (temporary file, then rename).

Under the book's runner (``python -m ctr.book``, ``make chapter``) a chapter's kernel runs with
two environment variables the runner sets:

- ``CTR_RESULTS_STAGE``: ``save`` writes there instead of ``results_dir``; the runner moves the
  file into the book's results only when the whole notebook succeeded, together with the executed
  notebook (a chapter that fails after saving leaves the previous results file as it was).
  ``load`` still reads ``results_dir`` (the book's results), except a file this run saved.
- ``CTR_BOOK_TRACE``: every results file ``load`` reads (or finds missing) and every top-level
  section of the paper's numbers the run reads is appended there, with a digest of what was read,
  so the chapter re-runs exactly when one of them changes (``ctr.book.cache``). A page that
  loads ``timings`` (the run time of every chapter) re-runs when another chapter's entry changes;
  its own entry, which its own run rewrites, is left out (``read_digest``).

The book's results directory holds a marker file (``BOOK_MARKER``); ``save`` refuses to write
into it from anywhere but the runner, so a notebook run by hand (papermill, Jupyter) never
replaces a result the book shows.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import yaml

STAGE = "CTR_RESULTS_STAGE"
TRACE = "CTR_BOOK_TRACE"
CHAPTER = "CTR_BOOK_CHAPTER"       # the chapter the runner is running
TIMINGS = "timings"                # timings.json: every chapter's run time (the runner's)
BOOK_MARKER = ".ctr-book-results"
_UMASK = os.umask(0)
os.umask(_UMASK)


class MissingResults(FileNotFoundError):
    pass


def digest(data) -> str:
    """The short digest the book's cache keys use (bytes, or any JSON-able value)."""
    if not isinstance(data, bytes):
        data = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _trace(kind: str, name: str, value: str) -> None:
    path = os.environ.get(TRACE)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "name": name, "digest": value}) + "\n")


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
        os.chmod(tmp, 0o666 & ~_UMASK)      # as an ordinary new file (mkstemp makes it 0600)
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
    """Write ``<results_dir>/<name>.json`` (under the runner: into its staging directory)."""
    return save_text(f"{name}.json", json.dumps(_clean(data), indent=1, sort_keys=True),
                     results_dir)


def save_text(filename: str, text: str, results_dir) -> Path:
    """Write ``<results_dir>/<filename>`` as ``save`` does: under the runner into its staging
    directory (moved into the book with the rest when the chapter succeeded), never straight
    into the book's results."""
    stage = os.environ.get(STAGE)
    if stage:
        results_dir = stage
    elif (Path(results_dir) / BOOK_MARKER).exists():
        raise ResultsDirError(
            f"{Path(results_dir).resolve()} holds the book's results, which only `make chapter` "
            "or `python -m ctr.book` write (when the whole chapter succeeded): pass another "
            "results_dir (papermill: -p results_dir /tmp/results)")
    path = check_dir(results_dir) / filename
    write_atomic(path, text)
    return path


def load(name: str, results_dir) -> dict:
    """``<results_dir>/<name>.json`` as a dict (under the runner, a file this run saved first)."""
    path = Path(results_dir) / f"{name}.json"
    stage = os.environ.get(STAGE)
    if stage and (Path(stage) / f"{name}.json").exists():
        path = Path(stage) / f"{name}.json"
    if not path.exists():
        _trace("results", name, "missing")
        raise MissingResults(f"no results file {path}: run the {name!r} chapter first "
                             f"(make chapter NAME={name})")
    raw = path.read_bytes()
    _trace("results", name, read_digest(name, raw, os.environ.get(CHAPTER)))
    return json.loads(raw.decode("utf-8"))


def read_digest(name: str, raw: bytes, reader: str | None = None) -> str:
    """The digest of a results file as chapter ``reader`` depends on it: its bytes, except for
    ``timings``, whose entry for the reader itself is left out."""
    if name != TIMINGS:
        return digest(raw)
    data = json.loads(raw.decode("utf-8"))
    return digest({k: v for k, v in data.items() if k != reader})


class _Paper(dict):
    """The paper's numbers; reading a top-level section records it in the run's trace."""

    def __init__(self, data: dict):
        super().__init__(data)
        self._seen: set[str] = set()

    def _read(self, key):
        if key in self and key not in self._seen:
            self._seen.add(key)
            _trace("paper", key, digest(dict.__getitem__(self, key)))

    def __getitem__(self, key):
        self._read(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self._read(key)
        return dict.get(self, key, default)

    def _all(self):
        for k in dict.keys(self):
            self._read(k)

    def __iter__(self):
        self._all()
        return dict.__iter__(self)

    def keys(self):
        self._all()
        return dict.keys(self)

    def values(self):
        self._all()
        return dict.values(self)

    def items(self):
        self._all()
        return dict.items(self)

    def copy(self):
        self._all()
        return dict(dict.items(self))


_PAPER: dict | None = None


def paper_path() -> Path:
    """ctr/paper_numbers.yaml (``CTR_PAPER_NUMBERS``: another copy of it, as the tests use)."""
    return Path(os.environ.get("CTR_PAPER_NUMBERS") or Path(__file__).with_name("paper_numbers.yaml"))


def paper() -> dict:
    """The paper's reported numbers (ctr/paper_numbers.yaml), read once per process."""
    global _PAPER
    if _PAPER is None:
        _PAPER = _Paper(yaml.safe_load(paper_path().read_text()))
    return _PAPER


def paper_sections(names, path: Path | None = None) -> dict:
    """The digest of each named top-level section of the paper's numbers as they are now
    ("missing" for a section no longer there): what a chapter's key compares with its trace."""
    data = yaml.safe_load(Path(path or paper_path()).read_text()) or {}
    return {n: digest(data[n]) if n in data else "missing" for n in sorted(names)}
