"""The docs' examples run: every block a page marks as an example is executed, every excerpt
is checked against the file it quotes, every quoted file against its source.

Markers (an HTML comment on the line before a fenced block):

* ``<!-- example: runs in tests/test_docs.py -->``: run, in order, in one namespace per page,
  from the repository's root;
* ``<!-- excerpt: PATH -->``: the block appears verbatim in ``PATH``;
* ``<!-- file: PATH -->``: the block is the whole of ``PATH``.
"""

import contextlib
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "docs/writing-a-device.md", "docs/systemrdl.md", "docs/hardening.md", "docs/storage.md"]
_BLOCK = re.compile(r"^<!-- (example|excerpt|file): ?(.*?) -->\n```[a-z]*\n(.*?)^```$", re.M | re.S)


def blocks(page: str, kind: str) -> list[tuple[str, str]]:
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    return [(arg, body) for k, arg, body in _BLOCK.findall(text) if k == kind]


def test_every_page_has_what_it_marks():
    assert blocks("docs/writing-a-device.md", "example") and blocks("docs/writing-a-device.md", "excerpt")
    assert blocks("docs/systemrdl.md", "example") and blocks("docs/systemrdl.md", "file")
    assert blocks("docs/hardening.md", "example") and blocks("docs/hardening.md", "file")
    assert blocks("docs/storage.md", "example") and len(blocks("docs/storage.md", "excerpt")) >= 4


@pytest.mark.parametrize("page", PAGES)
def test_examples_run(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "docs_example"}
    out = io.StringIO()
    for _, body in blocks(page, "example"):
        with contextlib.redirect_stdout(out):
            exec(compile(body, page, "exec"), namespace)
    for line in out.getvalue().splitlines():  # what an example prints, the page says it prints
        with open(os.path.join(ROOT, page)) as f:
            assert line in f.read(), f"{page}: an example printed {line!r}, which the page does not show"


@pytest.mark.parametrize("page", PAGES)
def test_excerpts_are_the_code(page):
    for path, body in blocks(page, "excerpt"):
        with open(os.path.join(ROOT, path)) as f:
            assert body in f.read(), f"{page} quotes {path}, which no longer has:\n{body}"
    for path, body in blocks(page, "file"):
        with open(os.path.join(ROOT, path)) as f:
            assert body == f.read(), f"{page} quotes {path} whole, and it changed"
