"""A chapter's parameters: read from its parameters cell, given as ``key=value``, checked before
any kernel starts.

Every value is checked against the default the parameters cell declares (``values.coerce``: its
type, an int stays an int, a list stays a list of the same kind; its range from the default's
sign; ``None`` only where the parameter's comment mentions None), then by the shared checks of ``ctr.definitions`` (eps, min_queries, max_tokens), and
model names by ``check_model``. Each failure is one line naming the parameter as the user types
it (``n_prompts=abc``).

The checks of one value are in ``values`` (which a chapter's kernel also runs).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .layout import ROOT, SMOKE_MODEL, BookError, paths, source
from .values import ParamError, _literal, check_models, coerce


def _inspect(name: str, root: Path = ROOT) -> dict:
    import papermill

    return papermill.inspect_notebook(str(source(name, root)))


def parameters(name: str, root: Path = ROOT) -> dict:
    """The parameters cell as papermill reads it: name -> default (its source text)."""
    return {k: v["default"] for k, v in _inspect(name, root).items()}


def defaults(name: str, root: Path = ROOT) -> dict:
    """Parameter defaults as values (the source text where it is not a literal)."""
    return {k: _literal(v) for k, v in parameters(name, root).items()}


def parse_params(items: list[str]) -> dict:
    """``key=value`` items; values are YAML (``n=3``, ``models=[a,b]``, ``smoke=true``)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise BookError(f"parameter {item!r} is not key=value (e.g. n_prompts=4)")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            out[k.strip()] = v          # not YAML: the text itself (checked against its type)
    return out


def check_all(params: dict, dflt: dict, info: dict) -> dict:
    """Every given parameter checked and coerced (see the module docstring)."""
    from .. import definitions as D

    out = {}
    for k, v in params.items():
        if k in ("models", "model"):
            out[k] = check_models(k, v)
        elif k == "results_dir":
            out[k] = v
        else:
            out[k] = coerce(k, v, dflt.get(k), info.get(k, {}).get("help") or "")
    try:
        for k in ("eps", "main_eps", "eps_sweep"):
            if out.get(k) is not None:
                D.check_eps(out[k])
        if out.get("min_queries") is not None:
            D.check_min_queries(out["min_queries"])
        D.check_max_tokens(out.get("max_tokens"))
    except (TypeError, ValueError) as e:
        raise ParamError(str(e)) from e
    return out


# --- the runner's view: given -> the parameters a run gets ----------------------------------------

def resolve(name: str, given: dict, smoke: bool = False, root: Path = ROOT) -> dict:
    """Check names against the notebook's parameters cell, check every value, and fill the
    runner's own parameters (``results_dir``: the book's results; ``smoke``: the tiny model).
    ``model=X`` is shorthand for ``models=[X]``. BookError (one line) on any bad parameter."""
    from ..results import check_dir

    info = _inspect(name, root)
    known = {k: m["default"] for k, m in info.items()}
    dflt = {k: _literal(v) for k, v in known.items()}
    given = dict(given)
    if "model" in given and "model" not in known and "models" in known:
        given["models"] = [given.pop("model")]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise BookError(f"chapter {name!r} has no parameter {', '.join(unknown)}; its parameters: "
                        + ", ".join(f"{k}={v}" for k, v in known.items() if k != "results_dir"))
    if "results_dir" in given:
        raise BookError(f"chapter {name!r}: results_dir is set by the book (book/executed/"
                        "results); to keep results elsewhere run the notebook with papermill "
                        "(see the adapt page)")
    params = {}
    if "results_dir" in known:
        params["results_dir"] = str(paths(root)["results"])
    if smoke:
        if "smoke" in known:
            params["smoke"] = True
        for key in ("models", "model"):
            if key in known and key not in given:
                params[key] = [SMOKE_MODEL] if key == "models" else SMOKE_MODEL
    params.update(given)
    try:
        params = check_all(params, dflt, info)
        if "results_dir" in params:
            check_dir(params["results_dir"])
    except (ValueError, OSError) as e:
        raise BookError(f"chapter {name!r}: {e}") from None
    return params
