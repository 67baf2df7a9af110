"""docs/debugging.md runs: its files are written, its commands run in order, its Python blocks executed,
and every line of output it shows is produced (times aside).

Markers (an HTML comment on the line before a fenced block):

* ``<!-- doc-test: write NAME -->``: the block is written to NAME in the page's working folder;
* ``<!-- doc-test: command -->`` (``command exit N``): ``$`` lines run there (``vfiouser`` and
  ``python`` are this interpreter's); the lines after a command are output it must print;
* ``<!-- doc-test: command background -->``: the command keeps running (a server) until the next
  background command starts or the page ends;
* ``<!-- doc-test: stderr of the command in the background -->``: lines the background command
  must have written to its standard error by the time it is stopped;
* ``<!-- doc-test: python -->``: executed (``test_*`` functions it defines are called); what it
  prints must appear in the page.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "debugging.md")
_BLOCK = re.compile(r"^<!-- doc-test: (.*?) -->\n```[a-z]*\n(.*?)^```$", re.M | re.S)
_TIME = re.compile(r" *\d+\.\d{3} ms")


def _norm(line: str) -> str:
    return _TIME.sub(" <t> ms", line.rstrip())


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "vfiouser":
        return [sys.executable, "-m", "vfiouser", *words[1:]]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    raise AssertionError(f"the page runs {words[0]!r}, which this test does not know")


def _shown(body: str) -> list[tuple[str, list[str]]]:
    """``(command, output lines)`` of a console block."""
    out: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return out


def _assert_printed(expected: list[str], printed: str, what: str) -> None:
    got = [_norm(line) for line in printed.splitlines()]
    for line in expected:
        assert _norm(line) in got, f"{what}: the page shows {line!r}, which it did not print:\n{printed}"


class _Background:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.stderr = ""

    def start(self, command: str, cwd: str) -> None:
        self.stop()
        self.proc = subprocess.Popen(_argv(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        first = self.proc.stdout.readline()
        assert first.startswith("-device "), f"{command} did not start: {self.proc.stderr.read()}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            _, self.stderr = self.proc.communicate(timeout=30)
            assert self.proc.returncode == 0, self.stderr
            self.proc = None


def test_every_block_of_the_debugging_page_runs(tmp_path, monkeypatch):
    with open(PAGE) as f:
        page = f.read()
    blocks = _BLOCK.findall(page)
    kinds = [kind.split()[0] for kind, _ in blocks]
    assert kinds.count("command") >= 6 and "python" in kinds and "write" in kinds
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    server = _Background()
    background_lines: list[str] = []
    try:
        for kind, body in blocks:
            words = kind.split()
            if words[0] == "write":
                (tmp_path / words[1]).write_text(body)
            elif kind == "command background":
                if background_lines:
                    server.stop()
                    _assert_printed(background_lines, server.stderr, "the server's log")
                    background_lines = []
                (command, _), = _shown(body)
                server.start(command, str(tmp_path))
            elif words[0] == "command":
                code = int(words[2]) if len(words) == 3 else 0
                for command, expected in _shown(body):
                    if "trace show" in command or "replay" in command:
                        server.stop()  # the trace is complete once its server stopped
                        if background_lines:
                            _assert_printed(background_lines, server.stderr, "the server's log")
                            background_lines = []
                    done = subprocess.run(_argv(command), cwd=tmp_path, capture_output=True, text=True,
                                          timeout=120)
                    assert done.returncode == code, f"{command}: exit {done.returncode}\n{done.stdout}{done.stderr}"
                    _assert_printed(expected, done.stdout, command)
            elif kind.startswith("stderr"):
                background_lines = body.splitlines()
            elif kind == "python":
                namespace = {"__name__": "debugging_doc"}
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(compile(body, PAGE, "exec"), namespace)
                    for name, value in list(namespace.items()):
                        if name.startswith("test_") and callable(value):
                            value()
                for line in out.getvalue().splitlines():
                    assert line in page, f"a Python block printed {line!r}, which the page does not show"
            else:
                raise AssertionError(f"unknown doc-test marker {kind!r}")
    finally:
        server.stop()
    if background_lines:
        _assert_printed(background_lines, server.stderr, "the server's log")
