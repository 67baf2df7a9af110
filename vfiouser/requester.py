"""A session's DMA backend: guest memory for the device, in place or through messages.

:class:`DmaRequester` is what the session hands the device port as its
:class:`~vfiouser.devices.port.DmaBackend`. A transfer is checked whole first
(mapped, right direction: :class:`~vfiouser.dma.DmaMappings`), then done map by
map, each map pinned only while it is in use:

* a map with an fd (guest RAM shared with ``memory-backend-memfd,share=on``) is
  copied in place, through the mmap;
* a map without one becomes DMA_READ/DMA_WRITE requests to the client, sent by
  the calling thread (a device's worker), each waiting for its reply, which the
  serving thread routes back here by message id (:meth:`DmaRequester.route_reply`).
  DMA_READ asks for at most 32 KiB at a time (see ``docs/design.md``, DMA).

The bus-master bit is checked before every piece. A transfer that would need a
message from a thread that may not wait (``may_wait=False``: a request handler,
or the device lock held) raises :class:`DmaWouldDeadlock` before a byte moves.
When the client goes away, :meth:`DmaRequester.close` fails every waiting
transfer; DMA_UNMAP fails the transfers waiting on that map.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from contextlib import closing

from vfiouser.devices.pci.dma import DmaAborted, DmaBusMasterDisabled, DmaError, DmaUnavailable, DmaWouldDeadlock
from vfiouser.devices.port import DevicePort, DmaBackend

from .dma import DmaMappings
from .errors import ConnectionClosed
from .protocol import DMA_ACCESS, Command, MsgFlags, command_name
from .transport import close_fds

__all__ = ["DmaRequester", "DMA_READ_CHUNK", "Waiter"]

#: Most bytes one DMA_READ asks for: the reply (32 KiB + 32) fits in one AF_UNIX socket
#: buffer unit (about 36 KiB on Linux), which QEMU writes all or nothing.
DMA_READ_CHUNK = 32 * 1024


class Waiter:
    """A request of ours waiting for its reply: ``event`` is set with ``reply`` (its payload) or ``error``."""

    __slots__ = ("cmd", "event", "reply", "error")

    def __init__(self, cmd: int) -> None:
        self.cmd = cmd
        self.event = threading.Event()
        self.reply: bytes | None = None
        self.error: Exception | None = None

    def fail(self, error: Exception) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


class DmaRequester(DmaBackend):
    """The DMA backend of one session (see the module docstring)."""

    def __init__(self, outbox, maps: DmaMappings, port: DevicePort, log, *, max_xfer: int) -> None:
        self.outbox = outbox
        self.maps = maps
        self.port = port
        self.log = log
        #: largest transfer in one message: the smaller of both sides' max_data_xfer_size
        self.max_xfer = max_xfer
        #: seconds a transfer waits for the client's reply
        self.timeout = 10.0
        self._lock = threading.Lock()
        self._pending: dict[int, Waiter] = {}
        self._next_id = 0
        self.closed = False

    # -- DmaBackend ------------------------------------------------------------------------

    def mapped(self, addr: int, size: int, write: bool) -> list[tuple[int, int]]:
        self._check_open(addr, size)
        return self.maps.reachable(addr, size, write)

    def in_place(self, addr: int, size: int, write: bool) -> bool:
        return not self.closed and self.maps.in_place(addr, size, write)

    def read(self, addr: int, size: int, *, may_wait: bool) -> bytes:
        if self.closed:
            raise DmaUnavailable("the client disconnected", addr, size)
        region = self.maps.pin(addr, size, False)
        if region is not None:  # the common case: all of it in one mmapped map, one copy
            try:
                self._check_bus_master(addr, size)
                offset = addr - region.addr
                return bytes(region.mem[offset : offset + size])
            except (TypeError, ValueError) as exc:  # released under us after UNMAP_WAIT
                raise DmaAborted(f"guest memory at {addr:#x} went away: {exc}", addr, size) from None
            finally:
                self.maps.unpin(region)
        self._check_wait(addr, size, False, may_wait)
        out = bytearray()
        with closing(self._pieces(addr, size, write=False)) as pieces:
            for region, offset, length in pieces:
                self._check_bus_master(addr, size)
                if region.mem is not None:
                    out += self._copy(lambda: region.mem[offset : offset + length], region, offset, addr, size)
                    continue
                chunk = self._chunk(Command.DMA_READ)
                for pos in range(0, length, chunk):
                    self._check_bus_master(addr, size)
                    n = min(chunk, length - pos)
                    where = region.addr + offset + pos
                    self._still_mapped(where, n, False, addr, size)
                    reply = self._request(Command.DMA_READ, DMA_ACCESS.pack(where, n))
                    if len(reply) != DMA_ACCESS.size + n or DMA_ACCESS.unpack_from(reply) != (where, n):
                        raise DmaAborted(f"DMA_READ reply does not match the request ({len(reply)} bytes)", where, n)
                    out += reply[DMA_ACCESS.size :]
        return bytes(out)

    def write(self, addr: int, data: bytes, *, may_wait: bool) -> None:
        size = len(data)
        if self.closed:
            raise DmaUnavailable("the client disconnected", addr, size)
        region = self.maps.pin(addr, size, True)
        if region is not None:
            try:
                self._check_bus_master(addr, size)
                offset = addr - region.addr
                region.mem[offset : offset + size] = data
                return
            except (TypeError, ValueError) as exc:  # released under us after UNMAP_WAIT
                raise DmaAborted(f"guest memory at {addr:#x} went away: {exc}", addr, size) from None
            finally:
                self.maps.unpin(region)
        self._check_wait(addr, size, True, may_wait)
        view = memoryview(data)
        pos = 0
        with closing(self._pieces(addr, size, write=True)) as pieces:
            for region, offset, length in pieces:
                self._check_bus_master(addr, size)
                part = view[pos : pos + length]
                pos += length
                if region.mem is not None:
                    self._copy(lambda: region.mem.__setitem__(slice(offset, offset + length), part),
                               region, offset, addr, size)
                    continue
                chunk = self._chunk(Command.DMA_WRITE)
                for sub in range(0, length, chunk):
                    self._check_bus_master(addr, size)
                    n = min(chunk, length - sub)
                    where = region.addr + offset + sub
                    self._still_mapped(where, n, True, addr, size)
                    reply = self._request(Command.DMA_WRITE, DMA_ACCESS.pack(where, n) + part[sub : sub + n])
                    # QEMU 11.1.3 echoes (addr, count); older clients reply with the header only.
                    if reply and (len(reply) != DMA_ACCESS.size or DMA_ACCESS.unpack_from(reply) != (where, n)):
                        raise DmaAborted("DMA_WRITE reply does not match the request", where, n)

    def read_sg(self, segments, *, may_wait: bool) -> bytes:
        self._check_open(*segments[0])
        pinned = self.maps.acquire_in_place(segments, write=False)
        if pinned is None:
            return super().read_sg(segments, may_wait=may_wait)
        try:
            self._check_bus_master(*segments[0])
            return b"".join(self._copy(lambda: region.mem[offset : offset + length], region, offset, *segments[0])
                            for region, offset, length in pinned)
        finally:
            self.maps.release(pinned)

    def write_sg(self, segments, data, *, may_wait: bool) -> None:
        self._check_open(*segments[0])
        pinned = self.maps.acquire_in_place(segments, write=True)
        if pinned is None:
            super().write_sg(segments, data, may_wait=may_wait)
            return
        view = memoryview(data)
        pos = 0
        try:
            self._check_bus_master(*segments[0])
            for region, offset, length in pinned:
                part = view[pos : pos + length]
                self._copy(lambda: region.mem.__setitem__(slice(offset, offset + length), part), region, offset,
                           *segments[0])
                pos += length
        finally:
            self.maps.release(pinned)

    @contextlib.contextmanager
    def _lent(self, pinned, addr: int, size: int):
        views = []
        try:
            self._check_bus_master(addr, size)
            try:
                views = [region.mem[offset : offset + length] for region, offset, length in pinned]
            except (TypeError, ValueError) as exc:  # released under us after UNMAP_WAIT
                raise DmaAborted(f"guest memory went away: {exc}", addr, size) from None
            yield views
        finally:
            for view in views:
                view.release()  # a model cannot keep guest memory past the loan
            self.maps.release(pinned)

    def lend_sg(self, segments, write: bool):
        self._check_open(*segments[0])
        pinned = self.maps.acquire_in_place(segments, write)
        return None if pinned is None else self._lent(pinned, *segments[0])

    # -- checks and pieces -----------------------------------------------------------------

    def _check_open(self, addr: int, size: int) -> None:
        if self.closed:
            raise DmaUnavailable("the client disconnected", addr, size)

    def _check_wait(self, addr: int, size: int, write: bool, may_wait: bool) -> None:
        if not may_wait and not self.maps.in_place(addr, size, write):
            raise DmaWouldDeadlock("DMA that needs the client, from a request handler or with the device lock held;"
                                   " defer it", addr, size)

    def _check_bus_master(self, addr: int, size: int) -> None:
        if not self.port.dma_allowed():
            raise DmaBusMasterDisabled("bus mastering was turned off during the transfer", addr, size)

    @staticmethod
    def _copy(move, region, offset: int, addr: int, size: int):
        try:
            return move()
        except (TypeError, ValueError) as exc:  # released under us after UNMAP_WAIT
            raise DmaAborted(f"guest memory at {region.addr + offset:#x} went away: {exc}", addr, size) from None

    def _pieces(self, addr: int, size: int, write: bool):
        """Check the whole range is mapped with the right rights, then yield ``(region, offset,
        length)`` one piece at a time, each pinned only while it is in use. An unmap waits only
        for a piece being copied in place, never for one whose message waits for the client."""
        self.maps.release(self.maps.acquire(addr, size, write))  # all or nothing, before any byte moves
        pos, end = addr, addr + size
        while pos < end:
            try:
                pinned = self.maps.acquire(pos, 1, write)
            except DmaError as exc:
                raise DmaAborted(f"guest memory at {pos:#x} was unmapped during the transfer", addr, size) from exc
            region = pinned[0][0]
            length = min(end, region.end) - pos
            try:
                yield region, pos - region.addr, length
            finally:
                self.maps.release(pinned)
            pos += length

    def _still_mapped(self, where: int, n: int, write: bool, addr: int, size: int) -> None:
        """Before each message of a transfer: its range is still mapped for this direction. (A map
        the client removed and added again meanwhile, as QEMU does when its memory layout changes,
        counts: the range is mapped.)"""
        try:
            self.maps.release(self.maps.acquire(where, n, write))
        except DmaError as exc:
            raise DmaAborted(f"guest memory at {where:#x} was unmapped during the transfer", addr, size) from exc

    def _chunk(self, cmd: int) -> int:
        chunk = self.max_xfer
        if cmd == Command.DMA_READ:
            # QEMU 11.1.3 sends a reply with one writev and treats a partial write as complete.
            # Linux splits an AF_UNIX stream write into buffers of about 36 KiB, and a writev
            # that needs more than one can stop between them when the socket is full (QEMU's
            # posted writes we have not read yet fill it): the reply arrives truncated, the data
            # silently wrong, and the stream is lost. A reply that fits one buffer goes whole or
            # not at all (EAGAIN, and QEMU queues it).
            chunk = min(chunk, DMA_READ_CHUNK)
        return max(1, chunk)

    # -- requests and their replies --------------------------------------------------------

    def _request(self, cmd: int, payload: bytes) -> bytes:
        """Send a request to the client and wait for the reply's payload (never the serving thread).
        The client's answer decides, even if it unmapped the range meanwhile (see vfiouser.dma)."""
        waiter = Waiter(cmd)
        with self._lock:
            if self.closed:
                raise DmaUnavailable("the client disconnected")
            msg_id = self._next_id
            while msg_id in self._pending:
                msg_id = (msg_id + 1) & 0xFFFF
            self._next_id = (msg_id + 1) & 0xFFFF
            self._pending[msg_id] = waiter
        try:
            try:
                self.outbox.request(msg_id, cmd, payload)
            except ConnectionClosed as exc:
                raise DmaUnavailable(f"the client disconnected ({exc})") from None
            if not waiter.event.wait(self.timeout):
                raise DmaAborted(f"no reply to {command_name(cmd)} #{msg_id} within {self.timeout:g}s")
            if waiter.error is not None:
                raise waiter.error
            return waiter.reply
        finally:
            with self._lock:
                if self._pending.get(msg_id) is waiter:
                    del self._pending[msg_id]

    def route_reply(self, msg_id: int, cmd: int, flags: int, error_no: int, payload, fds: list[int]) -> None:
        """A reply from the client: hand it to the request waiting for it (serving thread)."""
        with self._lock:
            waiter = self._pending.pop(msg_id, None)
        if waiter is None:
            self.log.warning("unexpected reply %s #%d (no request of ours is waiting); dropped",
                             command_name(cmd), msg_id)
            close_fds(fds)
            fds.clear()
            return
        if fds:
            close_fds(fds)
            fds.clear()
            waiter.fail(DmaAborted(f"{command_name(cmd)} reply carried fds"))
        elif cmd != waiter.cmd:
            waiter.fail(DmaAborted(f"reply #{msg_id} is for {command_name(cmd)}, not {command_name(waiter.cmd)}"))
        elif flags & MsgFlags.ERROR:
            name = errno.errorcode.get(error_no, str(error_no))
            waiter.fail(DmaAborted(f"client answered {command_name(cmd)} with {name}"))
        elif payload is None:
            waiter.fail(DmaAborted(f"{command_name(cmd)} reply too large"))
        else:
            waiter.reply = bytes(payload)
            waiter.event.set()

    def close(self) -> None:
        """The client is gone: no new transfer starts, waiting ones fail."""
        with self._lock:
            self.closed = True
            waiters, self._pending = list(self._pending.values()), {}
        for waiter in waiters:
            waiter.fail(DmaUnavailable("the client disconnected"))
