"""What a session sends: replies queued in order during a wake-up and sent together,
requests of the server's own sent at once, and the message trace of both.

The dispatcher queues each reply as it is made; :meth:`Outbox.flush` sends the
batch in as few system calls as the transport allows, after the last message
of the wake-up. A reply that carries fds flushes what is queued first and goes
out on its own ``sendmsg``, so the fds arrive with its first byte (as QEMU
expects). A command flagged NO_REPLY never reaches the outbox.

Tracing (``--trace``) and message logging (``-v``, DEBUG) happen here, so the
dispatcher's fast path, which runs only while neither is on, never pays for
them. A trace that fails (a full disk) stops tracing, never the device.
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

    def __init__(self, transport, log: logging.LoggerAdapter, tracer=None) -> None:
        self.transport = transport
        self.log = log
        self.tracer = tracer
        self.verbose = log.isEnabledFor(logging.DEBUG)
        self.queue: list = []
        #: called when tracing stops after a failure (the session re-checks its fast path)
        self.on_trace_stopped = lambda: None

    @property
    def observed(self) -> bool:
        """Whether messages are traced or logged (the fast path is off then)."""
        return self.verbose or self.tracer is not None

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
            self.record("out", header + payload, len(fds))
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
        self.record("out", header, 0)
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
        self.record("out", header + payload, 0)
        self.transport.send([header, payload])

    # -- the trace -------------------------------------------------------------------------

    def record(self, direction: str, message: bytes, nfds: int) -> None:
        """Add one message to the trace, if there is one."""
        tracer = self.tracer
        if tracer is None:
            return
        try:
            tracer.record(direction, message, nfds)
        except Exception as exc:  # a full disk must not take the device down
            self.log.error("message trace failed (%s); tracing stops", exc)
            self.tracer = None
            self.on_trace_stopped()
