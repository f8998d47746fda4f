"""Small books for the tests of ctr.book: notebooks built in code, a book skeleton in a temporary
directory (never the real book/executed or _build), and a copy of the whole repository."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from html import unescape
from pathlib import Path

import nbformat

from ctr import book

REPO = book.ROOT
PARAMS = 'smoke = False      # tiny sizes\nresults_dir = "results"'
SETUP = "from ctr.book.values import in_kernel\nresults_dir = in_kernel(globals())\n"


def nb(*cells):
    n = nbformat.v4.new_notebook(cells=list(cells))
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return n


def md(text):
    return nbformat.v4.new_markdown_cell(text)


def code(src, *tags):
    c = nbformat.v4.new_code_cell(src)
    if tags:
        c.metadata["tags"] = list(tags)
    return c


def chapter(body: str, params: str = PARAMS, title: str = "A page"):
    """A chapter as the book's are made: title, parameters cell, setup line, its code."""
    return nb(md(f"# {title}"), code(params, "parameters"), code(SETUP + body))


def mini_book(dst: Path, notebooks: dict) -> Path:
    """A book of the given notebooks only (name -> notebook), no HTML: for runs and keys."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("_config.yml", "references.bib", "requirements.txt"):
        shutil.copy(REPO / f, dst / f)
    (dst / "book").mkdir()
    for name, n in notebooks.items():
        nbformat.write(n, dst / "book" / f"{name}.ipynb")
    names = list(notebooks)
    toc = ["format: jb-book", f"root: book/executed/{names[0]}", "chapters:",
           *[f"  - file: book/executed/{c}" for c in names[1:]]]
    (dst / "_toc.yml").write_text("\n".join(toc) + "\n")
    return dst


def repo_copy(dst: Path) -> Path:
    """The repository's book (sources, toc, config; ``ctr`` linked, not copied) in ``dst``."""
    dst = Path(dst)
    for f in ("_config.yml", "_toc.yml", "references.bib", "requirements.txt", "Makefile"):
        shutil.copy(REPO / f, dst / f)
    shutil.copytree(REPO / "book", dst / "book", ignore=shutil.ignore_patterns(
        "executed", "results", ".ipynb_checkpoints", "kernel-ipc-*", "*.failed.ipynb"))
    (dst / "ctr").symlink_to(REPO / "ctr")     # chapters show package code (literalinclude)
    return dst


@contextlib.contextmanager
def captured(path: Path):
    """Everything written to stdout and stderr, by this process (Python and file descriptors)
    and by the kernels it starts -> path."""
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w", buffering=1) as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            f.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for s in saved:
                os.close(s)


def plain(html: str) -> str:
    """The text of an HTML page, tags dropped (code highlighting splits words into spans)."""
    return unescape(re.sub(r"<[^>]+>", "", html))


def ran(root: Path, **kw) -> set[str]:
    """The chapters a build (notebooks only, no HTML) re-ran."""
    return set(book.build(root=root, check=False, html=False, **kw))
