"""Execute one chapter with papermill, and commit it to the book only when all of it succeeded.

A run happens in a private temporary directory (``lock.private_dir``): the kernel's connection
file and IPC sockets, the notebook being written, the results the chapter saves (``ctr.results``
stages them there: ``CTR_RESULTS_STAGE``) and the trace of what it read (``CTR_BOOK_TRACE``).
When the notebook finished without error, the runner moves into the book, in this order: the
results files (with the run's parameters recorded in them, ``present.RUN_KEY``), the executed
notebook, its key, its time. A failed run changes none of them; its partial notebook is kept as
``book/executed/<name>.failed.ipynb``. Kernels read the book's own results (``results_dir`` is
``book/executed/results``), so a chapter that shows another chapter's numbers shows the book's.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from .. import results as R
from . import cache, fingerprint, lock, present
from .layout import LAST, ROOT, BookError, paths, source
from .params import _inspect, defaults, resolve


def prepare_env() -> None:
    """Environment for papermill kernels and jupyter-book (they inherit this process's)."""
    bindir = str(Path(sys.executable).parent)   # the kernelspec runs "python": make it ours
    if not os.environ.get("PATH", "").startswith(bindir + os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"   # figures inline
    # a log is not a terminal: a bar redrawn every 0.1 s fills it with megabytes of \r lines
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "10")
    # tqdm.auto in a kernel without ipywidgets warns once, then draws plain text bars anyway
    quiet = "ignore:IProgress not found"
    if quiet not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                              quiet]))


def kernel_manager(private: Path):
    """A kernel manager whose kernel talks over IPC sockets in ``private`` (over TCP ipykernel
    7 warns on every chapter that traffic is unencrypted; sockets in the book directory would
    collide between two runs), its connection file there too."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class PrivateKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self):
            return "ipc"

        @default("connection_file")
        def _connection_file_default(self):
            return str(private / "kernel.json")

        @default("ip")
        def _ip_default(self):
            return str(private / "kernel-ipc")

    return PrivateKernelManager


@contextlib.contextmanager
def _environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shown_results(reads, results_dir: Path) -> dict:
    """The chapters this page reads whose results were made with non-default parameters."""
    return {r: d for r in sorted(reads) if (d := present.nondefault(r, results_dir))}


def finish(name: str, raw, params: dict, root: Path, reads=()):
    """The executed notebook as written: today's source prose + the run's outputs, presented.
    None when the outputs no longer line up with the source (the chapter must re-run)."""
    merged = cache.merge(cache.read(source(name, root)), raw)
    if merged is None:
        return None
    res = paths(root)["results"]
    return present.present(merged, name, params, _inspect(name, root), defaults(name, root),
                           results_dir=res, shown=shown_results(reads, res))


def refresh(name: str, params: dict, root: Path = ROOT) -> bool:
    """Rewrite a chapter's page that need not re-run (prose, tags, boxes, timings as they are
    now), only if it changed. False when it cannot be refreshed (then it must re-run)."""
    import nbformat

    P = paths(root)
    path = P["executed"] / f"{name}.ipynb"
    old = cache.read(path)
    nb = finish(name, old, params, root, cache.reads(P["executed"], name))
    if nb is None:
        return False
    if nbformat.writes(nb) != nbformat.writes(old):
        R.write_atomic(path, nbformat.writes(nb))
    return True


def _failure(name: str, e: Exception, failed: Path | None) -> str:
    """One paragraph: the kernel's error (its last line, not the whole traceback)."""
    ename, evalue = getattr(e, "ename", None), getattr(e, "evalue", None)
    what = f"{ename}: {evalue}" if ename else f"{type(e).__name__}: {e}"
    what = re.sub(r"\x1b\[[0-9;]*m", "", what).strip().splitlines()
    msg = f"chapter {name!r} failed: {what[-1] if what else 'unknown error'}"
    if failed is not None:
        msg += f"\n(the notebook as far as it ran, with the traceback: {failed})"
    return msg + "\n(the book's pages and results are those of the last good run)"


def _commit(name: str, stage: Path, run: dict, results_dir: Path) -> None:
    """Move the staged results into the book; the chapter's own file records how it was run."""
    results_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in stage.iterdir() if p.is_file()) if stage.exists() else []:
        if f.suffix != ".json":                     # a table beside the results (scorecard.csv)
            R.write_atomic(results_dir / f.name, f.read_text())
            continue
        data = json.loads(f.read_text())
        if f.stem == name and isinstance(data, dict):
            data[present.RUN_KEY] = run
        R.write_atomic(results_dir / f.name, json.dumps(data, indent=1, sort_keys=True))


def run_chapter(name: str, given: dict | None = None, smoke: bool = False,
                timeout: int | None = None, root: Path = ROOT) -> float:
    """Execute one chapter with papermill and commit it (module docstring); returns its wall
    time in seconds. Holds the book's lock (``lock.held``)."""
    import nbformat
    import papermill

    P = paths(root)
    src = source(name, root)
    params = resolve(name, given or {}, smoke, root)   # every parameter checked: no kernel yet
    with lock.held(root):
        dflt = defaults(name, root)
        hashes = fingerprint.Hashes(P["executed"] / ".file-hashes.json")
        k0 = cache.key(name, params, cache.read(src), P["results"], dflt, hashes=hashes)
        P["results"].mkdir(parents=True, exist_ok=True)
        (P["results"] / R.BOOK_MARKER).touch()
        failed = P["executed"] / f"{name}.failed.ipynb"
        shown = {k: v for k, v in params.items() if k != "results_dir"}
        print(f"[ctr.book] {name}: running with {json.dumps(shown)}", flush=True)
        prepare_env()
        with lock.private_dir() as tmp:
            out, stage, trace = tmp / f"{name}.ipynb", tmp / "stage", tmp / "trace.jsonl"
            t0 = time.time()
            try:
                with _environ(**{R.STAGE: str(stage), R.TRACE: str(trace), R.CHAPTER: name}):
                    # the kernel's stderr (progress as text, warnings) goes to the build log;
                    # the page never shows it (nb_output_stderr: remove)
                    papermill.execute_notebook(
                        str(src), str(out), parameters=params, kernel_name="python3",
                        cwd=str(P["book"]), log_output=False, stderr_file=sys.stderr,
                        progress_bar=False, request_save_on_cell_execute=False,
                        execution_timeout=timeout or (600 if smoke else 3600),
                        kernel_manager_class=kernel_manager(tmp))
            except Exception as e:
                if out.exists():
                    shutil.move(str(out), failed)
                raise BookError(_failure(name, e, failed if failed.exists() else None)) from e
            seconds = time.time() - t0
            got, raw = cache.read_trace(trace), cache.read(out)
            if cache.merge(cache.read(src), raw) is None:
                raise BookError(f"chapter {name!r}: {src} changed while it ran; run it again")
            run = {"parameters": shown, "nondefault": present.differing(params, dflt),
                   "smoke": smoke}
            _commit(name, stage, run, P["results"])
            nb = finish(name, raw, params, root, set(k0["results"]) | set(got["results"]))
            R.write_atomic(P["executed"] / f"{name}.ipynb", nbformat.writes(nb))
        if failed.exists():
            failed.unlink()
        k = cache.after_run(k0, got, name, params, dflt, hashes)
        cache.record(name, k, P["executed"], P["results"], given=shown)
        hashes.save()
        _record_time(P["results"], name, seconds, shown, smoke)
        print(f"[ctr.book] {name}: done in {seconds:.0f} s", flush=True)
        return seconds


def _record_time(results_dir: Path, name: str, seconds: float, shown: dict, smoke: bool):
    path = results_dir / "timings.json"
    t = json.loads(path.read_text()) if path.exists() else {}
    t[name] = {"seconds": round(seconds, 1), "smoke": smoke, "params": shown,
               "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    R.write_atomic(path, json.dumps(t, indent=1, sort_keys=True))


__all__ = ["LAST", "finish", "kernel_manager", "prepare_env", "refresh", "run_chapter"]
