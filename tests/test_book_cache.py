"""The rebuild cache: a chapter re-runs exactly when something it depends on changed.

Key parts on their own (no execution): code, modules, parameters, versions, merge. Then, on a
small book of real notebooks (each saves a results file in a second or two), every key the
issue names: model files by content (``touch`` re-runs nothing, new weights or another
``CTR_CACHE`` with other weights re-run exactly the chapters that load that model), model lists
resolved ("default" and "installed" mean the models installed here), the paper's numbers per
section actually read, and the results files read (literal names and names computed at run
time, both traced).
"""
import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest

from book_helpers import REPO, chapter, code, md, mini_book, nb, ran
from ctr import book
from ctr import models as M
from ctr.book import cache, deps

# --- key parts, no execution ----------------------------------------------------------------------


def _package(root: Path) -> Path:
    """A fake ctr package: chapters.x -> a -> b, c alone, results.load('other') in d."""
    files = {"ctr/__init__.py": '"""Docs naming RULES.md and paper_numbers.yaml."""\n',
             "ctr/a.py": "from . import b\n", "ctr/b.py": "X = 1\n", "ctr/c.py": "Y = 2\n",
             "ctr/d.py": "from . import results\nR = results.load('other', '.')\n",
             "ctr/results.py": "import yaml\nP = 'paper_numbers.yaml'\n",
             "ctr/rules.py": "from pathlib import Path\nPATH = Path('.') / 'RULES.md'\n",
             "ctr/e.py": "from . import rules\n",
             "ctr/paper_numbers.yaml": "a: 1\n", "ctr/chapters/__init__.py": "",
             "ctr/chapters/x.py": "from .. import a\n", "RULES.md": "# rules\n"}
    for f, text in files.items():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(text)
    (root / "requirements.txt").write_text("numpy==1\n")
    return root


NOTEBOOKS = {"n1": nb(code("from ctr.chapters import x")), "n2": nb(code("from ctr import c")),
             "n3": nb(code("import numpy")), "n4": nb(code("import ctr.d as d")),
             "n5": nb(code("from ctr import e"))}


def _keys(pkg: Path, results: Path):
    return {n: cache.key(n, {"smoke": True}, x, results, {}, pkg_root=pkg)
            for n, x in NOTEBOOKS.items()}


def test_closure_follows_imports_inside_the_package_only(tmp_path):
    pkg = _package(tmp_path)
    mods = deps.closure(["from ctr.chapters import x\nimport numpy"], pkg)
    assert set(mods) == {"ctr", "ctr.chapters", "ctr.chapters.x", "ctr.a", "ctr.b"}


@pytest.mark.parametrize("edited, expected", [
    ("ctr/b.py", {"n1"}),                      # reached through chapters.x -> a -> b
    ("ctr/c.py", {"n2"}),
    ("ctr/chapters/x.py", {"n1"}),
    ("ctr/__init__.py", {"n1", "n2", "n4", "n5"}),   # runs whenever anything of ctr is imported
    ("RULES.md", {"n5"}),                      # opened by rules.py, which e imports
    ("ctr/paper_numbers.yaml", set()),         # per section, as a run reads it (traced)
    ("requirements.txt", set()),               # the file itself is no input; versions are
])
def test_editing_one_file_changes_exactly_the_chapters_that_reach_it(tmp_path, edited, expected):
    pkg, res = _package(tmp_path), tmp_path / "results"
    res.mkdir()
    before = _keys(pkg, res)
    (pkg / edited).write_text((pkg / edited).read_text() + "\n# edited\n")
    after = _keys(pkg, res)
    assert {n for n in NOTEBOOKS if before[n]["digest"] != after[n]["digest"]} == expected


def test_real_chapters_keys_follow_their_own_modules(tmp_path, monkeypatch):
    """Per module on the real package: toy_multihead's module is imported by its chapter only,
    and no chapter depends on the runner (an edit to the machinery re-runs nothing)."""
    monkeypatch.setenv("CTR_CACHE", str(tmp_path / "empty"))     # no weights to hash
    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "ctr", pkg / "ctr", ignore=shutil.ignore_patterns("__pycache__"))
    names = [n for n in book.toc_notebooks() if (REPO / "book" / f"{n}.ipynb").exists()]
    nbs = {n: cache.read(book.source(n)) for n in names}
    key = lambda: {n: cache.key(n, {}, nbs[n], tmp_path, {}, pkg_root=pkg) for n in names}
    before = key()
    for m in ("execute", "commands", "present", "cache", "htmlcheck", "runner"):
        assert not any(f"ctr/book/{m}.py" in k["modules"] for k in before.values()), m
    f = pkg / "ctr" / "chapters" / "toy_multihead" / "__init__.py"
    f.write_text(f.read_text() + "\n# edited\n")
    after = key()
    assert {n for n in names if before[n]["digest"] != after[n]["digest"]} == {"toy_multihead"}


def test_prose_and_tags_do_not_change_the_key_code_and_parameters_do(tmp_path):
    x = nb(md("# T"), code("x = 1", "parameters"), code("print(x)"))
    k = lambda x, p={"x": 1}: cache.key("t", p, x, tmp_path, {})["digest"]
    base = k(x)
    x.cells[0].source = "# Another title"
    x.cells[2].metadata["tags"] = ["hide-input"]
    assert k(x) == base
    assert k(x, {"x": 2}) != base
    x.cells[2].source = "print(x + 1)"
    assert k(x) != base


def test_package_versions_are_part_of_the_key(tmp_path, monkeypatch):
    x = nb(code("import numpy"))
    base = cache.key("t", {}, x, tmp_path, {})["digest"]
    real = cache.versions
    monkeypatch.setattr(cache, "versions", lambda *a: {**real(*a), "torch": "0.0"})
    assert cache.key("t", {}, x, tmp_path, {})["digest"] != base


def test_a_model_converted_by_the_run_is_keyed_as_the_run_left_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CTR_CACHE", str(tmp_path))
    x, p = nb(code('models = ["gemma3-270m"]', "parameters")), {"models": ["gemma3-270m"]}
    before = cache.key("t", p, x, tmp_path, {})              # not converted yet
    d = tmp_path / "models" / "gemma3-270m"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"converted during the run")
    (tmp_path / "t.ipynb").write_text("{}")
    cache.record("t", cache.after_run(before, {}, "t", p, {}), tmp_path, tmp_path)
    now = lambda: cache.key("t", p, x, tmp_path, {}, recorded=cache.load_key(tmp_path, "t"))
    assert cache.stale("t", now(), tmp_path, tmp_path) is None
    (d / "model.safetensors").write_bytes(b"converted again")
    assert cache.stale("t", now(), tmp_path, tmp_path) == "files of model gemma3-270m changed"


def test_merge_keeps_outputs_takes_new_prose_and_refuses_changed_code():
    src = nb(md("# Old"), code("x = 1", "parameters"), code("print(x)"))
    done = nb(md("# Old"), code("x = 1", "parameters"), code("x = 2", "injected-parameters"),
              code("print(x)"))
    done.cells[3].outputs = [nbformat.v4.new_output("stream", name="stdout", text="2\n")]
    src.cells[0].source = "# New"
    src.cells[2].metadata["tags"] = ["hide-input"]
    merged = cache.merge(src, done)
    assert merged.cells[0].source == "# New" and merged.cells[3].outputs[0]["text"] == "2\n"
    assert merged.cells[3].metadata["tags"] == ["hide-input"]
    assert "injected-parameters" in merged.cells[2].metadata["tags"]
    src.cells[2].source = "print(x, x)"
    assert cache.merge(src, done) is None


# --- a small book, run: each key changes exactly the chapters that depend on it -------------------

SAVE = "results.save({name!r}, {data}, results_dir)"
PAGES = {
    # reads the paper's "toy" section and saves it: its readers see a paper edit too
    "toyish": chapter('from ctr import results\nP = results.paper()["toy"]\n'
                      + SAVE.format(name="toyish", data='{"toy": P}')),
    "sinksish": chapter('from ctr import results\nP = results.paper().get("sinks")\n'
                        + SAVE.format(name="sinksish", data='{"n": 1}')),
    # reads toyish by a literal name, sinksish by a name computed at run time
    "reader": chapter('from ctr import results\nr = results.load("toyish", results_dir)\n'
                      'other = "sinks" + "ish"\ns = results.load(other, results_dir)\n'
                      + SAVE.format(name="reader", data='{"n": len(r) + len(s)}')),
    "dflt": chapter("print(models)", params='models = "default"\n' + "smoke = False\n"
                    'results_dir = "results"'),
    "inst": chapter("print(models)", params='models = "installed"\n' + "smoke = False\n"
                    'results_dir = "results"'),
    "gem": chapter("print(models)", params='models = ["gemma3-270m"]\nsmoke = False\n'
                   'results_dir = "results"'),
}


def _fake_cache(d: Path) -> Path:
    for m in ("smollm2-135m", "gemma3-270m"):
        (d / "models" / m).mkdir(parents=True)
        (d / "models" / m / "config.json").write_text(json.dumps({"model": m}))
        (d / "models" / m / "model.safetensors").write_bytes(m.encode() * 1000)
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The small book built once; each test works on its own copy."""
    tmp = tmp_path_factory.mktemp("cachebook")
    root = mini_book(tmp / "book", PAGES)
    cachedir = _fake_cache(tmp / "cache")
    paper = tmp / "paper_numbers.yaml"
    shutil.copy(REPO / "ctr" / "paper_numbers.yaml", paper)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTR_CACHE", str(cachedir))
        mp.setenv("CTR_PAPER_NUMBERS", str(paper))
        assert ran(root) == set(PAGES)
    return tmp


@pytest.fixture
def copy(base, tmp_path, monkeypatch):
    dst = tmp_path / "c"
    shutil.copytree(base, dst)
    monkeypatch.setenv("CTR_CACHE", str(dst / "cache"))
    monkeypatch.setenv("CTR_PAPER_NUMBERS", str(dst / "paper_numbers.yaml"))
    return dst


def test_the_run_records_what_it_read(copy):
    k = lambda n: cache.load_key(copy / "book" / "book" / "executed", n)
    assert set(k("toyish")["paper"]) == {"toy"} and set(k("sinksish")["paper"]) == {"sinks"}
    assert set(k("reader")["results"]) == {"toyish", "sinksish"}     # literal and computed
    assert set(k("dflt")["models"]) == set(M.names("default")) >= {"smollm2-135m", "gemma3-270m"}


def test_touch_alone_reruns_nothing(copy):
    for f in [*copy.rglob("*.safetensors"), *copy.rglob("*.json"), copy / "paper_numbers.yaml",
              *(copy / "book" / "book").glob("*.ipynb")]:
        os.utime(f)
    assert ran(copy / "book") == set()


def test_new_weights_rerun_exactly_the_chapters_that_load_that_model(copy):
    (copy / "cache" / "models" / "smollm2-135m" / "model.safetensors").write_bytes(b"reconverted")
    assert ran(copy / "book") == {"dflt", "inst"}          # "gem" loads gemma3-270m only


def test_another_cache_reruns_only_where_its_weights_differ(copy, monkeypatch):
    other = copy / "cache2"
    shutil.copytree(copy / "cache", other)
    monkeypatch.setenv("CTR_CACHE", str(other))
    assert ran(copy / "book") == set()                     # same content elsewhere
    (other / "models" / "gemma3-270m" / "model.safetensors").write_bytes(b"other weights")
    assert ran(copy / "book") == {"dflt", "inst", "gem"}


def test_installing_a_model_reruns_the_chapters_on_installed_models_only(copy, monkeypatch):
    extra = next(n for n, e in M.EMBEDDED.items() if e.extra)
    here = M.available()
    more = lambda: [*here, extra] if extra not in here else here     # noqa: E731
    monkeypatch.setattr(M, "available", more)
    monkeypatch.setattr(M.registry, "available", more)      # what names("installed") calls
    assert ran(copy / "book") == ({"inst"} if extra not in here else set())


def test_a_paper_number_reruns_the_chapters_that_read_its_section(copy):
    import yaml

    p = copy / "paper_numbers.yaml"
    data = yaml.safe_load(p.read_text())
    data["meta"] = {"edited": True}                        # a section nobody here reads
    p.write_text(yaml.safe_dump(data))
    assert ran(copy / "book") == set()
    data["toy"]["edited"] = 1
    p.write_text(yaml.safe_dump(data))
    assert ran(copy / "book") == {"toyish", "reader"}      # reader reads toyish's results


def test_a_results_file_read_reruns_its_readers(copy):
    src = copy / "book" / "book" / "sinksish.ipynb"
    src.write_text(src.read_text().replace('{\\"n\\": 1}', '{\\"n\\": 2}'))
    assert ran(copy / "book") == {"sinksish", "reader"}    # read by a computed name
