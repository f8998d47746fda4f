"""What a notebook's code reaches, read from its source without running it: the ``ctr``
modules it imports (followed through the package's own imports), the data files those modules
open, and the results files it loads by a literal name.

- modules: ``import``/``from`` statements anywhere in a file (inside functions too), relative
  ones resolved; every parent package's ``__init__`` counts, since importing a submodule runs it.
  Imports made by name at run time (``importlib.import_module(x)``) are not seen; ctr makes
  two on purpose: ``ctr.book``'s lazy names (a chapter importing ``ctr.book.explorer`` does not
  depend on the runner) and ``values.check_model`` (a toy chapter does not depend on
  ``ctr.models``; chapters that check model names import it themselves).
- data files: a file beside a module, or at the repository root, whose exact name is a string
  constant of that module's code (``with_name("paper_numbers.yaml")``, ``/ "RULES.md"``);
  docstrings and comments do not count. ``TRACED`` files are left out: the run itself records
  which parts of them it read (``ctr.results`` traces ``paper()``), finer than the whole file.
- results: ``results.load("name", ...)`` / ``load("name", ...)`` calls with a literal name. The
  run records every results file it actually read as well (``ctr.results`` traces ``load``).
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG_ROOT = Path(__file__).resolve().parents[2]     # the directory that holds the ctr package
PKG = "ctr"
TRACED = {"ctr/paper_numbers.yaml"}


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


def parse(source: str) -> ast.AST:
    """A notebook cell or a module as an ast; IPython lines (%magic, !shell) become ``pass``."""
    lines = [(l[:len(l) - len(l.lstrip())] + "pass" if l.lstrip().startswith(("%", "!")) else l)
             for l in source.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return ast.parse("")


_FACTS: dict = {}


def _facts(f: Path, mod: str, pkg_root: Path) -> dict:
    """What one module file imports, its string constants and literal results loads; parsed
    once per version of the file (a build asks for the same modules for every chapter)."""
    st = f.stat()
    k = (str(f), mod, str(pkg_root), st.st_mtime_ns, st.st_size)
    if k not in _FACTS:
        text = f.read_text()
        tree = ast.parse(text)
        _FACTS[k] = {"imports": _imports(tree, mod, f.name == "__init__.py", pkg_root),
                     "constants": _constants(tree), "loads": loaded_results([text])}
    return _FACTS[k]


def closure(sources: list[str], pkg_root: Path = PKG_ROOT) -> dict[str, Path]:
    """Every ctr module the given code imports, directly or through ctr's own imports."""
    todo = set()
    for s in sources:
        todo |= _imports(parse(s), "__main__", False, pkg_root)
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
            todo |= _facts(f, name, pkg_root)["imports"]
    return dict(sorted(seen.items()))


def _constants(tree: ast.AST) -> set[str]:
    """String constants of a module's code, docstrings left out."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and node.body and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant):
            docs.add(id(node.body[0].value))
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docs}


def data_files(mods: dict[str, Path], pkg_root: Path = PKG_ROOT) -> list[Path]:
    """Files beside a module or at the repository root that a module opens by name."""
    out = set()
    for mod, f in mods.items():
        names = _facts(f, mod, pkg_root)["constants"]
        for where in {f.parent, pkg_root}:
            for d in where.iterdir():
                if d.is_file() and d.suffix not in (".py", ".pyc") and d.name in names \
                        and d.relative_to(pkg_root).as_posix() not in TRACED:
                    out.add(d)
    return sorted(out)


def module_loads(mods: dict[str, Path], pkg_root: Path = PKG_ROOT) -> set[str]:
    """``loaded_results`` of the given modules (parsed once)."""
    return set().union(*[_facts(f, m, pkg_root)["loads"] for m, f in mods.items()])


def loaded_results(sources: list[str]) -> set[str]:
    """Names in ``results.load("name", ...)`` / ``load("name", ...)`` calls with a literal name."""
    out = set()
    for s in sources:
        for node in ast.walk(parse(s)):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                f = node.func
                if (isinstance(f, ast.Attribute) and f.attr == "load"
                        and isinstance(f.value, ast.Name) and f.value.id == "results") or \
                        (isinstance(f, ast.Name) and f.id == "load"):
                    out.add(node.args[0].value)
    return out
