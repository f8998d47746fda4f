"""Runs of a chapter, on small books of real notebooks: a run is committed only when the whole
notebook succeeded; a notebook run outside the book (papermill) never writes the book's
results and takes papermill's text form of lists; one run of a book at a time; a stopped or
killed run leaves no kernel files behind."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from book_helpers import chapter, code, mini_book
from ctr import book
from ctr.book import lock

PARAMS = 'n = 1\nfail = False\nsmoke = False\nresults_dir = "results"'
SAVES = chapter('from ctr import results\nresults.save("p", {"n": n}, results_dir)\n'
                'assert results.load("p", results_dir)["n"] == n      # its own, staged\n'
                'if fail:\n    raise RuntimeError("failed after saving")', params=PARAMS)
SLOW = chapter('import time\nfrom ctr import results\ntime.sleep(wait)\n'
               'results.save("slow", {"n": n}, results_dir)',
               params='n = 1\nwait = 4.0\nsmoke = False\nresults_dir = "results"')


def _executed(root):
    return root / "book" / "executed"


def test_a_chapter_that_fails_after_saving_leaves_the_book_as_it_was(tmp_path):
    root = mini_book(tmp_path, {"p": SAVES})
    book.run_chapter("p", {"n": 1}, root=root)
    files = {f: f.read_bytes() for f in _executed(root).rglob("*") if f.is_file()
             and f.name not in (".lock", ".file-hashes.json")}
    assert json.loads((_executed(root) / "results" / "p.json").read_text())["n"] == 1
    with pytest.raises(book.BookError) as e:
        book.run_chapter("p", {"n": 2, "fail": True}, root=root)
    assert "RuntimeError: failed after saving" in str(e.value) and "Traceback" not in str(e.value)
    assert "the book's pages and results are those of the last good run" in str(e.value)
    failed = _executed(root) / "p.failed.ipynb"
    assert failed.exists() and str(failed) in str(e.value)
    for f, data in files.items():           # results, notebook, key, timings: byte-identical
        assert f.read_bytes() == data, f
    assert not list(tempfile.gettempdir() and Path(tempfile.gettempdir()).glob(
        f"{lock.PREFIX}{os.getpid()}-*"))                     # its private directory is gone


def test_papermill_outside_the_book_writes_beside_its_cwd_and_types_lists(tmp_path):
    """The notebook run by papermill itself, lists given as -p text: results go to ./results
    of its --cwd, never into the book's results (which refuse it even when asked)."""
    page = chapter('from ctr import results\n'
                   'results.save("q", {"models": models, "sizes": sizes, "n": n}, results_dir)',
                   params='models = ["smollm2-135m"]\nsizes = [1.0]\nn = 2\nsmoke = False\n'
                          'results_dir = "results"')
    root = mini_book(tmp_path, {"q": page})
    book.run_chapter("q", {"models": ["tiny-planted-llama"]}, root=root)
    res = _executed(root) / "results"
    before = {f.name: f.read_bytes() for f in res.iterdir()}
    pm = [str(Path(sys.executable).parent / "papermill"), "book/q.ipynb", str(tmp_path / "out.ipynb"),
          "-k", "python3", "--cwd", "book", "--no-progress-bar"]
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(pm + ["-p", "models", '["tiny-planted-llama"]', "-p", "sizes", "[2, 3.5]",
                             "-p", "n", "3"], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((root / "book" / "results" / "q.json").read_text()) == \
        {"models": ["tiny-planted-llama"], "sizes": [2.0, 3.5], "n": 3}
    r = subprocess.run(pm + ["-p", "results_dir", "executed/results"], cwd=root, env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "holds the book's results" in r.stderr + r.stdout
    assert {f.name: f.read_bytes() for f in res.iterdir()} == before


def _cli(root, *args, **kw):
    env = dict(os.environ, CTR_BOOK_ROOT=str(root))
    return subprocess.Popen([sys.executable, "-m", "ctr.book", "chapter", *args, "--no-html"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


def test_two_runs_at_once_one_runs_and_the_other_refuses_or_waits(tmp_path):
    root = mini_book(tmp_path, {"slow": SLOW})
    a, b = _cli(root, "slow", "n=1", "wait=3"), _cli(root, "slow", "n=2", "wait=3")
    out = {p: p.communicate(timeout=300) for p in (a, b)}
    won, lost = (a, b) if a.returncode == 0 else (b, a)
    assert won.returncode == 0 and lost.returncode == 2, out
    err = out[lost][1]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"another run of this book is under way (pid {won.pid}: " in err
    assert f"chapter slow n={1 if won is a else 2}" in err
    res = _executed(root) / "results" / "slow.json"
    assert json.loads(res.read_text())["n"] == (1 if won is a else 2)
    # with --wait the second run says whom it waits for, then runs
    with lock.held(root):
        c = _cli(root, "slow", "n=3", "wait=0.1", "--wait")
        first = c.stdout.readline()          # its first words, while we hold the lock
        assert first.startswith(f"[ctr.book] waiting for another run of this book (pid "
                                f"{os.getpid()}: "), first
        time.sleep(1)
        assert c.poll() is None and json.loads(res.read_text())["n"] != 3
    out_c = c.communicate(timeout=300)
    assert c.returncode == 0, out_c
    assert json.loads(res.read_text())["n"] == 3
    assert not list(_executed(root).glob("*.failed.ipynb"))


def _private_dirs(pid):
    return list(Path(tempfile.gettempdir()).glob(f"{lock.PREFIX}{pid}-*"))


def _kernel_started(pid, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        for d in _private_dirs(pid):
            if (d / "kernel.json").exists() and list(d.glob("kernel-ipc-*")):
                return d
        time.sleep(0.2)
    raise AssertionError("the kernel did not start")


def _kernels_of(d: Path) -> list[int]:
    """Processes whose command line names the private directory (the kernel's -f file)."""
    out = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and str(d) in (p / "cmdline").read_bytes().decode(errors="ignore"):
                out.append(int(p.name))
        except OSError:
            pass
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_or_killed_run_leaves_no_kernel_files(tmp_path, sig):
    root = mini_book(tmp_path, {"slow": SLOW})
    p = _cli(root, "slow", "wait=60")
    d = _kernel_started(p.pid)
    assert d.parent != root and not list(root.rglob("kernel-ipc-*"))   # never in the book
    p.send_signal(sig)
    p.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert p.returncode == 128 + sig and not d.exists()   # removed on the way out
    else:
        assert d.exists()                    # nothing runs after SIGKILL ...
        lock.clean_stale()                   # ... the next run of any book removes it
        assert not d.exists()
    t0 = time.time()
    while _kernels_of(d) and time.time() - t0 < 30:   # the kernel notices its parent is gone
        time.sleep(0.5)
    assert not _kernels_of(d)
    assert not list(root.rglob("kernel-ipc-*")) and not (_executed(root) / "results" /
                                                          "slow.json").exists()


CHAIN = {
    "src": chapter('from ctr import results\nresults.save("src", {"n": n}, results_dir)',
                   params='n = 1\nsmoke = False\nresults_dir = "results"'),
    "mid": chapter('from ctr import results\nm = results.load("src", results_dir)["n"]\n'
                   'print(f"mid shows n = {m}")\nresults.save("mid", {"m": m}, results_dir)'),
    "top": chapter('from ctr import results\nprint("top shows m =", '
                   'results.load("mid", results_dir)["m"])'),
    "other": chapter('print("reads nothing")'),
    "front": chapter('print("the front page")'),
    # a page that shows every chapter's run time re-runs when another chapter's entry changes
    "clock": chapter('from ctr import results\nt = results.load("timings", results_dir)\n'
                     'print("clock sees", sorted(t))'),
}


def _text(root, name):
    return (_executed(root) / f"{name}.ipynb").read_text()


def _timings_cell(root, name) -> str:
    import nbformat

    x = nbformat.read(_executed(root) / f"{name}.ipynb", as_version=4)
    cell, = [c for c in x.cells if c.metadata.get("ctr") == "timings"]
    return json.dumps(cell.outputs)


def test_a_chapter_with_other_parameters_reruns_its_readers_and_says_so(tmp_path, capsys):
    import nbformat

    root = mini_book(tmp_path, CHAIN)
    front = nbformat.read(root / "book" / "front.ipynb", as_version=4)
    front.cells.append(code("from ctr.book import present\n\npresent.show_timings(results_dir)"))
    front.cells[-1].metadata["ctr"] = "timings"
    nbformat.write(front, root / "book" / "front.ipynb")
    assert set(book.build(root=root, check=False, html=False)) == set(CHAIN)
    assert "Non-default parameters" not in _text(root, "top")
    times = book.chapter("src", {"n": 2}, root=root, html=False)
    assert set(times) == {"src", "mid", "top", "clock"}   # and not "other", nor "front"
    assert "mid shows n = 2" in _text(root, "mid") and "top shows m = 2" in _text(root, "top")
    for name, line in [("src", "This page was run with `n=2`."),
                       ("mid", "It shows results of the *src* chapter, run with `n=2`.")]:
        assert line in _text(root, name) and "`make book` restores the defaults." in _text(root, name)
    # the front page's run-time table is filled at every build, from timings.json as it is then
    t = json.loads((_executed(root) / "results" / "timings.json").read_text())["src"]
    assert f"<td>{t['seconds']}</td>" in _timings_cell(root, "front")
    assert "<td>n=2</td>" in _timings_cell(root, "front")
    capsys.readouterr()
    assert set(book.build(root=root, check=False, html=False)) == {"src", "mid", "top", "clock"}
    assert 'parameters changed: n 2 -> "default"' in capsys.readouterr().out
    assert book.build(root=root, check=False, html=False) == {}    # its own entry is left out
    assert "Non-default parameters" not in _text(root, "mid")
    assert "<td>n=2</td>" not in _timings_cell(root, "front")


def test_a_run_that_has_just_taken_the_lock_is_named_not_anonymous(tmp_path):
    """The race the clean-clone CI once hit: the second run reads the lock file between the
    first run's flock and its write of who it is; it must wait for the words, not say 'a process
    that did not say which'."""
    import fcntl
    import threading

    p = lock.lock_path(tmp_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)             # taken, nothing written yet
    late = threading.Timer(0.3, lambda: os.pwrite(fd, b"pid 1: make chapter x, since 12:00:00\n", 0))
    late.start()
    try:
        with pytest.raises(book.BookError, match=r"under way \(pid 1: make chapter x"):
            with lock.held(tmp_path):
                pass
    finally:
        late.join()
        os.close(fd)
