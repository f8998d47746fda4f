"""Parameters: read from each chapter's parameters cell, checked against its declared defaults
before any kernel starts, one line naming what the user typed; the same typing inside a kernel
run by papermill directly (``values.in_kernel``); the rerun command and box built from them."""
import re
import shlex
import subprocess
import sys

import nbformat
import pytest

from book_helpers import REPO, code, md, nb
from ctr import book
from ctr.book import __main__ as cli
from ctr.book import present, values


def test_toc_lists_every_chapter_and_each_has_a_source():
    names = book.toc_notebooks()
    assert names[-1] == "index" and names[-2] == "scorecard"
    for n in names:
        assert book.source(n).exists()
    assert {p.stem for p in (REPO / "book").glob("*.ipynb")} == set(names)


def test_references_page_is_last_in_the_toc():
    assert (REPO / "_toc.yml").read_text().rstrip().endswith("- file: book/references")


@pytest.mark.parametrize("name", book.toc_notebooks())
def test_every_chapter_declares_its_parameters_and_types_them_in_its_setup_cell(name):
    x = nbformat.read(book.source(name), as_version=4)
    tagged = [c for c in x.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = book.parameters(name)
    assert "smoke" in params and "results_dir" in params
    # a run outside the book never writes into the book's results by default
    assert book.defaults(name)["results_dir"] == "results"
    # every assignment of the parameters cell is a parameter papermill can see (a comment
    # papermill cannot parse would silently drop it, and overriding it would then be refused)
    assigned = [l.split("=")[0].strip() for l in tagged[0].source.splitlines()
                if re.match(r"^\w+\s*=", l)]
    assert assigned == list(params)
    setup = [c for c in x.cells if c.cell_type == "code"][1]
    assert "results_dir = in_kernel(globals())" in setup.source.splitlines()[1]


@pytest.mark.parametrize("name", book.toc_notebooks())
def test_the_defaults_and_the_smoke_settings_pass_the_checks(name):
    dflt = {k: v for k, v in book.defaults(name).items() if k != "results_dir"}
    got = book.resolve(name, dflt)
    assert {k: got[k] for k in dflt} == dflt            # an int stays an int, a list a list
    book.resolve(name, {}, smoke=True)


@pytest.mark.parametrize("given, message", [
    ({"n_prompts": "abc"}, r"n_prompts=abc is not a whole number \(its default: n_prompts=\d+\)"),
    ({"n_prompts": 4.5}, r"n_prompts=4.5 is not a whole number"),
    ({"n_prompts": 0}, r"n_prompts=0 must be at least 1"),
    ({"seed": -1}, r"seed=-1 must be 0 or more"),
    ({"smoke": "maybe"}, r"smoke=maybe is not true or false"),
    ({"models": []}, r"models=\[\] is empty: give at least one model"),
    ({"model": "/tmp"}, r"unknown model '/tmp'"),
    ({"models": ["nosuchmodel"]}, r"unknown model 'nosuchmodel'"),
    ({"max_tokens": 1}, r"max_tokens=1 must be a whole number >= 2"),
    ({"eps": 2}, r"outside \(0, 1\)"),
    ({"min_queries": 0}, r"min_queries"),
    ({"n_promts": 3}, r"no parameter n_promts.*n_prompts=\d+"),
    ({"results_dir": "/tmp/x"}, r"results_dir is set by the book"),
])
def test_a_bad_parameter_is_one_line_before_any_kernel_starts(given, message, monkeypatch, capsys):
    import papermill

    def no_kernel(*a, **k):
        raise AssertionError("a kernel was started")

    monkeypatch.setattr(papermill, "execute_notebook", no_kernel)
    with pytest.raises(book.BookError, match=message):
        book.resolve("sinks", given)
    args = [f"{k}={values.yaml_arg(v)}" for k, v in given.items()]
    assert cli.main(["chapter", "sinks", *args, "--no-html"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: chapter 'sinks'")
    assert re.search(message, err)


def test_no_traceback_for_a_user_error_from_the_command_lines(capsys):
    """What `make chapter` runs, as a process: one line, exit 2; the same for `python -m ctr`,
    whose messages name the flags typed there."""
    for cmd, message in [
        (["-m", "ctr.book", "chapter", "sinks", "n_prompts=abc"], "n_prompts=abc is not a whole"),
        (["-m", "ctr", "inspect", "/tmp", "some text"], "unknown model '/tmp'"),
    ]:
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (cmd, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert message in r.stderr, r.stderr
    from ctr.__main__ import main as ctr_main
    for main, args, message in [
        (cli.main, ["chapter", "nosuch"], "error: no chapter 'nosuch'"),
        (cli.main, ["build", "--only", "nosuch"], "error: unknown chapter(s) nosuch"),
        (ctr_main, ["inspect", "tiny-planted-llama", "a b", "--max-tokens", "1"],
         "error: --max-tokens 1 must be a whole number"),
        (ctr_main, ["inspect", "tiny-planted-llama", "a b", "--min-queries", "0"],
         "error: --min-queries 0 must be a whole number"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(message), err


def test_model_is_shorthand_for_models_and_one_name_becomes_a_list():
    assert book.resolve("sinks", {"model": "gemma3-270m"})["models"] == ["gemma3-270m"]
    assert book.resolve("sinks", {"models": "gemma3-270m"})["models"] == ["gemma3-270m"]
    assert book.resolve("variance", {"models": "installed"})["models"] == "installed"


def test_a_model_name_is_embedded_tiny_a_model_directory_or_org_slash_name(tmp_path, monkeypatch):
    values.check_model("tiny-planted-llama")
    (tmp_path / "config.json").write_text("{}")
    values.check_model(str(tmp_path))                       # a directory with a config.json
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    values.check_model("someorg/somemodel")                 # may be downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(values.ParamError, match="not in the local Hugging Face cache"):
        values.check_model("someorg/somemodel")
    with pytest.raises(values.ParamError, match="unknown model"):
        values.check_model(str(tmp_path / "nothing"))


def test_papermill_text_of_a_list_gets_its_declared_type_in_the_kernel():
    """papermill -p passes lists as text; ints and floats it converts itself."""
    cell = ('models = ["smollm2-135m"]   # names\nn_prompts = 8\nsizes = [1.0, 2.0]\n'
            'layers = 4   # None: every layer\nsmoke = False\nresults_dir = "results"')
    ns = {"In": ["", cell, '# Parameters\nmodels = "[\\"tiny-planted-llama\\"]"\n'],
          "models": '["tiny-planted-llama"]', "n_prompts": 4, "sizes": "[3, 4.5]",
          "layers": None, "smoke": False, "results_dir": "results"}
    out = values.in_kernel(ns)
    assert ns["models"] == ["tiny-planted-llama"] and ns["sizes"] == [3.0, 4.5]
    assert ns["n_prompts"] == 4 and ns["layers"] is None and out.endswith("/results")
    ns["n_prompts"] = "abc"
    with pytest.raises(values.ParamError, match="n_prompts=abc is not a whole number"):
        values.in_kernel(ns)


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


def test_present_hides_the_parameter_cells_and_adds_the_boxes(tmp_path):
    x = nb(md("# T"), code("n = 3   # how many\nsmoke = False", "parameters"),
           code("n = 5\nsmoke = True", "injected-parameters"), code("print(n)"))
    info = {"n": {"help": "how many"}, "smoke": {"help": ""}}
    (tmp_path / "other.json").write_text('{"ctr_book": {"nondefault": {"k": 2}}}')
    for _ in range(2):                      # presenting twice changes nothing more
        x = present.present(x, "t", {"n": 5, "smoke": True}, info, {"n": 3, "smoke": False},
                            shown={"other": present.nondefault("other", tmp_path)})
        tags = [c.metadata.get("tags", []) for c in x.cells]
        assert "remove-cell" in tags[1] and "remove-cell" in tags[4] and "remove-cell" not in tags[5]
        assert [c.metadata.get("ctr") for c in x.cells[2:4]] == ["nondefault", "rerun"]
    assert 'make chapter NAME=t PARAMS="n=5 smoke=true"' in x.cells[3].source
    assert "| `n` | `3` | `5` | how many |" in x.cells[3].source
    box = x.cells[2].source
    assert ":class: warning" in box and "This page was run with `n=5`, `smoke=true`." in box
    assert "results of the *other* chapter, run with `k=2`" in box
    assert "`make book` restores the defaults." in box
    plain = present.present(x, "t", {}, info, {"n": 3, "smoke": False})
    assert not [c for c in plain.cells if c.metadata.get("ctr") == "nondefault"]


def test_nondefault_reads_what_the_runner_recorded(tmp_path):
    assert present.nondefault("sinks", tmp_path) == {}                 # no file
    (tmp_path / "sinks.json").write_text('{"claims": []}')             # not written by the runner
    assert present.nondefault("sinks", tmp_path) == {}
    (tmp_path / "sinks.json").write_text(
        '{"ctr_book": {"nondefault": {"n_prompts": 4}, "parameters": {"n_prompts": 4}}}')
    assert present.nondefault("sinks", tmp_path) == {"n_prompts": 4}


def test_ranges_come_from_the_sign_of_the_declared_default():
    assert values.coerce("n", 3, 8) == 3
    with pytest.raises(values.ParamError, match="n=0 must be at least 1"):
        values.coerce("n", 0, 8)
    assert values.coerce("depth", 0, 3, "layers after the head; 0: the head's own") == 0
    assert values.coerce("weight_decay", 0, 1e-3) == 0.0 and values.coerce("lr", 1, 0.05) == 1.0
    with pytest.raises(values.ParamError, match="lr=-0.1 must be 0 or more"):
        values.coerce("lr", -0.1, 0.05)
    assert values.coerce("shift", -2, -1) == -2                # a negative default: any int
    assert values.coerce("layers", None, 4, "None: every layer") is None
    with pytest.raises(values.ParamError, match="layers=null is not a whole number"):
        values.coerce("layers", None, 4, "how many")
    with pytest.raises(values.ParamError, match=r"heads\[1\]=x is not a whole number"):
        values.coerce("heads", [2, "x"], [2, 1])
