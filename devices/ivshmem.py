"""Inter-VM shared memory, register-compatible with QEMU's ``ivshmem-plain``.

A window of host memory in the guest's physical address space: BAR2 is a file
(or memfd) that QEMU maps straight into the guest, so guest loads and stores
there never reach the server, and any host process that opens the same file
sees the same bytes. This is the framework's shared-area fast path
(:meth:`vfiouser.devices.pci.MemoryBar.share`) used for real.

Identity
    vendor 0x1af4, device 0x1110, revision 1, class 0x050000 (RAM memory),
    subsystem 1af4:1100, no interrupt pin, no capabilities (as QEMU's
    ``ivshmem-plain``; the doorbell/MSI-X flavour is not modelled).

BARs
    BAR0: 256 bytes, 32-bit memory, registers (trapped).
    BAR2: the shared memory, 64-bit prefetchable, ``size`` bytes (a power of
    two, at least 4 KiB), shared in whole with the client.

Registers (BAR0, 32-bit)

    ======  ============  ===================================================
    offset  name          behaviour
    ======  ============  ===================================================
    0x00    IntrMask      read/write
    0x04    IntrStatus    a write sets it; a read returns it and clears it
    0x08    IVPosition    read-only 0 (no ivshmem server, no peers)
    0x0c    Doorbell      write-only; ignored (no peers to ring)
    ======  ============  ===================================================

    Accesses behave as QEMU's: an access is cut into naturally aligned pieces
    of at most 4 bytes; a piece read at an offset that is not a register's
    reads 0, a narrower read at a register's offset gets its low bytes; a
    piece written goes to the register containing it, as the whole
    (zero-extended) register value. Other offsets read 0 and ignore writes.

Host side
    ``file``: the host file behind BAR2 (created if missing, grown to
    ``size``; contents kept), e.g. ``/dev/shm/ivshmem``. Without it the
    memory is an anonymous memfd. :attr:`Ivshmem.memory` is BAR2 as a
    memoryview for the model's own process. With a ``file`` and no explicit
    ``size``, an existing file's size is used.

Reset
    IntrMask and IntrStatus clear; the shared memory is left alone (it is the
    host's, as with QEMU).

Note that QEMU 11.1.3 sends all writes of a device with an mmap-able region
synchronously (no posted writes), so BAR0 writes cost a round trip.
"""

from __future__ import annotations

import os
import re

from vfiouser.devices.errors import DefinitionError

from vfiouser.devices.pci import MemoryBar, PciDevice

__all__ = ["Ivshmem", "parse_size"]

INTR_MASK = 0x00
INTR_STATUS = 0x04
IV_POSITION = 0x08
DOORBELL = 0x0C

DEFAULT_SIZE = 1 << 20


def parse_size(text: str | int) -> int:
    """``4096``, ``"64K"``, ``"1M"``, ``"2G"`` (binary units, as QEMU's size options) -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[iI]?[bB]?\s*", text)
    if not m:
        raise DefinitionError(f"size {text!r} is not a number with an optional K, M or G suffix")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


class Ivshmem(PciDevice):
    """``ivshmem-plain``. ``size``: BAR2 bytes (e.g. ``1M``); ``file``: host file behind it."""

    vendor_id = 0x1AF4
    device_id = 0x1110
    revision = 1
    class_code = 0x050000
    subsystem_vendor_id = 0x1AF4
    subsystem_id = 0x1100

    def __init__(self, size: str | int | None = None, file: str | None = None) -> None:
        super().__init__()
        if size is None:
            size = os.stat(file).st_size if file and os.path.exists(file) else DEFAULT_SIZE
        size = parse_size(size)
        self.add_bar(0, MemoryBar(0x100)).map(self)
        self.bar2 = self.add_bar(2, MemoryBar(size, bits=64, prefetchable=True, file=file))
        #: BAR2, the shared memory, as this process sees it.
        self.memory = self.bar2.share()
        self.reset()

    def reset(self) -> None:
        self.intr_mask = 0
        self.intr_status = 0

    # -- BAR0 ------------------------------------------------------------------------

    def _read32(self, offset: int) -> int:
        if offset == INTR_MASK:
            return self.intr_mask
        if offset == INTR_STATUS:
            value, self.intr_status = self.intr_status, 0
            return value
        return 0  # IVPosition (no peers), Doorbell (write-only), holes

    def _write32(self, offset: int, value: int) -> None:
        if offset == INTR_MASK:
            self.intr_mask = value
        elif offset == INTR_STATUS:
            self.intr_status = value
        elif offset == DOORBELL:
            self.log.debug("doorbell %#x ignored: no peers", value)

    def read(self, base: int, offset: int, data) -> None:
        value = 0
        for pos, size in _pieces(offset, len(data)):
            piece = self._read32(pos) if pos % 4 == 0 else 0  # QEMU does not align reads
            value |= (piece & ((1 << (8 * size)) - 1)) << (8 * (pos - offset))
        data[:] = value.to_bytes(len(data), "little")

    def write(self, base: int, offset: int, data) -> None:
        value = int.from_bytes(data, "little")
        for pos, size in _pieces(offset, len(data)):
            piece = (value >> (8 * (pos - offset))) & ((1 << (8 * size)) - 1)
            self._write32(pos & ~3, piece)  # QEMU aligns writes down to their register


def _pieces(offset: int, length: int):
    """``(offset, size)`` of the naturally aligned pieces (1, 2 or 4 bytes) covering an access."""
    end = offset + length
    while offset < end:
        size = 4
        while size > 1 and (offset % size or offset + size > end):
            size //= 2
        yield offset, size
        offset += size
