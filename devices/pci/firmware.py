"""What PCI firmware does to a function at boot, for code that talks to a device without a guest.

A BAR answers only once it is *decoded*: programmed with an address, with
I/O or memory decoding on in the command register (see
:mod:`vfiouser.devices.pci.bars`). In a VM, the firmware (SeaBIOS, OVMF) and
the guest kernel do that. A test or a tool that drives a device directly (the
Python client, a test backend, an in-process benchmark) calls
:func:`assign_bars` instead, which does it the firmware's way, through config
space only: size each BAR by writing all-ones and reading the mask back, give
it a naturally aligned address, then turn decoding (and bus mastering) on.

>>> from vfiouser.devices.idio16 import Idio16
>>> bring_up(Idio16().port)          # BAR2 is a 256-byte I/O BAR
{2: 49152}
"""

from __future__ import annotations

from vfiouser.devices.errors import DeviceUsageError

from .config import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_IO_MASK,
    PCI_BASE_ADDRESS_MEM_MASK,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_COMMAND,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
)

__all__ = ["assign_bars", "bring_up", "IO_BASE", "MEM32_BASE", "MEM64_BASE"]

#: Where addresses are handed out from, as QEMU's q35 firmware would roughly place them.
IO_BASE = 0xC000
MEM32_BASE = 0xE000_0000
MEM64_BASE = 0x80_0000_0000


def _align(value: int, size: int) -> int:
    return (value + size - 1) & ~(size - 1)


def assign_bars(read, write, *, io_base: int = IO_BASE, mem32_base: int = MEM32_BASE,
                mem64_base: int = MEM64_BASE, bus_master: bool = True) -> dict[int, int]:
    """Size and place every BAR through config space, then enable decoding.

    ``read(offset, size) -> int`` and ``write(offset, value, size)`` access the
    function's config space. Returns ``{bar index: guest address}``.
    """
    command = read(PCI_COMMAND, 2)
    write(PCI_COMMAND, command & ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY), 2)  # no decoding while sizing
    placed: dict[int, int] = {}
    next_io, next_mem32, next_mem64 = io_base, mem32_base, mem64_base
    index = 0
    while index < 6:
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        write(reg, 0xFFFF_FFFF, 4)
        mask = read(reg, 4)
        if not mask:
            index += 1
            continue
        if mask & PCI_BASE_ADDRESS_SPACE_IO:
            size = (~(mask & PCI_BASE_ADDRESS_IO_MASK) & 0xFFFF) + 1
            address = next_io = _align(next_io, size)
            next_io += size
            write(reg, address, 4)
            placed[index] = address
            index += 1
            continue
        wide = bool(mask & PCI_BASE_ADDRESS_MEM_TYPE_64)
        full = mask & PCI_BASE_ADDRESS_MEM_MASK
        if wide:
            write(reg + 4, 0xFFFF_FFFF, 4)
            full |= read(reg + 4, 4) << 32
            size = (~full & 0xFFFF_FFFF_FFFF_FFFF) + 1
            address = next_mem64 = _align(next_mem64, size)
            next_mem64 += size
            write(reg + 4, address >> 32, 4)
        else:
            size = (~full & 0xFFFF_FFFF) + 1
            address = next_mem32 = _align(next_mem32, size)
            next_mem32 += size
            if address + size - 1 > 0xFFFF_FFFE:  # a 32-bit BAR must end below 4 GiB to decode
                raise DeviceUsageError(f"BAR{index} ({size:#x} bytes) does not fit below 4 GiB from "
                                       f"{mem32_base:#x}; pass a lower mem32_base")
        write(reg, address & 0xFFFF_FFFF, 4)
        placed[index] = address
        index += 2 if wide else 1
    enable = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | (PCI_COMMAND_MASTER if bus_master else 0)
    write(PCI_COMMAND, command | enable, 2)
    return placed


def bring_up(port, **kwargs) -> dict[int, int]:
    """:func:`assign_bars` on a device port, through its config region (region 7)."""

    def read(offset: int, size: int) -> int:
        buf = bytearray(size)
        port.region_read(7, offset, buf)
        return int.from_bytes(buf, "little")

    def write(offset: int, value: int, size: int) -> None:
        port.region_write(7, offset, value.to_bytes(size, "little"))

    return assign_bars(read, write, **kwargs)
