"""Where the book's files are: the repository root, the sources, the executed notebooks, the
results, the HTML; the chapters in the order the build runs them (``_toc.yml``).

The lowest module of ``ctr.book``: it imports none of the others, so every other module (and
``htmlcheck``) can import it without a circle.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

# the repository (CTR_BOOK_ROOT: another copy of it, for the command line; functions take root=)
ROOT = Path(os.environ.get("CTR_BOOK_ROOT") or Path(__file__).resolve().parents[2]).resolve()
LAST = ("scorecard", "index")      # they read other chapters' results: run them last
SMOKE_MODEL = "tiny-planted-llama"


class BookError(RuntimeError):
    """A user error or a failed run: the command line prints the message alone, no traceback."""


def paths(root: Path = ROOT) -> dict[str, Path]:
    root = Path(root)
    return {"root": root, "book": root / "book", "executed": root / "book" / "executed",
            "results": root / "book" / "executed" / "results", "html": root / "_build" / "html"}


HTML = paths()["html"]


def toc_notebooks(root: Path = ROOT) -> list[str]:
    """Executed notebooks listed in _toc.yml, in run order (scorecard and index last)."""
    toc = yaml.safe_load((Path(root) / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk({k: v for k, v in toc.items() if k != "root"})
    names = [Path(f).name for f in files if f.startswith("book/executed/")]
    return [n for n in names if n not in LAST] + [n for n in LAST if n in names]


def source(name: str, root: Path = ROOT) -> Path:
    """``book/<name>.ipynb``; an unknown name is an error listing the chapters."""
    p = paths(root)["book"] / f"{name}.ipynb"
    if not p.exists():
        raise BookError(f"no chapter {name!r} (no book/{name}.ipynb); chapters: "
                        f"{', '.join(toc_notebooks(root))}")
    return p
