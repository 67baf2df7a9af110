"""A trace recorded from a real QEMU driving edu replays without QEMU: against edu every reply, interrupt,
DMA transfer and deferred task matches (exit 0); against an edu that differs in one register the replay
stops at the message that reads it (exit 1)."""

import os
import signal
import subprocess
import sys

import pytest

from vfiouser.qemu import QtestMachine
from vfiouser.server import device_json
from vfiouser.trace import load_events

from . import edu_scenario

pytestmark = pytest.mark.qemu

VFIOUSER = [sys.executable, "-m", "vfiouser"]
VARIANT = """
from vfiouser.devices.edu import Edu


class EduMinor1(Edu):
    '''edu, except that the identification register says version 1.1.'''

    def _power_on(self):
        super()._power_on()
        self.regs.ident.value = 0x010100ED
"""


@pytest.fixture(scope="module", params=[False, True], ids=["default-ram", "memfd-ram"])
def qemu_trace(request, qemu_binary, tmp_path_factory):
    """``vfiouser serve edu --trace`` while QEMU runs the edu scenario (registers, factorial, INTx,
    MSI, DMA both ways, a reset), with guest RAM shared (DMA in place) or not (DMA by message)."""
    import tempfile

    folder = tmp_path_factory.mktemp("qemu-trace")
    trace = str(folder / "edu.jsonl")
    with tempfile.TemporaryDirectory(prefix="vfu-") as sockdir:
        path = os.path.join(sockdir, "edu.sock")
        server = subprocess.Popen(VFIOUSER + ["serve", "edu", "-s", path, "--trace", trace],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().startswith("-device"), server.stderr.read()
            with QtestMachine([device_json(path, addr=f"{edu_scenario.SLOT:02x}.0")], qemu=qemu_binary,
                              memfd=request.param) as vm:
                transcript = dict(edu_scenario.run(vm))
        finally:
            server.send_signal(signal.SIGTERM)
            _, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
    assert transcript["msi message"] == "0xabcd"  # the scenario did run against our edu
    return trace, request.param


def test_the_qemu_trace_holds_registers_interrupts_and_dma(qemu_trace):
    trace, memfd = qemu_trace
    entries = list(load_events(trace))
    irqs = {(e["kind"], e.get("level", True)) for e in entries if e["dir"] == "irq"}
    assert {("intx", True), ("intx", False), ("msi", True)} <= irqs
    dma = [e for e in entries if e["dir"] == "dma"]
    assert {e["op"] for e in dma} == {"read", "write"}
    how = {e.get("how") for e in dma if "error" not in e}
    assert ("in place" in how) if memfd else (how == {"by message"})  # QEMU maps some areas without an fd
    maps = [e for e in entries if e["dir"] == "in" and e.get("fds") and e["msg"][2] == 2]  # DMA_MAP with an fd
    assert bool(maps) == memfd and all(f["kind"] == "memory" for m in maps for f in m["fds"])
    assert sum(1 for e in entries if e["dir"] == "task" and e["event"] == "finish") >= 20


def test_the_qemu_trace_replays_against_edu(qemu_trace):
    trace, _ = qemu_trace
    result = subprocess.run(VFIOUSER + ["replay", trace, "edu"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("replay: the model matches the recording (")
    assert "interrupts and DMA transfers" in result.stdout


def test_an_edu_that_differs_in_one_register_diverges_at_the_message_that_reads_it(qemu_trace, tmp_path):
    trace, _ = qemu_trace
    (tmp_path / "variant.py").write_text(VARIANT)
    result = subprocess.run(VFIOUSER + ["replay", trace, "variant.py:EduMinor1"], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("replay: the model differs from the recording at trace entry ")
    first_ident_read = next(e for e in load_events(trace) if e["dir"] == "in" and e.get("msg")[2] == 9
                            and e["msg"][16:32] == bytes(8) + bytes(4) + (4).to_bytes(4, "little"))
    assert f"at trace entry {first_ident_read['n']} " in lines[0]
    assert lines[1].startswith("  message:  #") and lines[1].endswith(" read  BAR0   +0x000 [4] edu.ident")
    assert lines[2].startswith("  recorded: #") and lines[2].endswith(" -> 0x010000ed")
    assert lines[3].startswith("  model:    #") and lines[3].endswith(" -> 0x010100ed")
