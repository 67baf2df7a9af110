"""Guest memory of a libvfio-user session: the :class:`~vfiouser.devices.port.DmaBackend` it hands the port.

libvfio-user tells us each DMA region the client registers or removes (its DMA
callbacks); :class:`GuestMemory` keeps them in a table, in address order. A
transfer is checked whole against the table first (mapped, right direction),
then done range by range:

* a range libvfio-user mapped (the client sent an fd: guest RAM shared with
  ``memory-backend-memfd,share=on``) is copied *in place* by libvfio-user itself:
  ``vfu_addr_to_sgl``, then ``vfu_sgl_read``/``vfu_sgl_write`` with
  ``VFU_SGL_DIRECT_ACCESS``, one scatter-gather entry at a time, holding the
  context's memory lock (so no DMA_UNMAP can take the memory away mid-copy);
* any other range becomes DMA_READ/DMA_WRITE messages, sent through the
  session's :class:`~.wire.Wire`. libvfio-user's own message path
  (``vfu_sgl_read`` without direct access) is not used: it waits for the reply on
  the socket it shares with the client's commands, and takes the client's next
  command for the reply when the two cross, which QEMU 11.1.3 (no twin socket)
  makes routine (libvfio-user issue #279). The wire reads replies between
  commands instead.

The bus-master bit is checked before every piece, as with our own engine.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap

from vfiouser.devices.pci.dma import (DmaAborted, DmaBusMasterDisabled, DmaPermissionError, DmaUnavailable,
                                      DmaUnmapped, DmaWouldDeadlock)
from vfiouser.devices.port import DevicePort, DmaBackend

from ..protocol import DMA_ACCESS, Command
from ..requester import DMA_READ_CHUNK
from .bindings import LibvfioUserError

__all__ = ["GuestMemory"]

#: ``VFU_SGL_DIRECT_ACCESS``: copy through libvfio-user's mapping, never by message
_DIRECT = 1


class _Range:
    """One DMA region as libvfio-user registered it."""

    __slots__ = ("addr", "end", "vaddr", "readable", "writable")

    def __init__(self, addr: int, size: int, vaddr: int | None, prot: int) -> None:
        self.addr, self.end, self.vaddr = addr, addr + size, vaddr
        self.readable = bool(prot & mmap.PROT_READ)
        self.writable = bool(prot & mmap.PROT_WRITE)


class GuestMemory(DmaBackend):
    """The DMA backend of one libvfio-user session (see the module docstring).

    The table changes on the serving thread only, inside ``vfu_run_ctx`` with the
    context's memory lock held; transfers read it under the same lock.
    """

    def __init__(self, context, wire, port: DevicePort, *, max_xfer: int) -> None:
        self.context = context
        self.wire = wire
        self.port = port
        self.max_xfer = max_xfer
        self._lock = context.memory_lock
        self._starts: list[int] = []
        self._ranges: list[_Range] = []
        self.closed = False

    # -- the table (libvfio-user's DMA callbacks) -------------------------------------------------

    def added(self, addr: int, size: int, vaddr: int | None, prot: int) -> None:
        """libvfio-user registered ``[addr, addr+size)`` (mapped at ``vaddr`` if it got an fd)."""
        with self._lock:
            i = bisect.bisect_left(self._starts, addr)
            self._starts.insert(i, addr)
            self._ranges.insert(i, _Range(addr, size, vaddr, prot))

    def removed(self, addr: int, size: int) -> None:
        """libvfio-user removed ``[addr, addr+size)``. A message already sent for it is the
        client's to answer (as in our engine: see :mod:`vfiouser.dma`); the transfer's next
        message goes only if the range is mapped again by then."""
        with self._lock:
            i = bisect.bisect_left(self._starts, addr)
            if i < len(self._starts) and self._starts[i] == addr:
                del self._starts[i], self._ranges[i]

    @property
    def timeout(self) -> float:
        """Seconds a message transfer waits for the client's reply (the wire's)."""
        return self.wire.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self.wire.timeout = seconds

    def close(self) -> None:
        """The client is gone: no transfer starts, waiting ones fail."""
        with self._lock:
            self.closed = True
            self._starts.clear()
            self._ranges.clear()

    def _pieces(self, addr: int, size: int, write: bool) -> list[tuple[_Range, int, int]]:
        """``(range, start, length)`` covering ``[addr, addr+size)``, all or nothing (lock held)."""
        if self.closed:
            raise DmaUnavailable("the client disconnected", addr, size)
        pieces, pos, end = [], addr, addr + size
        i = bisect.bisect_right(self._starts, addr) - 1
        while pos < end:
            found = self._ranges[i] if 0 <= i < len(self._ranges) else None
            if found is None or not found.addr <= pos < found.end:
                raise DmaUnmapped(f"DMA range [{addr:#x}, +{size:#x}) is not mapped at {pos:#x}", addr, size)
            if not (found.writable if write else found.readable):
                what = "write to read-only" if write else "read of write-only"
                raise DmaPermissionError(f"DMA {what} guest memory at {pos:#x}", addr, size)
            n = min(end, found.end) - pos
            pieces.append((found, pos, n))
            pos += n
            i += 1
        return pieces

    # -- DmaBackend ------------------------------------------------------------------------------

    def mapped(self, addr: int, size: int, write: bool) -> list[tuple[int, int]]:
        end, out = addr + size, []
        with self._lock:
            if self.closed:
                raise DmaUnavailable("the client disconnected", addr, size)
            for found in self._ranges[max(0, bisect.bisect_right(self._starts, addr) - 1):]:
                if found.addr >= end:
                    break
                lo, hi = max(addr, found.addr), min(end, found.end)
                if lo < hi and (found.writable if write else found.readable):
                    if out and sum(out[-1]) == lo:
                        out[-1] = (out[-1][0], out[-1][1] + hi - lo)
                    else:
                        out.append((lo, hi - lo))
        return out

    def in_place(self, addr: int, size: int, write: bool) -> bool:
        with self._lock:
            try:
                return all(found.vaddr for found, _, _ in self._pieces(addr, size, write))
            except (DmaUnmapped, DmaPermissionError, DmaUnavailable):
                return False

    def read(self, addr: int, size: int, *, may_wait: bool) -> bytes:
        out = bytearray()
        for found, start, length in self._plan(addr, size, False, may_wait):
            self._check_bus_master(addr, size)
            if found.vaddr:
                out += self._direct(found, Command.DMA_READ, start, length, None, addr, size)
                continue
            for pos in range(0, length, DMA_READ_CHUNK):
                self._check_bus_master(addr, size)
                n = min(DMA_READ_CHUNK, length - pos)
                reply = self._message(Command.DMA_READ, DMA_ACCESS.pack(start + pos, n), start + pos, n)
                if len(reply) != DMA_ACCESS.size + n or DMA_ACCESS.unpack_from(reply) != (start + pos, n):
                    raise DmaAborted(f"DMA_READ reply does not match the request ({len(reply)} bytes)", start + pos, n)
                out += reply[DMA_ACCESS.size:]
        return bytes(out)

    def write(self, addr: int, data: bytes, *, may_wait: bool) -> None:
        view, offset = memoryview(data), 0
        for found, start, length in self._plan(addr, len(data), True, may_wait):
            self._check_bus_master(addr, len(data))
            part, offset = view[offset:offset + length], offset + length
            if found.vaddr:
                self._direct(found, Command.DMA_WRITE, start, length, part, addr, len(data))
                continue
            for pos in range(0, length, self.max_xfer):
                self._check_bus_master(addr, len(data))
                n = min(self.max_xfer, length - pos)
                payload = DMA_ACCESS.pack(start + pos, n) + part[pos:pos + n]
                reply = self._message(Command.DMA_WRITE, payload, start + pos, n)
                if reply and (len(reply) != DMA_ACCESS.size or DMA_ACCESS.unpack_from(reply) != (start + pos, n)):
                    raise DmaAborted("DMA_WRITE reply does not match the request", start + pos, n)

    def lend_sg(self, segments, write: bool):
        """Guest memory itself where every segment lies in one range libvfio-user mapped: views
        on its mapping, valid while the memory lock is held (so no DMA_UNMAP can take it away
        mid-loan). None otherwise: :class:`~vfiouser.devices.pci.dma.Dma` copies instead."""
        with self._lock:
            for addr, size in segments:
                pieces = self._pieces(addr, size, write)
                if len(pieces) != 1 or not pieces[0][0].vaddr:
                    return None
        return self._lent(segments, write)

    @contextlib.contextmanager
    def _lent(self, segments, write: bool):
        views: list[memoryview] = []
        addr, size = segments[0]
        with self._lock:  # re-checked under the lock held for the whole loan
            try:
                for seg_addr, seg_size in segments:
                    (found, start, length), = self._pieces(seg_addr, seg_size, write)
                    if not found.vaddr:
                        raise DmaAborted(f"guest memory at {start:#x} is no longer mapped in place", addr, size)
                    raw = memoryview((ctypes.c_char * length).from_address(found.vaddr + start - found.addr))
                    views.append(raw)
                    views.append(raw.cast("B"))
                self._check_bus_master(addr, size)
                yield views[1::2]
            finally:
                for view in reversed(views):
                    view.release()  # a model cannot keep guest memory past the loan

    # -- helpers ---------------------------------------------------------------------------------

    def _plan(self, addr: int, size: int, write: bool, may_wait: bool) -> list[tuple[_Range, int, int]]:
        with self._lock:
            pieces = self._pieces(addr, size, write)
        if not may_wait and not all(found.vaddr for found, _, _ in pieces):
            raise DmaWouldDeadlock("DMA that needs the client, from a request handler or with the device lock held;"
                                   " defer it", addr, size)
        return pieces

    def _still_mapped(self, found: _Range, addr: int, size: int) -> None:
        """Raise :class:`DmaAborted` if ``found`` left the table since the transfer was planned
        (memory lock held)."""
        if self.closed:
            raise DmaUnavailable("the client disconnected during the transfer", addr, size)
        i = bisect.bisect_left(self._starts, found.addr)
        if i == len(self._ranges) or self._ranges[i] is not found:
            raise DmaAborted(f"guest memory at {found.addr:#x} was unmapped during the transfer", addr, size)

    def _message(self, cmd: int, payload: bytes, addr: int, size: int) -> bytes:
        """One DMA_READ/DMA_WRITE of ``[addr, addr+size)``: queued while
        the range is mapped for this direction (under the memory lock; a range the client
        removed and added again since counts), then its reply awaited without the lock."""
        with self._lock:
            try:
                self._pieces(addr, size, cmd == Command.DMA_WRITE)
            except (DmaUnmapped, DmaPermissionError) as exc:
                raise DmaAborted(f"guest memory at {addr:#x} was unmapped during the transfer", addr, size) from exc
            ticket = self.wire.send(cmd, payload, addr, size)
        return self.wire.wait(ticket, addr, size)

    def _check_bus_master(self, addr: int, size: int) -> None:
        if not self.port.dma_allowed():
            raise DmaBusMasterDisabled("bus mastering was turned off during the transfer", addr, size)

    def _direct(self, found: _Range, cmd: int, start: int, length: int, data, addr: int, size: int) -> bytes:
        """Copy through libvfio-user's own mapping (``vfu_sgl_read``/``vfu_sgl_write``)."""
        context, lib = self.context, self.context.lib
        buf = ctypes.create_string_buffer(bytes(data) if data is not None else length, length)
        prot = mmap.PROT_WRITE if cmd == Command.DMA_WRITE else mmap.PROT_READ
        with self._lock:
            self._still_mapped(found, addr, size)
            if context.ctx is None:
                raise DmaUnavailable("the client disconnected during the transfer", addr, size)
            try:
                # One of our ranges is one libvfio-user region, which it maps as one entry.
                sgl, count = lib.addr_to_sgl(context.ctx, start, length, prot)
                if count != 1:
                    raise DmaAborted(f"libvfio-user split [{start:#x}, +{length:#x}) in {count}", addr, size)
                copy = lib.vfu_sgl_write if cmd == Command.DMA_WRITE else lib.vfu_sgl_read
                copy(context.ctx, sgl, 1, buf, _DIRECT)
            except LibvfioUserError as exc:
                raise DmaAborted(f"libvfio-user could not copy [{start:#x}, +{length:#x}): {exc}", addr, size) from None
        return buf.raw[:length] if cmd == Command.DMA_READ else b""
