"""The book pipeline: papermill runs, the rebuild cache, the page presentation (rerun box, hidden
cells), references, the attention explorer, and the headless-Chromium check, including the
broken pages it must reject.

Everything happens in copies of the book skeleton under temporary directories, so a test run
never touches the real build in book/executed and _build. The one smoke build (module fixture)
holds the real sinks chapter on the tiny planted model, a small explorer page and a small front
page, so it does not depend on the scorecard or on every other chapter's results.
"""
import contextlib
import json
import os
import re
import shlex
import shutil
import time
from html import unescape
from pathlib import Path

import nbformat
import numpy as np
import pytest

from ctr import book
from ctr.book import cache, explorer, htmlcheck, present

REPO = book.ROOT
NOISE = ("IProgress not found", "TqdmWarning", "Kernel is running over TCP")


# --- small notebooks of our own -----------------------------------------------------------------

def _nb(*cells):
    nb = nbformat.v4.new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def _md(text):
    return nbformat.v4.new_markdown_cell(text)


def _code(src, *tags):
    c = nbformat.v4.new_code_cell(src)
    if tags:
        c.metadata["tags"] = list(tags)
    return c


PARAMS = 'smoke = False      # tiny sizes\nresults_dir = "executed/results"'

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
                    nbformat.v4.new_code_cell('smoke = False\nresults_dir = "executed/results"',
                                              metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\n"
                                              "plt.plot([0, 1], [1, 0]); plt.show()")]
        nbformat.write(nb, dst / "book" / f"{name}.ipynb")
    rest = [c for c in [*chapters, *stubs, *own] if c != "index"]
    toc = ["format: jb-book", "root: book/executed/index", "parts:", "  - caption: Chapters",
           "    chapters:", *[f"      - file: book/executed/{c}" for c in rest],
           "  - caption: References", "    chapters:", "      - file: book/references"]
    (dst / "_toc.yml").write_text("\n".join(toc) + "\n")
    return dst


@contextlib.contextmanager
def captured(path: Path):
    """Everything written to stdout and stderr, by this process (Python and file descriptors)
    and by the kernels it starts -> path."""
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w", buffering=1) as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            f.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for s in saved:
                os.close(s)


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


def plain(html: str) -> str:
    """The text of an HTML page, tags dropped (code highlighting splits words into spans)."""
    return unescape(re.sub(r"<[^>]+>", "", html))


def copy_of(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst, symlinks=True)
    return dst


# --- runner behaviour (no execution) ------------------------------------------------------------

def test_toc_lists_every_chapter_and_each_has_a_source():
    names = book.toc_notebooks()
    assert names[-1] == "index" and names[-2] == "scorecard"
    for n in names:
        assert book.source(n).exists()
    # and every source notebook is in the toc
    assert {p.stem for p in (REPO / "book").glob("*.ipynb")} == set(names)


def test_references_page_is_last_in_the_toc():
    assert (REPO / "_toc.yml").read_text().rstrip().endswith("- file: book/references")


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


def _from_command(cmd: str) -> dict:
    """What `make chapter` passes on: PARAMS split by the recipe's shell, parsed by the runner."""
    m = re.fullmatch(r'make chapter NAME=\w+(?: PARAMS="(.*)")?', cmd)
    assert m, cmd
    return book.parse_params(shlex.split(m.group(1) or ""))


@pytest.mark.parametrize("name", book.toc_notebooks())
def test_rerun_command_gives_back_the_parameters_of_the_build(name):
    dflt = book.defaults(name)
    assert _from_command(present.rerun_command(name, dflt, dflt)) == {}    # defaults: no PARAMS
    smoke = {k: v for k, v in book.resolve(name, {}, smoke=True).items() if k != "results_dir"}
    assert _from_command(present.rerun_command(name, smoke, dflt)) == \
        {k: v for k, v in smoke.items() if dflt.get(k) != v}


def test_rerun_command_quotes_what_the_shell_would_split():
    given = {"models": ["a", "b c"], "eps": 1e-05, "note": "x y", "flag": None, "d": {"k": 1}}
    cmd = present.rerun_command("x", given, {})
    assert _from_command(cmd) == given
    assert "models=[smollm2-135m,gemma3-270m]" in present.rerun_command(
        "x", {"models": ["smollm2-135m", "gemma3-270m"]}, {})      # lists stay readable


def test_present_hides_the_parameter_cells_and_adds_one_rerun_box():
    nb = _nb(_md("# T"), _code("n = 3   # how many\nsmoke = False", "parameters"),
             _code("n = 5\nsmoke = True", "injected-parameters"), _code("print(n)"))
    info = {"n": {"help": "how many"}, "smoke": {"help": ""}}
    for _ in range(2):                      # presenting twice changes nothing more
        nb = present.present(nb, "t", {"n": 5, "smoke": True}, info, {"n": 3, "smoke": False})
        tags = [c.metadata.get("tags", []) for c in nb.cells]
        assert "remove-cell" in tags[1] and "remove-cell" in tags[3] and "remove-cell" not in tags[4]
        boxes = [c for c in nb.cells if c.metadata.get("ctr") == "rerun"]
        assert len(boxes) == 1 and nb.cells[2] is boxes[0]
    text = boxes[0].source
    assert 'make chapter NAME=t PARAMS="n=5 smoke=true"' in text
    assert "| `n` | `3` | `5` | how many |" in text


# --- the rebuild cache (keys; no execution) -----------------------------------------------------

def _package(root: Path) -> Path:
    """A fake ctr package: chapters.x -> a -> b, c alone, results.load('other') in d."""
    files = {"ctr/__init__.py": "", "ctr/a.py": "from . import b\n", "ctr/b.py": "X = 1\n",
             "ctr/c.py": "Y = 2\n",
             "ctr/d.py": "from . import results\nR = results.load('other', '.')\n",
             "ctr/results.py": "import yaml\nP = 'paper_numbers.yaml'\n",
             "ctr/paper_numbers.yaml": "a: 1\n", "ctr/chapters/__init__.py": "",
             "ctr/chapters/x.py": "from .. import a\n"}
    for f, text in files.items():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(text)
    (root / "requirements.txt").write_text("numpy==1\n")
    return root


NOTEBOOKS = {"n1": _nb(_code("from ctr.chapters import x")), "n2": _nb(_code("from ctr import c")),
             "n3": _nb(_code("import numpy")), "n4": _nb(_code("import ctr.d as d"))}


def _keys(pkg: Path, results: Path, last=()):
    return {n: cache.key(n, {"smoke": True}, nb, results, list(NOTEBOOKS), {}, last=n in last,
                         pkg_root=pkg) for n, nb in NOTEBOOKS.items()}


def test_closure_follows_imports_inside_the_package_only(tmp_path):
    pkg = _package(tmp_path)
    mods = cache.closure(["from ctr.chapters import x\nimport numpy"], pkg)
    assert set(mods) == {"ctr", "ctr.chapters", "ctr.chapters.x", "ctr.a", "ctr.b"}


@pytest.mark.parametrize("edited, expected", [
    ("ctr/b.py", {"n1"}),                      # reached through chapters.x -> a -> b
    ("ctr/c.py", {"n2"}),
    ("ctr/chapters/x.py", {"n1"}),
    ("ctr/__init__.py", {"n1", "n2", "n4"}),   # runs whenever anything of ctr is imported
    ("ctr/paper_numbers.yaml", {"n4"}),        # named by results.py, which d imports
    ("requirements.txt", set()),               # the file itself is no input; versions are
])
def test_editing_one_module_changes_exactly_the_chapters_that_import_it(tmp_path, edited, expected):
    pkg, res = _package(tmp_path), tmp_path / "results"
    res.mkdir()
    before = _keys(pkg, res)
    (pkg / edited).write_text((pkg / edited).read_text() + "\n# edited\n")
    after = _keys(pkg, res)
    assert {n for n in NOTEBOOKS if before[n]["digest"] != after[n]["digest"]} == expected


def test_results_a_chapter_reads_are_part_of_its_key(tmp_path):
    pkg, res = _package(tmp_path), tmp_path / "results"
    res.mkdir()
    before = _keys(pkg, res, last=("n3",))
    (res / "other.json").write_text("{}")       # n4 loads 'other' through ctr.d
    (res / "n1.json").write_text("{}")          # n3 is a LAST page: it reads every chapter's
    after = _keys(pkg, res, last=("n3",))
    assert {n for n in NOTEBOOKS if before[n]["digest"] != after[n]["digest"]} == {"n3", "n4"}


def test_real_chapters_keys_follow_their_own_modules(tmp_path):
    """Per module on the real package: toy_multihead's module is imported by its chapter only."""
    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "ctr", pkg / "ctr", ignore=shutil.ignore_patterns("__pycache__"))
    names = [n for n in book.toc_notebooks() if n not in book.LAST
             and (REPO / "book" / f"{n}.ipynb").exists()]
    nbs = {n: cache.read(book.source(n)) for n in names}
    key = lambda: {n: cache.key(n, {}, nbs[n], tmp_path, [], {}, pkg_root=pkg)["digest"]
                   for n in names}
    before = key()
    f = pkg / "ctr" / "chapters" / "toy_multihead.py"
    f.write_text(f.read_text() + "\n# edited\n")
    after = key()
    assert {n for n in names if before[n] != after[n]} == {"toy_multihead"}


def test_prose_and_tags_do_not_change_the_key_code_and_parameters_do(tmp_path):
    nb = _nb(_md("# T"), _code("x = 1", "parameters"), _code("print(x)"))
    k = lambda nb, p={"x": 1}: cache.key("t", p, nb, tmp_path, [], {})["digest"]
    base = k(nb)
    nb.cells[0].source = "# Another title"
    nb.cells[2].metadata["tags"] = ["hide-input"]
    assert k(nb) == base
    assert k(nb, {"x": 2}) != base
    nb.cells[2].source = "print(x + 1)"
    assert k(nb) != base


def test_a_model_converted_by_the_run_is_keyed_as_the_run_left_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CTR_CACHE", str(tmp_path))
    nb, p = _nb(_code('models = ["gemma3-270m"]', "parameters")), {"models": ["gemma3-270m"]}
    before = cache.key("t", p, nb, tmp_path, [], {})              # not converted yet
    d = tmp_path / "models" / "gemma3-270m"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"converted during the run")
    (tmp_path / "t.ipynb").write_text("{}")
    cache.record("t", cache.after_run(before, p, {}), tmp_path, tmp_path)
    assert cache.stale("t", cache.key("t", p, nb, tmp_path, [], {}), tmp_path, tmp_path) is None
    (d / "model.safetensors").write_bytes(b"converted again")
    assert cache.stale("t", cache.key("t", p, nb, tmp_path, [], {}), tmp_path, tmp_path) == \
        "model files changed"


def test_model_files_and_versions_are_part_of_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CTR_CACHE", str(tmp_path))
    d = tmp_path / "models" / "smollm2-135m"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights")
    nb = _nb(_code('models = ["smollm2-135m"]', "parameters"))
    k = lambda: cache.key("t", {}, nb, tmp_path, [], {"models": ["smollm2-135m"]})["digest"]
    base = k()
    (d / "model.safetensors").write_bytes(b"other weights")
    assert k() != base
    base = k()
    real = cache.versions
    monkeypatch.setattr(cache, "versions", lambda *a: {**real(*a), "torch": "0.0"})
    assert k() != base


def test_merge_keeps_outputs_takes_new_prose_and_refuses_changed_code():
    src = _nb(_md("# Old"), _code("x = 1", "parameters"), _code("print(x)"))
    ran = _nb(_md("# Old"), _code("x = 1", "parameters"), _code("x = 2", "injected-parameters"),
              _code("print(x)"))
    ran.cells[3].outputs = [nbformat.v4.new_output("stream", name="stdout", text="2\n")]
    src.cells[0].source = "# New"
    src.cells[2].metadata["tags"] = ["hide-input"]
    nb = cache.merge(src, ran)
    assert nb.cells[0].source == "# New" and nb.cells[3].outputs[0]["text"] == "2\n"
    assert nb.cells[3].metadata["tags"] == ["hide-input"]
    assert "injected-parameters" in nb.cells[2].metadata["tags"]
    src.cells[2].source = "print(x, x)"
    assert cache.merge(src, ran) is None


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


@pytest.mark.parametrize("given,msg", [({"eps": 2}, r"outside \(0, 1\)"),
                                       ({"eps": 0}, r"outside \(0, 1\)"),
                                       ({"min_queries": 0}, "min_queries"),
                                       ({"max_tokens": 1}, "max_tokens=1 must be")])
def test_bad_settings_fail_before_any_kernel_starts(given, msg):
    with pytest.raises(book.BookError, match=msg):
        book.resolve("sinks", given)


def test_an_unwritable_results_dir_fails_before_any_kernel_starts(tmp_path):
    root = skeleton(tmp_path)
    (root / "book" / "executed").write_text("a file where the executed notebooks should go")
    with pytest.raises(book.BookError, match="cannot write results"):
        book.resolve("sinks", {}, root=root)


def test_changed_static_files_are_served_even_when_no_page_is_rebuilt(tmp_path):
    # Sphinx neither overwrites a file in _build/html/_static nor copies anything when no page
    # is out of date, so the runner must put a changed explorer script or stylesheet there.
    from ctr.book import runner
    (tmp_path / "_build" / "mathjax").mkdir(parents=True)
    (tmp_path / "_build" / "mathjax" / "MathJax.js").write_text("")   # skip the MathJax copy
    served = tmp_path / "_build" / "html" / "_static"
    served.mkdir(parents=True)
    (served / "ctr-book.css").write_text("/* an old stylesheet */")
    runner._static(tmp_path)
    src = Path(runner.__file__).parent / "static"
    for f in src.iterdir():
        assert (served / f.name).read_bytes() == f.read_bytes()
