"""One run of a book at a time, and nothing left behind by a run that was stopped.

``held(root)``: an exclusive ``flock`` on ``book/executed/.lock`` for the whole command (run,
render, check). A second run either refuses at once, naming the holder (pid, command, start
time), or with ``wait=True`` says so and waits. The lock is reentrant within a process and the
kernel releases it when the holder dies, however it dies.

``private_dir()``: the temporary directory of one chapter run (kernel connection file, IPC
sockets, staged results, trace), outside the book, removed on exit. ``stop_on_signals`` turns
SIGTERM and SIGHUP into a normal exit so that removal runs; a run killed with SIGKILL cannot
clean up, so every run first removes the directories of runs whose process is gone.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .layout import ROOT, BookError, paths

PREFIX = "ctr-book-"
_depth: dict[str, int] = {}


def lock_path(root: Path = ROOT) -> Path:
    return paths(root)["executed"] / ".lock"


def holder(root: Path = ROOT) -> str:
    """Who holds the lock, as its holder wrote it ("" when nobody says)."""
    try:
        return lock_path(root).read_text().strip()
    except OSError:
        return ""


def _holder_soon(root: Path, seconds: float = 2.0) -> str:
    """The holder's words; a run that has just taken the lock writes them a moment later, so a
    second run started in the same instant waits briefly for them."""
    end = time.monotonic() + seconds
    while not (who := holder(root)) and time.monotonic() < end:
        time.sleep(0.02)
    return who


@contextlib.contextmanager
def held(root: Path = ROOT, wait: bool = False):
    """Hold the book's lock for the duration; BookError when another process holds it."""
    p = lock_path(root)
    p.parent.mkdir(parents=True, exist_ok=True)
    k = str(p.resolve())
    if _depth.get(k):
        _depth[k] += 1
        try:
            yield
        finally:
            _depth[k] -= 1
        return
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder_soon(root) or "a process that did not say which"
            if not wait:
                raise BookError(f"another run of this book is under way ({who}); wait for it to "
                                "finish or stop it, then run again (or add --wait)") from None
            print(f"[ctr.book] waiting for another run of this book ({who}) ...", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {_command()}, since {_dt.datetime.now():%H:%M:%S}\n"
                  .encode(), 0)
        _depth[k] = 1
        clean_stale()
        try:
            yield
        finally:
            _depth[k] = 0
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)          # closing the descriptor releases the flock


def _command() -> str:
    """This process's command as the user typed it (``python -m ctr.book chapter sinks ...``)."""
    argv = list(sys.argv) or ["python"]
    if argv[0].endswith(os.path.join("ctr", "book", "__main__.py")):
        argv[0] = "python -m ctr.book"
    return " ".join(argv)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(tmp: Path | None = None) -> list[Path]:
    """Remove the private directories of runs whose process no longer exists."""
    gone = []
    for d in Path(tmp or tempfile.gettempdir()).glob(PREFIX + "*"):
        m = re.match(re.escape(PREFIX) + r"(\d+)-", d.name)
        if m and d.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


@contextlib.contextmanager
def private_dir():
    """A fresh directory for one chapter run, removed on exit (an exception or a signal too)."""
    d = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Stopped(SystemExit):
    """SIGTERM or SIGHUP: leave through every ``finally`` (kernels shut down, files removed)."""


def stop_on_signals() -> None:
    """In the command line: SIGTERM and SIGHUP end the run as Ctrl-C does (cleanly)."""
    def stop(sig, frame):
        raise Stopped(128 + sig)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, stop)
