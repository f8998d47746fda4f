"""``python -m ctr.book``: the command line of the book runner (see ``ctr/book/runner.py``)."""
import argparse
import sys

from . import runner
from .runner import HTML, BookError, build, parameters, parse_params, render, run_chapter, toc_notebooks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctr.book", description=runner.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="run the chapters that changed, render, check")
    b.add_argument("--force", action="store_true", help="re-execute every chapter")
    b.add_argument("--smoke", action="store_true", help="tiny model, tiny sizes (seconds)")
    b.add_argument("--only", default=None, help="comma-separated chapter names")
    b.add_argument("--no-check", action="store_true", help="skip the Chromium check")
    b.add_argument("params", nargs="*", help="key=value for every chapter that has the key")
    c = sub.add_parser("chapter", help="rerun one chapter and re-render")
    c.add_argument("name")
    c.add_argument("params", nargs="*")
    c.add_argument("--smoke", action="store_true")
    c.add_argument("--no-check", action="store_true")
    pa = sub.add_parser("params", help="a chapter's parameters")
    pa.add_argument("name")
    sub.add_parser("check", help="headless-Chromium check of _build/html")
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            build(args.only.split(",") if args.only else None, args.smoke,
                  parse_params(args.params), check=not args.no_check, force=args.force)
        elif args.cmd == "chapter":
            run_chapter(args.name, parse_params(args.params), smoke=args.smoke)
            render()
            if not args.no_check:
                from . import htmlcheck
                htmlcheck.check(HTML, [args.name])
        elif args.cmd == "params":
            for k, v in parameters(args.name).items():
                print(f"{k} = {v}")
        elif args.cmd == "check":
            from . import htmlcheck
            htmlcheck.check(HTML, toc_notebooks())
    except BookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
