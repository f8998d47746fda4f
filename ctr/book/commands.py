"""The two commands that change the book: ``build`` (every chapter whose key changed, with its
defaults) and ``chapter`` (one chapter with the given parameters, then every page that reads its
results). Both end with one rendered, checked book whose pages agree with each other.

- ``build`` re-runs a chapter when its key changed (``cache``), including a chapter last run with
  other parameters by ``make chapter``: the book's pages are the defaults' (the page said so in
  its "non-default parameters" box, and the log says which parameters are restored).
- ``chapter`` runs the chapter, then, in the book's order, every page whose recorded run read a
  results file that changed (scorecard, front page, QK-norm, Scale, ...) re-runs with its own
  recorded parameters (so results read from the new run are shown everywhere); the others are
  refreshed (their boxes). A page that reads the chapter only when its key says it does: a page
  never run yet is not run by ``chapter``.
"""
from __future__ import annotations

import time
from pathlib import Path

from . import cache, fingerprint, lock
from .execute import refresh, run_chapter
from .layout import ROOT, BookError, paths, source, toc_notebooks
from .params import defaults, parameters, resolve
from .rendering import render


def _key(name: str, params: dict, root: Path) -> dict:
    P = paths(root)
    return cache.key(name, params, cache.read(source(name, root)), P["results"],
                     defaults(name, root), recorded=cache.load_key(P["executed"], name),
                     hashes=fingerprint.Hashes(P["executed"] / ".file-hashes.json"))


def why_stale(name: str, params: dict, root: Path = ROOT) -> str | None:
    """Why ``name`` must re-run with ``params`` (None: its recorded run is valid)."""
    P = paths(root)
    shown = {k: v for k, v in params.items() if k != "results_dir"}
    return cache.stale(name, _key(name, params, root), P["executed"], P["results"], given=shown)


def _check(root: Path, names: list[str], only_changed: bool) -> None:
    from . import htmlcheck

    htmlcheck.check(paths(root)["html"], names, only_changed=only_changed)


def build(only: list[str] | None = None, smoke: bool = False, given: dict | None = None,
          check: bool = True, root: Path = ROOT, force: bool = False, keep_going: bool = False,
          wait: bool = False, html: bool = True) -> dict:
    """Run the chapters that changed (all with ``force``), render, check. Returns the wall
    time of each chapter that ran; chapters that were up to date are not in it.
    ``keep_going``: run every other chapter after a failure, then raise listing the failures.
    ``html=False``: run and refresh the notebooks only (no HTML, no check)."""
    names = toc_notebooks(root)
    if only:
        bad = sorted(set(only) - set(names))
        if bad:
            raise BookError(f"unknown chapter(s) {', '.join(bad)}; chapters: {', '.join(names)}")
        names = [n for n in names if n in only]
    P = paths(root)
    todo = {}
    for n in names:          # every parameter of every chapter checked before anything runs
        known = parameters(n, root)
        todo[n] = {k: v for k, v in (given or {}).items()
                   if k in known or (k == "model" and "models" in known)}
        resolve(n, todo[n], smoke, root)
    times, skipped, failed = {}, [], []
    t0 = time.time()
    with lock.held(root, wait=wait):
        for n, mine in todo.items():
            if not force:
                params = resolve(n, mine, smoke, root)
                why = why_stale(n, params, root)
                if why is None and refresh(n, params, root):
                    skipped.append(n)
                    continue
                print(f"[ctr.book] {n}: re-running ({why or 'its page no longer matches its source'})",
                      flush=True)
            try:
                times[n] = run_chapter(n, mine, smoke=smoke, root=root)
            except BookError as e:
                if not keep_going:
                    raise
                print(f"[ctr.book] {e}", flush=True)
                failed.append((n, str(e)))
        if skipped:
            print(f"[ctr.book] up to date, not re-run: {', '.join(skipped)}", flush=True)
        if html:
            render(root)
        if failed:
            raise BookError("chapters failed: " + "; ".join(n for n, _ in failed) + "\n"
                            + "\n".join(e for _, e in failed))
        if check and html:
            _check(root, names, only_changed=not force)
    total = time.time() - t0
    print("[ctr.book] chapter times: " + (", ".join(f"{k} {v:.0f} s" for k, v in times.items())
                                          or "none ran") + f"; total {total:.0f} s", flush=True)
    print(f"[ctr.book] open {P['html'] / 'index.html'}")
    return times


def _own(P: dict, name: str) -> str | None:
    f = P["results"] / f"{name}.json"
    return cache.digest(f.read_bytes()) if f.exists() else None


def chapter(name: str, given: dict | None = None, smoke: bool = False, check: bool = True,
            root: Path = ROOT, wait: bool = False, html: bool = True) -> dict:
    """Run one chapter, then every page that reads results that changed (module docstring),
    render and check what ran. Returns the wall time of each chapter that ran."""
    P = paths(root)
    names = toc_notebooks(root)
    source(name, root)
    resolve(name, given or {}, smoke, root)
    with lock.held(root, wait=wait):
        before = _own(P, name)
        times = {name: run_chapter(name, given, smoke=smoke, root=root)}
        changed = ({name} if _own(P, name) != before else set()) | {"timings"}    # it ran
        for n in names:
            if n == name or not (P["executed"] / f"{n}.ipynb").exists():
                continue
            theirs = (cache.load_key(P["executed"], n) or {}).get("given", {})
            try:
                params = resolve(n, theirs, False, root)
            except BookError:
                params = resolve(n, {}, False, root)
                theirs = {}
            if cache.reads(P["executed"], n) & changed and why_stale(n, params, root):
                print(f"[ctr.book] {n}: re-running (it reads results that changed: "
                      f"{', '.join(sorted(cache.reads(P['executed'], n) & changed))})", flush=True)
                old = _own(P, n)
                try:
                    times[n] = run_chapter(n, theirs, root=root)
                except BookError as e:
                    raise BookError(f"{name} ran, but {e}\nuntil it is fixed, that page shows "
                                    f"results older than {name}'s") from e
                if _own(P, n) != old:
                    changed.add(n)
            else:
                refresh(n, params, root)
        if html:
            render(root)
        if check and html:
            _check(root, list(times), only_changed=False)
    return times
