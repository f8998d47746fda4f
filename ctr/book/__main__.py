"""``python -m ctr.book``: the command line of the book runner (see ``ctr/book/runner.py``).

A user error (a bad parameter, an unknown chapter, a busy book, a failed chapter) is one message
and a non-zero exit, never a Python traceback: 2 for an error, 1 for a failed page check,
130/143 when stopped by Ctrl-C / SIGTERM.
"""
import argparse
import sys

from . import lock, runner
from .layout import HTML, BookError, toc_notebooks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ctr.book", description=runner.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="run the chapters that changed, render, check")
    b.add_argument("--force", action="store_true", help="re-execute every chapter")
    b.add_argument("--smoke", action="store_true", help="tiny model, tiny sizes (seconds)")
    b.add_argument("--only", default=None, help="comma-separated chapter names")
    b.add_argument("--no-check", action="store_true", help="skip the Chromium check")
    b.add_argument("--keep-going", action="store_true", help="run the others after a failure")
    b.add_argument("--wait", action="store_true", help="wait for another run of the book")
    b.add_argument("params", nargs="*", help="key=value for every chapter that has the key")
    c = sub.add_parser("chapter", help="rerun one chapter and the pages that read it, re-render")
    c.add_argument("name")
    c.add_argument("params", nargs="*")
    c.add_argument("--smoke", action="store_true")
    c.add_argument("--no-check", action="store_true")
    c.add_argument("--no-html", action="store_true", help="run only: no HTML, no check")
    c.add_argument("--wait", action="store_true", help="wait for another run of the book")
    pa = sub.add_parser("params", help="a chapter's parameters")
    pa.add_argument("name")
    sub.add_parser("check", help="headless-Chromium check of _build/html")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    lock.stop_on_signals()
    try:
        if args.cmd == "build":
            runner.build(args.only.split(",") if args.only else None, args.smoke,
                         runner.parse_params(args.params), check=not args.no_check,
                         force=args.force, keep_going=args.keep_going, wait=args.wait)
        elif args.cmd == "chapter":
            runner.chapter(args.name, runner.parse_params(args.params), smoke=args.smoke,
                           check=not args.no_check, wait=args.wait, html=not args.no_html)
        elif args.cmd == "params":
            for k, v in runner.parameters(args.name).items():
                print(f"{k} = {v}")
        elif args.cmd == "check":
            from . import htmlcheck
            htmlcheck.check(HTML, toc_notebooks())
    except BookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except AssertionError as e:          # the rendered-book check: its list of problems
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped (Ctrl-C); the book keeps its last complete runs", file=sys.stderr)
        return 130
    except lock.Stopped as e:
        print("stopped; the book keeps its last complete runs", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
