"""What a chapter's page shows of how it was run, rebuilt at every build from the files as they
are then (never only when the chapter re-executes):

- papermill's injected cell and the parameters cell are removed, and a "how to rerun this page"
  box takes their place, with the exact command for this build and every parameter's default;
- a page run with non-default parameters, or showing results of a chapter that was, says so in a
  visible box beside it ("this page was run with n_prompts=4; `make book` restores the defaults");
- a code cell with the metadata ``{"ctr": "timings"}`` shows the run time of every chapter from
  ``timings.json`` as it is at this build (``timings_outputs``), not as it was when that page ran.

``nondefault(name, results_dir)`` is the public question behind the second box: the parameters
(other than the defaults) a chapter's results file was made with. The runner records them in
the file itself (``RUN_KEY``) when it moves a finished run's results into the book.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import nbformat

from .values import RUN_KEY, nondefault, yaml_arg  # noqa: F401 (re-exported)



def differing(params: dict, defaults_: dict) -> dict:
    """The parameters that differ from their defaults (``results_dir`` is never one)."""
    return {k: v for k, v in params.items()
            if k != "results_dir" and (k not in defaults_ or defaults_[k] != v)}


def _item(k, v) -> str:
    item = f"{k}={yaml_arg(v)}"
    # brackets and commas pass a shell unquoted (as in models=[a,b]); anything else is quoted
    plain = item.translate(str.maketrans("[],", "___"))
    return item if shlex.quote(plain) == plain else shlex.quote(item)


def rerun_command(name: str, params: dict, defaults_: dict) -> str:
    """``make chapter NAME=x PARAMS="..."`` with every parameter that differs from its default."""
    items = [_item(k, v) for k, v in differing(params, defaults_).items()]
    return f"make chapter NAME={name}" + (f' PARAMS="{" ".join(items)}"' if items else "")


def _params_text(d: dict) -> str:
    return ", ".join(f"`{k}={yaml_arg(v)}`" for k, v in d.items())


def nondefault_box(name: str, params: dict, dflt: dict, shown: dict[str, dict]):
    """A visible Markdown box when this page (``params``) or a chapter whose results it shows
    (``shown``: chapter -> its non-default parameters) ran with non-default parameters."""
    own = differing(params, dflt)
    lines = []
    if own:
        lines.append(f"This page was run with {_params_text(own)}.")
    for ch, d in sorted(shown.items()):
        if d:
            lines.append(f"It shows results of the *{ch}* chapter, run with {_params_text(d)}.")
    if not lines:
        return None
    text = "\n".join([":::{admonition} Non-default parameters", ":class: warning",
                      *lines, "`make book` restores the defaults.", ":::"])
    cell = nbformat.v4.new_markdown_cell(text)
    cell.metadata["ctr"] = "nondefault"
    del cell["id"]
    return cell


def rerun_box(name: str, params: dict, info: dict, dflt: dict):
    """A Markdown cell: how to rerun this page, and the parameters with their defaults
    (``info``: papermill.inspect_notebook of the source; ``dflt``: the defaults as values)."""
    rows = []
    for k, meta in info.items():
        if k == "results_dir":
            continue
        d, used = yaml_arg(dflt[k]), yaml_arg(params.get(k, dflt[k]))
        help_ = (meta.get("help") or "").replace("|", "\\|")
        rows.append(f"| `{k}` | `{d}` | {'' if used == d else f'`{used}`'} | {help_} |")
    cmd = rerun_command(name, params, dflt)
    text = "\n".join([
        ":::{admonition} How to rerun this page",
        ":class: tip dropdown",
        "This page was executed with",
        "```bash", cmd, "```",
        "Give other values as `PARAMS=\"key=value key=value\"` (values are YAML: `n=3`, "
        "`models=[a,b]`); the page is re-executed and the book re-rendered. The parameters and "
        "their defaults:",
        "", "| parameter | default | this build | meaning |", "|---|---|---|---|", *rows, ":::"])
    cell = nbformat.v4.new_markdown_cell(text)
    cell.metadata["ctr"] = "rerun"
    del cell["id"]
    return cell


def timings_outputs(results_dir) -> list:
    """The run time of every chapter (``timings.json``) as notebook outputs: a sentence and a
    table. Shown by the cell marked ``{"ctr": "timings"}``; filled at every build."""
    import pandas as pd

    p = Path(results_dir) / "timings.json"
    t = json.loads(p.read_text()) if p.exists() else {}
    rows = [{"chapter": k, "seconds": v["seconds"],
             "parameters": ", ".join(f"{a}={yaml_arg(b)}" for a, b in v.get("params", {}).items())
             or "defaults", "finished (UTC)": v["finished"]}
            for k, v in t.items() if k != "index"]
    if not rows:
        return [nbformat.v4.new_output("display_data", data={
            "text/markdown": "No chapter has been run yet.", "text/plain": "no timings"})]
    df = pd.DataFrame(rows).set_index("chapter")
    head = (f"**Run time per chapter** (papermill, wall clock; total "
            f"{df.seconds.sum() / 60:.1f} min before this page and the HTML build):")
    return [nbformat.v4.new_output("display_data", data={"text/markdown": head,
                                                         "text/plain": head}),
            nbformat.v4.new_output("display_data", data={"text/html": df.to_html(),
                                                         "text/plain": df.to_string()})]


def show_timings(results_dir) -> None:
    """Display ``timings_outputs`` in a kernel: the body of the front page's timings cell
    (metadata ``{"ctr": "timings"}``), whose outputs each build then replaces."""
    from IPython.display import display

    for out in timings_outputs(results_dir):
        display(dict(out["data"]), raw=True)


def present(nb, name: str, params: dict, info: dict, dflt: dict, results_dir=None,
            shown: dict[str, dict] | None = None):
    """Hide papermill's injected cell and the parameters cell; add the rerun box (and the
    non-default box) in its place; fill the timings cell from ``results_dir``."""
    cells, boxed = [], False
    for c in nb.cells:
        if c.metadata.get("ctr") in ("rerun", "nondefault"):
            continue
        tags = list(c.metadata.get("tags", []))
        cells.append(c)
        if ("parameters" in tags or "injected-parameters" in tags) and "remove-cell" not in tags:
            c.metadata["tags"] = tags + ["remove-cell"]
        if c.cell_type == "code" and c.metadata.get("ctr") == "timings" and results_dir:
            c.outputs = timings_outputs(results_dir)
        if "parameters" in tags and not boxed:
            box = nondefault_box(name, params, dflt, shown or {})
            cells += [box] if box is not None else []
            cells.append(rerun_box(name, params, info, dflt))
            boxed = True
    nb.cells = cells
    for i, c in enumerate(nb.cells):      # stable ids: a refresh with nothing changed is a no-op
        if nb.nbformat_minor >= 5:
            c["id"] = f"{name}-{i}"
        else:
            c.pop("id", None)
    return nb
