"""A test device that exercises the framework's layouts against QEMU.

Identity 1234:beef (class 0xff0000), INTA.

BAR0  4 KiB memory, two handlers: scratch RAM at 0x000-0x7ff, registers at 0x800-0x80f
BAR2  16-byte I/O BAR, served by the *same* scratch RAM handler (one handler, two BARs)
BAR4  16 KiB 64-bit prefetchable memory, scratch RAM of its own
ROM   2 KiB: 0x55 0xaa then "PROBE"

Registers (BAR0 + 0x800):
  0x0  INTx control: write 1 asserts INTx, 0 deasserts; reads the level
  0x4  write counter: number of writes to the register block so far
  0x8  fault: any access raises an exception inside the model (tests error replies)

Reset: the scratch RAM survives a warm reset and is cleared by a power cycle.
"""

from __future__ import annotations

from vfiouser.devices.pci import INTA, IoBar, MemoryBar, PciDevice, ResetType, RomBar
from vfiouser.iomgr import DeviceIo

ROM_DATA = b"\x55\xaa" + b"PROBE"


class Scratch(DeviceIo):
    """Plain memory, reachable as MMIO and as ports."""

    def __init__(self, size: int) -> None:
        self.mem = bytearray(size)
        self.calls: list[tuple[str, int, int, int]] = []

    def read(self, base, offset, data):
        self.calls.append(("read", base, offset, len(data)))
        data[:] = self.mem[offset : offset + len(data)]

    def write(self, base, offset, data):
        self.calls.append(("write", base, offset, len(data)))
        self.mem[offset : offset + len(data)] = data

    pio_read = read
    pio_write = write


class Registers(DeviceIo):
    def __init__(self, device: ProbeDevice) -> None:
        self.device = device
        self.writes = 0

    def read(self, base, offset, data):
        if offset >= 8:
            raise RuntimeError("probe fault register read")
        value = int(self.device.intx_level) if offset < 4 else self.writes
        data[:] = value.to_bytes(8, "little")[: len(data)]

    def write(self, base, offset, data):
        if offset >= 8:
            raise RuntimeError("probe fault register write")
        self.writes += 1
        if offset == 0:
            self.device.set_intx(bool(data[0] & 1))


class ProbeDevice(PciDevice):
    vendor_id = 0x1234
    device_id = 0xBEEF
    subsystem_vendor_id = 0x1234
    subsystem_id = 0x0001
    revision = 0x02
    class_code = 0xFF0000
    interrupt_pin = INTA

    def __init__(self) -> None:
        super().__init__()
        self.ram = Scratch(0x800)
        self.regs = Registers(self)
        self.ram64 = Scratch(0x4000)
        bar0 = self.add_bar(0, MemoryBar(0x1000))
        bar0.map(self.ram, 0, 0x800)
        bar0.map(self.regs, 0x800, 0x10)
        self.add_bar(2, IoBar(16)).map(self.ram, 0, 16)
        self.add_bar(4, MemoryBar(0x4000, bits=64, prefetchable=True)).map(self.ram64)
        self.set_rom(RomBar(ROM_DATA))

    def reset(self, kind: ResetType) -> None:
        if kind is ResetType.COLD:
            for scratch in (self.ram, self.ram64):
                scratch.mem[:] = bytes(len(scratch.mem))
