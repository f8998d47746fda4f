"""The rendered book: a small build (the real sinks chapter, a small explorer page, a small front
page) rendered and checked in headless Chromium, the broken pages the check must reject, the
references, the attention explorer. (Parameters: test_book_params.py; the cache:
test_book_cache.py; runs, locks, papermill: test_book_runs.py; the whole book: test_book_smoke.py.)

Everything happens in copies of the book skeleton under temporary directories, so a test run
never touches the real build in book/executed and _build. The one smoke build (module fixture)
holds the real sinks chapter on the tiny planted model, a small explorer page and a small front
page, so it does not depend on the scorecard or on every other chapter's results.
"""
import json
import re
import shutil
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest

from book_helpers import REPO, captured, code, md, nb, plain
from ctr import book
from ctr.book import cache, explorer, htmlcheck

NOISE = ("IProgress not found", "TqdmWarning", "Kernel is running over TCP")


# --- small notebooks of our own -----------------------------------------------------------------

_nb, _md, _code = nb, md, code


PARAMS = 'smoke = False      # tiny sizes\nresults_dir = "results"'

FRONT = _nb(_md("# Test front page\n\nProse, a citation {cite}`zhang2025catch` and one figure."),
            _code(PARAMS, "parameters"),
            _code("import matplotlib.pyplot as plt\nplt.plot([0, 1, 4])\nplt.show()", "remove-input"))

DEMO = _nb(
    _md("# Explorer demo\n\nThe explorer of {ref}`the next section <demo-explorer>` shows the "
        "tiny planted model; sinks as in {cite:t}`gu2024sink`."),
    _code('model = "tiny-planted-llama"   # any name ctr.models.load accepts\nmax_tokens = 24\n'
          + PARAMS, "parameters"),
    _code("import tqdm.auto   # in a kernel without ipywidgets this warns, once\n"
          "from tqdm import tqdm\nfor _ in tqdm(range(3), desc='progress bar'):\n    pass\n"
          "import matplotlib.pyplot as plt\nfrom ctr import models as M\nfrom ctr.book import explorer",
          "hide-input"),
    _md("(demo-explorer)=\n## The explorer"),
    _code("m = M.load(model)\ntext = 'the cat sat . on the mat . and then it slept . the end'\n"
          "tokens, A, windows = explorer.attention(m, text, max_tokens=max_tokens)\n"
          "explorer.show(tokens, A, eps=0.2, min_queries=2, windows=windows, layer=1, head=0)"),
    _code("plt.imshow(A[1, 2])\nplt.show()", "hide-input"),
)


def skeleton(dst: Path, chapters=("sinks",), own=None) -> Path:
    """A book in ``dst``: config, references, the given real chapters, our own notebooks
    (``own``: name -> notebook; ``index`` among them becomes the root) and a toc of just these."""
    own = dict(own or {})
    for f in ("_config.yml", "references.bib"):
        shutil.copy(REPO / f, dst / f)
    (dst / "book").mkdir()
    (dst / "ctr").symlink_to(REPO / "ctr")      # chapters show package code (literalinclude)
    shutil.copy(REPO / "book" / "references.md", dst / "book" / "references.md")
    for c in chapters:
        shutil.copy(REPO / "book" / f"{c}.ipynb", dst / "book" / f"{c}.ipynb")
    for name, nb in own.items():
        nbformat.write(nb, dst / "book" / f"{name}.ipynb")
    # chapters link to each other ({doc}`variance`): a chapter left out gets a one-cell stand-in,
    # so a partial book still builds with -n (a dead link elsewhere still fails it)
    linked = {m for c in chapters for m in re.findall(r"\{doc\}`([\w-]+)`",
                                                       (REPO / "book" / f"{c}.ipynb").read_text())}
    stubs = sorted(linked - set(chapters) - set(own))
    for name in stubs:
        nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language":
                                                              "python", "display_name": "Python 3"}})
        nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}\n\n(a stand-in for this test)"),
                    nbformat.v4.new_code_cell('smoke = False\nresults_dir = "results"',
                                              metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\n"
                                              "plt.plot([0, 1], [1, 0]); plt.show()",
                                              metadata={"tags": ["hide-input"]})]
        nbformat.write(nb, dst / "book" / f"{name}.ipynb")
    rest = [c for c in [*chapters, *stubs, *own] if c != "index"]
    toc = ["format: jb-book", "root: book/executed/index", "parts:", "  - caption: Chapters",
           "    chapters:", *[f"      - file: book/executed/{c}" for c in rest],
           "  - caption: References", "    chapters:", "      - file: book/references"]
    (dst / "_toc.yml").write_text("\n".join(toc) + "\n")
    return dst


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The smoke build: sinks + explorer page + front page, rendered and checked once."""
    root = skeleton(tmp_path_factory.mktemp("book"), own={"index": FRONT, "explorer_demo": DEMO})
    log = root / "build.log"
    with captured(log):
        times = book.build(smoke=True, root=root, check=True)
    return root, times, log.read_text()


def page(root, name):
    return htmlcheck.pages(root / "_build" / "html", [name])[name]


def copy_of(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst, symlinks=True)
    return dst


# --- the explorer (no browser) ------------------------------------------------------------------

def _attention(L=2, H=3, T=10, seed=0):
    g = np.random.default_rng(seed)
    A = g.random((L, H, T, T)) * np.tri(T)
    return A / A.sum(-1, keepdims=True)


def test_explorer_payload_decodes_to_the_attention_and_sink_scores():
    A = _attention()
    p = explorer.payload([f"t{i}" for i in range(10)], A, eps=0.2, min_queries=3)
    A2, a2 = explorer.decode(p)
    assert np.abs(A2 - A).max() <= 0.5 / 255 + 1e-9          # one byte per entry
    a = explorer.scores(A, min_queries=3)
    assert np.isnan(a[..., -2:]).all() and np.isnan(a2[..., -2:]).all()   # tail guard kept
    assert np.nanmax(np.abs(a2 - a)) < 1e-5
    # alpha_0 by hand: the mean of column 0 over all T queries
    assert a[1, 2, 0] == pytest.approx(A[1, 2, :, 0].mean())


def test_explorer_rejects_bad_input_with_one_clear_error():
    A, tok = _attention(), [f"t{i}" for i in range(10)]
    with pytest.raises(explorer.ExplorerError, match="eps must lie in"):
        explorer.html(tok, A, eps=2)
    with pytest.raises(explorer.ExplorerError, match="9 tokens for attention over 10"):
        explorer.html(tok[:9], A)
    with pytest.raises(explorer.ExplorerError, match=r"layers, heads, T, T"):
        explorer.html(tok, A[0])
    with pytest.raises(explorer.ExplorerError, match="MB into the page"):
        explorer.html(tok, A, max_bytes=100)


def test_explorer_html_is_stable_and_needs_no_network():
    A, tok = _attention(), [f"t{i}" for i in range(10)]
    a, b = explorer.html(tok, A), explorer.html(tok, A)
    assert a == b                                  # reruns give identical notebooks
    js = (explorer.STATIC / "ctr-explorer.js").read_text()
    assert not re.search(r"https?://", js + a)     # nothing fetched from anywhere


# --- the smoke build ----------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_build_runs_and_the_check_passes(built):
    root, times, _ = built
    assert set(times) == {"sinks", "variance", "explorer_demo", "index"}     # variance: a stand-in
    for name in times:
        nb = nbformat.read(root / "book" / "executed" / f"{name}.ipynb", as_version=4)
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                    if o.get("output_type") == "error"], name
        assert (root / "book" / "executed" / f"{name}.key.json").exists()
    timings = json.loads((root / "book" / "executed" / "results" / "timings.json").read_text())
    assert set(timings) == set(times)
    shots = root / "_build" / "screenshots"
    assert (shots / "index.png").stat().st_size > 10_000
    assert (shots / "explorer-explorer_demo.png").stat().st_size > 5_000


@pytest.mark.slow
def test_pages_hide_the_injected_cell_and_show_a_rerun_box(built):
    root, _, _ = built
    text = page(root, "sinks").read_text()
    assert str(root) not in text                       # no absolute path of the build machine
    assert text.count("How to rerun this page") == 1
    assert 'make chapter NAME=sinks PARAMS="smoke=true models=[tiny-planted-llama]"' in plain(text)
    for k in book.parameters("sinks"):
        assert (f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{k}</span>"
                in text) == (k != "results_dir"), k


@pytest.mark.slow
def test_hidden_code_says_what_is_hidden_and_logs_are_quiet(built):
    root, _, log = built
    text = page(root, "explorer_demo").read_text()
    assert "Show code (setup, plotting or formatting)" in text
    for w in NOISE:
        assert w not in log and w not in text, w
    assert "progress bar: 100%" in log                 # progress as text in the log ...
    assert "progress bar: " not in text and "it/s" not in text      # ... not in the page


@pytest.mark.slow
def test_citations_link_to_the_references_page(built):
    root, _, _ = built
    text = page(root, "explorer_demo").read_text()
    assert re.search(r'href="\.\./references\.html#[^"]+"', text)
    assert "Gu <em>et al.</em>" in text and "2024" in text
    refs = (root / "_build" / "html" / "book" / "references.html").read_text()
    assert "When attention sink emerges" in refs and "Massive activations" in refs


@pytest.mark.slow
def test_rebuild_with_nothing_changed_runs_nothing(built):
    root = built[0]
    t0 = time.time()
    assert book.build(smoke=True, root=root, check=False) == {}
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_front_page_showing_code_fails_the_check_and_a_tag_edit_only_rerenders(built, tmp_path):
    root = copy_of(built[0], tmp_path)
    nb = cache.read(root / "book" / "index.ipynb")
    nb.cells[2].metadata["tags"] = []                  # the plotting cell, visible
    nbformat.write(nb, root / "book" / "index.ipynb")
    assert book.build(smoke=True, root=root, check=False) == {}       # not re-executed
    with pytest.raises(AssertionError, match=r"index: the front page shows code.*plt\.plot"):
        htmlcheck.check(root / "_build" / "html", ["index"], screenshots=tmp_path / "shots")


@pytest.mark.slow
def test_unknown_citation_and_dead_reference_fail_the_build(built, tmp_path):
    """One broken page with both; -W -n reports each as its own warning, and any warning fails
    the build. A Markdown edit re-renders without re-executing."""
    root = copy_of(built[0], tmp_path)
    timings = (root / "book" / "executed" / "results" / "timings.json").read_text()
    nb = cache.read(root / "book" / "explorer_demo.ipynb")
    nb.cells[0].source += "\n\nSee {cite}`nosuchkey2099` and {ref}`no-such-label`."
    nbformat.write(nb, root / "book" / "explorer_demo.ipynb")
    with pytest.raises(book.BookError) as e:
        book.build(smoke=True, root=root, check=False)
    assert re.search(r"explorer_demo.*nosuchkey2099", str(e.value))
    assert re.search(r"explorer_demo.*no-such-label", str(e.value))
    assert (root / "book" / "executed" / "results" / "timings.json").read_text() == timings


@pytest.mark.slow
@pytest.mark.parametrize("patch, message", [
    (lambda js: js.replace('hsel.addEventListener("change", draw);', ""), "does not change the picture"),
    (lambda js: "", "was not drawn"),
])
def test_check_rejects_an_explorer_that_does_not_react_or_draw(built, tmp_path, patch, message):
    html = tmp_path / "html"
    shutil.copytree(built[0] / "_build" / "html", html)
    js = html / "_static" / "ctr-explorer.js"
    js.write_text(patch(js.read_text()))
    with pytest.raises(AssertionError, match=message):
        htmlcheck.check(html, ["explorer_demo"], screenshots=tmp_path / "shots")


@pytest.mark.slow
def test_chromium_check_catches_a_broken_page(built, tmp_path):
    html = tmp_path / "html"
    shutil.copytree(built[0] / "_build" / "html", html)
    p = htmlcheck.pages(html, ["sinks"])["sinks"]
    text = p.read_text()
    # remove one figure file and inject an error output
    img = re.search(r'<img[^>]*src="([^"]+)"', text).group(1)
    (p.parent / img).unlink()
    p.write_text(text.replace("</main>", '<div class="output traceback"><pre>Traceback (most '
                                         'recent call last): boom</pre></div><div class="cell_output">'
                                         "<pre>PosixPath('/home/me/results/sinks.json')</pre></div>"
                                         '</main>', 1))
    with pytest.raises(AssertionError) as e:
        htmlcheck.check(html, ["sinks"], screenshots=tmp_path / "shots")
    assert "did not load" in str(e.value) and "error output shown" in str(e.value)
    assert "path object is shown" in str(e.value)


@pytest.mark.slow
def test_a_failing_chapter_fails_and_keeps_the_last_good_run(built, tmp_path):
    root = copy_of(built[0], tmp_path)
    good = (root / "book" / "executed" / "index.ipynb").read_text()
    nb = cache.read(root / "book" / "index.ipynb")
    nb.cells.append(_code("raise RuntimeError('broken chapter')"))
    nbformat.write(nb, root / "book" / "index.ipynb")
    with pytest.raises(book.BookError, match="broken chapter"):
        book.build(smoke=True, root=root, check=False)
    assert (root / "book" / "executed" / "index.ipynb").read_text() == good
    assert (root / "book" / "executed" / "index.failed.ipynb").exists()


@pytest.mark.slow
def test_rerun_with_same_parameters_gives_identical_numbers(built, tmp_path):
    root = copy_of(built[0], tmp_path)
    res = root / "book" / "executed" / "results" / "sinks.json"
    before = res.read_text()
    book.run_chapter("sinks", smoke=True, root=root)
    assert res.read_text() == before


def test_an_unwritable_results_dir_fails_before_any_kernel_starts(tmp_path):
    root = skeleton(tmp_path)
    (root / "book" / "executed").write_text("a file where the executed notebooks should go")
    with pytest.raises(book.BookError, match="cannot write results"):
        book.resolve("sinks", {}, root=root)


def test_changed_static_files_are_served_even_when_no_page_is_rebuilt(tmp_path):
    # Sphinx neither overwrites a file in _build/html/_static nor copies anything when no page
    # is out of date, so the runner must put a changed explorer script or stylesheet there.
    from ctr.book import rendering as runner
    (tmp_path / "_build" / "mathjax").mkdir(parents=True)
    (tmp_path / "_build" / "mathjax" / "MathJax.js").write_text("")   # skip the MathJax copy
    served = tmp_path / "_build" / "html" / "_static"
    served.mkdir(parents=True)
    (served / "ctr-book.css").write_text("/* an old stylesheet */")
    runner._static(tmp_path)
    src = Path(runner.__file__).parent / "static"
    for f in src.iterdir():
        assert (served / f.name).read_bytes() == f.read_bytes()


@pytest.mark.slow
def test_check_fails_on_an_element_wider_than_its_column_and_on_plotting_code_shown(
        built, tmp_path, capsys):
    html = tmp_path / "html"
    shutil.copytree(built[0] / "_build" / "html", html)
    p = htmlcheck.pages(html, ["explorer_demo"])["explorer_demo"]
    wide = "tokens = " + ", ".join(f"'t{i}'" for i in range(120))      # one long code line
    p.write_text(p.read_text().replace("</main>", (
        '<div class="cell_input"><pre>fig, ax = plt.subplots()\nax.plot(x, y)</pre></div>'
        # white-space: pre, as a page without ctr-book.css's pre-wrap would show it
        f'<div class="cell_output"><pre style="white-space: pre">{wide}</pre></div></main>'), 1))
    with pytest.raises(AssertionError) as e:
        htmlcheck.check(html, ["explorer_demo"], screenshots=tmp_path / "shots", strict=True)
    assert re.search(r"explorer_demo: wider than its column: pre.* px in .* px\): tokens = 't0'",
                     str(e.value))
    assert "explorer_demo: plotting/formatting code shown (tag it hide-input): 'fig, ax" \
        in str(e.value)
    capsys.readouterr()
    htmlcheck.check(html, ["explorer_demo"], screenshots=tmp_path / "shots", strict=False)
    assert "wider than its column" in capsys.readouterr().out        # a note, not a failure


def test_notebooks_define_no_functions_and_name_no_internal_issues():
    """Pages only consume the package: no def/class/lambda in a code cell (a helper belongs in a
    tested chapter module), and no "issue 12" a reader cannot follow."""
    bad = []
    for path in sorted((REPO / "book").glob("*.ipynb")):
        for i, c in enumerate(nbformat.read(path, as_version=4).cells):
            if c.cell_type == "code" and re.search(r"^\s*(def|class)\s|\blambda\b", c.source, re.M):
                bad.append(f"{path.name} cell {i}: defines a function")
            if re.search(r"\b[Ii]ssues? \d+", c.source):
                bad.append(f"{path.name} cell {i}: names an internal issue")
    assert not bad, "\n".join(bad)
