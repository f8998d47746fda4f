"""Execute the book's chapters with papermill and render the HTML book with jupyter-book.

    python -m ctr.book build [--smoke] [--only sinks,variance] [--no-check] [key=value ...]
    python -m ctr.book chapter NAME [key=value ...]      # rerun one chapter, re-render
    python -m ctr.book params NAME                       # a chapter's parameters and defaults
    python -m ctr.book check                             # the headless-Chromium check alone

Sources are ``book/<name>.ipynb`` (narrative + calls into ``ctr``, one cell tagged
``parameters``). Each run writes ``book/executed/<name>.ipynb`` atomically (a failed run goes
to ``<name>.failed.ipynb`` and fails the build; the last good run stays), results to
``book/executed/results/<name>.json`` and its wall time to ``results/timings.json``.
``_toc.yml`` lists the executed notebooks; jupyter-book never executes anything itself
(``execute_notebooks: 'off'``) and builds with ``-W``, so a missing chapter fails the build.
Values in ``key=value`` are YAML (``n_prompts=20``, ``models=[smollm2-135m,gemma3-270m]``);
``model=X`` is shorthand for ``models=[X]``. Unknown names are an error.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..results import write_atomic

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
    import papermill

    return {k: v["default"] for k, v in papermill.inspect_notebook(str(source(name, root))).items()}


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
    return params


def prepare_env() -> None:
    """Environment for papermill kernels and jupyter-book (they inherit this process's)."""
    bindir = str(Path(sys.executable).parent)   # the kernelspec runs "python": make it ours
    if not os.environ.get("PATH", "").startswith(bindir + os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"   # figures inline


def run_chapter(name: str, given: dict | None = None, smoke: bool = False,
                timeout: int | None = None, root: Path = ROOT) -> float:
    """Execute one chapter with papermill; returns its wall time in seconds."""
    import papermill

    P = paths(root)
    src = source(name, root)
    params = resolve(name, given or {}, smoke, root)
    P["executed"].mkdir(parents=True, exist_ok=True)
    tmp = P["executed"] / f".{name}.running.ipynb"
    failed = P["executed"] / f"{name}.failed.ipynb"
    print(f"[ctr.book] {name}: running with {json.dumps(params)}", flush=True)
    prepare_env()
    t0 = time.time()
    try:
        papermill.execute_notebook(str(src), str(tmp), parameters=params, kernel_name="python3",
                                   cwd=str(P["book"]), log_output=True, progress_bar=False,
                                   execution_timeout=timeout or (600 if smoke else 3600),
                                   request_save_on_cell_execute=False)
    except Exception as e:
        if tmp.exists():
            os.replace(tmp, failed)
        raise BookError(f"chapter {name!r} failed: {type(e).__name__}: {e}\n(the partial "
                        f"notebook is {failed})") from e
    seconds = time.time() - t0
    os.replace(tmp, P["executed"] / f"{name}.ipynb")
    if failed.exists():
        failed.unlink()
    _record_time(P["results"], name, seconds, params, smoke)
    print(f"[ctr.book] {name}: done in {seconds:.0f} s", flush=True)
    return seconds


def _record_time(results_dir, name, seconds, params, smoke):
    path = results_dir / "timings.json"
    t = json.loads(path.read_text()) if path.exists() else {}
    t[name] = {"seconds": round(seconds, 1), "smoke": smoke,
               "params": {k: v for k, v in params.items() if k != "results_dir"},
               "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_atomic(path, json.dumps(t, indent=1, sort_keys=True))


def _mathjax(root: Path = ROOT) -> None:
    """MathJax 2.7 from the jupyter-server-mathjax wheel, served from _static (the default
    CDN address cannot be reached offline). _config.yml points html_static_path here."""
    import shutil

    import jupyter_server_mathjax

    src = Path(jupyter_server_mathjax.__file__).parent / "static"
    dst = Path(root) / "_build" / "mathjax"
    if not (dst / "MathJax.js").exists():
        shutil.copytree(src, dst, dirs_exist_ok=True)


def render(root: Path = ROOT) -> None:
    """jupyter-book build (never executes; warnings are errors)."""
    _mathjax(root)
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(root), "--builder", "html",
           "-W", "--keep-going", "--quiet"]
    print("[ctr.book] " + " ".join(cmd[1:]), flush=True)
    prepare_env()
    r = subprocess.run(cmd, cwd=root)
    if r.returncode != 0:
        raise BookError("jupyter-book build failed (see the warnings above); the HTML in "
                        "_build/html may be incomplete")


def build(only: list[str] | None = None, smoke: bool = False, given: dict | None = None,
          check: bool = True, root: Path = ROOT) -> dict:
    names = toc_notebooks(root)
    if only:
        bad = sorted(set(only) - set(names))
        if bad:
            raise BookError(f"unknown chapter(s) {', '.join(bad)}; chapters: {', '.join(names)}")
        names = [n for n in names if n in only]
    times = {}
    t0 = time.time()
    for n in names:
        # global key=value parameters go to the chapters that have them
        known = parameters(n, root)
        mine = {k: v for k, v in (given or {}).items()
                if k in known or (k == "model" and "models" in known)}
        times[n] = run_chapter(n, mine, smoke=smoke, root=root)
    render(root)
    if check:
        from . import htmlcheck
        htmlcheck.check(paths(root)["html"], names)
    total = time.time() - t0
    print("[ctr.book] chapter times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; total {total:.0f} s", flush=True)
    print(f"[ctr.book] open {paths(root)['html'] / 'index.html'}")
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctr.book", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="run every chapter, render, check")
    b.add_argument("--smoke", action="store_true", help="tiny model, tiny sizes (seconds)")
    b.add_argument("--only", default=None, help="comma-separated chapter names")
    b.add_argument("--no-check", action="store_true", help="skip the Chromium check")
    b.add_argument("params", nargs="*", help="key=value for every chapter that has the key")
    c = sub.add_parser("chapter", help="rerun one chapter and re-render")
    c.add_argument("name")
    c.add_argument("params", nargs="*")
    c.add_argument("--smoke", action="store_true")
    c.add_argument("--no-check", action="store_true")
    pa = sub.add_parser("params", help="a chapter's parameters")
    pa.add_argument("name")
    sub.add_parser("check", help="headless-Chromium check of _build/html")
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            build(args.only.split(",") if args.only else None, args.smoke,
                  parse_params(args.params), check=not args.no_check)
        elif args.cmd == "chapter":
            run_chapter(args.name, parse_params(args.params), smoke=args.smoke)
            render()
            if not args.no_check:
                from . import htmlcheck
                htmlcheck.check(HTML, [args.name])
        elif args.cmd == "params":
            for k, v in parameters(args.name).items():
                print(f"{k} = {v}")
        elif args.cmd == "check":
            from . import htmlcheck
            htmlcheck.check(HTML, toc_notebooks())
    except BookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
