"""The client's side of the socket, reading: what the server sent, cut into whole messages,
each with the fds that arrived with its bytes."""

from __future__ import annotations

import array
import os
import socket

from .wire import HDR, FuzzFailure

#: Room for the most fds one message of the server could carry (the kernel's limit, 253).
_ANC_SPACE = socket.CMSG_SPACE(253 * 4)


class Inbox:
    """Reads the server's bytes without blocking and hands every whole message to ``deliver``
    as ``(msg_id, cmd, msg_size, flags, error_no, payload, fds)``; the fds are closed after it.
    ``eof`` is set once the server closed its side (or reset the connection)."""

    def __init__(self, sock: socket.socket, deliver) -> None:
        self.sock = sock
        self.deliver = deliver
        self.eof = False
        self._in = bytearray()
        self._in_pos = 0  # stream offset of _in[0]
        self._in_fds: list[tuple[int, int, list[int]]] = []  # (first byte, end, fds) as received

    def pump(self) -> None:
        """Read what is there (never blocks) and deliver every whole message."""
        while not self.eof:
            try:
                data, anc, _, _ = self.sock.recvmsg(1 << 20, _ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                data, anc = b"", []
            fds = []
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", blob[: len(blob) - len(blob) % 4]))
            if not data:
                for fd in fds:
                    os.close(fd)
                self.eof = True
                break
            if fds:
                start = self._in_pos + len(self._in)
                self._in_fds.append((start, start + len(data), fds))
            self._in += data
            self.frames()
        if self.eof:
            self.frames()

    def frames(self) -> None:
        """Deliver the whole messages received; at end of stream, a partial one is a failure."""
        while len(self._in) >= HDR.size:
            msg_id, cmd, size, flags, err = HDR.unpack_from(self._in)
            if size < HDR.size:
                raise FuzzFailure("server-framing", f"the server sent a header with msg_size {size}: "
                                                    f"{bytes(self._in[:16]).hex()}")
            if len(self._in) < size:
                break
            payload = bytes(self._in[HDR.size:size])
            start = self._in_pos
            fds = []
            while self._in_fds and self._in_fds[0][0] <= start + size - 1 and self._in_fds[0][1] <= start + size:
                fds.extend(self._in_fds.pop(0)[2])
            del self._in[:size]
            self._in_pos += size
            try:
                self.deliver(msg_id, cmd, size, flags, err, payload, fds)
            finally:
                for fd in fds:
                    os.close(fd)
        if self.eof and self._in:
            raise FuzzFailure("server-framing", f"the server closed the connection in the middle of a message "
                                                f"({len(self._in)} bytes: {bytes(self._in[:32]).hex()}...)")
