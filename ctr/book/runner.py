"""Execute the book's chapters with papermill and render the HTML book with jupyter-book.

    python -m ctr.book build [--force] [--smoke] [--only sinks,variance] [--no-check] [--wait] [key=value ...]
    python -m ctr.book chapter NAME [key=value ...] [--wait]   # one chapter, its readers, re-render
    python -m ctr.book params NAME                             # a chapter's parameters and defaults
    python -m ctr.book check                                   # the headless-Chromium check alone

Sources are ``book/<name>.ipynb`` (narrative + calls into ``ctr``, one cell tagged
``parameters``). ``build`` re-executes a chapter only when its key changed (``cache``: code,
modules, parameters, the paper's numbers and results files it read, its models by content,
versions) and otherwise refreshes its page; ``--force`` runs everything. ``chapter`` runs one
chapter with the given parameters and then every page that reads its results, so no page shows
the old numbers. A run is committed only when the whole notebook succeeded (``execute``); one
run of a book at a time (``lock``). Parameters are checked before any kernel starts
(``params``); values in ``key=value`` are YAML (``n_prompts=20``,
``models=[smollm2-135m,gemma3-270m]``); ``model=X`` is shorthand for ``models=[X]``.
The executed page is presented for readers (``present``): a "how to rerun" box, a visible box
when it was run (or shows results run) with non-default parameters. ``_toc.yml`` lists the
executed notebooks; jupyter-book never executes anything itself and builds with ``-W -n``
(``render``), then headless Chromium checks every page (``htmlcheck``).

This module gathers the machinery's public functions in one place (``ctr.book`` re-exports them).
"""
from .commands import build, chapter, why_stale
from .execute import finish, prepare_env, refresh, run_chapter
from .layout import HTML, LAST, ROOT, SMOKE_MODEL, BookError, paths, source, toc_notebooks
from .params import defaults, parameters, parse_params, resolve
from .rendering import _static, render

__all__ = ["HTML", "LAST", "ROOT", "SMOKE_MODEL", "BookError", "build", "chapter", "defaults",
           "finish", "parameters", "parse_params", "paths", "prepare_env", "refresh", "render",
           "resolve", "run_chapter", "source", "toc_notebooks", "why_stale"]
