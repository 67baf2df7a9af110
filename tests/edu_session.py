"""An edu session driven by the Python client as a driver would: registers, INTx, MSI, DMA both ways.

:func:`run` needs a negotiated :class:`~vfiouser.client.Client` on an ``Edu``
and guest RAM: ``memory`` is what the client serves DMA_READ/DMA_WRITE from
(message DMA), or the memfd it maps (``memfd``: DMA in place). It polls like a
driver, so the device's deferred work (the factorial, the transfers) lands
between the client's reads wherever it happens to: a replay must put it back
exactly there. Returns what the driver saw, for the test to check.
"""

from __future__ import annotations

import mmap
import os
import time

from vfiouser.protocol import IrqIndex, IrqSetFlags

RAM_SIZE = 1 << 20
SRC, DST = 0x1000, 0x8000
PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(256))
MSI_ADDR = 0xFEE0_0000


class GuestRam:
    """Guest RAM for a client: a memfd (mapped with an fd: DMA in place) or plain bytes the client
    serves by message."""

    def __init__(self, memfd: bool) -> None:
        self.fd = None
        if memfd:
            self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, RAM_SIZE)
            self.mem = mmap.mmap(self.fd, RAM_SIZE)
        else:
            self.mem = bytearray(RAM_SIZE)

    def handler(self, cmd, addr, count, data):
        from vfiouser.protocol import Command

        if cmd == Command.DMA_READ:
            return bytes(self.mem[addr : addr + count])
        self.mem[addr : addr + count] = data
        return b""

    def close(self) -> None:
        if self.fd is not None:
            self.mem.close()
            os.close(self.fd)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _poll(c, offset: int, mask: int, limit: float = 5.0) -> int:
    deadline = time.monotonic() + limit
    while True:
        value = int.from_bytes(c.region_read(0, offset, 4), "little")
        if not value & mask or time.monotonic() > deadline:
            return value
        time.sleep(0.001)


def run(c, ram: GuestRam) -> dict:
    """Drive edu through ``c`` (see the module docstring)."""
    seen = {}
    if ram.fd is not None:
        c.dma_map(0, RAM_SIZE, fd=ram.fd)
    else:
        c.dma_map(0, RAM_SIZE)
    c.bring_up()
    intx = _eventfd()
    c.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, fds=[intx])
    seen["ident"] = c.region_read(0, 0x00, 4).hex()
    c.region_write(0, 0x04, (0x12345678).to_bytes(4, "little"))
    seen["liveness"] = c.region_read(0, 0x04, 4).hex()
    # factorials, the last with its completion interrupt (INTx)
    for n in (5, 10):
        c.region_write(0, 0x08, n.to_bytes(4, "little"))
        _poll(c, 0x20, 0x1)
        seen[f"{n}!"] = c.region_read(0, 0x08, 4).hex()
    c.region_write(0, 0x20, (0x80).to_bytes(4, "little"))
    c.region_write(0, 0x08, (12).to_bytes(4, "little"))
    _poll(c, 0x20, 0x1)
    seen["irq status"] = c.region_read(0, 0x24, 4).hex()
    c.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK)
    c.region_write(0, 0x64, (1).to_bytes(4, "little"), posted=True)
    c.region_write(0, 0x20, (0).to_bytes(4, "little"))
    # DMA: RAM -> buffer, then buffer -> RAM elsewhere, each raising its interrupt when done
    ram.mem[SRC : SRC + len(PATTERN)] = PATTERN
    with c.serving():
        for src, dst, count, cmd in ((SRC, 0x40000, 256, 0x5), (0x40040, DST, 128, 0x7)):
            c.region_write(0, 0x80, src.to_bytes(8, "little"))
            c.region_write(0, 0x88, dst.to_bytes(8, "little"))
            c.region_write(0, 0x90, count.to_bytes(8, "little"))
            c.region_write(0, 0x98, cmd.to_bytes(8, "little"))
            _poll(c, 0x98, 0x1)
            seen[f"dma {cmd:#x} irq status"] = c.region_read(0, 0x24, 4).hex()
            c.region_write(0, 0x64, (0x100).to_bytes(4, "little"))
            c.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK)
    seen["ram"] = bytes(ram.mem[DST : DST + 128]).hex()
    seen["intx signals"] = _count(intx)
    # MSI: address and data in the capability, an eventfd for vector 0, then a raise
    msi = _eventfd()
    c.config_write(0x44, MSI_ADDR)
    c.config_write(0x48, 0)
    c.config_write(0x4C, 0x4041, 2)
    c.set_irqs(IrqIndex.MSI, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, fds=[msi])
    c.config_write(0x42, 0x0001, 2)
    c.region_write(0, 0x60, (0x10).to_bytes(4, "little"))
    deadline = time.monotonic() + 2
    while not (got := _count(msi)) and time.monotonic() < deadline:
        time.sleep(0.005)
    seen["msi signals"] = got
    c.region_write(0, 0x64, (0xFFFFFFFF).to_bytes(4, "little"))
    c.reset()
    for fd in (intx, msi):
        os.close(fd)
    return seen
