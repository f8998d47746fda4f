"""Command line: a quick look at one prompt, and the list of models.

    python -m ctr inspect MODEL "some text" [--eps 0.2] [--min-queries 1] [--max-tokens N]
    python -m ctr models
"""
from __future__ import annotations

import argparse
import os
import re
import sys


def _inspect(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from . import analysis, models

    torch.set_grad_enabled(False)
    m = models.load(args.model)
    info = m.info()
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    batch = m.encode([args.text], max_tokens=args.max_tokens)
    T = batch.lengths[0]
    print(f"{T} tokens; eps={args.eps}, min_queries={args.min_queries}")
    df = analysis.heads(m, [args.text], eps=args.eps, min_queries=args.min_queries,
                        max_tokens=args.max_tokens, progress=T >= 256 or args.progress)
    for layer, g in df.groupby("layer"):
        parts = []
        for _, r in g.iterrows():
            s = ",".join(f"{p}:{t!r}" for p, t in zip(r.sink_positions, r.sink_tokens)) or "-"
            ve = "" if r.n_sinks == 0 else f" VE={r.ve:.2f}"
            parts.append(f"h{r['head']}[{s}{ve}]")
        print(f"L{layer:02d} " + " ".join(parts))
    has = df[df.n_sinks > 0]
    print(f"mean sinks/head {df.n_sinks.mean():.2f}; heads with a sink {len(has)}/{len(df)}; "
          f"mean VE {has.ve.mean():.3f} (random subspace {has.ve_random.mean():.3f})")
    return 0


def _models(args) -> int:
    from . import models

    here = set(models.available())
    for name, e in models.EMBEDDED.items():
        state = "installed" if name in here else ("run `make models-extra`" if e.extra else "missing")
        print(f"{name:22s} {e.title:32s} {e.quant:18s} {state}")
    print("tiny test models: " + ", ".join(models.TINY))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="sinks and VE of every head on one prompt")
    i.add_argument("model")
    i.add_argument("text")
    i.add_argument("--eps", type=float, default=0.2)
    i.add_argument("--min-queries", type=int, default=1)
    i.add_argument("--max-tokens", type=int, default=None)
    i.add_argument("--progress", action="store_true", help="progress bar even on short inputs")
    sub.add_parser("models", help="list the embedded models")
    args = p.parse_args(argv)
    from .models import ModelError, PromptError
    try:
        if args.cmd == "inspect":      # bad settings and names fail before a model is loaded
            from . import definitions as D
            from .book.values import check_model
            D.check_eps(args.eps)
            D.check_min_queries(args.min_queries)
            D.check_max_tokens(args.max_tokens)
            check_model(args.model, "model")
        return {"inspect": _inspect, "models": _models}[args.cmd](args)
    except (ModelError, PromptError, ValueError, OSError) as e:
        print(f"error: {_as_flags(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130


def _as_flags(message: str) -> str:
    """Messages of the shared checks name settings as Python does (``max_tokens=1``); here the
    user typed a flag (``--max-tokens 1``)."""
    for name in ("max_tokens", "min_queries", "eps"):
        message = re.sub(rf"\b{name}=", f"--{name.replace('_', '-')} ", message)
    return message

if __name__ == "__main__":
    sys.exit(main())
