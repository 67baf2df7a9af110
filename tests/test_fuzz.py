"""The session fuzzer (``vfiouser.fuzz``, ``scripts/fuzz``): the commands of docs/fuzzing.md run
and pass (among them the CI run: 20,000 messages over every built-in device, on the engine a
user gets), its plans are deterministic, and a planted server bug is caught and reported with a
reproducer that reproduces it.

A failed run prints its reproducer and the server's log in the assertion message.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

from vfiouser import fastpath
from vfiouser.fuzz import BUILTIN, build_parser, build_plan, default_vector_dir, device_profile, load_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "fuzzing.md")
FUZZ = [sys.executable, "-m", "vfiouser.fuzz"]

TOTALS = re.compile(r"^TOTALS sessions=(\d+) messages=(\d+) replies=(\d+) error_replies=(\d+) crashes=0 hangs=0 "
                    r"replies_to_no_reply=0 fd_growth=(\d+) thread_growth=(\d+) map_growth=(\d+) "
                    r"rss_growth_kb=(\d+) result=PASS$", re.M)


@pytest.fixture(autouse=True)
def workdirs(sockdir, monkeypatch):
    """The fuzzer's work directories (kept after a failure) go under a directory removed after
    the test, short enough for socket paths."""
    monkeypatch.setenv("TMPDIR", sockdir)


def fuzz(args: list[str], timeout: float, env: dict | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    """``python -m vfiouser.fuzz ARGS`` (what ``scripts/fuzz ARGS`` runs) in a subprocess."""
    return subprocess.run(FUZZ + args, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def doc_commands() -> list[str]:
    """The command lines of the block docs/fuzzing.md marks ``<!-- commands: run in tests/test_fuzz.py -->``."""
    with open(DOC) as f:
        text = f.read()
    block = re.search(r"^<!-- commands: run in tests/test_fuzz\.py -->\n```\n(.*?)^```$", text, re.M | re.S)
    assert block, "docs/fuzzing.md has no block of commands run here"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def split_command(line: str) -> tuple[dict, list[str]]:
    """``[VAR=value ...] scripts/fuzz ARGS`` as (environment, ARGS)."""
    words = shlex.split(line)
    env = {}
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    assert words[0] == "scripts/fuzz", line
    return env, words[1:]


def passed(out: subprocess.CompletedProcess, engine: str) -> tuple[int, ...]:
    """The run passed on ``engine``: its totals."""
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-3000:]
    assert f"engine {engine}" in out.stdout, out.stdout[:500]
    totals = TOTALS.search(out.stdout)
    assert totals, out.stdout[-3000:]
    return tuple(map(int, totals.groups()))


def user_engine() -> str:
    return "C fast loop" if fastpath.AVAILABLE else "pure Python"


def test_the_documented_commands_are_the_ones_tested():
    commands = doc_commands()
    assert "scripts/fuzz --seed 20260117 --messages 20000 --report fuzz.md" in commands  # the CI run
    assert any("--session" in c for c in commands) and any("VFIOUSER_PURE_PYTHON=1" in c for c in commands)
    for line in commands:
        build_parser().parse_args(split_command(line)[1])


def test_the_ci_run_over_every_device_passes_on_the_users_engine(tmp_path):
    """20,000 messages over the five built-in devices, served as ``vfiouser serve`` serves them (the
    C fast loop when built): no crash, hang, reply to NO_REPLY, missing or wrong reply, and no
    growth of fds, threads or mappings."""
    line = next(c for c in doc_commands() if "--messages 20000" in c)
    env, args = split_command(line)
    out = fuzz(args, timeout=600, env={**env, "VFIOUSER_PURE_PYTHON": "0"}, cwd=tmp_path)
    sessions, messages, replies, error_replies, fds, threads, maps, _ = passed(out, user_engine())
    assert sessions > 300 and messages > 18000 and replies > messages // 2 and error_replies > 300
    assert fds <= 2 and threads <= 2 and maps <= 16  # the fuzzer fails beyond these; the line says so
    for device in BUILTIN:  # and at the end of each device's run, its fds are back to its baseline
        line = re.search(rf"^fuzz: {device}: peak fds=.* \(baseline fds=(\d+) .*; at the end fds=(\d+) ", out.stdout,
                         re.M)
        assert line and line.group(1) == line.group(2), out.stdout[-3000:]
    text = (tmp_path / "fuzz.md").read_text()
    assert "result: PASS" in text and "seed: 20260117" in text and "| EINVAL |" in text


def test_a_short_run_on_the_pure_python_engine_and_a_session_replayed_alone():
    commands = [c for c in doc_commands() if "--messages 20000" not in c]
    assert len(commands) >= 2
    for line in commands:
        env, args = split_command(line)
        out = fuzz(args, timeout=300, env=env)
        if "--session" in args:
            assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
            assert re.search(r"^fuzz: session \d+ passed every check$", out.stdout, re.M)
            assert re.search(r"^  \[0\] .* VERSION ", out.stdout, re.M), "the whole plan is printed"
        else:
            engine = "pure Python" if env.get("VFIOUSER_PURE_PYTHON") == "1" else user_engine()
            sessions, messages, *_ = passed(out, engine)
            assert sessions > 20 and messages > 2000


def test_plans_are_a_function_of_seed_device_and_number():
    """A session's plan depends on (seed, device, number) only; ids are unique in a session."""
    shapes = load_shapes(default_vector_dir())
    prof = device_profile("edu")

    def wires(plan):
        return [(m.wire(), m.fds, m.splits, m.frag_fds) for m in plan.msgs]

    for number in range(40):
        a = build_plan(5, "edu", number, prof, shapes)
        b = build_plan(5, "edu", number, prof, shapes)
        assert wires(a) == wires(b) and (a.cut, a.flush_after, a.half_close) == (b.cut, b.flush_after, b.half_close)
        ids = [m.msg_id for m in a.msgs]
        assert len(set(ids)) == len(ids)
        assert a.msgs[-1].origin.startswith("sentinel") or a.cut or any(m.ends for m in a.msgs)
    assert wires(build_plan(5, "edu", 3, prof, shapes)) != wires(build_plan(6, "edu", 3, prof, shapes))
    warmup = build_plan(5, "edu", -1, prof, shapes)
    assert not warmup.mutated and warmup.cut is None and warmup.msgs[0].notes == []


#: A server with one planted bug: it answers every message, NO_REPLY ones included.
FAKE_SERVER = textwrap.dedent('''
    import os, socket, struct, sys
    HDR = struct.Struct("<HHIII")
    path = sys.argv[1]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    print("-device fake", flush=True)
    while True:
        conn, _ = listener.accept()
        buf = b""
        while True:
            try:
                data, anc, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(253 * 4))
            except OSError:
                break
            for level, kind, blob in anc:
                for fd in struct.unpack(f"{len(blob) // 4}i", blob[: len(blob) // 4 * 4]):
                    os.close(fd)
            if not data:
                break
            buf += data
            while len(buf) >= 16:
                msg_id, cmd, size, flags, _ = HDR.unpack_from(buf)
                if size < 16 or len(buf) < size:
                    break
                payload, buf = buf[16:size], buf[size:]
                if flags & 0xF == 1:
                    continue
                if cmd == 1:
                    body = struct.pack("<HH", 0, 0) + b'{"capabilities":{}}\\0'
                elif cmd == 9 and len(payload) >= 16:
                    body = payload[:16] + bytes(struct.unpack_from("<I", payload, 12)[0])
                else:
                    body = b""
                conn.sendall(HDR.pack(msg_id, cmd, 16 + len(body), 1, 0) + body)  # even to NO_REPLY
        conn.close()
''')


def test_a_reply_to_a_no_reply_message_is_caught_with_a_reproducer(tmp_path):
    """The planted bug fails the run (exit 1) with a reproducer that fails the same way."""
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    command = f"{sys.executable} {script} {{socket}}"
    out = fuzz(["--device", "idio16", "--seed", "7", "--messages", "2000", "--server-command", command],
               timeout=120)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "FUZZ FAILURE [reply-to-no-reply]" in out.stdout, out.stdout[-3000:]
    assert "result=FAIL" in out.stdout and "replies_to_no_reply=1" in out.stdout
    found = re.search(r"^reproduce with: (scripts/fuzz --device idio16 --seed 7 --session (-?\d+)\b.*)$",
                      out.stdout, re.M)
    assert found, out.stdout[-3000:]
    failing = re.search(r"^  \[(\d+)\] .*flags=0x10 .*<-- failed here$", out.stdout, re.M)
    assert failing, "the reproducer names the NO_REPLY message the server answered"
    assert re.search(r"^       hex: [0-9a-f]{32,}", out.stdout, re.M)
    with open(DOC) as f:  # docs/fuzzing.md shows this report as it is
        shown = re.search(r"^<!-- output: the planted bug in tests/test_fuzz\.py -->\n```\n(.*?)^```$", f.read(),
                          re.M | re.S)
    printed = out.stdout.splitlines()
    for line in shown.group(1).splitlines():
        assert any(p.startswith(line) for p in printed), f"docs/fuzzing.md shows {line!r}, the run did not print it"
    # The reproducer's command line replays that session alone, and it fails the same way.
    again = fuzz(shlex.split(found.group(1))[1:], timeout=120)
    assert again.returncode == 1 and "FUZZ FAILURE [reply-to-no-reply]" in again.stdout, again.stdout[-3000:]


@pytest.mark.parametrize("bad", [["--device", "nonesuch"], ["--messages", "0"], ["--avoid", "known"]])
def test_bad_arguments_are_usage_errors(bad):
    """An unknown device, an empty budget or an unknown option is a usage error (exit 2), not a run."""
    out = fuzz(bad, timeout=60)
    assert out.returncode == 2 and "error" in out.stderr
