"""The libvfio-user backend's server: one device port, one client at a time, through the C library.

:class:`LibvfioUserServer` has the surface of :class:`vfiouser.server.Server`
(``serve_forever``, ``stop``, ``close``, ``qemu_device_json``, ``wait_idle``)
and serves the same models. libvfio-user speaks the protocol; this module
runs its context in non-blocking mode on the serving thread::

    wait for the listening socket          vfu_attach_ctx: accept + VERSION (libvfio-user)
    client attached: port.attach(Interrupts, GuestMemory)
    loop:
        poll(connection, wake-up eventfd)  the eventfd: a model thread queued a DMA request
        flush our queued DMA requests      (non-blocking; while half sent, only POLLOUT)
        peek at the next header            (nothing consumed)
          a reply          -> ours: Wire.read_reply hands it to the waiting model thread
          a command        -> once it has all arrived: with port.batch(): vfu_run_ctx
                              (one message: libvfio-user reads, calls our callbacks, replies)
          end of stream    -> the session ends: DMA fails, port detached, vfu_run_ctx
                              cleans up, then port.reset(CLIENT_LOST)

Around ``vfu_run_ctx`` the loop takes the context's locks for the messages that
change libvfio-user's tables (DMA_MAP/UNMAP: memory; SET_IRQS: interrupts),
see :mod:`.context`. A command must arrive whole within
:attr:`LibvfioUserServer.partial_deadline` seconds, or the client is
disconnected (libvfio-user reads a body with a blocking ``recv``; we never let
it wait for one).

What this backend does not do, by libvfio-user's design: REGION_WRITE_MULTI
(not implemented there: QEMU falls back to one message per write), a message
trace, busy polling; the VERSION exchange is synchronous inside
``vfu_attach_ctx`` (a client that connects and stays silent holds the server
until it goes); a second client waits in the listen queue instead of getting
EBUSY. ``docs/backends.md`` compares the two engines.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import termios
import threading
import time

from vfiouser.devices.port import ResetReason, as_port

from ..protocol import HEADER, HEADER_SIZE, Command, Layout, MsgFlags, MsgType
from ..server import device_json, prepare_socket_path, remove_socket_path
from .bindings import IrqType, Library, LibvfioUserError
from .context import Context
from .interrupts import Interrupts
from .memory import GuestMemory
from .wire import MAX_REPLY, Wire

__all__ = ["LibvfioUserServer"]

log = logging.getLogger(__name__)

#: What the loop peeks at: the header and the whole of every small message (REGION_READ/WRITE).
_PEEK = 64
_IRQ_SET = Layout.IRQ_SET  # argsz, flags, index, start, count
_IRQ_EVENTFD_TRIGGER = 0x4 | 0x20  # VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER
_POLL_IN = select.POLLIN | select.POLLPRI
_TYPE_MASK, _REPLY = int(MsgFlags.TYPE_MASK), int(MsgType.REPLY)
#: most messages served in one batch (deferred work waits for the batch to end)
_MAX_BATCH = 64


class _Session:
    """One attached client: its connection, guest memory and interrupts."""

    def __init__(self, number: int, wire: Wire, memory: GuestMemory, irqs: Interrupts, batch) -> None:
        self.name = f"client{number}"
        self.wire, self.memory, self.irqs = wire, memory, irqs
        self.partial_since: float | None = None  # when the command at the head began to wait for its rest
        self.batch = batch  # the port's batch context, held while messages come back to back
        self.in_batch = 0  # messages served in the batch held now (0: none held)
        #: the connection was shut down (a broken stream): libvfio-user reads out what is left
        self.closing = False


class LibvfioUserServer:
    """Serves ``device`` (a model or a device port) on the UNIX socket ``path`` through libvfio-user.

    The socket listens (mode 0600) when the constructor returns. ``library`` is the path
    of ``libvfio-user.so.0`` (default: :func:`~.bindings.find_library`).
    """

    #: seconds a command may take to arrive whole
    partial_deadline = 5.0

    def __init__(self, device, path: str, *, library: str | None = None) -> None:
        self.path = os.path.abspath(path)
        self.port = as_port(device)
        self.device = device
        self.lib = Library.load(library)
        self.session: _Session | None = None
        self.sessions_served = 0
        self._stopping = False
        self._closed = False
        self._lost = False
        self._routes = False
        self._idle = threading.Event()
        self._idle.set()
        self._loop_done = threading.Event()
        self._loop_done.set()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        prepare_socket_path(self.path)
        try:
            self.context = Context(self.port, self.path, self, library=self.lib)
            os.chmod(self.path, 0o600)
        except BaseException:
            os.close(self._wake_fd)
            raise
        log.info("serving %s on %s through libvfio-user (%s)", self.port.describe(), self.path, self.lib.path)

    # -- public ----------------------------------------------------------------------------------

    def qemu_device_json(self, **extra) -> str:
        """The JSON for QEMU's ``-device`` option that attaches to this server."""
        return device_json(self.path, **extra)

    def serve_forever(self) -> None:
        """Accept and serve clients, one at a time, until :meth:`stop`."""
        self._loop_done.clear()
        try:
            while not self._stopping:
                if self.session is None:
                    self._await_client()
                else:
                    self._serve_step(self.session)
        finally:
            self._loop_done.set()

    def stop(self) -> None:
        """Make :meth:`serve_forever` return (any thread, or a signal handler)."""
        self._stopping = True
        self._wake()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no client is attached; True if so."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Stop serving, end the session, destroy the context (which removes the socket file)."""
        if self._closed:
            return
        if not self._loop_done.is_set():
            self.stop()
            if not self._loop_done.wait(10):
                log.error("the libvfio-user loop did not stop within 10 s (stuck in libvfio-user or a model); "
                          "closing under it")
        self._closed = True
        session = self.session
        if session is not None:
            self._detach(session)
        self.context.destroy()
        if session is not None:
            self._end_session()
        os.close(self._wake_fd)
        remove_socket_path(self.path)
        log.info("server on %s closed", self.path)

    def __enter__(self) -> LibvfioUserServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.close()

    # -- events from the context's callbacks (serving thread) ------------------------------------

    def client_lost(self) -> None:
        self._lost = True

    def dma_added(self, addr: int, size: int, vaddr: int | None, prot: int) -> None:
        if self.session is not None:
            self.session.memory.added(addr, size, vaddr, prot)

    def dma_removed(self, addr: int, size: int) -> None:
        if self.session is not None:
            self.session.memory.removed(addr, size)

    def intx_unmasked(self) -> None:
        if self.session is not None:
            self.session.irqs.intx_unmasked()

    def vectors_masked(self, index: IrqType, start: int, count: int, masked: bool) -> None:
        if self.session is not None:
            self.session.irqs.vectors_masked(index, start, count, masked)
            self._routes = self._routes or not masked

    # -- the loop --------------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass

    def _poll(self, fd: int, events: int, timeout: float | None) -> int:
        """Wait for ``events`` on ``fd`` or a wake-up; the events that came on ``fd``."""
        poller = select.poll()
        poller.register(fd, events)
        poller.register(self._wake_fd, _POLL_IN)
        ready = 0
        for got_fd, got in poller.poll(None if timeout is None else timeout * 1000):
            if got_fd == self._wake_fd:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
            else:
                ready = got
        return ready

    def _await_client(self) -> None:
        listen_fd = self.lib.vfu_get_poll_fd(self.context.ctx)
        if not self._poll(listen_fd, _POLL_IN, None) or self._stopping:
            return
        try:
            self.lib.vfu_attach_ctx(self.context.ctx)  # accept, then VERSION (synchronously)
        except LibvfioUserError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                log.warning("a client could not attach: %s", exc)
            return
        self.sessions_served += 1
        wire = Wire(self.lib.vfu_get_poll_fd(self.context.ctx), self._wake)
        session = _Session(self.sessions_served, wire, GuestMemory(self.context, wire, self.port, max_xfer=1 << 20),
                           Interrupts(self.context), self.port.batch())
        self._idle.clear()
        self.session = session
        self.port.attach(session.irqs, session.memory)
        log.info("%s connected", session.name)

    def _serve_step(self, session: _Session) -> None:
        """Handle what is there; sleep (in poll) only when nothing is."""
        wire = session.wire
        if session.closing:
            self._run(session, b"")  # until libvfio-user meets the end of the stream
            return
        if wire.sending and not wire.flush():
            # A request of ours is half sent: libvfio-user may write nothing until it is out.
            self._sleep(session, select.POLLOUT)
            return
        if wire.reading_reply:
            session.closing = not wire.read_reply()
            if wire.reading_reply:
                self._sleep(session, _POLL_IN)
            return
        head = wire.head(_PEEK)
        if head is None:
            self._sleep(session, _POLL_IN)
            return
        if len(head) >= HEADER_SIZE and HEADER.unpack_from(head)[3] & _TYPE_MASK == _REPLY:
            session.closing = not wire.read_reply()  # ours: a DMA reply
            return
        if head and not self._arrived(session, head):
            # Arriving in parts: the fd stays readable, so poll cannot wait for the rest. Sleep
            # a little, waking for a hang-up (the rest will never come) or a stop only.
            if self._sleep(session, 0, 0.002) & (select.POLLHUP | select.POLLERR):
                wire.shutdown()
                session.closing = True
            return
        self._run(session, head)

    def _sleep(self, session: _Session, events: int, timeout: float | None = None) -> int:
        """End the batch (deferred work may start: every reply is out), then wait in poll."""
        if session.in_batch:
            session.in_batch = 0
            session.batch.__exit__(None, None, None)
        return self._poll(session.wire.fileno(), events, timeout)

    def _arrived(self, session: _Session, head: bytes) -> bool:
        """Whether the command at the head is all there; a client that leaves one in parts
        longer than :attr:`partial_deadline` is disconnected."""
        size = HEADER.unpack_from(head)[2] if len(head) >= HEADER_SIZE else 0
        if len(head) >= HEADER_SIZE and (size <= len(head) or size > MAX_REPLY or self._queued(session) >= size):
            session.partial_since = None
            return True
        now = time.monotonic()
        if session.partial_since is None:
            session.partial_since = now
        elif now - session.partial_since > self.partial_deadline:
            log.warning("%s left a message in parts for %g s; disconnecting it", session.name, self.partial_deadline)
            session.partial_since = None
            session.wire.shutdown()
            session.closing = True  # libvfio-user reads what there is, meets the end, drops the client
        return False

    @staticmethod
    def _queued(session: _Session) -> int:
        buf = fcntl.ioctl(session.wire.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return struct.unpack("i", buf)[0]

    def _run(self, session: _Session, head: bytes) -> None:
        """Let libvfio-user handle the message at the head of the stream."""
        context = self.context
        cmd = HEADER.unpack_from(head)[1] if len(head) >= HEADER_SIZE else None
        locks = []
        intx_routed = False
        if cmd is None:  # end of stream or a broken header: the session ends in vfu_run_ctx
            self._detach(session)
            locks = [context.memory_lock, context.irq_lock]
        elif cmd in (Command.DMA_MAP, Command.DMA_UNMAP):
            locks = [context.memory_lock]
        elif cmd == Command.DEVICE_SET_IRQS:
            locks = [context.irq_lock]
            body = head[HEADER_SIZE:HEADER_SIZE + _IRQ_SET.size]
            if len(body) == _IRQ_SET.size:
                _, flags, index, _, _ = _IRQ_SET.unpack(body)
                intx_routed = index == IrqType.INTX and flags & _IRQ_EVENTFD_TRIGGER == _IRQ_EVENTFD_TRIGGER
        context.running_cmd = cmd
        # One batch for the messages that come back to back (deferred work starts when the loop
        # would sleep, every reply sent), but never more than MAX_BATCH, so work is not starved.
        if session.in_batch >= _MAX_BATCH:
            session.in_batch = 0
            session.batch.__exit__(None, None, None)
        if not session.in_batch:
            session.batch.__enter__()
        session.in_batch += 1
        for lock in locks:
            lock.acquire()
        try:
            self.lib.vfu_run_ctx(context.ctx)
        except LibvfioUserError as exc:
            if exc.errno == errno.ENOTCONN:
                self._lost = True
            else:
                log.debug("%s: vfu_run_ctx: %s", session.name, exc)
        except BaseException:
            log.exception("%s: serving a message failed", session.name)
        finally:
            context.running_cmd = None
            context.unquiesce()
            for lock in reversed(locks):
                lock.release()
        if self._lost:
            self._detach(session)
            self._end_session()
            return
        if intx_routed:
            session.irqs.intx_unmasked()
        if cmd == Command.DEVICE_SET_IRQS or self._routes:
            self._routes = False
            self._guarded(self.port.routes_changed, "the device failed to deliver its held interrupts")

    # -- session end -----------------------------------------------------------------------------

    def _detach(self, session: _Session) -> None:
        """The client is leaving: no transfer starts, waiting ones fail, the model lets go."""
        session.memory.close()
        session.wire.close()
        self._guarded(self.port.detach, "the device failed to detach")

    def _end_session(self) -> None:
        session, self.session = self.session, None
        self._lost = False
        if session is None:
            return
        if session.in_batch:
            session.in_batch = 0
            session.batch.__exit__(None, None, None)
        self._guarded(lambda: self.port.reset(ResetReason.CLIENT_LOST), "the device failed to reset after its client left")
        self._idle.set()
        log.info("%s gone; waiting for the next client", session.name)

    @staticmethod
    def _guarded(action, failure: str) -> None:
        try:
            action()
        except BaseException:  # a broken model must not take the server with it
            log.exception("%s", failure)
