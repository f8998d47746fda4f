"""The book machinery: run chapters (papermill) when their inputs changed (cache), render
(jupyter-book), check (Chromium), gather the verdicts (scorecard), and the attention explorer.
``python -m ctr.book --help`` for the commands."""
from .runner import (HTML, LAST, ROOT, SMOKE_MODEL, BookError, build, defaults, parameters,
                     parse_params, paths, prepare_env, refresh, render, resolve, run_chapter,
                     source, toc_notebooks)

__all__ = ["HTML", "LAST", "ROOT", "SMOKE_MODEL", "BookError", "build", "defaults", "main",
           "parameters", "parse_params", "paths", "prepare_env", "refresh", "render", "resolve",
           "run_chapter", "source", "toc_notebooks"]


def main(argv=None) -> int:
    """The command line (``python -m ctr.book``)."""
    from .__main__ import main as _main

    return _main(argv)
