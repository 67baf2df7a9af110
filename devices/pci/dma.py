"""DMA for device models: read and write guest memory, whatever the backend does underneath.

A model reaches guest memory through ``self.dma`` (a :class:`Dma`)::

    data = self.dma.read(addr, 4096)          # guest memory -> bytes
    self.dma.write(addr, b"result")           # bytes -> guest memory
    chunks = self.dma.read_sg([(a1, n1), (a2, n2)])   # scatter-gather
    data = self.dma.read_available(addr, n)   # like a bus: unmapped bytes read 0
    self.dma.write_with(segments, lambda views: os.preadv(fd, views, offset))  # zero-copy

The backend decides how (:class:`~vfiouser.devices.port.DmaBackend`): with the
vfio-user server, guest RAM shared through a memory fd is accessed *in place*
(mmap), other RAM through DMA_READ/DMA_WRITE messages to QEMU. The model does
not see the difference, except for one rule (below). Scatter-gather lists
move in one pass where the memory is in place, and :meth:`Dma.write_with` /
:meth:`Dma.read_with` lend guest memory itself to a callback for the length
of the call (a storage model reads a file straight into the guest's buffers);
where it is not in place the callback gets scratch buffers that are moved by
messages, so the model is the same either way.

The rule:

**DMA that needs the client must not come from a register handler.** A handler
runs while QEMU waits for its reply, and QEMU cannot answer a DMA message until
then. :meth:`vfiouser.devices.pci.PciDevice.defer` runs a function after the
current request is answered, on the device's worker thread, without the device
lock; take ``self.lock`` around register state, not around DMA. A transfer that
would need a message, made from a handler or with the device lock held, raises
:class:`DmaWouldDeadlock` before a byte moves instead of hanging. In-place
memory has no such limit: :meth:`Dma.in_place` tells whether a range is, so a
handler may do a short transfer itself when it can and defer it when it
cannot. Deferring always works; models that must run with any client defer.

Failures are exceptions the model can handle (the device, not the server,
decides what a bad address means: an error bit, an error interrupt, ...):

* :class:`DmaUnmapped` - the range is not (entirely) in guest memory the client mapped;
* :class:`DmaPermissionError` - a write to a read-only mapping, or a read of a write-only one;
* :class:`DmaUnavailable` - no client is connected;
* :class:`DmaBusMasterDisabled` - the command register's bus-master bit is clear
  (a PCI function may not start DMA then);
* :class:`DmaAborted` - the mapping went away during the transfer, the client
  answered with an error, or did not answer in time;
* :class:`DmaWouldDeadlock` - see above.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from vfiouser.devices.errors import DeviceError, DeviceUsageError
from vfiouser.devices.port import DmaBackend

__all__ = [
    "Dma",
    "DmaError",
    "DmaUnmapped",
    "DmaPermissionError",
    "DmaUnavailable",
    "DmaBusMasterDisabled",
    "DmaAborted",
    "DmaWouldDeadlock",
]


class DmaError(DeviceError):
    """Base class of DMA failures. ``addr`` and ``size`` give the failed range."""

    def __init__(self, message: str, addr: int = 0, size: int = 0) -> None:
        super().__init__(message)
        self.addr, self.size = addr, size


class DmaUnmapped(DmaError):
    """The range is not entirely inside guest memory the client mapped for DMA."""


class DmaPermissionError(DmaError):
    """The mapping does not allow this direction (write to read-only, read of write-only)."""


class DmaUnavailable(DmaError):
    """No client is connected, so there is no guest memory to reach."""


class DmaBusMasterDisabled(DmaError):
    """Bus mastering is off in the command register, so the function may not do DMA."""


class DmaAborted(DmaError):
    """The transfer started but could not finish: unmapped meanwhile, error reply, timeout, client gone."""


class DmaWouldDeadlock(DmaError):
    """DMA was attempted where waiting for the client could deadlock (in a handler, or holding the device lock)."""


class _NoBackend(DmaBackend):
    """No client: there is no guest memory."""

    def read(self, addr: int, size: int, *, may_wait: bool) -> bytes:
        raise DmaUnavailable("no client is connected", addr, size)

    def write(self, addr: int, data: bytes, *, may_wait: bool) -> None:
        raise DmaUnavailable("no client is connected", addr, len(data))

    def mapped(self, addr: int, size: int, write: bool) -> list[tuple[int, int]]:
        raise DmaUnavailable("no client is connected", addr, size)

    def in_place(self, addr: int, size: int, write: bool) -> bool:
        return False


NO_BACKEND = _NoBackend()


class Dma:
    """A device model's view of guest memory (see the module docstring)."""

    def __init__(self, device) -> None:
        self._device = device
        #: Set by the device port while a client is attached.
        self.backend: DmaBackend = NO_BACKEND

    def _may_wait(self, addr: int, size: int) -> bool:
        """Whether this thread may wait for the client (not in a handler, not holding the
        device lock); raises :class:`DmaUnavailable` without a client and
        :class:`DmaBusMasterDisabled` when bus mastering is off."""
        if self.backend is NO_BACKEND:
            raise DmaUnavailable("no client is connected", addr, size)
        device = self._device
        if device.worker.stale_here():
            raise DmaUnavailable("the device was reset while this task ran; its DMA is refused", addr, size)
        if not device.bus_master_enabled():
            raise DmaBusMasterDisabled("bus mastering is disabled (command register bit 2)", addr, size)
        return not (device.lock._is_owned() or device.worker.held_here())

    def mapped(self, addr: int, size: int, write: bool = False) -> list[tuple[int, int]]:
        """The parts of ``[addr, addr+size)`` guest memory has for this direction, as
        ``(addr, size)`` in order (all of it: ``[(addr, size)]``)."""
        return self.backend.mapped(addr, size, write)

    def in_place(self, addr: int, size: int, write: bool = False) -> bool:
        """Whether ``[addr, addr+size)`` is reachable without a message to the client (so a
        register handler may move it itself); False while no client is attached."""
        return self.backend.in_place(addr, size, write)

    def read(self, addr: int, size: int) -> bytes:
        """Read ``size`` bytes of guest memory at ``addr``."""
        if size < 0 or addr < 0:
            raise DmaUnmapped(f"invalid DMA range [{addr:#x}, +{size:#x})", addr, size)
        if size == 0:
            return b""
        return self.backend.read(addr, size, may_wait=self._may_wait(addr, size))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` to guest memory at ``addr``."""
        data = bytes(data)
        if addr < 0:
            raise DmaUnmapped(f"invalid DMA address {addr:#x}", addr, len(data))
        if not data:
            return
        self.backend.write(addr, data, may_wait=self._may_wait(addr, len(data)))

    def read_sg(self, segments: Iterable[tuple[int, int]]) -> bytes:
        """Read a scatter-gather list of ``(addr, size)`` segments, concatenated."""
        segments = self._segments(segments)
        if not segments:
            return b""
        return self.backend.read_sg(segments, may_wait=self._may_wait(*segments[0]))

    def write_sg(self, segments: Sequence[tuple[int, int]], data: bytes | bytearray | memoryview) -> None:
        """Spread ``data`` over ``(addr, size)`` segments, in order; their sizes must add up to ``len(data)``."""
        data = memoryview(bytes(data)).cast("B")
        total = sum(size for _, size in segments)
        if total != len(data):
            raise DeviceUsageError(f"segments cover {total} bytes, data has {len(data)}")
        segments = self._segments(segments)
        if not segments:
            return
        self.backend.write_sg(segments, data, may_wait=self._may_wait(*segments[0]))

    # -- zero-copy transfers -----------------------------------------------------------------

    def write_with(self, segments: Sequence[tuple[int, int]], fill):
        """Fill the ``(addr, size)`` segments of guest memory with ``fill(views)``, which gets one
        writable memoryview per segment and returns anything (returned here).

        Where the backend reaches the memory in place the views *are* guest memory, so a model
        can, say, ``os.preadv`` a file straight into the guest's buffers; otherwise they are
        scratch buffers, written to the guest after ``fill`` returns. Either way the views are
        only valid during the call."""
        segments = self._segments(segments)
        if not segments:
            return fill([])
        may_wait = self._may_wait(*segments[0])
        lent = self.backend.lend_sg(segments, True)
        if lent is not None:
            with lent as views:
                return fill(views)
        scratch = bytearray(sum(size for _, size in segments))
        view = memoryview(scratch)
        starts = list(itertools.accumulate((size for _, size in segments), initial=0))
        result = fill([view[starts[i] : starts[i + 1]] for i in range(len(segments))])
        self.backend.write_sg(segments, scratch, may_wait=may_wait)
        return result

    def read_with(self, segments: Sequence[tuple[int, int]], consume):
        """Hand the guest memory of the ``(addr, size)`` segments to ``consume(views)`` (one
        read-only memoryview per segment; returns what it returns): in place where the backend
        can lend it, else copies. The views are only valid during the call."""
        segments = self._segments(segments)
        if not segments:
            return consume([])
        may_wait = self._may_wait(*segments[0])
        lent = self.backend.lend_sg(segments, False)
        if lent is not None:
            with lent as views:
                return consume([v.toreadonly() for v in views])
        data = memoryview(self.backend.read_sg(segments, may_wait=may_wait))
        starts = list(itertools.accumulate((size for _, size in segments), initial=0))
        return consume([data[starts[i] : starts[i + 1]] for i in range(len(segments))])

    @staticmethod
    def _segments(segments) -> list[tuple[int, int]]:
        out = [(addr, size) for addr, size in segments if size]
        for addr, size in out:
            if addr < 0 or size < 0:
                raise DmaUnmapped(f"invalid DMA segment [{addr:#x}, +{size:#x})", addr, size)
        return out

    # -- best effort, as a PCI bus does it ---------------------------------------------------

    def read_available(self, addr: int, size: int) -> bytes:
        """Read like a bus: the parts of the range that are mapped for reading are read, the rest
        reads as zeros (what QEMU's own devices get from ``pci_dma_read``). Errors other than
        unmapped or read-protected memory are still raised."""
        may_wait = self._may_wait(addr, size)
        out = bytearray(size)
        for start, length in self._reachable(addr, size, False, may_wait):
            out[start - addr : start - addr + length] = self.backend.read(start, length, may_wait=may_wait)
        return bytes(out)

    def _reachable(self, addr: int, size: int, write: bool, may_wait: bool) -> list[tuple[int, int]]:
        pieces = self.backend.mapped(addr, size, write)
        if not may_wait and not all(self.backend.in_place(a, n, write) for a, n in pieces):
            raise DmaWouldDeadlock("DMA that needs the client, from a request handler or with the device lock "
                                   "held; defer it", addr, size)  # before a byte moves
        return pieces

    def write_available(self, addr: int, data: bytes | bytearray | memoryview) -> int:
        """Write like a bus: the parts of the range mapped for writing are written, the rest is
        dropped (QEMU's ``pci_dma_write``). Returns the number of bytes written."""
        data = bytes(data)
        may_wait = self._may_wait(addr, len(data))
        written = 0
        for start, length in self._reachable(addr, len(data), True, may_wait):
            self.backend.write(start, data[start - addr : start - addr + length], may_wait=may_wait)
            written += length
        return written

    def read_u32(self, addr: int) -> int:
        """A little-endian 32-bit value from guest memory."""
        return int.from_bytes(self.read(addr, 4), "little")

    def read_u64(self, addr: int) -> int:
        """A little-endian 64-bit value from guest memory."""
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u32(self, addr: int, value: int) -> None:
        """Store a little-endian 32-bit value in guest memory."""
        self.write(addr, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    def write_u64(self, addr: int, value: int) -> None:
        """Store a little-endian 64-bit value in guest memory."""
        self.write(addr, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))
