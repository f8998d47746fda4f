"""Render the executed notebooks into HTML with jupyter-book (which never executes anything:
``execute_notebooks: 'off'``). Built with ``-W -n``: a warning, an unknown citation or a dead
cross-reference fails the build; only warnings and errors reach the log."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from .execute import prepare_env
from .layout import ROOT, BookError


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
    """jupyter-book build of ``root`` into ``_build/html``; BookError listing the problems."""
    _static(root)
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(root), "--builder",
           "html", "-W", "-n", "--keep-going", "--quiet"]
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
