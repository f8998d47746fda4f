"""The executed notebooks: when a chapter must re-run (its key), and what its page is made of.

A chapter re-executes only when something it depends on changed; otherwise its page is rebuilt
from the source's prose and tags and the recorded outputs (``merge``). Either way
``present.present`` hides papermill's injected-parameters cell and turns the parameters cell
into a "how to rerun" box.

The key of a chapter (recorded beside its executed notebook as ``<name>.key.json``) hashes:

- ``code``: the source of its code cells, in order (Markdown cells, tags and outputs are left out:
  a prose or tag edit re-renders the page from the recorded outputs, it does not re-execute);
- ``params``: the parameters the runner passes (``results_dir`` left out: it names the build
  directory, not an input);
- ``modules``: per module, the source of every ``ctr`` module the notebook imports, followed
  through the package's own imports (``import``/``from`` statements anywhere in a file, relative
  ones resolved, every parent package's ``__init__`` included because importing a submodule
  runs it) and the data files those modules name (``paper_numbers.yaml``). Per module, not
  package-wide: editing ``ctr/chapters/toy_theory.py`` re-runs only the chapters whose imports
  reach it;
- ``results``: the results files it reads: every other chapter's for the pages in ``LAST``
  (scorecard, index), and ``results.load("name", ...)`` calls with a literal name in its code or
  its modules (qknorm reads variance and probes);
- ``models``: for each model it loads (``models``/``model`` parameters; ``"installed"`` = every
  installed embedded model), the converted files in ``~/.cache/ctr`` by name, size and mtime;
- ``versions``: Python and the installed version of every package in ``requirements.txt``.

Imports made by name at run time (``importlib.import_module(x)``) are not seen; ctr has none.
"""
from __future__ import annotations

import ast
import hashlib
import json
import platform
from pathlib import Path

import nbformat

PKG_ROOT = Path(__file__).resolve().parents[2]     # the directory that holds the ctr package
PKG = "ctr"


def _sha(data) -> str:
    if not isinstance(data, bytes):
        data = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def code_cells(nb) -> list[str]:
    """The code a run executes (the injected-parameters cell papermill adds is not source)."""
    return [c.source for c in nb.cells if c.cell_type == "code"
            and "injected-parameters" not in c.metadata.get("tags", [])]


# --- which ctr modules a notebook reaches ---------------------------------------------------------

def _module_file(mod: str, pkg_root: Path) -> Path | None:
    base = pkg_root.joinpath(*mod.split("."))
    for p in (base / "__init__.py", base.with_suffix(".py")):
        if p.is_file():
            return p
    return None


def _imports(tree: ast.AST, mod: str, is_pkg: bool, pkg_root: Path) -> set[str]:
    """Module names an ast imports (``from a import b`` may name the submodule a.b)."""
    out = set()
    here = mod if is_pkg else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            out.add(base)
            for a in node.names:
                if _module_file(f"{base}.{a.name}", pkg_root):
                    out.add(f"{base}.{a.name}")
    return out


def _parse(source: str) -> ast.AST:
    # notebook cells may hold IPython syntax (%magic, !shell): drop those lines, parse the rest
    lines = [(l[:len(l) - len(l.lstrip())] + "pass" if l.lstrip().startswith(("%", "!")) else l)
             for l in source.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return ast.parse("")


def closure(sources: list[str], pkg_root: Path = PKG_ROOT) -> dict[str, Path]:
    """Every ctr module the given code imports, directly or through ctr's own imports."""
    todo = set()
    for s in sources:
        todo |= _imports(_parse(s), "__main__", False, pkg_root)
    seen: dict[str, Path] = {}
    while todo:
        mod = todo.pop()
        if mod != PKG and not mod.startswith(PKG + "."):
            continue
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):        # importing a.b.c runs a and a.b first
            name = ".".join(parts[:i])
            f = _module_file(name, pkg_root)
            if f is None or name in seen:
                continue
            seen[name] = f
            todo |= _imports(ast.parse(f.read_text()), name, f.name == "__init__.py", pkg_root)
    return dict(sorted(seen.items()))


def _data_files(mods: dict[str, Path]) -> list[Path]:
    """Non-Python files beside a module that the module names (e.g. paper_numbers.yaml)."""
    out = set()
    for f in mods.values():
        text = f.read_text()
        for d in f.parent.iterdir():
            if d.is_file() and d.suffix not in (".py", ".pyc") and d.name in text:
                out.add(d)
    return sorted(out)


def _loaded_results(sources: list[str]) -> set[str]:
    """Names in ``results.load("name", ...)`` / ``load("name", ...)`` calls with a literal name."""
    out = set()
    for s in sources:
        for node in ast.walk(_parse(s)):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                f = node.func
                if (isinstance(f, ast.Attribute) and f.attr == "load"
                        and isinstance(f.value, ast.Name) and f.value.id == "results") or \
                        (isinstance(f, ast.Name) and f.id == "load"):
                    out.add(node.args[0].value)
    return out


# --- models and versions --------------------------------------------------------------------------

def model_fingerprint(names: list[str]) -> dict:
    """Converted model files by name, size and mtime (hashing 1.6 GB of weights would cost
    seconds per build; a reconversion rewrites the files, so their mtimes change)."""
    from .. import models as M

    out = {}
    for n in names:
        d = M.cache_dir() / "models" / n if n in M.EMBEDDED else Path(n)
        if n in M.TINY:
            out[n] = "tiny (built from ctr/tiny.py)"
        elif d.is_dir():
            out[n] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns]
                      for p in sorted(d.iterdir()) if p.is_file()}
        else:
            out[n] = "no local files (a hub id, or not converted yet)"
    return out


def models_of(params: dict, defaults: dict) -> list[str]:
    given = {**defaults, **params}
    v = given.get("models", given.get("model"))
    if v is None:
        return []
    if v == "installed":
        from .. import models as M
        return M.available()
    return [v] if isinstance(v, str) else list(v)


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


# --- the key --------------------------------------------------------------------------------------

def key(name: str, params: dict, source_nb, results_dir: Path, others: list[str],
        defaults: dict | None = None, last: bool = False, pkg_root: Path = PKG_ROOT) -> dict:
    """Components of a chapter's key and their digest. ``others``: the other chapters whose
    results a LAST page reads."""
    code = code_cells(source_nb)
    mods = closure(code, pkg_root)
    files = {f.relative_to(pkg_root).as_posix(): f for f in [*mods.values(), *_data_files(mods)]}
    reads = set(others) if last else _loaded_results(code + [f.read_text() for f in mods.values()])
    reads.discard(name)
    results_dir = Path(results_dir)
    parts = {
        "code": _sha(code),
        "params": _sha({k: v for k, v in params.items() if k != "results_dir"}),
        "modules": {k: _sha(f.read_bytes()) for k, f in sorted(files.items())},
        "results": {r: (_sha((results_dir / f"{r}.json").read_bytes())
                        if (results_dir / f"{r}.json").exists() else "missing")
                    for r in sorted(reads)},
        "models": _sha(model_fingerprint(models_of(params, defaults or {}))),
        "versions": _sha(versions(pkg_root)),
    }
    parts["digest"] = _sha({k: v for k, v in parts.items()})
    return parts


def after_run(k: dict, params: dict, defaults: dict | None = None) -> dict:
    """The key to record for a run: the model files as the run left them (a first run converts
    an embedded model into ~/.cache/ctr; keyed on the files before it, the next build would
    re-run the chapter for nothing). Everything else stays as it was when the run started."""
    k = dict(k, models=_sha(model_fingerprint(models_of(params, defaults or {}))))
    k["digest"] = _sha({p: v for p, v in k.items() if p not in ("digest", "own_results")})
    return k


def key_path(executed_dir: Path, name: str) -> Path:
    return Path(executed_dir) / f"{name}.key.json"


def stale(name: str, k: dict, executed_dir: Path, results_dir: Path) -> str | None:
    """Why the chapter must re-run, or None when its recorded run is still valid."""
    nb, kp = Path(executed_dir) / f"{name}.ipynb", key_path(executed_dir, name)
    if not nb.exists():
        return "never executed"
    if not kp.exists():
        return "no recorded key"
    old = json.loads(kp.read_text())
    res = Path(results_dir) / f"{name}.json"
    if old.get("own_results") and (not res.exists() or _sha(res.read_bytes()) != old["own_results"]):
        return "its results file is missing or was changed"
    if old.get("digest") == k["digest"]:
        return None
    why = []
    for part in ("code", "params", "models", "versions"):
        if old.get(part) != k[part]:
            why.append({"code": "code cells", "params": "parameters", "models": "model files",
                        "versions": "package versions"}[part] + " changed")
    for part, what in (("modules", "{} changed"), ("results", "results of {} changed")):
        a, b = old.get(part, {}), k[part]
        why += [what.format(m) for m in sorted(set(a) | set(b)) if a.get(m) != b.get(m)]
    return "; ".join(why) or "key changed"


def record(name: str, k: dict, executed_dir: Path, results_dir: Path) -> None:
    from ..results import write_atomic

    res = Path(results_dir) / f"{name}.json"
    k = dict(k, own_results=_sha(res.read_bytes()) if res.exists() else None)
    write_atomic(key_path(executed_dir, name), json.dumps(k, indent=1, sort_keys=True))


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
