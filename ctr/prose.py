"""Numbers put into a chapter's prose (myst-nb ``glue``): the Markdown says
{glue:text}`name` and the value comes from code executed in the build, never typed.

``text(name, s)`` glues a string as it is (a plain ``glue`` of a str would show its quotes);
``paper(name, s)`` does the same for a value read from ``ctr/paper_numbers.yaml`` (the prose
around it must say it is the paper's).
"""
from __future__ import annotations


class _Text:
    def __init__(self, s: str):
        self.s = str(s)

    def __repr__(self) -> str:       # what glue's text/plain shows
        return self.s


def text(name: str, s) -> None:
    from myst_nb import glue

    glue(name, _Text(s), display=False)


paper = text
