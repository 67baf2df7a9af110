"""What a session sends: replies queued in order during a wake-up and sent together,
requests of the server's own sent at once, and the message trace of both.

The dispatcher queues each reply as it is made; :meth:`Outbox.flush` sends the
batch in as few system calls as the transport allows, after the last message
of the wake-up. A reply that carries fds flushes what is queued first and goes
out on its own ``sendmsg``, so the fds arrive with its first byte (as QEMU
expects). A command flagged NO_REPLY never reaches the outbox.

Every message sent goes to the session's observer, if it has one (the readable
log and the trace, :mod:`vfiouser.observe`), and is logged raw when this
session's logger is at DEBUG (``-vv``); the dispatcher's fast path, which runs
only while neither is on, never pays for them.
"""

from __future__ import annotations

import errno
import logging

from .protocol import HEADER, HEADER_SIZE, MsgFlags, MsgType, command_name, describe

__all__ = ["Outbox"]

_REPLY = int(MsgType.REPLY)
_ERROR_REPLY = int(MsgType.REPLY | MsgFlags.ERROR)


class Outbox:
    """The outgoing side of one session (see the module docstring).

    ``queue`` is the list of buffers waiting for :meth:`flush`; the dispatcher's
    fast path appends finished replies to it directly.
    """

    def __init__(self, transport, log: logging.LoggerAdapter) -> None:
        self.transport = transport
        self.log = log
        #: raw protocol lines (the session's logger at DEBUG)
        self.verbose = log.isEnabledFor(logging.DEBUG)
        #: the session's :class:`~vfiouser.observe.SessionObserver`, if it has one
        self.observer = None
        self.queue: list = []

    @property
    def observed(self) -> bool:
        """Whether messages are traced or logged (the fast path is off then)."""
        return self.verbose or self.observer is not None

    @property
    def tracer(self):
        """The session's message trace, if it is traced."""
        return self.observer.tracer if self.observer is not None else None

    # -- replies (the serving thread) -----------------------------------------------------

    def reply(self, msg_id: int, cmd: int, parts=None, fds=()) -> None:
        """Queue the reply to ``msg_id``: ``parts`` is a bytes-like payload or a list of them."""
        if parts is None:
            parts = []
        elif not isinstance(parts, list):
            parts = [parts]
        size = HEADER_SIZE + sum(len(p) for p in parts)
        header = HEADER.pack(msg_id, cmd, size, _REPLY, 0)
        if self.observed:
            payload = b"".join(bytes(p) for p in parts)
            if self.verbose:
                self.log.debug(">>> %s", describe(cmd, _REPLY, payload, msg_id=msg_id, nfds=len(fds)))
            if self.observer is not None:
                self.observer.sent(header + payload, len(fds))
        if fds:
            self.flush()
            self.transport.send([header, *parts], fds)
        else:
            self.queue.append(header)
            self.queue.extend(parts)

    def error(self, msg_id: int, cmd: int, err: int) -> None:
        """Queue an error reply to ``msg_id`` carrying errno ``err``."""
        header = HEADER.pack(msg_id, cmd, HEADER_SIZE, _ERROR_REPLY, err)
        if self.verbose:
            self.log.debug(">>> %s #%d reply ERROR %s", command_name(cmd), msg_id, errno.errorcode.get(err, err))
        if self.observer is not None:
            self.observer.sent(header, 0)
        self.queue.append(header)

    def flush(self) -> None:
        """Send everything queued (raises ConnectionClosed if the client is gone)."""
        queue = self.queue
        if queue:
            self.queue = []
            if len(queue) == 1:  # one reply of bytes: the usual case
                self.transport.send_one(queue[0])
            else:
                self.transport.send(queue)

    # -- requests of our own (any thread) ---------------------------------------------------

    def request(self, msg_id: int, cmd: int, payload: bytes) -> None:
        """Send a request of the server's own now (it does not wait for the queue)."""
        header = HEADER.pack(msg_id, cmd, HEADER_SIZE + len(payload), MsgType.COMMAND, 0)
        if self.verbose:
            self.log.debug(">>> %s", describe(cmd, 0, payload, msg_id=msg_id))
        observer = self.observer
        if observer is not None:
            observer.sent(header + payload, 0)
        self.transport.send([header, payload])
