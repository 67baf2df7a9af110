"""The device port is the whole contract: a backend of under 100 lines (tests/port_backend.py)
serves edu through it alone, registers, deferred work, INTx, MSI and DMA included."""

import pathlib

from vfiouser.devices.edu import Edu
from vfiouser.devices.port import ResetReason

from .port_backend import PortBackend

PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(256))
MSI_CAP = 0x40


def test_the_test_backend_is_small():
    source = pathlib.Path(__file__).with_name("port_backend.py").read_text()
    assert len(source.splitlines()) < 100


def test_edu_registers_deferred_work_and_intx():
    edu = Edu(dma_delay_ms=0)
    b = PortBackend(edu)
    assert b.boot() == {0: 0xE000_0000}
    assert b.read(0, 0x00, 4) == 0x010000ED
    b.write(0, 0x04, 0x12345678, 4)
    assert b.read(0, 0x04, 4) == ~0x12345678 & 0xFFFF_FFFF
    b.write(0, 0x20, 0x80, 4)  # interrupt when the factorial is done
    b.write(0, 0x08, 5, 4)  # computed by deferred work, after the batch
    assert edu.worker.wait_idle(5)
    assert b.read(0, 0x08, 4) == 120 and b.irqs.intx_levels == [True]
    b.write(0, 0x64, 0x1, 4)  # acknowledge: INTx drops
    assert b.irqs.intx_levels == [True, False] and b.read(0, 0x24, 4) == 0


def test_edu_msi_and_dma_in_both_directions():
    edu = Edu(dma_delay_ms=0)
    b = PortBackend(edu)
    b.boot()
    b.write(7, MSI_CAP + 4, 0xFEE0_0000, 4)  # message address and data, then enable
    b.write(7, MSI_CAP + 12, 0x4321, 2)
    b.write(7, MSI_CAP + 2, 0x0001, 2)
    b.write(0, 0x60, 0x2, 4)  # raise: with MSI on, a message instead of INTx
    assert b.irqs.msi_vectors == [0] and b.irqs.intx_levels == []

    b.memory.ram[0x1000:0x1100] = PATTERN
    for reg, value in ((0x80, 0x1000), (0x88, 0x40000), (0x90, 0x100), (0x98, 0x1)):  # RAM -> buffer
        b.write(0, reg, value, 8)
    assert edu.worker.wait_idle(5) and b.read(0, 0x98, 8) == 0
    for reg, value in ((0x80, 0x40000), (0x88, 0x2000), (0x90, 0x100), (0x98, 0x1 | 0x2 | 0x4)):  # and back
        b.write(0, reg, value, 8)
    assert edu.worker.wait_idle(5)
    assert bytes(b.memory.ram[0x2000:0x2100]) == PATTERN
    assert b.read(0, 0x24, 4) == 0x102 and b.irqs.msi_vectors == [0, 0]  # completion interrupt

    b.memory.read_only.append((0x3000, 0x1000))  # like QEMU's bus: what is not writable is dropped
    for reg, value in ((0x88, 0x3000), (0x98, 0x1 | 0x2)):
        b.write(0, reg, value, 8)
    assert edu.worker.wait_idle(5) and b.read(0, 0x98, 8) == 0x2
    assert b.memory.ram[0x3000:0x3100] == bytes(0x100)


def test_a_warm_reset_keeps_edus_state_and_a_lost_client_power_cycles_it():
    edu = Edu(dma_delay_ms=0)
    b = PortBackend(edu)
    b.boot()
    b.write(0, 0x04, 0x1, 4)
    b.write(7, 0x80, 0x55, 1)  # sticky scratch in config space, as QEMU's PCI core has it
    b.reset(ResetReason.CLIENT_REQUEST)
    assert b.read(7, 0x10, 4) == 0 and b.read(7, 0x04, 2) == 0  # BAR and command reset
    assert b.read(0, 0x04, 4) == 0xFFFF_FFFF  # nothing decodes: a master abort
    b.boot()
    assert b.read(0, 0x04, 4) == 0xFFFF_FFFE and b.read(7, 0x80, 1) == 0x55  # edu keeps its registers
    b.close()

    again = PortBackend(edu)  # the next client: a new machine
    assert again.read(7, 0x80, 1) == 0
    again.boot()
    assert again.read(0, 0x04, 4) == 0 and again.read(0, 0x08, 4) == 0
