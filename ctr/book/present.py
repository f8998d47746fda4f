"""What a chapter's page shows of its parameters: papermill's injected cell and the parameters
cell are removed from the page, and a "how to rerun this page" box takes their place, with the
exact command for this build and every parameter's default."""
from __future__ import annotations

import shlex

import nbformat
import yaml


def yaml_arg(v) -> str:
    """A value as the runner's key=value parser reads it back (YAML, no spaces)."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(yaml_arg(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}: {yaml_arg(x)}" for k, x in v.items()) + "}"
    text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").strip()
    return text


def rerun_command(name: str, params: dict, defaults_: dict) -> str:
    """``make chapter NAME=x PARAMS="..."`` with every parameter that differs from its default."""
    items = []
    for k, v in params.items():
        if k != "results_dir" and (k not in defaults_ or defaults_[k] != v):
            item = f"{k}={yaml_arg(v)}"
            # brackets and commas pass a shell unquoted (as in models=[a,b]); anything else is quoted
            plain = shlex.quote(item.translate(str.maketrans("[],", "___"))) == \
                item.translate(str.maketrans("[],", "___"))
            items.append(item if plain else shlex.quote(item))
    joined = " ".join(items)
    return f"make chapter NAME={name}" + (f' PARAMS="{joined}"' if items else "")


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


def present(nb, name: str, params: dict, info: dict, dflt: dict):
    """Hide papermill's injected cell and the parameters cell; add the rerun box in its place."""
    cells, boxed = [], False
    for c in nb.cells:
        if c.metadata.get("ctr") == "rerun":
            continue
        tags = list(c.metadata.get("tags", []))
        cells.append(c)
        if ("parameters" in tags or "injected-parameters" in tags) and "remove-cell" not in tags:
            c.metadata["tags"] = tags + ["remove-cell"]
        if "parameters" in tags and not boxed:
            cells.append(rerun_box(name, params, info, dflt))
            boxed = True
    nb.cells = cells
    for i, c in enumerate(nb.cells):      # stable ids: a refresh with nothing changed is a no-op
        if nb.nbformat_minor >= 5:
            c["id"] = f"{name}-{i}"
        else:
            c.pop("id", None)
    return nb


