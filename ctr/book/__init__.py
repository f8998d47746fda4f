"""The book machinery: run chapters (papermill), render (jupyter-book), check (Chromium), and
gather the verdicts (scorecard). ``python -m ctr.book --help`` for the commands."""
from .runner import (HTML, LAST, ROOT, SMOKE_MODEL, BookError, build, main, parameters,
                     parse_params, paths, prepare_env, render, resolve, run_chapter, source,
                     toc_notebooks)

__all__ = ["HTML", "LAST", "ROOT", "SMOKE_MODEL", "BookError", "build", "main", "parameters",
           "parse_params", "paths", "prepare_env", "render", "resolve", "run_chapter", "source",
           "toc_notebooks"]
