"""When a chapter must re-run: its key, recorded beside its executed notebook (``<name>.key.json``).

A chapter re-executes only when something it depends on changed; otherwise its page is rebuilt
from the source's prose and tags and the recorded outputs (``merge``). The parts of a key:

- ``code``: the source of its code cells, in order (prose, tags and outputs are left out: a prose
  or tag edit re-renders the page from the recorded outputs, it does not re-execute);
- ``params``: the parameters the runner passes (``results_dir`` left out: a place, not an input);
- ``modules``: per file, every ``ctr`` module the notebook imports and the data files they open
  (``deps``). Per module: editing ``ctr/chapters/toy_theory/__init__.py`` re-runs only the chapters whose
  imports reach it;
- ``paper``: per top-level section, the paper's numbers the run read (``ctr.results`` traces
  ``paper()``): a number edited in ``toy`` re-runs the chapters that read ``toy``, no other;
- ``results``: per file, the other chapters' results it read, by content: the ones its code names
  (``deps.loaded_results``) and every one the run loaded (traced), a missing one included;
- ``models``: the models it loads, "default"/"installed" resolved to the names they mean here, and
  each model's files by content (``fingerprint``): ``touch`` re-runs nothing, new weights do;
- ``versions``: Python and the installed version of every package in ``requirements.txt``.

The traced parts come from the last run; code, modules and parameters cannot change without a
re-run, so the same run reads the same files again (a dependency file in the manner of make).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import nbformat

from ..results import digest, paper_sections, read_digest, write_atomic
from . import deps, fingerprint
from .deps import PKG_ROOT

PARTS = ("code", "params", "modules", "paper", "results", "models", "versions")


def code_cells(nb) -> list[str]:
    """The code a run executes (the injected-parameters cell papermill adds is not source)."""
    return [c.source for c in nb.cells if c.cell_type == "code"
            and "injected-parameters" not in c.metadata.get("tags", [])]


def versions(pkg_root: Path = PKG_ROOT) -> dict:
    import importlib.metadata as md

    req = pkg_root / "requirements.txt"
    names = [l.split("#")[0].split("==")[0].split(">=")[0].strip()
             for l in req.read_text().splitlines()] if req.exists() else ["torch", "transformers",
                                                                            "nnsight", "papermill"]
    out = {"python": platform.python_version()}
    for n in filter(None, names):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = "not installed"
    return out


def _results(names, results_dir: Path, reader: str) -> dict:
    return {r: (read_digest(r, (results_dir / f"{r}.json").read_bytes(), reader)
                if (results_dir / f"{r}.json").exists() else "missing") for r in sorted(names)}


def _seal(k: dict) -> dict:
    k["digest"] = digest({p: k[p] for p in PARTS})
    return k


def key(name: str, params: dict, source_nb, results_dir: Path, defaults: dict | None = None,
        pkg_root: Path = PKG_ROOT, recorded: dict | None = None,
        hashes: fingerprint.Hashes | None = None) -> dict:
    """A chapter's key as things are now. ``recorded``: its last recorded key, whose traced
    reads (results files, paper sections) are looked up again."""
    code = code_cells(source_nb)
    mods = deps.closure(code, pkg_root)
    files = {f.relative_to(pkg_root).as_posix(): f
             for f in [*mods.values(), *deps.data_files(mods, pkg_root)]}
    reads = deps.loaded_results(code) | deps.module_loads(mods, pkg_root)
    recorded = recorded or {}
    reads |= set(recorded.get("results", {}))
    reads.discard(name)
    names = fingerprint.resolve_models(params, defaults or {})
    return _seal({
        "code": digest(code),
        "params": digest({k: v for k, v in params.items() if k != "results_dir"}),
        "modules": {k: digest(f.read_bytes()) for k, f in sorted(files.items())},
        "paper": paper_sections(recorded.get("paper", {})),
        "results": _results(reads, Path(results_dir), name),
        "models": {n: digest(v) for n, v in fingerprint.models(names, hashes).items()},
        "versions": digest(versions(pkg_root)),
    })


def read_trace(path: Path) -> dict:
    """What a run read, from its trace file: {"results": {name: digest}, "paper": {...}}."""
    out = {"results": {}, "paper": {}}
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            e = json.loads(line)
            out[e["kind"]].setdefault(e["name"], e["digest"])    # the first read is the one used
    return out


def after_run(k: dict, trace: dict, name: str, params: dict, defaults: dict | None = None,
              hashes: fingerprint.Hashes | None = None) -> dict:
    """The key to record for a run: the reads it traced, and the model files as the run left
    them (a first run converts an embedded model into ~/.cache/ctr; keyed on the files before
    it, the next build would re-run the chapter for nothing)."""
    names = fingerprint.resolve_models(params, defaults or {})
    got = {r: d for r, d in trace.get("results", {}).items() if r != name}
    return _seal(dict(k, results=dict(sorted({**k["results"], **got}.items())),
                      paper=dict(sorted(trace.get("paper", {}).items())),
                      models={n: digest(v) for n, v in fingerprint.models(names, hashes).items()}))


def key_path(executed_dir: Path, name: str) -> Path:
    return Path(executed_dir) / f"{name}.key.json"


def load_key(executed_dir: Path, name: str) -> dict | None:
    p = key_path(executed_dir, name)
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except ValueError:
        return None


def _changed(a: dict, b: dict) -> list[str]:
    return [m for m in sorted(set(a) | set(b)) if a.get(m) != b.get(m)]


def explain(old: dict, k: dict, given: dict | None = None) -> str | None:
    """Why a recorded key ``old`` differs from the key now (None when it does not)."""
    if any(p not in old for p in PARTS):
        return "recorded by an older version of the book"
    if old.get("digest") == k["digest"]:
        return None
    why = []
    if old["code"] != k["code"]:
        why.append("code cells changed")
    if old["params"] != k["params"]:
        was = old.get("given")
        why.append("parameters changed" if was is None or given is None else
                   "parameters changed: " + ", ".join(
                       f"{p} {json.dumps(was.get(p, 'default'))} -> "
                       f"{json.dumps(given.get(p, 'default'))}"
                       for p in _changed(was, given)))
    why += [f"{m} changed" for m in _changed(old["modules"], k["modules"])]
    why += [f"paper numbers '{s}' changed" for s in _changed(old["paper"], k["paper"])]
    why += [f"results of {r} changed" for r in _changed(old["results"], k["results"])]
    gone = set(old["models"]) ^ set(k["models"])
    if gone:
        why.append("model list changed: " + ", ".join(sorted(gone)))
    why += [f"files of model {m} changed" for m in _changed(old["models"], k["models"])
            if m not in gone]
    if old["versions"] != k["versions"]:
        why.append("package versions changed")
    return "; ".join(why) or "key changed"


def stale(name: str, k: dict, executed_dir: Path, results_dir: Path,
          given: dict | None = None) -> str | None:
    """Why the chapter must re-run, or None when its recorded run is still valid. ``k`` is
    ``key(..., recorded=load_key(executed_dir, name))``."""
    nb = Path(executed_dir) / f"{name}.ipynb"
    if not nb.exists():
        return "never executed"
    old = load_key(executed_dir, name)
    if old is None:
        return "no recorded key"
    res = Path(results_dir) / f"{name}.json"
    if old.get("own_results") and (not res.exists() or digest(res.read_bytes()) != old["own_results"]):
        return "its results file is missing or was changed"
    return explain(old, k, given)


def record(name: str, k: dict, executed_dir: Path, results_dir: Path,
           given: dict | None = None) -> None:
    """Write the key of a finished run; ``given``: the parameters it ran with (no results_dir)."""
    res = Path(results_dir) / f"{name}.json"
    k = dict(k, own_results=digest(res.read_bytes()) if res.exists() else None, given=given or {})
    write_atomic(key_path(executed_dir, name), json.dumps(k, indent=1, sort_keys=True))


def reads(executed_dir: Path, name: str) -> set[str]:
    """The results files the chapter's recorded run read (or would have: missing ones too)."""
    return set((load_key(executed_dir, name) or {}).get("results", {}))


# --- refreshing a skipped chapter from its source --------------------------------------------------

def merge(source_nb, executed_nb):
    """The source notebook (prose, tags, metadata as edited now) with the recorded outputs of
    the executed one. Returns None when the code cells no longer line up (then: re-run)."""
    import copy

    done = [c for c in executed_nb.cells if c.cell_type == "code"
            and "injected-parameters" not in c.metadata.get("tags", [])]
    injected = [c for c in executed_nb.cells
                if "injected-parameters" in c.metadata.get("tags", [])]
    src_code = [c for c in source_nb.cells if c.cell_type == "code"]
    if len(done) != len(src_code) or any(a.source != b.source for a, b in zip(done, src_code)):
        return None
    nb = copy.deepcopy(source_nb)
    it = iter(done)
    cells = []
    for c in nb.cells:
        if c.cell_type == "code":
            old = next(it)
            c.outputs, c.execution_count = old.outputs, old.execution_count
            tags = c.metadata.get("tags", [])
            c.metadata = nbformat.NotebookNode({**{k: v for k, v in old.metadata.items()
                                                   if k != "tags"}, **c.metadata})
            c.metadata["tags"] = tags
        cells.append(c)
        if c.cell_type == "code" and "parameters" in c.metadata.get("tags", []):
            cells += copy.deepcopy(injected)
    nb.cells = cells
    meta = copy.deepcopy(executed_nb.metadata)
    meta.update({k: v for k, v in source_nb.metadata.items() if k != "papermill"})
    nb.metadata = meta
    return nb


def read(path: Path):
    return nbformat.read(str(path), as_version=4)
