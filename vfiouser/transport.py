"""Message framing over an AF_UNIX stream socket, with file descriptors.

:class:`Transport` turns the byte stream into whole messages (header, payload
and the fds that came with them) and sends messages, fds attached, back.

Receiving reads as much as the socket holds in one ``recvmsg`` and returns
every complete message in it, so a burst of pipelined requests costs one
system call. File descriptors (SCM_RIGHTS) must then be matched to the right
message. Linux hands out at most one fd-carrying send per ``recvmsg``, and
that send is the last one whose bytes the call returns; a vfio-user peer sends
each message, fds attached, in one ``sendmsg``. So the fds of a receive belong
to the **last message that starts in the bytes of that receive**. Fds that do
not fit that rule (a peer sending fds mid-message) are closed and logged.

A header whose ``msg_size`` is below 16 cannot be framed: the messages before
it are still returned, and :attr:`Transport.framing_error` is set (the caller
answers and drops the connection); the next :meth:`Transport.receive` raises it.
A message larger than ``max_msg_size`` is reported as an *oversized* frame (its
payload is ``None``) so the caller can answer it with an error, and nothing
after it is read: its size cannot be trusted (a peer may announce 4 GiB and
send nothing), so the caller ends the connection (:attr:`Transport.abandoned`).

Every fd the transport received and did not hand over in a frame is closed by
:meth:`Transport.close`; fds in frames belong to the caller.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import threading
from collections import deque
from typing import NamedTuple

from .errors import ConnectionClosed, FramingError
from .protocol import HEADER, HEADER_SIZE

__all__ = ["Transport", "Frame", "LostFds", "MAX_FDS_PER_MESSAGE", "MAX_HELD_FDS", "close_fds", "wait_readable"]

_log = logging.getLogger(__name__)

#: Most fds accepted in one receive (the kernel's SCM_MAX_FD).
MAX_FDS_PER_MESSAGE = 253
#: Most fds held for messages not complete yet (a message carries at most max_msg_fds, 16).
MAX_HELD_FDS = 64
# Plain ints: ``int & socket.MSG_CTRUNC`` goes through IntFlag.__rand__ (about 0.4 us a call).
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_RECV_WAIT = _MSG_CMSG_CLOEXEC
_RECV_NOWAIT = _MSG_CMSG_CLOEXEC | _DONTWAIT
_MIN_CHUNK = 64 * 1024
_SEND_TIMEOUT = 10.0
#: Buffers per sendmsg (the kernel refuses more than IOV_MAX, 1024 on Linux).
_IOV_GROUP = 512
#: Replies up to this many bytes in all are joined into one buffer and sent with send().
_JOIN_MAX = 16 * 1024


class LostFds(list):
    """The fds of a message that did not all arrive (the kernel truncated them, or the session
    held too many): empty, yet true, so no path mistakes it for "no fds"; such a message is
    refused (EMFILE)."""

    def __bool__(self) -> bool:
        return True


class Frame(NamedTuple):
    """One received message. ``payload`` is ``None`` for an oversized message;
    otherwise a memoryview valid until the next :meth:`Transport.receive`."""

    msg_id: int
    cmd: int
    msg_size: int
    flags: int
    error_no: int
    payload: memoryview | None
    fds: list[int]


_new_tuple = tuple.__new__  # Frame(...) without NamedTuple.__new__'s Python-level call


def _nbytes(buffer) -> int:
    """Size in bytes of a bytes-like object (``len`` of a memoryview counts its items)."""
    return buffer.nbytes if type(buffer) is memoryview else len(buffer)


def _drop_sent(views: list[memoryview], sent: int) -> None:
    """Remove the first ``sent`` bytes from ``views`` (byte views), in place."""
    while sent:
        if sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0


def _wait_writable(sock, timeout: float) -> bool:
    """Wait until ``sock`` can take more data (poll: fine with fd numbers above 1023)."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(timeout * 1000))


def wait_readable(sock, timeout: float) -> bool:
    """Wait until ``sock`` has data (or EOF); poll-based, fine with any fd number."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def close_fds(fds) -> None:
    """Close every fd of ``fds``, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Transport:
    """Framing and fd passing on a connected AF_UNIX stream socket (made non-blocking)."""

    def __init__(self, sock: socket.socket, *, max_msg_size: int = (1 << 20) + 4096, log=None,
                 initial: bytes = b"", max_fds: int = MAX_FDS_PER_MESSAGE) -> None:
        self.sock = sock
        # Blocking, so that one thread may wait in recvmsg for the next message (the server's
        # serving thread does); every other call passes MSG_DONTWAIT and never blocks.
        sock.setblocking(True)
        self.max_msg_size = max_msg_size
        # Room for the fds one message may carry: a peer that sends more gets its message
        # refused (the kernel truncates, see LostFds); a small buffer is cheaper to allocate.
        self._ancbuf = socket.CMSG_SPACE(min(max_fds, MAX_FDS_PER_MESSAGE) * 4)
        self.log = log if log is not None else _log
        self._buf = bytearray(_MIN_CHUNK)
        # A view of _buf kept for slicing (the receive window, payloads). _buf is never resized
        # in place (a bigger one replaces it), so the export is harmless.
        self._view = memoryview(self._buf)
        self._start = 0  # first byte of the message being assembled
        self._end = 0  # end of the received bytes
        self._base = 0  # stream offset of _buf[0]
        #: set once a message larger than max_msg_size arrived: nothing after it is read
        self.abandoned = False
        self._complaints = 0
        if initial:  # bytes read from the socket before this transport existed
            self._buf[: len(initial)] = initial
            self._end = len(initial)
        # (first stream offset, end stream offset, fds) of receives that carried fds
        self._fd_chunks: deque[tuple[int, int, list[int]]] = deque()
        self._send_lock = threading.Lock()
        #: set when the stream could not be framed any further (see the module docstring)
        self.framing_error: FramingError | None = None
        self.closed = False

    # -- receiving ---------------------------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, wait: bool = False) -> list[Frame]:
        """Read what is available and return the complete messages; with ``wait``, block until
        something arrives (the one reader of the socket may; a signal or a shutdown of the
        socket ends the wait).

        Returns ``[]`` when nothing complete is there yet. Raises
        :class:`ConnectionClosed` at end of stream and :class:`FramingError`
        when the stream cannot be framed.
        """
        if self.framing_error is not None:
            raise self.framing_error
        if self.abandoned:
            raise ConnectionClosed("the stream was abandoned after an oversized message")
        if self._start == self._end:  # everything framed (the usual case): start over at 0
            self._base += self._start
            self._start = self._end = 0
        else:
            self._make_room()
        try:
            n, ancdata, msg_flags, _ = self.sock.recvmsg_into([self._view[self._end :]], self._ancbuf,
                                                              _RECV_WAIT if wait else _RECV_NOWAIT)
        except (BlockingIOError, InterruptedError):
            return self._frames()  # nothing new; bytes given at construction may still hold messages
        except OSError as exc:
            raise ConnectionClosed(f"receive failed: {exc}") from exc
        return self._took(n, ancdata, msg_flags)

    @property
    def drained(self) -> bool:
        """Nothing received is waiting to be framed, and no fds are held for a message."""
        return (self._start == self._end and not self._fd_chunks and self.framing_error is None
                and not self.abandoned)

    def feed(self, data: bytes, ancdata=(), msg_flags: int = 0) -> list[Frame]:
        """Bytes (and the control data that came with them) that someone else received from this
        socket for us (the C serving loop, :mod:`vfiouser._fastloop`): framed exactly as if
        :meth:`receive` had read them. Returns the complete messages."""
        if self.framing_error is not None:
            raise self.framing_error
        if self._start == self._end:
            self._base += self._start
            self._start = self._end = 0
        if len(self._buf) - self._end < len(data):
            self._make_room()
            if len(self._buf) - self._end < len(data):
                new = bytearray(self._end + len(data))
                new[: self._end] = self._buf[: self._end]
                self._buf, self._view = new, memoryview(new)
        self._buf[self._end : self._end + len(data)] = data
        return self._took(len(data), list(ancdata or ()), msg_flags)

    def _took(self, n: int, ancdata, msg_flags: int) -> list[Frame]:
        """Frame the ``n`` bytes just placed at ``_end`` (with their control data)."""
        if n and not ancdata and not msg_flags & _MSG_CTRUNC and not self._fd_chunks:
            # The usual case: bytes, no fds. Frame every whole message here (no second call).
            end = self._end = self._end + n
            start = self._start
            buf, view, unpack, limit = self._buf, self._view, HEADER.unpack_from, self.max_msg_size
            frames: list[Frame] = []
            while end - start >= HEADER_SIZE:
                msg_id, cmd, size, flags, error_no = unpack(buf, start)
                if not HEADER_SIZE <= size <= limit or end - start < size:
                    break  # unframeable, oversized, or not all here: the general loop decides
                frames.append(_new_tuple(Frame, (msg_id, cmd, size, flags, error_no,
                                                 view[start + HEADER_SIZE : start + size], [])))
                start += size
            self._start = start
            if end - start >= HEADER_SIZE:
                try:
                    frames += self._frames()
                except FramingError:
                    if not frames:
                        raise
                    # framing_error is set: it surfaces once the messages before it are served
            return frames
        fds = None
        if ancdata or msg_flags & _MSG_CTRUNC:
            fds = self._collect_fds(ancdata)
            if msg_flags & _MSG_CTRUNC:  # out of fds (or more than SCM_MAX_FD): some never arrived
                self._complain("control data truncated (no fds left, or more than %d sent): the message "
                               "they came with is refused", MAX_FDS_PER_MESSAGE)
                close_fds(fds)
                fds = LostFds()
        if n == 0:
            if fds:
                close_fds(fds)
            raise ConnectionClosed("peer closed the connection")
        self._end += n
        if fds:
            self._keep_fds(self._base + self._end - n, self._base + self._end, fds)
        return self._frames()

    def _keep_fds(self, c0: int, c1: int, fds: list[int]) -> None:
        """Keep the fds of the bytes ``[c0, c1)`` for the message that starts there; close them at
        once if no message starts there (sent with a fragment), or if the session holds too many."""
        if not self._message_starts_in(c0, c1):
            self._complain("%d fd(s) arrived in the middle of a message; closed", len(fds))
            close_fds(fds)
            return
        if len(fds) + sum(len(f) for _, _, f in self._fd_chunks) > MAX_HELD_FDS:
            self._complain("more than %d fds waiting for their messages; the message they came with is refused",
                           MAX_HELD_FDS)
            close_fds(fds)
            fds = LostFds()
        self._fd_chunks.append((c0, c1, fds))

    def _message_starts_in(self, c0: int, c1: int) -> bool:
        """Whether a message starts in the stream bytes ``[c0, c1)`` (just received)."""
        pos = self._base + self._start  # the first message not framed yet
        while pos < c0:
            at = pos - self._base
            if at + HEADER_SIZE > self._end:
                return False  # a header still incomplete: the next message starts after these bytes
            size = HEADER.unpack_from(self._buf, at)[2]
            if size < HEADER_SIZE:
                return True  # unframeable: the connection ends anyway
            pos += size
        return pos < c1

    def _complain(self, message: str, *args) -> None:
        """Log a peer's misbehaviour: at ERROR the first time, then at DEBUG (never a flood)."""
        self._complaints += 1
        self.log.log(logging.ERROR if self._complaints == 1 else logging.DEBUG, message, *args)

    @staticmethod
    def _collect_fds(ancdata) -> list[int]:
        fds: list[int] = []
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
                fds.extend(arr)
        return fds

    def _make_room(self) -> None:
        """Move the partial message to the front and make sure there is space to read into."""
        if self._start == self._end:
            self._base += self._start
            self._start = self._end = 0
        elif self._start > 0 and len(self._buf) - self._end < _MIN_CHUNK:
            pending = self._end - self._start
            self._buf[:pending] = self._buf[self._start : self._end]
            self._base += self._start
            self._start, self._end = 0, pending
        need = _MIN_CHUNK
        if self._end - self._start >= HEADER_SIZE:
            size = HEADER.unpack_from(self._buf, self._start)[2]
            if HEADER_SIZE <= size <= self.max_msg_size:
                need = max(need, size - (self._end - self._start))
        if len(self._buf) - self._end < need:
            new = bytearray(self._end + need)
            new[: self._end] = self._buf[: self._end]
            self._buf = new
            self._view = memoryview(new)

    def _frames(self) -> list[Frame]:
        frames: list[Frame] = []
        buf = self._buf
        while self._end - self._start >= HEADER_SIZE and not self.abandoned:
            start = self._start
            msg_id, cmd, size, flags, error_no = HEADER.unpack_from(buf, start)
            if size < HEADER_SIZE:
                self.framing_error = FramingError(f"msg_size {size} is smaller than the header",
                                                  raw=bytes(buf[start : start + 16]))
                if not frames:
                    raise self.framing_error
                break  # hand over what came before; the error surfaces next
            stream_start = self._base + start
            fds = self._fds_for(stream_start, size) if self._fd_chunks else []
            if size > self.max_msg_size:
                # Reading on would mean trusting a size up to 4 GiB: hand over the header for
                # its error reply and read no further (the caller ends the connection).
                self.abandoned = True
                self._start = self._end
                frames.append(Frame(msg_id, cmd, size, flags, error_no, None, fds))
                break
            if self._end - start < size:
                if fds:  # not complete yet: keep its fds for next time
                    self._fd_chunks.appendleft((stream_start, stream_start + 1, fds))
                break
            self._start = start + size
            frames.append(_new_tuple(Frame, (msg_id, cmd, size, flags, error_no,
                                             self._view[start + HEADER_SIZE : start + size], fds)))
        return frames

    def _fds_for(self, stream_start: int, size: int) -> list[int]:
        """The fds that belong to the message starting at ``stream_start`` (a :class:`LostFds`
        if some of them never arrived)."""
        got: list[int] = []
        lost = False
        chunks = self._fd_chunks
        while chunks:
            c0, c1, fds = chunks[0]
            if stream_start >= c1:
                # No message started in that receive: fds sent in the middle of a message.
                chunks.popleft()
                self._complain("%d fd(s) arrived without a message start; closed", len(fds))
                close_fds(fds)
                continue
            if c0 <= stream_start and stream_start + size >= c1:
                chunks.popleft()
                lost = lost or isinstance(fds, LostFds)
                got.extend(fds)
                continue
            break
        if lost:
            close_fds(got)
            return LostFds()
        return got

    # -- sending -----------------------------------------------------------------

    def send_one(self, data) -> None:
        """Send one buffer of bytes without fds (the usual reply): :meth:`send`'s first system
        call, without its generality; the rest, if the socket took only part, goes through it."""
        with self._send_lock:
            try:
                sent = self.sock.send(data, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                raise ConnectionClosed(f"send failed: {exc}") from exc
        if sent != _nbytes(data):
            self.send(memoryview(data).cast("B")[sent:])

    def send(self, buffers, fds=()) -> None:
        """Send ``buffers`` (a bytes-like object or a list of them) in order, as one unit
        that other threads' sends never interleave with; ``fds`` travel with the first
        byte. Blocks (up to 10 s) while the socket is full."""
        if isinstance(buffers, (bytes, bytearray, memoryview)):
            buffers = [buffers]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        with self._send_lock:
            if len(buffers) <= _IOV_GROUP:
                # Fast path: one system call that takes everything (the usual case). Small
                # replies without fds are joined and sent with send(): cheaper than sendmsg
                # with one iovec each (1.7 against 2.6 µs for 16 replies of 36 bytes).
                total = sum(map(len, buffers))  # bytes, except for a memoryview of wider items
                data = buffers
                if anc or (len(buffers) > 1 and total > _JOIN_MAX):
                    total = sum(map(_nbytes, buffers))
                elif len(buffers) == 1:
                    data = buffers[0]
                    total = _nbytes(data)
                else:
                    data = b"".join(buffers)
                    total = len(data)
                try:
                    if data is buffers:
                        sent = self.sock.sendmsg(data, anc, _DONTWAIT)
                    else:
                        sent = self.sock.send(data, _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    raise ConnectionClosed(f"send failed: {exc}") from exc
                else:
                    anc = []
                if sent == total:
                    return
            else:
                sent = 0
            views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
            _drop_sent(views, sent)  # what the fast path got out already
            while views:
                group = views[:_IOV_GROUP]
                try:
                    sent = self.sock.sendmsg(group, anc, _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    if not _wait_writable(self.sock, _SEND_TIMEOUT):
                        raise ConnectionClosed("peer stopped reading (send timed out)") from None
                    continue
                except OSError as exc:
                    raise ConnectionClosed(f"send failed: {exc}") from exc
                anc = []
                _drop_sent(views, sent)

    # -- teardown ----------------------------------------------------------------

    def close(self) -> None:
        """Close the socket and every received fd not handed over in a frame."""
        if self.closed:
            return
        self.closed = True
        while self._fd_chunks:
            close_fds(self._fd_chunks.popleft()[2])
        try:
            self.sock.close()
        except OSError:
            pass
