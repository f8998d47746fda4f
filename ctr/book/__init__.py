"""The book machinery: run chapters (papermill) when their inputs changed (cache), render
(jupyter-book), check (Chromium), gather the verdicts (scorecard), and the attention explorer.
``python -m ctr.book --help`` for the commands; ``ctr/book/runner.py`` for the map.

The names below are loaded on first use: a chapter that imports ``ctr.book.explorer`` or
``ctr.book.scorecard`` does not import (and so its cache key does not depend on) the runner.
"""
import importlib

__all__ = ["HTML", "LAST", "ROOT", "SMOKE_MODEL", "BookError", "build", "chapter", "defaults",
           "main", "parameters", "parse_params", "paths", "prepare_env", "refresh", "render",
           "resolve", "run_chapter", "source", "toc_notebooks"]


def __getattr__(name):
    if name in __all__ and name != "main":
        return getattr(importlib.import_module(".runner", __name__), name)
    raise AttributeError(f"module 'ctr.book' has no attribute {name!r}")


def main(argv=None) -> int:
    """The command line (``python -m ctr.book``)."""
    return importlib.import_module(".__main__", __name__).main(argv)
