"""Base address registers (BARs) and the expansion ROM, as a device model declares them.

* :class:`IoBar` - port I/O space, 4 to 256 bytes (PCI 3.0 §6.2.5.1 caps I/O BARs at 256);
* :class:`MemoryBar` - memory space, 32- or 64-bit, optionally prefetchable, >= 16 bytes;
* :class:`RomBar` - the expansion ROM (BAR at 0x30), 2 KiB to 1 MiB, read-only contents
  (QEMU reads a whole ROM in one message, which may not exceed 1 MiB).

Sizes are powers of two. A BAR is given to :meth:`vfiouser.devices.pci.PciDevice.add_bar`,
which programs its register in config space (type bits read-only, address bits
above the size writable, so the guest's sizing write of all-ones reads back the
size mask). Handlers are attached to the whole BAR or to parts of it with
:meth:`Bar.map`.

A BAR is *decoded* where the guest put it: once the guest (or its firmware)
has programmed an address and enabled I/O or memory decoding in the command
register, every handler is registered in the device's IoManager at that guest
address plus its offset, and a handler's ``base`` is the guest address of its
block (the device reconciles this on every write to a BAR or to the command
register, in one IoManager transaction). An access to a BAR that is not
decoded reads as all-ones and drops writes, as a master abort does on a real
bus (see ``docs/design.md``, "Regions and the IoManager").

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

from vfiouser.devices.errors import DefinitionError
from vfiouser.iomgr import DeviceIo, IoManager, MmioAddressRange, NoDevice, PioAddressRange, Resource

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


class BarError(DefinitionError):
    """A BAR declaration or mapping that cannot work (size, index, overlap)."""


def _check_pow2(kind: str, size: int, minimum: int, maximum: int) -> None:
    if size < minimum or size > maximum or size & (size - 1):
        raise BarError(f"{kind} size must be a power of two in [{minimum:#x}, {maximum:#x}], not {size:#x}")


class Bar:
    """Common part of BARs: size, index, owner device, handler mappings, and where the
    guest decodes it."""

    #: True for port I/O BARs (mapped on the PIO bus), False for memory.
    is_io = False
    #: The IoManager's dispatch functions for this kind of BAR.
    _bus_read = staticmethod(IoManager.mmio_read)
    _bus_write = staticmethod(IoManager.mmio_write)

    def __init__(self, size: int) -> None:
        self.size = size
        self.index: int | None = None
        self.device: PciDevice | None = None
        self.mappings: list[tuple[int, int, DeviceIo]] = []
        #: The guest address the BAR is decoded at, or None: not programmed, decoding off in
        #: the command register, or overlapping another BAR of the device.
        self.address: int | None = None
        self._blocked_at: int | None = None  # where it would decode but overlaps another BAR
        self._io = None  # the device's IoManager, once the BAR is added to a device

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

    def resource(self, address: int, offset: int, size: int) -> Resource:
        """The IoManager resource for ``[offset, offset+size)`` of this BAR decoded at ``address``."""
        if self.is_io:
            return PioAddressRange(address + offset, size)
        return MmioAddressRange(address + offset, size)

    def _check_block(self, offset: int, size: int) -> None:
        if offset < 0 or size <= 0 or offset + size > self.size:
            raise BarError(f"[{offset:#x}, +{size:#x}) is outside the {self.size:#x}-byte BAR")
        for area_off, area_size in self.shared_areas:
            if offset < area_off + area_size and area_off < offset + size:
                raise BarError(f"[{offset:#x}, +{size:#x}) overlaps the shared area at {area_off:#x} "
                               "(guest accesses there reach memory, never a handler)")

    #: ``(offset, size)`` of each shared (mmap-able) area; only memory BARs have any.
    shared_areas: tuple[tuple[int, int], ...] | list[tuple[int, int]] = ()
    #: The memory behind the shared areas; only memory BARs have any.
    shared: SharedMemory | None = None

    def map(self, handler: DeviceIo, offset: int = 0, size: int | None = None) -> None:
        """Route accesses to ``[offset, offset+size)`` of this BAR to ``handler``.

        ``size`` defaults to the rest of the BAR. The handler sees offsets
        relative to ``offset`` (its own block), through ``pio_read``/``pio_write``
        for an I/O BAR and ``read``/``write`` for a memory BAR, and as ``base``
        the guest address of its block. Several handlers may share a BAR
        (disjoint blocks); one handler may serve several BARs. May be called
        while the device is served (from any thread).
        """
        if size is None:
            size = self.size - offset
        self._check_block(offset, size)
        dev = self.device
        if dev is None:
            raise BarError("add the BAR to a device before mapping handlers on it")
        with dev.lock:
            for other, other_size, _ in self.mappings:
                if offset < other + other_size and other < offset + size:
                    raise BarError(f"[{offset:#x}, +{size:#x}) overlaps the handler mapped at {other:#x}")
            if self.address is not None:
                with dev.io.transaction() as tx:
                    dev.io.register_device_io(tx, handler, [self.resource(self.address, offset, size)])
            self.mappings.append((offset, size, handler))

    def unmap(self, offset: int = 0) -> None:
        """Remove the handler mapped at ``offset`` (accesses there become unclaimed)."""
        dev = self.device
        assert dev is not None
        with dev.lock:
            for i, (off, size, _handler) in enumerate(self.mappings):
                if off == offset:
                    if self.address is not None:
                        with dev.io.transaction() as tx:
                            dev.io.unregister_device_io(tx, [self.resource(self.address, off, size)])
                    del self.mappings[i]
                    return
        raise BarError(f"nothing is mapped at offset {offset:#x} of BAR{self.index}")

    # -- decoding (the device calls these with its lock held, inside one transaction) --

    def register_at(self, io, tx, address: int) -> None:
        """Register every handler at ``address`` in transaction ``tx``; all or nothing."""
        done = []
        try:
            for offset, size, handler in self.mappings:
                res = self.resource(address, offset, size)
                io.register_device_io(tx, handler, [res])
                done.append(res)
        except Exception:
            if done:
                io.unregister_device_io(tx, done)
            raise
        self.address = address

    def unregister(self, io, tx) -> None:
        """Remove every handler from the IoManager (the BAR is no longer decoded)."""
        if self.address is not None and self.mappings:
            io.unregister_device_io(tx, [self.resource(self.address, off, size) for off, size, _ in self.mappings])
        self.address = None

    # -- access (the device port calls these with the device lock held) ----------

    def read(self, offset: int, data: bytearray | memoryview) -> None:
        """A read of the BAR at ``offset``: through the IoManager where the BAR is decoded;
        all-ones where it is not, or where no handler claims the bytes (a master abort)."""
        address = self.address
        if address is None:
            data[:] = b"\xff" * len(data)
            self.device._master_abort(self, offset, len(data), "read")
            return
        try:
            self._bus_read(self._io.current, address + offset, data)
        except NoDevice as exc:
            data[:] = b"\xff" * len(data)
            self.device._unclaimed(self.index, offset, len(data), "read", exc)

    def local_read(self, offset: int, data: bytearray | memoryview) -> None:
        """A read that does not come over the bus (the device's own window into its BAR, such
        as virtio's PCI configuration access): straight to the handler mapped at ``offset``,
        whether the BAR is decoded or not; all-ones where no handler takes it all. ``base`` is
        the block's guest address, or its offset in the BAR while the BAR is not decoded."""
        hit = self._handler_at(offset, len(data))
        if hit is None:
            data[:] = b"\xff" * len(data)
            return
        handler, base, rel = hit
        (handler.pio_read if self.is_io else handler.read)(base, rel, data)

    def local_write(self, offset: int, data: bytes | memoryview) -> None:
        """A write that does not come over the bus (see :meth:`local_read`); dropped where no
        handler takes it all."""
        hit = self._handler_at(offset, len(data))
        if hit is not None:
            handler, base, rel = hit
            (handler.pio_write if self.is_io else handler.write)(base, rel, data)

    def _handler_at(self, offset: int, size: int):
        for start, length, handler in self.mappings:
            if start <= offset and offset + size <= start + length:
                return handler, (self.address or 0) + start, offset - start
        return None

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """A write of the BAR at ``offset``; dropped where the BAR is not decoded or unclaimed."""
        address = self.address
        if address is None:
            self.device._master_abort(self, offset, len(data), "write")
            return
        try:
            self._bus_write(self._io.current, address + offset, data)
        except NoDevice as exc:
            self.device._unclaimed(self.index, offset, len(data), "write", exc)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size:#x}, index={self.index})"


class IoBar(Bar):
    """A port I/O BAR of ``size`` bytes (4..256)."""

    is_io = True
    _bus_read = staticmethod(IoManager.pio_read)
    _bus_write = staticmethod(IoManager.pio_write)

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
        self._check_block(offset, size)  # against other shared areas; map() checks handlers
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
    """The expansion ROM: ``data`` padded with 0xff to ``size`` (default: next power of two).

    The client reads the ROM's contents by region index (QEMU copies them when the
    guest first looks at the ROM BAR), whatever the guest's ROM BAR says, so the ROM is
    never decoded through the IoManager and takes no handlers.
    """

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

    def map(self, handler: DeviceIo, offset: int = 0, size: int | None = None) -> None:
        raise BarError("the expansion ROM is data, not handlers")

    def read(self, offset: int, data: bytearray | memoryview) -> None:
        data[:] = self.data[offset : offset + len(data)]
