"""Base address registers (BARs) and the expansion ROM, as a device model declares them.

* :class:`IoBar` - port I/O space, 4 to 256 bytes (PCI 3.0 §6.2.5.1 caps I/O BARs at 256);
* :class:`MemoryBar` - memory space, 32- or 64-bit, optionally prefetchable, >= 16 bytes;
* :class:`RomBar` - the expansion ROM (BAR at 0x30), 2 KiB to 1 MiB, read-only contents
  (QEMU reads a whole ROM in one message, which may not exceed 1 MiB).

Sizes are powers of two. A BAR is given to :meth:`vfiouser.devices.pci.PciDevice.add_bar`,
which programs its register in config space (type bits read-only, address bits
above the size writable, so the guest's sizing write of all-ones reads back the
size mask) and gives it a *window* in the device's IoManager. Handlers are then
attached to the whole BAR or to parts of it with :meth:`Bar.map`.

Parts of a memory BAR may instead be *shared memory* (:meth:`MemoryBar.share`):
page-aligned areas backed by a memfd or a host file that the client maps
straight into the guest. Guest accesses there never reach the server; the model
reads and writes the same bytes through a memoryview::

    bar = self.add_bar(2, MemoryBar(0x10000, bits=64, prefetchable=True))
    self.ring = bar.share(0x1000, 0x1000)       # BAR2 + 0x1000..0x2000 is memory
    self.ring[0:4] = b"\x01\0\0\0"              # the guest reads 1 there, no message

The rest of the BAR stays trapped. Note that QEMU 11.1.3 sends every write of
a device with any mmap-able area synchronously (posted writes are off for the
whole device), so trapped writes of such a device cost a round trip.
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING

from vfiouser.iomgr import DeviceIo, MmioAddressRange, PioAddressRange, Resource

from .config import (
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_ROM_ADDRESS_ENABLE,
)

if TYPE_CHECKING:
    from .device import PciDevice

__all__ = ["Bar", "IoBar", "MemoryBar", "RomBar", "BarError", "SharedMemory", "MAX_IO_BAR_SIZE", "PAGE_SIZE"]

#: Largest I/O BAR (PCI Local Bus Specification 3.0, §6.2.5.1).
MAX_IO_BAR_SIZE = 256
#: Largest expansion ROM: QEMU reads the whole ROM in one REGION_READ, at most max_data_xfer_size (1 MiB).
MAX_ROM_SIZE = 1 << 20
#: Granularity of shared (mmap-able) BAR areas: the host page size QEMU maps with.
PAGE_SIZE = mmap.PAGESIZE


class BarError(ValueError):
    """A BAR declaration or mapping that cannot work (size, index, overlap)."""


def _check_pow2(kind: str, size: int, minimum: int, maximum: int) -> None:
    if size < minimum or size > maximum or size & (size - 1):
        raise BarError(f"{kind} size must be a power of two in [{minimum:#x}, {maximum:#x}], not {size:#x}")


class Bar:
    """Common part of BARs: size, index, owner device and handler mappings."""

    #: True for port I/O BARs (mapped on the PIO bus), False for memory.
    is_io = False

    def __init__(self, size: int) -> None:
        self.size = size
        self.index: int | None = None
        self.device: PciDevice | None = None
        self.mappings: list[tuple[int, int, DeviceIo]] = []

    # -- config-space encoding (used by PciDevice.add_bar) --------------------

    def type_bits(self) -> int:
        """The read-only low bits of the BAR register."""
        raise NotImplementedError

    def address_mask(self) -> int:
        """Writable bits of the (64-bit) BAR value: the address bits above the size."""
        raise NotImplementedError

    @property
    def slots(self) -> int:
        """Number of BAR registers (dwords) used: 2 for a 64-bit BAR, else 1."""
        return 1

    # -- handlers ---------------------------------------------------------------

    @property
    def window(self) -> int:
        """Base address of this BAR in the device's IoManager (see ``docs/design.md``)."""
        if self.device is None or self.index is None:
            raise BarError("the BAR is not added to a device yet")
        return self.device.region_window(self.index)

    def resource(self, offset: int, size: int) -> Resource:
        """The IoManager resource for ``[offset, offset+size)`` of this BAR."""
        if offset < 0 or size <= 0 or offset + size > self.size:
            raise BarError(f"[{offset:#x}, +{size:#x}) is outside the {self.size:#x}-byte BAR")
        if self.is_io:
            return PioAddressRange(self.window + offset, size)
        return MmioAddressRange(self.window + offset, size)

    def map(self, handler: DeviceIo, offset: int = 0, size: int | None = None) -> None:
        """Route accesses to ``[offset, offset+size)`` of this BAR to ``handler``.

        ``size`` defaults to the rest of the BAR. The handler sees offsets
        relative to ``offset`` (its own block), through ``pio_read``/``pio_write``
        for an I/O BAR and ``read``/``write`` for a memory BAR. Several handlers
        may share a BAR (disjoint blocks); one handler may serve several BARs.
        """
        if size is None:
            size = self.size - offset
        res = self.resource(offset, size)
        for area_off, area_size in getattr(self, "shared_areas", ()):
            if offset < area_off + area_size and area_off < offset + size:
                raise BarError(f"[{offset:#x}, +{size:#x}) overlaps the shared area at {area_off:#x}: "
                               "the guest's accesses there never reach a handler")
        dev = self.device
        assert dev is not None
        with dev.io.transaction() as tx:
            dev.io.register_device_io(tx, handler, [res])
        self.mappings.append((offset, size, handler))

    def unmap(self, offset: int = 0) -> None:
        """Remove the handler mapped at ``offset`` (accesses there become unclaimed)."""
        for i, (off, size, _handler) in enumerate(self.mappings):
            if off == offset:
                dev = self.device
                assert dev is not None
                with dev.io.transaction() as tx:
                    dev.io.unregister_device_io(tx, [self.resource(off, size)])
                del self.mappings[i]
                return
        raise BarError(f"nothing is mapped at offset {offset:#x} of BAR{self.index}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size:#x}, index={self.index})"


class IoBar(Bar):
    """A port I/O BAR of ``size`` bytes (4..256)."""

    is_io = True

    def __init__(self, size: int) -> None:
        _check_pow2("I/O BAR", size, 4, MAX_IO_BAR_SIZE)
        super().__init__(size)

    def type_bits(self) -> int:
        return PCI_BASE_ADDRESS_SPACE_IO

    def address_mask(self) -> int:
        return ~(self.size - 1) & 0xFFFF_FFFC


class SharedMemory:
    """Host memory behind a BAR's shared areas: a memfd, or a host file other processes can
    open, mapped ``MAP_SHARED`` here and (through the same fd) by the client.

    A file is created if missing (mode 0600) and grown to ``size`` if shorter; its
    contents are kept. :attr:`view` is the whole memory as a writable memoryview.
    """

    def __init__(self, size: int, *, path: str | None = None, name: str = "vfiouser-bar") -> None:
        if path is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        self.size = size
        self.path = path
        self.view = memoryview(self._map)

    def close(self) -> None:
        """Unmap and close (views handed out must be released first)."""
        if self.fd < 0:
            return
        self.view.release()
        try:
            self._map.close()
        except BufferError:  # a model still holds a view: leave the mapping to the garbage collector
            pass
        os.close(self.fd)
        self.fd = -1

    def __repr__(self) -> str:
        where = self.path or "memfd"
        return f"SharedMemory({where}, {self.size:#x} bytes)"


class _SharedMemoryIo(DeviceIo):
    """Serves trapped accesses to a shared area from the memory itself (a client that did not
    map the area, such as the Python test client, still sees the same bytes)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def read(self, base, offset, data):
        data[:] = self.view[offset : offset + len(data)]

    def write(self, base, offset, data):
        self.view[offset : offset + len(data)] = data


class MemoryBar(Bar):
    """A memory BAR of ``size`` bytes; ``bits`` is 32 or 64; optionally prefetchable.

    ``file``: the host file behind :meth:`share` areas (default: an anonymous memfd).
    """

    def __init__(self, size: int, *, bits: int = 32, prefetchable: bool = False, file: str | None = None) -> None:
        if bits not in (32, 64):
            raise BarError(f"a memory BAR is 32- or 64-bit, not {bits}-bit")
        _check_pow2("memory BAR", size, 16, (1 << 31) if bits == 32 else (1 << 40))
        super().__init__(size)
        self.bits = bits
        self.prefetchable = prefetchable
        self.file = file
        #: The memory behind the shared areas (created by the first :meth:`share`).
        self.shared: SharedMemory | None = None
        #: ``(offset, size)`` of each shared area, in BAR order.
        self.shared_areas: list[tuple[int, int]] = []

    def share(self, offset: int = 0, size: int | None = None) -> memoryview:
        """Make ``[offset, offset+size)`` (default: the rest of the BAR) shared memory that the
        client maps into the guest; returns that area as a writable memoryview.

        Offset and size must be multiples of the page size (4 KiB). Guest
        accesses to the area never reach the server: the model sees them only
        as changed bytes, so shared areas suit data (buffers, rings, frame
        buffers), not registers with side effects. Declare areas before the
        device is served; they may not overlap handlers or each other.
        """
        dev = self.device
        if dev is None or self.index is None:
            raise BarError("add the BAR to a device before sharing part of it")
        if dev._realized:
            raise BarError("shared areas must be declared before the device is served")
        if size is None:
            size = self.size - offset
        if offset % PAGE_SIZE or size % PAGE_SIZE or size <= 0 or offset < 0 or offset + size > self.size:
            raise BarError(f"a shared area must be whole {PAGE_SIZE:#x}-byte pages inside the {self.size:#x}-byte "
                           f"BAR, not [{offset:#x}, +{size:#x})")
        for area_off, area_size in self.shared_areas:
            if offset < area_off + area_size and area_off < offset + size:
                raise BarError(f"[{offset:#x}, +{size:#x}) overlaps the shared area at {area_off:#x}")
        for map_off, map_size, _ in self.mappings:
            if offset < map_off + map_size and map_off < offset + size:
                raise BarError(f"[{offset:#x}, +{size:#x}) overlaps the handler mapped at {map_off:#x}")
        if self.shared is None:
            self.shared = SharedMemory(self.size, path=self.file, name=f"vfiouser-bar{self.index}")
        view = self.shared.view[offset : offset + size]
        self.map(_SharedMemoryIo(view), offset, size)
        self.shared_areas.append((offset, size))
        self.shared_areas.sort()
        return view

    @property
    def slots(self) -> int:
        return 2 if self.bits == 64 else 1

    def type_bits(self) -> int:
        bits = PCI_BASE_ADDRESS_MEM_TYPE_64 if self.bits == 64 else 0
        if self.prefetchable:
            bits |= PCI_BASE_ADDRESS_MEM_PREFETCH
        return bits

    def address_mask(self) -> int:
        limit = (1 << self.bits) - 1
        return ~(self.size - 1) & limit & ~0xF

    def __repr__(self) -> str:
        pf = ", prefetchable" if self.prefetchable else ""
        return f"MemoryBar(size={self.size:#x}, bits={self.bits}{pf}, index={self.index})"


class RomBar(Bar):
    """The expansion ROM: ``data`` padded with 0xff to ``size`` (default: next power of two)."""

    def __init__(self, data: bytes, size: int | None = None) -> None:
        if size is None:
            size = max(0x800, 1 << max(0, len(data) - 1).bit_length())
        _check_pow2("ROM", size, 0x800, MAX_ROM_SIZE)
        if len(data) > size:
            raise BarError(f"ROM data ({len(data)} bytes) does not fit in {size:#x} bytes")
        super().__init__(size)
        self.data = bytes(data) + b"\xff" * (size - len(data))

    def type_bits(self) -> int:
        return 0

    def address_mask(self) -> int:
        return (~(self.size - 1) & 0xFFFF_F800) | PCI_ROM_ADDRESS_ENABLE
