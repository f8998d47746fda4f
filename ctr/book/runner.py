"""Execute the book's chapters with papermill and render the HTML book with jupyter-book.

    python -m ctr.book build [--force] [--smoke] [--only sinks,variance] [--no-check] [key=value ...]
    python -m ctr.book chapter NAME [key=value ...]      # rerun one chapter, re-render
    python -m ctr.book params NAME                       # a chapter's parameters and defaults
    python -m ctr.book check                             # the headless-Chromium check alone

Sources are ``book/<name>.ipynb`` (narrative + calls into ``ctr``, one cell tagged
``parameters``). Each run writes ``book/executed/<name>.ipynb`` atomically (a failed run goes
to ``<name>.failed.ipynb`` and fails the build; the last good run stays), results to
``book/executed/results/<name>.json`` and its wall time to ``results/timings.json``.
``build`` re-executes a chapter only when its key changed (``cache.py``: code cells, imported
``ctr`` modules, parameters, results it reads, model files, versions); otherwise it refreshes the
page from the source's prose and the recorded outputs. ``--force`` runs everything.
The executed page is presented for readers: papermill's injected-parameters cell is removed and
the parameters cell becomes one "how to rerun" box (the exact ``make chapter`` command and each
parameter with its default). ``_toc.yml`` lists the executed notebooks; jupyter-book never
executes anything itself (``execute_notebooks: 'off'``) and builds with ``-W -n``, so a missing
chapter, an unknown citation or a dead cross-reference fails the build.
Values in ``key=value`` are YAML (``n_prompts=20``, ``models=[smollm2-135m,gemma3-270m]``);
``model=X`` is shorthand for ``models=[X]``. Unknown names are an error.
"""
from __future__ import annotations

import ast
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..results import write_atomic
from . import cache, present

ROOT = Path(__file__).resolve().parents[2]    # the repository; tests pass a copy instead


def paths(root: Path = ROOT) -> dict[str, Path]:
    root = Path(root)
    return {"root": root, "book": root / "book", "executed": root / "book" / "executed",
            "results": root / "book" / "executed" / "results", "html": root / "_build" / "html"}


HTML = paths()["html"]
LAST = ("scorecard", "index")      # they read every other chapter's results: run them last
SMOKE_MODEL = "tiny-planted-llama"


class BookError(RuntimeError):
    pass


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
    p = paths(root)["book"] / f"{name}.ipynb"
    if not p.exists():
        raise BookError(f"no chapter {name!r} (no book/{name}.ipynb); chapters: "
                        f"{', '.join(toc_notebooks(root))}")
    return p


def parameters(name: str, root: Path = ROOT) -> dict:
    """The parameters cell as papermill reads it: name -> default (its source text)."""
    return {k: v["default"] for k, v in _inspect(name, root).items()}


def _inspect(name: str, root: Path = ROOT) -> dict:
    import papermill

    return papermill.inspect_notebook(str(source(name, root)))


def defaults(name: str, root: Path = ROOT) -> dict:
    """Parameter defaults as values (the source text where it is not a literal)."""
    out = {}
    for k, v in parameters(name, root).items():
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def parse_params(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise BookError(f"parameter {item!r} is not key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
    return out


def resolve(name: str, given: dict, smoke: bool = False, root: Path = ROOT) -> dict:
    """Check names against the notebook's parameters cell and fill the runner's own ones."""
    known = parameters(name, root)
    given = dict(given)
    if "model" in given and "model" not in known and "models" in known:
        given["models"] = [given.pop("model")]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise BookError(f"chapter {name!r} has no parameter {', '.join(unknown)}; its parameters: "
                        + ", ".join(f"{k}={v!r}" for k, v in known.items()))
    params = {}
    if "results_dir" in known:
        params["results_dir"] = str(paths(root)["results"])
    if smoke:
        if "smoke" in known:
            params["smoke"] = True
        for key in ("models", "model"):
            if key in known and key not in given:
                params[key] = [SMOKE_MODEL] if key == "models" else SMOKE_MODEL
    params.update(given)
    _check_values(name, params)
    return params


def _check_values(name: str, params: dict) -> None:
    """The settings every chapter shares are checked before a kernel starts: one clear error."""
    from .. import definitions as D
    from ..results import check_dir

    try:
        for key in ("eps", "main_eps"):
            if params.get(key) is not None:
                D.check_eps(params[key])
        if params.get("eps_sweep") is not None:
            D.check_eps(params["eps_sweep"])
        if params.get("min_queries") is not None:
            D.check_min_queries(params["min_queries"])
        D.check_max_tokens(params.get("max_tokens"))
        if "results_dir" in params:
            check_dir(params["results_dir"])
    except (ValueError, TypeError, OSError) as e:
        raise BookError(f"chapter {name!r}: {e}") from e


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
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet]))


def _ipc_kernel_manager():
    """Kernels talk over local IPC sockets: over TCP ipykernel 7 warns that traffic is
    unencrypted, on every chapter."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self):
            return "ipc"

    return IPCKernelManager


def _finish(name: str, raw, params: dict, root: Path):
    """The executed notebook as written: today's source prose + the run's outputs, presented.
    None when the outputs no longer line up with the source (the chapter must re-run)."""
    merged = cache.merge(cache.read(source(name, root)), raw)
    return None if merged is None else present.present(merged, name, params, _inspect(name, root),
                                                     defaults(name, root))


def _key(name: str, params: dict, root: Path) -> dict:
    P = paths(root)
    return cache.key(name, params, cache.read(source(name, root)), P["results"],
                     [n for n in toc_notebooks(root) if n != name], defaults(name, root),
                     last=name in LAST)


def run_chapter(name: str, given: dict | None = None, smoke: bool = False,
                timeout: int | None = None, root: Path = ROOT) -> float:
    """Execute one chapter with papermill; returns its wall time in seconds."""
    import nbformat
    import papermill

    P = paths(root)
    src = source(name, root)
    params = resolve(name, given or {}, smoke, root)
    key = _key(name, params, root)         # the inputs as they are when the run starts
    P["executed"].mkdir(parents=True, exist_ok=True)
    tmp = P["executed"] / f".{name}.running.ipynb"
    failed = P["executed"] / f"{name}.failed.ipynb"
    shown = {k: v for k, v in params.items() if k != "results_dir"}
    print(f"[ctr.book] {name}: running with {json.dumps(shown)}", flush=True)
    prepare_env()
    t0 = time.time()
    try:
        # the kernel's stderr (progress bars as text, warnings) goes to the build log; the
        # page never shows it (nb_output_stderr: remove)
        papermill.execute_notebook(str(src), str(tmp), parameters=params, kernel_name="python3",
                                   cwd=str(P["book"]), log_output=False, stderr_file=sys.stderr,
                                   progress_bar=False,
                                   execution_timeout=timeout or (600 if smoke else 3600),
                                   request_save_on_cell_execute=False,
                                   kernel_manager_class=_ipc_kernel_manager())
    except Exception as e:
        if tmp.exists():
            os.replace(tmp, failed)
        raise BookError(f"chapter {name!r} failed: {type(e).__name__}: {e}\n(the partial "
                        f"notebook is {failed})") from e
    seconds = time.time() - t0
    nb = _finish(name, cache.read(tmp), params, root)
    if nb is None:
        raise BookError(f"chapter {name!r}: {src} changed while it ran; run it again")
    nbformat.write(nb, str(tmp))
    os.replace(tmp, P["executed"] / f"{name}.ipynb")
    if failed.exists():
        failed.unlink()
    cache.record(name, cache.after_run(key, params, defaults(name, root)), P["executed"],
                 P["results"])
    _record_time(P["results"], name, seconds, params, smoke)
    print(f"[ctr.book] {name}: done in {seconds:.0f} s", flush=True)
    return seconds


def refresh(name: str, params: dict, root: Path = ROOT) -> bool:
    """A chapter that need not re-run: rewrite its page only if the prose or tags changed.
    Returns False when it cannot be refreshed (then it must re-run)."""
    import nbformat

    path = paths(root)["executed"] / f"{name}.ipynb"
    old = cache.read(path)
    nb = _finish(name, old, params, root)
    if nb is None:
        return False
    if nbformat.writes(nb) != nbformat.writes(old):
        write_atomic(path, nbformat.writes(nb))
    return True


def _record_time(results_dir, name, seconds, params, smoke):
    path = results_dir / "timings.json"
    t = json.loads(path.read_text()) if path.exists() else {}
    t[name] = {"seconds": round(seconds, 1), "smoke": smoke,
               "params": {k: v for k, v in params.items() if k != "results_dir"},
               "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_atomic(path, json.dumps(t, indent=1, sort_keys=True))


# --- rendering ------------------------------------------------------------------------------------

def _static(root: Path = ROOT) -> None:
    """Files served from the book's _static (_config.yml html_static_path): MathJax 2.7 from the
    jupyter-server-mathjax wheel (the CDN cannot be reached offline) and ctr's own
    (ctr/book/static: the attention explorer)."""
    import jupyter_server_mathjax

    src = Path(jupyter_server_mathjax.__file__).parent / "static"
    dst = Path(root) / "_build" / "mathjax"
    if not (dst / "MathJax.js").exists():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    own = Path(root) / "_build" / "ctr_static"
    own.mkdir(parents=True, exist_ok=True)
    served = Path(root) / "_build" / "html" / "_static"
    for f in (Path(__file__).parent / "static").iterdir():
        if not f.is_file():
            continue
        if not (own / f.name).exists() or (own / f.name).read_bytes() != f.read_bytes():
            shutil.copy(f, own / f.name)
        # Sphinx never overwrites a file already in _static, and copies nothing when no page is
        # out of date: put the current file there ourselves
        if served.is_dir() and (not (served / f.name).exists()
                                or (served / f.name).read_bytes() != f.read_bytes()):
            shutil.copy(f, served / f.name)


def render(root: Path = ROOT) -> None:
    """jupyter-book build (never executes; warnings, unknown citations and dead references are
    errors). Only warnings and errors reach the log."""
    _static(root)
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(root), "--builder", "html",
           "-W", "-n", "--keep-going", "--quiet"]
    print("[ctr.book] " + " ".join(cmd[1:]), flush=True)
    prepare_env()
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    out = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)       # no terminal colours in logs
    problems = [l for l in out.splitlines()
                if any(w in l for w in ("WARNING", "ERROR", "Error", "Traceback", "CRITICAL"))]
    for line in problems:
        print(line, file=sys.stderr)
    if r.returncode != 0:
        if not problems:
            print(out[-8000:], file=sys.stderr)
        raise BookError("jupyter-book build failed:\n  " + "\n  ".join(problems[:20] or ["(see above)"])
                        + "\n(the HTML in _build/html may be incomplete)")


def build(only: list[str] | None = None, smoke: bool = False, given: dict | None = None,
          check: bool = True, root: Path = ROOT, force: bool = False) -> dict:
    """Run the chapters that changed (all with ``force``), render, check. Returns the wall
    time of each chapter that ran; chapters that were up to date are not in it."""
    names = toc_notebooks(root)
    if only:
        bad = sorted(set(only) - set(names))
        if bad:
            raise BookError(f"unknown chapter(s) {', '.join(bad)}; chapters: {', '.join(names)}")
        names = [n for n in names if n in only]
    P = paths(root)
    times, skipped = {}, []
    t0 = time.time()
    for n in names:
        # global key=value parameters go to the chapters that have them
        known = parameters(n, root)
        mine = {k: v for k, v in (given or {}).items()
                if k in known or (k == "model" and "models" in known)}
        if not force:
            params = resolve(n, mine, smoke, root)
            why = cache.stale(n, _key(n, params, root), P["executed"], P["results"])
            if why is None and refresh(n, params, root):
                skipped.append(n)
                continue
            print(f"[ctr.book] {n}: re-running ({why or 'its page no longer matches its source'})",
                  flush=True)
        times[n] = run_chapter(n, mine, smoke=smoke, root=root)
    if skipped:
        print(f"[ctr.book] up to date, not re-run: {', '.join(skipped)}", flush=True)
    render(root)
    if check:
        from . import htmlcheck
        htmlcheck.check(P["html"], names, only_changed=not force)
    total = time.time() - t0
    print("[ctr.book] chapter times: " + (", ".join(f"{k} {v:.0f} s" for k, v in times.items())
                                          or "none ran") + f"; total {total:.0f} s", flush=True)
    print(f"[ctr.book] open {P['html'] / 'index.html'}")
    return times
