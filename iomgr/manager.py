"""The IoManager: routes trapped PIO and MMIO accesses to the devices that claim them.

It holds two independent buses, port I/O (16-bit addresses) and memory-mapped
I/O (64-bit addresses). A device is registered with a list of
:mod:`~vfiouser.iomgr.resources`; every :class:`~vfiouser.iomgr.resources.PioAddressRange` and
:class:`~vfiouser.iomgr.resources.MmioAddressRange` in it becomes a range on the
matching bus, all pointing at that one device, and every other variant is
ignored. An access is routed to the range that contains it; the device gets
``(base, offset, data)`` with ``base`` the range's base.

Compared with dbs-device, this manager is strict (see ``docs/design.md`` for
the full table): any overlap is rejected, a resource list is registered or
unregistered atomically, empty and overflowing ranges are rejected, an access
that runs past the end of its range is rejected, and unregistering a range
that is not registered (same base *and* size) is an error.

>>> from vfiouser.iomgr import IoManager, DeviceIo, MmioAddressRange, PioAddressRange
>>> class Dummy(DeviceIo):
...     def read(self, base, offset, data):
...         data[:] = bytes([offset]) * len(data)
>>> mgr = IoManager()
>>> dev = Dummy()
>>> mgr.register_device_io(dev, [MmioAddressRange(0x1000, 0x100), PioAddressRange(0x40, 8)])
>>> buf = bytearray(2); mgr.mmio_read(0x1010, buf); bytes(buf)
b'\\x10\\x10'
>>> mgr.mmio_read(0x10ff, bytearray(2))
Traceback (most recent call last):
    ...
vfiouser.iomgr.errors.StraddlingAccess: access straddles the end of [0x1000, +0x100): mmio [0x10ff, +0x2)
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator

from .device import DeviceIo
from .errors import DeviceOverlap, InvalidRange, NoDevice, StraddlingAccess
from .resources import MmioAddressRange, PioAddressRange, Resource
from .types import MMIO_SPACE_SIZE, PIO_SPACE_SIZE, IoAddress, PioAddress

__all__ = ["IoManager"]


class _Bus:
    """One address space: sorted, non-overlapping ranges.

    ``bases[i]`` is the base of ``entries[i] = (typed_base, end, size, device)``;
    the two lists are kept sorted by base so a lookup is one bisection.
    """

    __slots__ = ("name", "limit", "addr_type", "bases", "entries")

    def __init__(self, name: str, limit: int, addr_type: type) -> None:
        self.name = name
        self.limit = limit
        self.addr_type = addr_type
        self.bases: list[int] = []
        self.entries: list[tuple[int, int, int, DeviceIo]] = []

    def copy(self) -> _Bus:
        bus = _Bus(self.name, self.limit, self.addr_type)
        bus.bases = list(self.bases)
        bus.entries = list(self.entries)
        return bus

    def check_range(self, base: int, size: int) -> None:
        if size <= 0:
            raise InvalidRange(self.name, base, size, "empty range")
        if self.limit == PIO_SPACE_SIZE and size > 0xFFFF:
            raise InvalidRange(self.name, base, size, "a PIO range is at most 0xffff ports (PioSize is 16 bits)")
        if base < 0 or base + size > self.limit:
            raise InvalidRange(self.name, base, size, f"does not fit in the {self.limit.bit_length() - 1}-bit space")

    def find_overlap(self, base: int, size: int) -> tuple[int, int] | None:
        """The registered ``(base, size)`` that overlaps ``[base, base+size)``, if any."""
        i = bisect_right(self.bases, base) - 1
        if i >= 0:
            b, end, s, _ = self.entries[i]
            if end > base:
                return (int(b), s)
        if i + 1 < len(self.bases) and self.bases[i + 1] < base + size:
            b, _, s, _ = self.entries[i + 1]
            return (int(b), s)
        return None

    def insert(self, base: int, size: int, device: DeviceIo) -> None:
        i = bisect_right(self.bases, base)
        self.bases.insert(i, base)
        self.entries.insert(i, (self.addr_type(base), base + size, size, device))

    def index_of(self, base: int, size: int) -> int:
        i = bisect_right(self.bases, base) - 1
        if i >= 0 and self.bases[i] == base and self.entries[i][2] == size:
            return i
        raise NoDevice(self.name, base, size, "no device registered at exactly this range")

    def remove_at(self, i: int) -> None:
        del self.bases[i]
        del self.entries[i]

    def lookup(self, addr: int) -> tuple[DeviceIo, int, int] | None:
        i = bisect_right(self.bases, addr) - 1
        if i >= 0:
            base, end, size, device = self.entries[i]
            if addr < end:
                return device, base, size
        return None

    def ranges(self) -> Iterator[tuple[int, int, DeviceIo]]:
        for base, _, size, device in self.entries:
            yield int(base), size, device

    def miss(self, addr: int, size: int) -> NoDevice:
        """The error for an access at ``addr`` of ``size`` bytes that did not dispatch."""
        if size <= 0:
            return NoDevice(self.name, addr, size, "empty access")
        i = bisect_right(self.bases, addr) - 1
        if i >= 0:
            base, end, rsize, _ = self.entries[i]
            if addr < end:
                return StraddlingAccess(self.name, addr, size, (int(base), rsize))
        return NoDevice(self.name, addr, size)


def _split(resources: Iterable[Resource]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pio: list[tuple[int, int]] = []
    mmio: list[tuple[int, int]] = []
    for res in resources:
        if isinstance(res, PioAddressRange):
            pio.append((res.base, res.size))
        elif isinstance(res, MmioAddressRange):
            mmio.append((res.base, res.size))
        elif not isinstance(res, Resource):
            raise TypeError(f"not a Resource: {res!r}")
    return pio, mmio


class IoManager:
    """Dispatches PIO and MMIO accesses to registered :class:`~vfiouser.iomgr.device.DeviceIo` handlers.

    Not locked inside: mutate it from one thread, or use
    :class:`~vfiouser.iomgr.transaction.CowIoManager` to change it while other threads
    dispatch through it.
    """

    __slots__ = ("_pio", "_mmio")

    def __init__(self) -> None:
        self._pio = _Bus("pio", PIO_SPACE_SIZE, PioAddress)
        self._mmio = _Bus("mmio", MMIO_SPACE_SIZE, IoAddress)

    # -- registration -----------------------------------------------------

    def register_device_io(self, device: DeviceIo, resources: Iterable[Resource]) -> None:
        """Trap every PIO/MMIO range of ``resources`` to ``device``; ignore other variants.

        All or nothing: if any range is empty or too large (:class:`InvalidRange`),
        or overlaps a registered range or another range of the list
        (:class:`DeviceOverlap`), nothing is registered.
        """
        if not isinstance(device, DeviceIo):
            raise TypeError(f"not a DeviceIo: {device!r} (wrap a DeviceIoMut in LockedDevice)")
        pio, mmio = _split(resources)
        for bus, ranges in ((self._pio, pio), (self._mmio, mmio)):
            for base, size in ranges:
                bus.check_range(base, size)
            ordered = sorted(ranges)
            for (b1, s1), (b2, s2) in zip(ordered, ordered[1:]):
                if b1 + s1 > b2:
                    raise DeviceOverlap(bus.name, (b2, s2), (b1, s1))
            for base, size in ranges:
                hit = bus.find_overlap(base, size)
                if hit is not None:
                    raise DeviceOverlap(bus.name, (base, size), hit)
        for bus, ranges in ((self._pio, pio), (self._mmio, mmio)):
            for base, size in ranges:
                bus.insert(base, size, device)

    def unregister_device_io(self, resources: Iterable[Resource]) -> None:
        """Remove every PIO/MMIO range of ``resources``; ignore other variants.

        Each range must be registered with exactly that base and size, else
        :class:`NoDevice` is raised and nothing is removed.
        """
        pio, mmio = _split(resources)
        for bus, ranges in ((self._pio, pio), (self._mmio, mmio)):
            if len(set(ranges)) != len(ranges):
                dup = next(r for r in ranges if ranges.count(r) > 1)
                raise NoDevice(bus.name, dup[0], dup[1], "range listed twice for removal")
            for base, size in ranges:
                bus.index_of(base, size)
        for bus, ranges in ((self._pio, pio), (self._mmio, mmio)):
            for base, size in ranges:
                bus.remove_at(bus.index_of(base, size))

    # -- dispatch (hot path) ------------------------------------------------

    def mmio_read(self, addr: int, data: bytearray | memoryview) -> None:
        """Read ``len(data)`` bytes at MMIO ``addr`` into ``data``.

        Raises :class:`NoDevice` if no range contains ``addr`` and
        :class:`StraddlingAccess` if the access runs past the range's end.
        """
        bus = self._mmio
        i = bisect_right(bus.bases, addr) - 1
        if i >= 0:
            base, end, _, device = bus.entries[i]
            if addr + len(data) <= end and data:
                device.read(base, addr - base, data)
                return
        raise bus.miss(addr, len(data))

    def mmio_write(self, addr: int, data: bytes | memoryview) -> None:
        """Write ``data`` at MMIO ``addr``; errors as for :meth:`mmio_read`."""
        bus = self._mmio
        i = bisect_right(bus.bases, addr) - 1
        if i >= 0:
            base, end, _, device = bus.entries[i]
            if addr + len(data) <= end and data:
                device.write(base, addr - base, data)
                return
        raise bus.miss(addr, len(data))

    def pio_read(self, addr: int, data: bytearray | memoryview) -> None:
        """Read ``len(data)`` bytes at port ``addr`` into ``data``; errors as for :meth:`mmio_read`."""
        bus = self._pio
        i = bisect_right(bus.bases, addr) - 1
        if i >= 0:
            base, end, _, device = bus.entries[i]
            if addr + len(data) <= end and data:
                device.pio_read(base, addr - base, data)
                return
        raise bus.miss(addr, len(data))

    def pio_write(self, addr: int, data: bytes | memoryview) -> None:
        """Write ``data`` at port ``addr``; errors as for :meth:`mmio_read`."""
        bus = self._pio
        i = bisect_right(bus.bases, addr) - 1
        if i >= 0:
            base, end, _, device = bus.entries[i]
            if addr + len(data) <= end and data:
                device.pio_write(base, addr - base, data)
                return
        raise bus.miss(addr, len(data))

    # -- inspection ---------------------------------------------------------

    def get_mmio_device(self, addr: int) -> tuple[DeviceIo, int] | None:
        """The device whose MMIO range contains ``addr`` and that range's base, or ``None``."""
        hit = self._mmio.lookup(addr)
        return None if hit is None else (hit[0], int(hit[1]))

    def get_pio_device(self, addr: int) -> tuple[DeviceIo, int] | None:
        """The device whose PIO range contains ``addr`` and that range's base, or ``None``."""
        hit = self._pio.lookup(addr)
        return None if hit is None else (hit[0], int(hit[1]))

    def mmio_target(self, addr: int, size: int) -> tuple[DeviceIo, int] | None:
        """The device :meth:`mmio_read` or :meth:`mmio_write` of ``size`` bytes at ``addr`` would
        call, and its range's base as the device is given it; ``None`` where they would raise. A
        caller may keep the answer for as long as this snapshot is current (a backend's cache
        of shortcuts does)."""
        return self._target(self._mmio, addr, size)

    def pio_target(self, addr: int, size: int) -> tuple[DeviceIo, int] | None:
        """As :meth:`mmio_target`, for :meth:`pio_read` and :meth:`pio_write`."""
        return self._target(self._pio, addr, size)

    @staticmethod
    def _target(bus: _Bus, addr: int, size: int) -> tuple[DeviceIo, int] | None:
        i = bisect_right(bus.bases, addr) - 1
        if i >= 0 and size > 0:
            base, end, _, device = bus.entries[i]
            if addr + size <= end:
                return device, base
        return None

    def mmio_ranges(self) -> list[tuple[int, int, DeviceIo]]:
        """Every MMIO range as ``(base, size, device)``, sorted by base."""
        return list(self._mmio.ranges())

    def pio_ranges(self) -> list[tuple[int, int, DeviceIo]]:
        """Every PIO range as ``(base, size, device)``, sorted by base."""
        return list(self._pio.ranges())

    # -- value semantics ----------------------------------------------------

    def clone(self) -> IoManager:
        """A shallow copy: independent range maps that share the device objects."""
        new = IoManager.__new__(IoManager)
        new._pio = self._pio.copy()
        new._mmio = self._mmio.copy()
        return new

    __copy__ = clone

    def __eq__(self, other: object) -> bool:
        """Equal if both have the same ranges (base and size) on both buses and
        the devices behind each pair of ranges trap the same resources."""
        if not isinstance(other, IoManager):
            return NotImplemented
        for mine, theirs in ((self._pio, other._pio), (self._mmio, other._mmio)):
            if len(mine.entries) != len(theirs.entries):
                return False
            for (b1, _, s1, d1), (b2, _, s2, d2) in zip(mine.entries, theirs.entries):
                if b1 != b2 or s1 != s2:
                    return False
                if d1 is not d2 and d1.get_trapped_io_resources() != d2.get_trapped_io_resources():
                    return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = [f"pio[{b:#x},+{s:#x})" for b, s, _ in self._pio.ranges()]
        parts += [f"mmio[{b:#x},+{s:#x})" for b, s, _ in self._mmio.ranges()]
        return f"IoManager({', '.join(parts)})"
