"""The book pipeline: every chapter runs under papermill in smoke mode on the tiny planted model,
the HTML renders with jupyter-book, and headless Chromium sees the figures and no traceback.

Everything happens in a copy of the book skeleton under a temporary directory, so a test run
never touches the real build in book/executed and _build.
"""
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from ctr import book
from ctr.book import htmlcheck

REPO = book.ROOT


def skeleton(dst: Path) -> Path:
    for f in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / f, dst / f)
    (dst / "book").mkdir()
    for f in (REPO / "book").iterdir():
        if f.suffix in (".ipynb", ".md"):
            shutil.copy(f, dst / "book" / f.name)
    return dst


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """All chapters in smoke mode, rendered and checked once for the module."""
    root = skeleton(tmp_path_factory.mktemp("book"))
    times = book.build(smoke=True, root=root, check=False)
    return root, times


# --- runner behaviour (no execution) ------------------------------------------------------------

def test_toc_lists_every_chapter_and_each_has_a_source():
    names = book.toc_notebooks()
    assert names[-1] == "index" and names[-2] == "scorecard"
    for n in names:
        assert book.source(n).exists()
    # and every source notebook is in the toc
    assert {p.stem for p in (REPO / "book").glob("*.ipynb")} == set(names)


@pytest.mark.parametrize("name", book.toc_notebooks())
def test_every_chapter_has_one_parameters_cell_with_smoke_and_results_dir(name):
    nb = nbformat.read(book.source(name), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = book.parameters(name)
    assert "smoke" in params and "results_dir" in params
    # every assignment of the parameters cell is a parameter papermill can see (a comment
    # papermill cannot parse would silently drop it, and overriding it would then be refused)
    assigned = [l.split("=")[0].strip() for l in tagged[0].source.splitlines()
                if re.match(r"^\w+\s*=", l)]
    assert assigned == list(params)


def test_unknown_parameter_is_an_error_that_lists_the_known_ones():
    with pytest.raises(book.BookError, match=r"no parameter n_promts.*n_prompts="):
        book.resolve("sinks", {"n_promts": 3})


def test_model_is_shorthand_for_models():
    assert book.resolve("sinks", {"model": "gemma3-270m"})["models"] == ["gemma3-270m"]


def test_params_parse_as_yaml():
    assert book.parse_params(["n=3", "models=[a,b]", "smoke=true", "eps=0.1"]) == \
        {"n": 3, "models": ["a", "b"], "smoke": True, "eps": 0.1}
    with pytest.raises(book.BookError, match="not key=value"):
        book.parse_params(["oops"])


def test_a_failing_chapter_fails_and_keeps_the_last_good_run(tmp_path):
    root = skeleton(tmp_path)
    nb = nbformat.read(root / "book" / "sinks.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("raise RuntimeError('broken chapter')"))
    nbformat.write(nb, root / "book" / "sinks.ipynb")
    good = root / "book" / "executed" / "sinks.ipynb"
    good.parent.mkdir(parents=True)
    good.write_text("last good run")
    with pytest.raises(book.BookError, match="broken chapter"):
        book.run_chapter("sinks", smoke=True, root=root)
    assert good.read_text() == "last good run"
    assert (root / "book" / "executed" / "sinks.failed.ipynb").exists()


# --- the smoke build ----------------------------------------------------------------------------

@pytest.mark.slow
def test_every_chapter_runs_in_smoke_mode(built):
    root, times = built
    assert set(times) == set(book.toc_notebooks())
    for name in times:
        nb = nbformat.read(root / "book" / "executed" / f"{name}.ipynb", as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, name


@pytest.mark.slow
def test_results_files_are_written(built):
    root, times = built
    res = root / "book" / "executed" / "results"
    timings = json.loads((res / "timings.json").read_text())
    assert set(timings) == set(times)
    for name in times:
        if name not in ("index",):
            assert (res / f"{name}.json").exists(), name


@pytest.mark.slow
def test_rendered_html_has_chapters_figures_and_no_traceback(built):
    root, times = built
    html = root / "_build" / "html"
    for name in times:
        page = htmlcheck.pages(html, [name])[name]
        text = page.read_text()
        assert "Traceback (most recent call last)" not in text, name
        if name not in htmlcheck.NO_FIGURES:
            assert "<img" in text and ".png" in text, name


@pytest.mark.slow
def test_chromium_sees_every_page_without_breakage(built):
    root, times = built
    if shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed: run `make chromium` (make test does)")
    report = htmlcheck.check(root / "_build" / "html", list(times), screenshots=root / "shots")
    assert set(report) == set(times)
    assert (root / "shots" / "sinks.png").stat().st_size > 10_000


@pytest.mark.slow
def test_chromium_check_catches_a_broken_page(built, tmp_path):
    root, _ = built
    html = tmp_path / "html"
    shutil.copytree(root / "_build" / "html", html)
    page = htmlcheck.pages(html, ["sinks"])["sinks"]
    text = page.read_text()
    # remove one figure file and inject an error output
    img = re.search(r'<img[^>]*src="([^"]+)"', text).group(1)
    (page.parent / img).unlink()
    page.write_text(text.replace("</main>", '<div class="output traceback"><pre>Traceback (most '
                                            'recent call last): boom</pre></div></main>', 1))
    with pytest.raises(AssertionError) as e:
        htmlcheck.check(html, ["sinks"], screenshots=tmp_path / "shots")
    assert "did not load" in str(e.value) and "error output shown" in str(e.value)


@pytest.mark.slow
def test_rerun_with_same_parameters_gives_identical_numbers(built):
    root, _ = built
    res = root / "book" / "executed" / "results"
    before = {p.name: p.read_text() for p in res.glob("*.json") if p.name != "timings.json"}
    for name in ("sinks", "variance"):
        book.run_chapter(name, smoke=True, root=root)
        assert (res / f"{name}.json").read_text() == before[f"{name}.json"], name
