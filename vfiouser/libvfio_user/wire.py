"""The client's socket as the libvfio-user backend shares it with libvfio-user.

libvfio-user reads the client's commands and writes their replies on its
connection fd, one message per ``vfu_run_ctx`` (non-blocking attach). Our
DMA_READ/DMA_WRITE requests go on the same stream, and their replies arrive
interleaved with the client's commands. :class:`Wire` holds its own reference
to the connection and, on the serving thread only:

* :meth:`Wire.head` peeks at the next message's header (``MSG_PEEK``: nothing
  is consumed, fds stay with the message), so the loop knows whether the next
  message is a command for libvfio-user or a reply for us;
* :meth:`Wire.read_reply` consumes a reply (without ever blocking: a reply that
  arrives in parts is finished on later wake-ups) and hands it to the thread
  waiting for it;
* :meth:`Wire.flush` sends our queued requests without blocking; while one is
  half sent, the loop gives libvfio-user no command (its replies would land in
  the middle of ours).

Model threads call :meth:`Wire.request`, which queues the message, wakes the
serving thread and waits for the reply (``timeout`` seconds).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from collections import deque

from vfiouser.devices.pci.dma import DmaAborted, DmaUnavailable

from ..protocol import HEADER, HEADER_SIZE, MsgFlags, MsgType, command_name
from ..requester import Waiter
from ..transport import close_fds

__all__ = ["Wire", "MAX_REPLY"]

log = logging.getLogger(__name__)

#: Largest reply we accept: a 1 MiB DMA_READ (libvfio-user's max_data_xfer_size) and its headers.
MAX_REPLY = HEADER_SIZE + 16 + (1 << 20)
_SEND = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_RECV = int(socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
_ANCILLARY = socket.CMSG_SPACE(16 * 4)


class Wire:
    """One client's connection, shared with libvfio-user (see the module docstring).

    ``fd`` is libvfio-user's connection fd (it is duplicated, never made non-blocking:
    libvfio-user reads it blocking); ``wake()`` wakes the serving thread.
    """

    #: seconds a request waits for the client's reply
    timeout = 10.0

    def __init__(self, fd: int, wake) -> None:
        self.sock = socket.socket(fileno=os.dup(fd))
        self._wake = wake
        self._lock = threading.Lock()
        self._queue: deque[bytes] = deque()
        self._out = bytearray()
        self._pending: dict[int, tuple[Waiter, int, int]] = {}  # msg_id -> (waiter, addr, size)
        self._next_id = 0x4000  # far from libvfio-user's own (it counts from 1)
        self._reply = bytearray()  # a reply being read
        self._reply_size = 0
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- model threads ---------------------------------------------------------------------------

    def send(self, cmd: int, payload: bytes, addr: int, size: int) -> tuple[int, Waiter]:
        """Queue ``cmd`` with ``payload`` for the client (about guest memory ``[addr, addr+size)``)
        and wake the serving thread; :meth:`wait` for the reply with what this returns. Raises
        :class:`~vfiouser.devices.pci.dma.DmaUnavailable` when the client is gone."""
        waiter = Waiter(cmd)
        with self._lock:
            if self.closed:
                raise DmaUnavailable("the client disconnected", addr, size)
            msg_id = self._next_id
            while msg_id in self._pending:
                msg_id = (msg_id + 1) & 0xFFFF
            self._next_id = (msg_id + 1) & 0xFFFF
            self._pending[msg_id] = (waiter, addr, size)
            self._queue.append(HEADER.pack(msg_id, cmd, HEADER_SIZE + len(payload), MsgType.COMMAND, 0) + payload)
        self._wake()
        return msg_id, waiter

    def wait(self, ticket: tuple[int, Waiter], addr: int, size: int) -> bytes:
        """The payload of the reply to the request :meth:`send` queued. Raises
        :class:`~vfiouser.devices.pci.dma.DmaAborted` for an error reply or none within
        :attr:`timeout`, and what the request failed with otherwise (unmapped, client gone)."""
        msg_id, waiter = ticket
        cmd = waiter.cmd
        try:
            if not waiter.event.wait(self.timeout):
                raise DmaAborted(f"no reply to {command_name(cmd)} #{msg_id} within {self.timeout:g}s", addr, size)
            if waiter.error is not None:
                raise waiter.error
            return waiter.reply
        finally:
            with self._lock:
                if msg_id in self._pending and self._pending[msg_id][0] is waiter:
                    del self._pending[msg_id]

    # -- the serving thread ----------------------------------------------------------------------

    def head(self, size: int = HEADER_SIZE) -> bytes | None:
        """Up to ``size`` bytes at the head of the stream, not consumed (b"" at end of stream),
        or None if nothing is waiting."""
        try:
            return self.sock.recv(size, _PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""  # reset: libvfio-user finds out when it reads

    @property
    def reading_reply(self) -> bool:
        """A reply is partly read: the stream belongs to us until it is done."""
        return bool(self._reply_size)

    @property
    def sending(self) -> bool:
        """Something of ours is queued or half sent."""
        return bool(self._out or self._queue)

    def flush(self) -> bool:
        """Send what is queued, without blocking; True when nothing is left half sent."""
        with self._lock:
            while self._queue:
                self._out += self._queue.popleft()
        while self._out:
            try:
                sent = self.sock.send(self._out, _SEND)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:  # the client is gone; libvfio-user finds out when it reads
                log.debug("sending a DMA request failed: %s", exc)
                self._out.clear()
                return True
            del self._out[:sent]
        return True

    def read_reply(self) -> bool:
        """Consume (part of) the reply at the head of the stream; True if the stream is still
        sound, False if the client broke it (the connection is then shut down)."""
        if not self._reply_size:
            head = self.head()
            if not head or len(head) < HEADER_SIZE:
                return True  # not all there yet
            size = HEADER.unpack(head)[2]
            if not HEADER_SIZE <= size <= MAX_REPLY:
                return self._broken(f"a reply of {size} bytes")
            self._reply_size = size
        try:
            data, ancdata, _, _ = self.sock.recvmsg(self._reply_size - len(self._reply), _ANCILLARY, _RECV)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:
            return self._broken(f"reading a reply failed ({exc})")
        fds = [fd for level, kind, blob in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for fd in memoryview(blob).cast("i")] if ancdata else []
        if not data:
            close_fds(fds)
            return True  # end of stream: libvfio-user finds out at the next command
        self._reply += data
        if len(self._reply) < self._reply_size:
            close_fds(fds)
            return True
        message, self._reply, self._reply_size = bytes(self._reply), bytearray(), 0
        self._route(message, fds)
        return True

    def _route(self, message: bytes, fds: list[int]) -> None:
        msg_id, cmd, _, flags, error_no = HEADER.unpack_from(message)
        with self._lock:
            entry = self._pending.pop(msg_id, None)
        if fds:
            close_fds(fds)
        if entry is None:
            log.warning("unexpected reply %s #%d (no request of ours is waiting); dropped", command_name(cmd), msg_id)
            return
        waiter, addr, size = entry
        if fds:
            waiter.fail(DmaAborted(f"{command_name(cmd)} reply carried fds", addr, size))
        elif cmd != waiter.cmd:
            waiter.fail(DmaAborted(f"reply #{msg_id} is for {command_name(cmd)}, not {command_name(waiter.cmd)}",
                                   addr, size))
        elif flags & MsgFlags.ERROR:
            name = errno.errorcode.get(error_no, str(error_no))
            waiter.fail(DmaAborted(f"client answered {command_name(cmd)} with {name}", addr, size))
        else:
            waiter.reply = message[HEADER_SIZE:]
            waiter.event.set()

    def _broken(self, why: str) -> bool:
        log.warning("the client broke the stream (%s); disconnecting it", why)
        self.shutdown()
        return False

    def shutdown(self) -> None:
        """End the connection: the client sees it closed, and libvfio-user reads what is left,
        then the end of the stream (so it never waits for bytes that cannot come)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """The client is gone: waiting requests fail, our reference to the connection is closed."""
        with self._lock:
            self.closed = True
            waiting, self._pending = [w for w, _, _ in self._pending.values()], {}
            self._queue.clear()
        for waiter in waiting:
            waiter.fail(DmaUnavailable("the client disconnected"))
        self.sock.close()
