"""From a received message to its reply: the fast path, the full path, and errors.

:meth:`Dispatcher.dispatch` handles one :class:`~vfiouser.transport.Frame`:

1. **Fast path** (a RUNNING session that neither traces nor logs messages): a
   well-formed REGION_READ of 16 payload bytes, or a REGION_WRITE of 1, 2, 4 or
   8 data bytes, without fds, flags 0 or NO_REPLY, within the size limit. One
   ``struct`` unpack (layouts derived from the protocol's declarations), one
   call into the device port (which checks the region, once, for both paths),
   one buffer for the reply. Anything else goes on to:
2. **Full path**: trace and log, route replies to our own requests to the
   DMA requester, classify the command through the table built from the
   protocol's message registry and the handlers' ``@handles`` marks (a command
   the protocol does not define: ENOSYS; one it defines that we do not serve:
   EOPNOTSUPP; a server-to-client command: EINVAL), run the handler, queue its
   reply, close the fds it did not keep.
3. **Faults** (a port with a fault plan, :mod:`vfiouser.devices.faults`): a
   port whose plan changes replies has a ``reply_fault`` method, called before
   each command is served (it may sleep, raise, or say "drop": serve without a
   reply); the fast path is off for such a port. A
   :class:`~vfiouser.devices.faults.Disconnect` raised by the port, on any path,
   drops the client: no reply, the socket is shut down.
4. **Errors**: an exception becomes an error reply (none if the command said
   NO_REPLY) whose errno is the exception's ``errno`` when it is a framework
   error (:class:`~vfiouser.iomgr.VfioUserError`) and EIO for anything else
   (a bug in the model, logged with its traceback). A failed VERSION closes
   the session.

``tests/test_hot_path.py`` sends the same random streams of valid and invalid
accesses through both paths and requires identical replies and device state.
"""

from __future__ import annotations

import errno
import struct

from vfiouser.devices.errors import RegionAccessError
from vfiouser.devices.faults import Disconnect, InjectedFailure
from vfiouser.iomgr.errors import VfioUserError

from .errors import MalformedMessage, MessageTooLarge, NegotiationError, ProtocolError, UnknownCommand, \
    UnsupportedCommand
from .protocol import HEADER, HEADER_SIZE, MESSAGES, REGION_ACCESS, Command, MsgFlags, MsgType, command_name, \
    describe
from .transport import LostFds, close_fds

__all__ = ["Dispatcher"]

_REPLY = int(MsgType.REPLY)
_COMMAND = int(MsgType.COMMAND)
_NO_REPLY = int(MsgFlags.NO_REPLY)
_TYPE_MASK = int(MsgFlags.TYPE_MASK)
_REGION_READ = int(Command.REGION_READ)
_REGION_WRITE = int(Command.REGION_WRITE)
_ACCESS_SIZE = HEADER_SIZE + REGION_ACCESS.size  # header + region access: 32 bytes
_ACCESS_UNPACK = REGION_ACCESS.unpack_from
#: Accesses whose -v log line names the registers they reach.
_NAMED_ACCESSES = (Command.REGION_READ, Command.REGION_WRITE)
#: a reply's header and region access in one pack
_REPLY_ACCESS = struct.Struct(HEADER.format + REGION_ACCESS.format.lstrip("<"))
#: a REGION_WRITE payload of 1, 2, 4 or 8 data bytes in one unpack (the data comes out as bytes)
_WRITE_PAYLOAD = {n: struct.Struct(f"{REGION_ACCESS.format}{n}s") for n in (1, 2, 4, 8)}


def _refuse(exc: Exception):
    def handler(frame):
        # one exception for every refusal: without dropping the last traceback, each raise
        # would chain onto it and keep every refused message's frames until the session ends
        raise exc.with_traceback(None)

    return handler


class Dispatcher:
    """Dispatches the messages of one session (see the module docstring)."""

    def __init__(self, session, handlers) -> None:
        self.session = session
        self.port = session.port
        self.outbox = session.outbox
        self.log = session.log
        self.handlers = handlers
        self.max_xfer = handlers.max_xfer  # the full path's limit, shared
        self.table = self._build_table(handlers.table())
        #: the port's fault plan's say on replies (None: no reply rules)
        self.reply_fault = getattr(self.port, "reply_fault", None)
        #: whether the fast path may run (see :meth:`refresh`)
        self.fast = False

    @staticmethod
    def _build_table(handlers: dict) -> dict:
        table = {}
        for cmd, spec in MESSAGES.items():
            if spec.direction == "s2c":
                table[int(cmd)] = _refuse(MalformedMessage(f"{command_name(cmd)} is a server-to-client command"))
            else:
                table[int(cmd)] = handlers.get(int(cmd)) or _refuse(
                    UnsupportedCommand(f"{command_name(cmd)} is not supported by this server"))
        return table

    def refresh(self) -> None:
        """Turn the fast path on exactly while the session runs and nothing observes messages."""
        self.fast = self.session.running and not self.outbox.observed and self.reply_fault is None

    # -- one message ---------------------------------------------------------------------

    def dispatch(self, frame) -> None:
        msg_id, cmd, msg_size, flags, error_no, payload, fds = frame
        if self.fast and not fds and (flags == 0 or flags == _NO_REPLY):
            if cmd == _REGION_READ:
                if msg_size == _ACCESS_SIZE:
                    offset, region, count = _ACCESS_UNPACK(payload)
                    if 0 < count <= self.max_xfer:
                        reply = bytearray(_ACCESS_SIZE + count)
                        try:
                            self.port.region_read(region, offset, memoryview(reply)[_ACCESS_SIZE:])
                        except BaseException as exc:  # a model that raises anything gets an error reply
                            self.failed(msg_id, cmd, flags, exc)
                            return
                        if not flags:
                            _REPLY_ACCESS.pack_into(reply, 0, msg_id, cmd, _ACCESS_SIZE + count, _REPLY, 0,
                                                    offset, region, count)
                            self.outbox.queue.append(reply)
                        return
            elif cmd == _REGION_WRITE:
                layout = _WRITE_PAYLOAD.get(msg_size - _ACCESS_SIZE)
                if layout is not None:
                    offset, region, count, data = layout.unpack(payload)
                    if count == msg_size - _ACCESS_SIZE and count <= self.max_xfer:
                        try:
                            self.port.region_write(region, offset, data)
                        except BaseException as exc:  # a model that raises anything gets an error reply
                            self.failed(msg_id, cmd, flags, exc)
                            return
                        if not flags:
                            self.outbox.queue.append(_REPLY_ACCESS.pack(msg_id, cmd, _ACCESS_SIZE, _REPLY, 0,
                                                                        offset, region, count))
                        return
        self.full(frame)

    def full(self, frame) -> None:
        """Everything the fast path does not take, with every check and precise errnos; observed
        (logged, traced) when the session is."""
        outbox = self.outbox
        if not outbox.observed:
            self.serve(frame)
            return
        msg_id, cmd, msg_size, flags, error_no, payload, fds = frame
        observer = outbox.observer
        if observer is not None and payload is not None:
            observer.received(frame)
        if outbox.verbose:
            self.log.debug("<<< %s", describe(cmd, flags, payload if payload is not None else b"",
                                              msg_id=msg_id, nfds=len(fds)))
        try:
            self.serve(frame)
        finally:
            if observer is not None:
                observer.done(msg_id)

    def serve(self, frame) -> None:
        """Serve one message (see :meth:`full`)."""
        msg_id, cmd, msg_size, flags, error_no, payload, fds = frame
        outbox = self.outbox
        mtype = flags & _TYPE_MASK
        if mtype == _REPLY:
            self.session.requester.route_reply(msg_id, cmd, flags, error_no, payload, fds)
            return
        try:
            if mtype != _COMMAND:
                raise MalformedMessage(f"unknown message type {mtype} in flags {flags:#x}")
            if payload is None:
                raise MessageTooLarge(f"{msg_size}-byte message exceeds the {self.session.max_msg_size}-byte limit")
            if type(fds) is LostFds:
                raise MalformedMessage("the fds sent with this message did not all arrive", errno=errno.EMFILE)
            handler = self.table.get(cmd)
            if handler is None:
                raise UnknownCommand(f"unknown command {cmd}")
            drop = self.reply_fault is not None and self.reply_fault(command_name(cmd)) == "drop"
            reply = handler(frame)
        except BaseException as exc:  # a model that raises anything gets an error reply
            self.failed(msg_id, cmd, flags, exc)
            return
        finally:
            if fds:
                self.log.debug("closing %d fd(s) %s #%d did not use", len(fds), command_name(cmd), msg_id)
                close_fds(fds)
                fds.clear()
        if not flags & _NO_REPLY and not drop:
            parts, reply_fds = reply if isinstance(reply, tuple) else (reply, ())
            outbox.reply(msg_id, cmd, parts, reply_fds)

    def failed(self, msg_id: int, cmd: int, flags: int, exc: Exception) -> None:
        """Log a failed command and queue its error reply (unless NO_REPLY). Called from the
        ``except`` clause, so a model's failure is logged with its traceback. A fault plan's
        :class:`~vfiouser.devices.faults.Disconnect` drops the client instead."""
        if isinstance(exc, Disconnect):
            self.log.warning("%s #%d: %s; dropping the client", command_name(cmd), msg_id, exc)
            self.session.close_after_reply(str(exc))
            try:
                self.session.transport.sock.shutdown(2)  # SHUT_RDWR: ends the C loop's wait too
            except OSError:
                pass
            return
        if isinstance(exc, InjectedFailure):
            self.log.info("%s #%d: %s", command_name(cmd), msg_id, exc)
            if not flags & _NO_REPLY:
                self.outbox.error(msg_id, cmd, exc.errno)
            return
        if isinstance(exc, VfioUserError):
            err = exc.errno
            if isinstance(exc, (ProtocolError, RegionAccessError)):  # the client's request was wrong
                self.log.warning("%s #%d rejected (%s): %s", command_name(cmd), msg_id,
                                 errno.errorcode.get(err, err), exc)
            else:
                self.log.exception("%s #%d failed in the device", command_name(cmd), msg_id)
        else:
            err = errno.EIO
            self.log.exception("device model failed on %s #%d", command_name(cmd), msg_id)
        if not flags & _NO_REPLY:
            self.outbox.error(msg_id, cmd, err)
        if isinstance(exc, (NegotiationError, MessageTooLarge)):  # nothing more can be understood
            self.session.close_after_reply(str(exc))
