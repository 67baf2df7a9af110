"""The bench device: a PCI function built with :mod:`vfiouser.devices.pci` whose registers cost
about what a small real device's registers cost.

Identity 1234:be4c, class 0xff0000, no interrupt pin.

BAR0  4 KiB memory: a register file (reads return what was last written), plus
      two control registers near the end
BAR1  256-byte I/O BAR: a register file of its own
BAR2  4 KiB memory, *shared* (mmap-able, :meth:`vfiouser.devices.pci.MemoryBar.share`), only
      with ``mmap=True``; QEMU maps it into the guest and accesses never reach us
BAR3  64 KiB memory: a write sink for bursts (memset), counting bytes
BAR4  4 KiB memory: the same register file declared on the register layer
      (:mod:`vfiouser.devices.regs`, 32-bit read-write registers at 0x000-0x0ff,
      plus a status register with write-1-to-clear bits at 0x100); the bench sets
      it beside the hand-decoded BAR0, the reference

Control registers (BAR0):

=======  ============  ======================================================
offset   name          behaviour
=======  ============  ======================================================
0xf00    STALL_MS      write: the next write to BAR3 stalls the server that
                       many milliseconds (the handler sleeps, holding the loop)
0xf08    BURST_BYTES   read: bytes written to BAR3 so far (8 bytes)
=======  ============  ======================================================

``region_accesses`` counts region accesses per region index (the bench checks
that the mmap-able area is never accessed through messages).
"""

from __future__ import annotations

import time

from vfiouser.devices.pci import IoBar, MemoryBar, PciDevice, PciPort
from vfiouser.devices.regs import W1C, Field, Register, RegisterMap
from vfiouser.iomgr import DeviceIo

__all__ = ["BenchDevice", "STALL_MS", "BURST_BYTES", "BENCH_REGS", "REGS_STATUS",
           "REGS_BAR", "IO_BAR", "SHARED_BAR", "BURST_BAR", "BURST_BAR_SIZE", "BLOCK_BAR"]

REGS_BAR, IO_BAR, SHARED_BAR, BURST_BAR, BLOCK_BAR = 0, 1, 2, 3, 4
REGS_STATUS = 0x100

#: BAR4: what BAR0's register file is, declared: 64 read-write registers, and a status
#: register whose low byte is write-1-to-clear.
BENCH_REGS = RegisterMap(
    [Register(f"r{i}", 4 * i, 32) for i in range(64)]
    + [Register("status", REGS_STATUS, 32, [Field("events", (7, 0), onwrite=W1C), Field("mode", (15, 8))])],
    name="bench")
BURST_BAR_SIZE = 0x10000
STALL_MS = 0xF00
BURST_BYTES = 0xF08


class RegisterFile(DeviceIo):
    """Plain registers: a read returns the bytes last written (MMIO and port I/O)."""

    def __init__(self, size: int, device: BenchDevice | None = None) -> None:
        self.mem = bytearray(size)
        self.device = device

    def read(self, base, offset, data):
        if offset == BURST_BYTES and self.device is not None:
            data[:] = self.device.burst.bytes_written.to_bytes(8, "little")[: len(data)]
            return
        data[:] = self.mem[offset : offset + len(data)]

    def write(self, base, offset, data):
        if offset == STALL_MS and self.device is not None:
            self.device.burst.stall_s = int.from_bytes(data, "little") / 1000.0
        self.mem[offset : offset + len(data)] = data

    pio_read = read
    pio_write = write


class BurstSink(DeviceIo):
    """Takes writes and counts them; the first write after an arm stalls the server."""

    def __init__(self) -> None:
        self.reset_counters()
        self.stall_s = 0.0

    def reset_counters(self) -> None:
        self.writes = 0
        self.bytes_written = 0
        self.stall_end: float | None = None
        self.first_write: float | None = None
        self.last_write: float | None = None

    def read(self, base, offset, data):
        data[:] = bytes(len(data))

    def write(self, base, offset, data):
        now = time.monotonic()
        if self.first_write is None:
            self.first_write = now
        if self.stall_s:
            time.sleep(self.stall_s)
            self.stall_s = 0.0
            now = self.stall_end = time.monotonic()
        self.writes += 1
        self.bytes_written += len(data)
        self.last_write = now


class CountingPort(PciPort):
    """The device port, counting region accesses per region index."""

    def region_read(self, index, offset, data):
        self.device.region_accesses[index] += 1
        super().region_read(index, offset, data)

    def region_write(self, index, offset, data):
        self.device.region_accesses[index] += 1
        super().region_write(index, offset, data)


class BenchDevice(PciDevice):
    """See the module docstring. ``mmap``: add the shared BAR2."""

    vendor_id, device_id = 0x1234, 0xBE4C
    class_code = 0xFF0000

    def __init__(self, mmap: bool = False) -> None:
        super().__init__()
        self.regs = RegisterFile(0x1000, self)
        self.io_regs = RegisterFile(0x100)
        self.burst = BurstSink()
        self.region_accesses = [0] * 9  # per region index
        self.add_bar(REGS_BAR, MemoryBar(0x1000)).map(self.regs)
        self.add_bar(IO_BAR, IoBar(0x100)).map(self.io_regs)
        self.shared: memoryview | None = None
        if mmap:
            self.shared = self.add_bar(SHARED_BAR, MemoryBar(0x1000)).share(0, None)
        self.add_bar(BURST_BAR, MemoryBar(BURST_BAR_SIZE)).map(self.burst)
        self.block = BENCH_REGS.instantiate(self)
        self.add_bar(BLOCK_BAR, MemoryBar(0x1000)).map(self.block)

    port_class = CountingPort
