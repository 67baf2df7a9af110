"""Replaying recorded sessions against models, without a VM: every reply, interrupt, DMA transfer and
deferred task compared, the device's own work put back exactly where it happened."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from vfiouser.client import Client
from vfiouser.devices.edu import Edu
from vfiouser.devices.pci import IoBar, PciDevice
from vfiouser.replay import ReplayError, replay
from vfiouser.server import serve_in_thread
from vfiouser.trace import Tracer, load_events

from . import edu_session

VFIOUSER = [sys.executable, "-m", "vfiouser"]


def record(device, path: str, sockdir: str, drive) -> dict:
    """Serve ``device`` with a trace to ``path`` and run ``drive(client)``; what it returns."""
    with open(path, "w") as out:
        with serve_in_thread(device, os.path.join(sockdir, "rec.sock"), tracer=Tracer(out)) as server:
            with Client.connect(server.path) as c:
                seen = drive(c)
            assert server.wait_idle(10)
    return seen


def edu_drive(memfd: bool):
    def drive(c):
        ram = edu_session.GuestRam(memfd)
        c.dma_handler = ram.handler
        try:
            return edu_session.run(c, ram)
        finally:
            ram.close()

    return drive


@pytest.fixture(scope="module", params=[False, True], ids=["message-dma", "in-place-dma"])
def edu_trace(request, tmp_path_factory):
    """A recorded edu session (registers, INTx, MSI, DMA both ways), and what its driver saw."""
    import tempfile

    path = str(tmp_path_factory.mktemp("trace") / "edu.jsonl")
    with tempfile.TemporaryDirectory(prefix="vfu-") as sockdir:
        seen = record(Edu(dma_delay_ms=5), path, sockdir, edu_drive(request.param))
    # The session really did what it is meant to exercise.
    assert seen["liveness"] == (~0x12345678 & 0xFFFFFFFF).to_bytes(4, "little").hex()
    assert seen["ram"] == edu_session.PATTERN[0x40:0xC0].hex()
    assert seen["intx signals"] >= 1 and seen["msi signals"] == 1
    return path


def test_a_recorded_edu_session_replays_against_edu(edu_trace):
    entries = list(load_events(edu_trace))
    kinds = {e["dir"] for e in entries}
    assert {"irq", "dma", "task", "lock"} <= kinds  # the trace holds what replay needs
    result = replay(entries, Edu())
    assert result.ok, str(result.divergence)
    messages = sum(1 for e in entries if e["dir"] == "in" and not e["msg"][12:14] == b"\x01\x00")
    assert result.sessions == 1 and result.messages >= 60 and result.replies >= 60
    assert result.tasks == sum(1 for e in entries if e["dir"] == "task" and e["event"] == "finish") >= 5
    assert result.events == sum(1 for e in entries if e["dir"] in ("irq", "dma")) >= 6
    assert messages >= result.messages


class EduOtherIdent(Edu):
    """edu, but the identification register says minor version 1."""

    def _power_on(self):
        super()._power_on()
        self.regs.ident.value = 0x010100ED


class EduSlowFactorial(Edu):
    """edu whose factorial forgets its completion interrupt."""

    def _raise_irq(self, value):
        if value != 0x1:
            super()._raise_irq(value)


class EduBadDma(Edu):
    """edu whose DMA engine writes the buffer to RAM one byte off."""

    def _write_ram(self, addr, data):
        super()._write_ram(addr + 1, data)


def test_a_register_that_differs_is_the_divergence_with_both_values(edu_trace):
    result = replay(list(load_events(edu_trace)), EduOtherIdent())
    d = result.divergence
    assert d is not None and d.context.startswith("message #")
    assert d.request.endswith("read  BAR0   +0x000 [4] edu.ident")
    assert d.recorded.endswith("-> 0x010000ed") and d.model.endswith("-> 0x010100ed")
    text = str(d)
    assert "recorded: " in text and "model:    " in text and f"trace entry {d.entry}" in text


def test_a_missing_interrupt_is_the_divergence_of_the_task_that_should_raise_it(edu_trace):
    d = replay(list(load_events(edu_trace)), EduSlowFactorial()).divergence
    assert d is not None and d.context == "what deferred task 3 (Edu._compute_factorial) did"
    assert d.recorded == "IRQ INTx asserted (signalled)" and d.model == "task Edu._compute_factorial finished"


def test_dma_that_differs_is_the_divergence_with_what_moved(edu_trace):
    d = replay(list(load_events(edu_trace)), EduBadDma()).divergence
    assert d is not None and d.context.endswith("(Edu._run_dma) did")
    assert d.recorded.startswith(f"DMA write {edu_session.DST:#x} +0x80")
    assert d.model.startswith(f"DMA write {edu_session.DST + 1:#x} +0x80")


class Stepper(PciDevice):
    """A device whose deferred work shows in between: a task that sets ``phase`` 1, works, then 2.
    A client polling ``phase`` sees 0, 1 and 2 wherever the task happens to be."""

    vendor_id, device_id = 0x1234, 0x5EED

    def __init__(self):
        super().__init__()
        self.phase = 0
        self.runs = 0
        self.add_bar(0, IoBar(16)).map(self, 0, 2)

    def pio_read(self, base, offset, data):
        data[0] = self.phase if offset == 0 else self.runs

    def pio_write(self, base, offset, data):
        self.phase = 0
        self.defer(self._work)

    def _work(self):
        with self.lock:
            self.phase = 1
        time.sleep(0.002)  # the slow part, without the lock: the client's reads land here too
        with self.lock:
            self.phase = 2
            self.runs += 1


def test_deferred_work_replays_exactly_where_it_happened(tmp_path, sockdir):
    """Every read in the recording saw the task at some phase, depending on timing; the replay must
    give every read the same phase, every time."""

    def drive(c):
        c.bring_up()
        phases = []
        for _ in range(30):
            c.region_write(0, 0, b"\x01")
            for _ in range(6):
                phases.append(c.region_read(0, 0, 1)[0])
        return phases

    path = str(tmp_path / "stepper.jsonl")
    phases = record(Stepper(), path, sockdir, drive)
    assert {0, 1, 2} <= set(phases)  # the recording did catch the task in between
    entries = list(load_events(path))
    ran = sum(1 for e in entries if e["dir"] == "task" and e["event"] == "finish")
    assert ran >= 20  # the last few may be dropped when the client leaves
    for _ in range(3):
        result = replay(entries, Stepper())
        assert result.ok, str(result.divergence)
        assert result.tasks == ran


def test_work_of_other_threads_is_noted_and_a_trace_without_a_session_refused(tmp_path, sockdir):
    def drive(c):
        c.bring_up()
        poker = threading.Thread(target=lambda: dev.set_inputs(0x5))  # the host, not the client
        poker.start()
        poker.join()
        return c.region_read(2, 1, 1)

    from vfiouser.devices.idio16 import Idio16

    dev = Idio16()
    path = str(tmp_path / "host.jsonl")
    assert record(dev, path, sockdir, drive) == b"\x05"
    result = replay(list(load_events(path)), Idio16())
    assert not result.ok and "inputs" not in result.divergence.request
    assert result.divergence.recorded.endswith("-> 0x05") and result.divergence.model.endswith("-> 0x00")
    assert any("threads other than" in note for note in result.notes)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ReplayError, match="no client message"):
        replay(list(load_events(str(tmp_path / "empty.jsonl"))), Edu())


def test_the_replay_command_exits_0_when_all_match_1_at_a_divergence_2_for_bad_input(edu_trace, tmp_path):
    (tmp_path / "variant.py").write_text("from vfiouser.devices.edu import Edu\n\n"
                                         "class Edu2(Edu):\n"
                                         "    def _power_on(self):\n"
                                         "        super()._power_on()\n"
                                         "        self.regs.ident.value = 0x010100ED\n")

    def run(*args):
        return subprocess.run(VFIOUSER + ["replay", *args], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)

    same = run(edu_trace, "edu")
    assert same.returncode == 0 and same.stdout.startswith("replay: the model matches the recording"), same.stdout
    other = run(edu_trace, "variant.py:Edu2")
    assert other.returncode == 1
    assert "  message:  #" in other.stdout and "read  BAR0   +0x000 [4] edu.ident" in other.stdout
    assert "  recorded: " in other.stdout and "-> 0x010000ed" in other.stdout and "-> 0x010100ed" in other.stdout
    bad = run(str(tmp_path / "variant.py"), "edu")
    assert bad.returncode == 2 and "is not a trace entry" in bad.stderr
    missing = run(str(tmp_path / "none.jsonl"), "edu")
    assert missing.returncode == 2 and "cannot read the trace" in missing.stderr


@pytest.mark.parametrize("vector", ["qemu-11.1.3-probe-default.jsonl", "qemu-11.1.3-probe-memfd.jsonl"])
def test_the_kept_qemu_vectors_replay_their_replies_against_the_probe(vector):
    """Traces from before device events were recorded: the replies are still compared."""
    from .probe import ProbeDevice

    path = os.path.join(os.path.dirname(__file__), "vectors", vector)
    entries = list(load_events(path))
    result = replay(entries, ProbeDevice())
    assert result.ok, str(result.divergence)
    assert result.replies >= 70 and any("replies are compared" in note for note in result.notes)
    other = replay(entries, Edu())  # another device answers GET_REGION_INFO differently
    assert not other.ok and other.divergence.request.endswith("GET_REGION_INFO BAR0")
