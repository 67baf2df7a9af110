"""Readable debugging from the command line: ``serve -v`` with filters, and ``trace show`` printing a
trace the same way, on a real server process driven like a driver drives edu."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from vfiouser.client import Client

from . import edu_session

VFIOUSER = [sys.executable, "-m", "vfiouser"]
LINE = re.compile(r"^(client\d*) +(\d+\.\d{3}) ms  (.*)$")


def serve_edu(sockdir: str, *args: str) -> tuple[str, dict]:
    """Serve edu with ``args``, run the edu session over message DMA; return (stderr, what it saw)."""
    path = os.path.join(sockdir, "edu.sock")
    proc = subprocess.Popen(VFIOUSER + ["serve", "edu", "-s", path, "--param", "dma_delay_ms=5", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("-device")
        ram = edu_session.GuestRam(memfd=False)
        with Client.connect(path, dma_handler=ram.handler) as c:
            seen = edu_session.run(c, ram)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return err, seen


def readable(text: str) -> list[tuple[str, float, str]]:
    """The readable lines of a log or of trace show: (client, ms, text)."""
    return [(m[1], float(m[2]), m[3]) for m in map(LINE.match, text.splitlines()) if m]


@pytest.fixture(scope="module")
def verbose_run(tmp_path_factory):
    """One edu session served with -v and --trace at once: the log, the trace, what the driver saw."""
    import tempfile

    trace = str(tmp_path_factory.mktemp("dbg") / "edu.jsonl")
    with tempfile.TemporaryDirectory(prefix="vfu-") as sockdir:
        err, seen = serve_edu(sockdir, "-v", "--trace", trace)
    return err, trace, seen


def test_verbose_names_regions_and_registers_and_shows_numbers(verbose_run):
    err, _, seen = verbose_run
    lines = [text for _, _, text in readable(err)]
    assert "client connected" in lines and "client gone" in lines
    assert any(re.fullmatch(r"#\d+ read  config \+0x004 \[2\] command -> 0x0000", t) for t in lines)
    assert any(re.fullmatch(r"#\d+ write config \+0x010 \[4\] BAR0 <- 0xffffffff", t) for t in lines)
    assert any(re.fullmatch(r"#\d+ write config \+0x042 \[2\] MSI.control <- 0x0001", t) for t in lines)
    assert any(re.fullmatch(r"#\d+ read  BAR0   \+0x000 \[4\] edu\.ident -> 0x010000ed", t) for t in lines)
    assert any(re.fullmatch(r"#\d+ write BAR0   \+0x064 \[4\] edu\.irq_ack <- 0x00000001 \(posted\)", t) for t in lines)
    assert any(re.fullmatch(r"#\d+ DMA_MAP 0x0 \+0x100000 read/write -> ok", t) for t in lines)
    assert any(re.fullmatch(r"#\d+ SET_IRQS MSI 0 trigger eventfd -> ok", t) for t in lines)
    assert any(t.startswith("#0 VERSION 0.0 -> 0.0 (max_msg_fds 16,") for t in lines)
    assert seen["10!"] == (3628800).to_bytes(4, "little").hex()
    assert "REGION_READ #" not in err and "region=0" not in err  # the raw protocol is -vv's


def test_verbose_shows_interrupts_dma_and_deferred_work_with_their_cause(verbose_run):
    err, _, _ = verbose_run
    lines = [text for _, _, text in readable(err)]
    assert "task Edu._compute_factorial started" in lines and "task Edu._run_dma finished" in lines
    assert "IRQ INTx asserted (signalled)" in lines
    pattern = " ".join(f"{b:02x}" for b in edu_session.PATTERN[:16])
    assert f"DMA read  {edu_session.SRC:#x} +0x100 by message: {pattern} ... (256 bytes)" in lines
    assert any(t.startswith(f"DMA write {edu_session.DST:#x} +0x80 by message: ") for t in lines)
    # What a message made the device do follows the message, indented: the MSI its raise sent.
    raw = [m[3] for m in map(LINE.match, err.splitlines()) if m]
    raise_at = next(i for i, t in enumerate(raw) if re.fullmatch(r"#\d+ write BAR0   \+0x060 \[4\] edu\.irq_raise <- 0x00000010", t))
    assert raw[raise_at + 1] == "    IRQ MSI vector 0 sent"


def test_times_are_milliseconds_since_the_client_arrived(verbose_run):
    err, _, _ = verbose_run
    times = readable(err)
    assert times[0][2] == "client connected" and times[0][1] < 5
    assert all(0 <= ms < 60_000 for _, ms, _ in times)
    messages = [ms for _, ms, text in times if text.startswith("#")]
    assert messages == sorted(messages) and messages[-1] > messages[0]


def test_trace_show_prints_what_verbose_logged(verbose_run):
    err, trace, _ = verbose_run
    shown = subprocess.run(VFIOUSER + ["trace", "show", trace], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    logged = sorted(text for _, _, text in readable(err))
    printed = sorted(text for _, _, text in readable(shown.stdout))
    assert printed == logged and len(printed) > 80


@pytest.mark.parametrize("only, hide, allowed", [
    (["bar0"], [], re.compile(r"^(#\d+ (read |write) BAR0 |client (connected|gone))")),
    (["irq", "task"], [], re.compile(r"^(\s*IRQ |task |#\d+ (SET_IRQS|GET_IRQ_INFO)|client )")),
    ([], ["config", "setup", "dma"], re.compile(r"^(?!#\d+ (read |write) config)(?!.*DMA)(?!#\d+ VERSION)")),
])
def test_filters_keep_a_busy_session_readable(verbose_run, sockdir, only, hide, allowed):
    err, trace, _ = verbose_run
    args = [f"--only={','.join(only)}"] * bool(only) + [f"--hide={h}" for h in hide]
    shown = subprocess.run(VFIOUSER + ["trace", "show", trace, *args], capture_output=True, text=True, timeout=60)
    lines = [text for _, _, text in readable(shown.stdout)]
    assert lines and all(allowed.match(t.strip()) or t.startswith("client ") for t in lines), lines
    live, _ = serve_edu(sockdir, "-v", *args)
    assert sorted(text for _, _, text in readable(live) if not text.startswith("client ")) and \
        all(allowed.match(text.strip()) or text.startswith("client ") for _, _, text in readable(live))


def test_bar0_alone_is_a_few_lines_of_a_busy_session(verbose_run):
    _, trace, _ = verbose_run
    every = subprocess.run(VFIOUSER + ["trace", "show", trace], capture_output=True, text=True, timeout=60)
    bar0 = subprocess.run(VFIOUSER + ["trace", "show", trace, "--only", "bar0"], capture_output=True, text=True,
                          timeout=60)
    assert 0 < len(bar0.stdout.splitlines()) < len(every.stdout.splitlines()) * 0.8
    assert all(" BAR0 " in line for line in bar0.stdout.splitlines())


def test_unknown_filter_names_the_valid_ones(tmp_path):
    result = subprocess.run(VFIOUSER + ["serve", "edu", "-s", str(tmp_path / "s"), "-v", "--only", "bar9"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "unknown category 'bar9': choose from bar0, bar1, bar2, bar3, bar4, bar5, rom, config" in result.stderr


def test_trace_show_raw_and_a_file_that_is_not_a_trace(verbose_run, tmp_path):
    _, trace, _ = verbose_run
    raw = subprocess.run(VFIOUSER + ["trace", "show", trace, "--raw", "--only", "bar0"], capture_output=True,
                         text=True, timeout=60)
    texts = [text for _, _, text in readable(raw.stdout)]
    assert any(t.startswith("<<< REGION_READ #") and "region=0" in t for t in texts)
    assert any(t.startswith(">>> REGION_READ #") and t.endswith("data=ed000001(4)") for t in texts)
    (tmp_path / "notes.txt").write_text("hello\n")
    bad = subprocess.run(VFIOUSER + ["trace", "show", str(tmp_path / "notes.txt")], capture_output=True, text=True,
                         timeout=20)
    assert bad.returncode == 2 and "notes.txt:1 is not a trace entry" in bad.stderr


def test_very_verbose_has_both_the_readable_lines_and_the_raw_protocol(sockdir):
    err, _ = serve_edu(sockdir, "-vv")
    assert re.search(r"<<< REGION_READ #\d+ command offset=4 region=7 count=2", err)
    assert re.search(r"client1 +\d+\.\d{3} ms  #\d+ read  config \+0x004 \[2\] command -> 0x0000", err)


def test_trace_show_reads_traces_from_before_entries_were_numbered():
    vector = os.path.join(os.path.dirname(__file__), "vectors", "qemu-11.1.3-probe-default.jsonl")
    shown = subprocess.run(VFIOUSER + ["trace", "show", vector, "--only", "config"], capture_output=True,
                           text=True, timeout=60)
    lines = [text for _, _, text in readable(shown.stdout)]
    assert shown.returncode == 0 and len(lines) > 20
    assert any(re.fullmatch(r"#\d+ read  config \+0x000 \[4\] -> 0xbeef1234", t) for t in lines)  # no names: older
