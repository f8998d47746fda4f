"""The whole book, every page, built once in smoke mode (the tiny planted model, tiny sizes) on a
copy of the repository, rendered and checked in headless Chromium; then what a user does to it.

The tests run in file order on the one build; the last one changes it (``make chapter`` with
other parameters), so it stays last.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from book_helpers import REPO, captured, plain, repo_copy
from ctr import book
from ctr import rules
from ctr import verdicts as V
from ctr.book import htmlcheck

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = repo_copy(tmp_path_factory.mktemp("smokebook"))
    log = root / "build.log"
    with captured(log):
        try:
            times = book.build(smoke=True, root=root, check=True, keep_going=True)
        except Exception as e:
            raise AssertionError(f"the smoke build failed: {e}\n{log.read_text()[-6000:]}")
    return root, times, log.read_text()


def _results(root):
    return root / "book" / "executed" / "results"


def _page(root, name):
    return plain(htmlcheck.pages(root / "_build" / "html", [name])[name].read_text())


def test_every_page_runs_renders_and_passes_the_check(smoke):
    root, times, log = smoke
    assert list(times) == book.toc_notebooks(root) and len(times) == 12
    assert "[ctr.htmlcheck] 12 pages ok" in log
    assert not list(root.rglob("kernel-ipc-*")) and not list(root.rglob("*.failed.ipynb"))


def test_every_results_files_claims_use_the_vocabulary(smoke):
    root = smoke[0]
    seen = 0
    for f in sorted(_results(root).glob("*.json")):
        data = json.loads(f.read_text())
        for part in ("claims", "beyond"):
            for row in data.get(part, []) if isinstance(data, dict) else []:
                assert row["verdict"] in V.VERDICTS, (f.name, row)
                assert row.get("rule"), (f.name, row["id"])
                if row["id"].endswith("_alt"):      # our reading: marked, never the file's rule
                    assert row.get("reading") == V.ALTERNATIVE, (f.name, row["id"])
                    assert "not pre-registered" in row["rule"], (f.name, row["id"])
                elif f.stem != "scorecard":
                    assert row["rule"] == rules.text(row["id"]), (f.name, row["id"])
                if f.stem != "scorecard":
                    assert set(V.COLUMNS) <= set(row), (f.name, row["id"])
                seen += 1
    assert seen > 20


def test_the_probes_and_release_results_carry_every_row(smoke):
    """What the chapters' own smoke tests checked before the whole book ran here."""
    from ctr.chapters.probes import verdicts as PV
    res = json.loads((_results(smoke[0]) / "probes.json").read_text())
    r = res["models"]["tiny-planted-llama"]
    for task in ("cities", "sentiment", "cities_suffix"):
        assert r[task]["paper"]["min_queries"] == 1 and r[task]["guard"]["min_queries"] == 5
        assert {"resplits", "null", "mcnemar", "best_tag", "best_activation"} <= set(r[task]["paper"])
    assert [c["id"] for c in res["claims"]] == [c[0] for c in PV.CLAIMS] + [c[0] for c in PV.ACT_CLAIMS]
    assert res["params"]["device"] == "cpu" and res["params"]["dtype"] == "float32"
    rel = json.loads((_results(smoke[0]) / "release.json").read_text())
    assert {"tags_lm_bos", "tags_lm_mid", "tags_lm_specific", "swap_sentiment_head",
            "swap_cities_layer_answer"} <= {c["id"] for c in rel["claims"]}


def test_a_rebuild_with_nothing_changed_runs_nothing(smoke):
    assert book.build(smoke=True, root=smoke[0], check=False, html=False) == {}


def _printed_papermill(root: Path) -> list[str]:
    """The papermill command the adapt page prints (its code block, continuation lines joined)."""
    cells = json.loads((root / "book" / "adapt.ipynb").read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    blocks = [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", text, re.S)]
    cmds = [line for b in blocks for line in b.splitlines() if "papermill book/" in line]
    assert len(cmds) == 1, cmds
    return shlex.split(cmds[0])


def test_the_adapt_pages_papermill_command_runs_as_printed(smoke):
    """The command as the adapt page prints it, run from the repository root, with two
    substitutions: ``.venv/bin/`` is the environment running the tests (``make test`` runs
    .venv/bin/python), and the model is the tiny one (the printed smollm2-135m takes minutes on
    a CPU). It leaves the book's results byte-identical and writes its own in book/results."""
    root = smoke[0]
    venv = Path(sys.executable).parent
    cmd = [str(venv / a[len(".venv/bin/"):]) if a.startswith(".venv/bin/") else
           a.replace("smollm2-135m", "tiny-planted-llama") for a in _printed_papermill(root)]
    assert Path(cmd[0]).name == "papermill" and "models" in cmd
    out = Path(cmd[2])
    before = {f.name: f.read_bytes() for f in _results(root).iterdir()}
    env = dict(os.environ, PATH=str(venv) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {f.name: f.read_bytes() for f in _results(root).iterdir()} == before
    mine = json.loads((root / "book" / "results" / "sinks.json").read_text())
    assert list(mine["models"]) == ["tiny-planted-llama"] and mine["params"]["n_prompts"] == 16
    out.unlink(missing_ok=True)


def test_make_chapter_with_other_parameters_leaves_no_page_showing_the_old_number(smoke):
    """`make chapter NAME=sinks PARAMS="n_prompts=1"` on the smoke book (smoke mode caps the
    prompts at 2, so 1 is what changes the numbers here): the sinks page, the scorecard and the
    front page all show the new numbers, none the old, and each says it was not run (or shows
    results not run) with the defaults."""
    root = smoke[0]
    old = {r["id"]: r["ours"] for r in json.loads((_results(root) / "sinks.json").read_text())["claims"]}
    ran = book.chapter("sinks", {"n_prompts": 1}, smoke=True, root=root)
    assert {"sinks", "scorecard", "index"} <= set(ran) and "variance" not in ran
    new = {r["id"]: r["ours"] for r in json.loads((_results(root) / "sinks.json").read_text())["claims"]}
    changed = {i for i in old if old[i] != new.get(i)}
    assert "two_sinks" in changed                       # "k of N (prompt, head) pairs"
    for page in ("sinks", "scorecard", "index"):
        text = _page(root, page)
        for i in changed:
            assert old[i] not in text, (page, old[i])
        assert new["two_sinks"] in text, page
        assert "Non-default parameters" in text and "n_prompts=1" in text, page
