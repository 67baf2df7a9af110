"""The Python edu against QEMU's own edu: the same qtest script, the same answers.

QEMU's in-tree ``edu`` is the oracle. ``tests/edu_scenario.py`` drives either
device through registers, the factorial, INTx, MSI (messages pointed at guest
RAM), the DMA engine in both directions and its address checks, and a reset;
the Python model, served over vfio-user, must produce the same transcript with
guest RAM shared (memfd: DMA in place) and not shared (DMA through messages).
"""

import os

import pytest

from vfiouser.devices.edu import Edu
from vfiouser.testing.qemu import QtestMachine
from vfiouser.server import serve_in_thread

from . import edu_scenario

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def qemu_edu(qemu_binary):
    """The transcript of QEMU's own edu (the oracle)."""
    with QtestMachine([f"edu,addr={edu_scenario.SLOT:02x}.0"], qemu=qemu_binary) as vm:
        return dict(_keyed(edu_scenario.run(vm)))


def _keyed(transcript):
    seen = {}
    for step, value in transcript:
        key = step if step not in seen else f"{step} #{seen[step]}"
        seen[step] = seen.get(step, 1) + 1
        yield key, value


def test_oracle_transcript_is_what_edu_should_do(qemu_edu):
    """Pin the oracle itself, so two equally wrong transcripts cannot pass."""
    reads = qemu_edu["mmio reads"]
    assert reads["readl ident"] == "0x10000ed" and reads["readq ident"] == hex(2**64 - 1)
    assert reads["readb ident"] == "0x0" and reads["readl buffer"] == "0xffffffff"
    assert qemu_edu["liveness"] == hex(~0x12345678 & 0xFFFFFFFF)
    assert qemu_edu["factorials"][5] == "0x78" and qemu_edu["factorials"][34] == "0x0"
    assert qemu_edu["raise 0x1234 irq"] == ["raise"] and qemu_edu["ack 0x4 irq"] == ["lower"]
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(256))
    ram = bytes.fromhex(qemu_edu["ram after dma"])
    assert ram[0x10:0x90] == pattern[0x80:0x100] and ram[:0x10] == b"\xee" * 0x10
    assert qemu_edu["msi message"] == "0xabcd" and qemu_edu["no message on ack"] == "0x0"
    assert qemu_edu["ram untouched by bad range"] == "ee" * 32
    assert qemu_edu["system reset irq"] == ["lower"]
    assert qemu_edu["buffer from clamped source"] == pattern[:64].hex()
    below_rom = bytes.fromhex(qemu_edu["ram below the read-only map"])
    assert below_rom[:0x100] == pattern and qemu_edu["read-only map unchanged"] is True


def _assert_same_as_qemu(ours: dict, qemu_edu: dict) -> None:
    assert list(ours) == list(qemu_edu)
    different = {step: (qemu_edu[step], ours[step]) for step in qemu_edu if qemu_edu[step] != ours[step]}
    assert not different, "steps where the Python edu differs (qemu, python): " + repr(different)


def test_two_qemus_in_a_row_see_the_same_edu_as_qemus_own(qemu_binary, qemu_edu, sockdir, backend):
    """Guest RAM shared (DMA in place). One server, two VMs one after the other: the first meets
    edu as QEMU's own edu behaves, and the second meets it as the first did (the interrupt status,
    the DMA buffer and the registers a warm reset keeps were power-cycled)."""
    with serve_in_thread(Edu(), os.path.join(sockdir, "edu.sock"), backend=backend) as server:
        transcripts = []
        for _ in range(2):
            with QtestMachine([server.qemu_device_json(addr=f"{edu_scenario.SLOT:02x}.0")], qemu=qemu_binary,
                              memfd=True) as vm:
                transcripts.append(dict(_keyed(edu_scenario.run(vm))))
            assert server.wait_idle(10)
    _assert_same_as_qemu(transcripts[0], qemu_edu)
    assert transcripts[1] == transcripts[0]


def test_python_edu_matches_qemu_edu_by_dma_messages(qemu_binary, qemu_edu, sockdir, backend):
    """Guest RAM not shared: edu's DMA goes by DMA_READ/DMA_WRITE messages, and the result is the
    same as QEMU's own edu's."""
    with serve_in_thread(Edu(), os.path.join(sockdir, "edu.sock"), backend=backend) as server:
        with QtestMachine([server.qemu_device_json(addr=f"{edu_scenario.SLOT:02x}.0")], qemu=qemu_binary,
                          memfd=False) as vm:
            ours = dict(_keyed(edu_scenario.run(vm)))
    _assert_same_as_qemu(ours, qemu_edu)
