"""A server session: one client connection, from VERSION to end of stream.

The session owns the connection's state machine (:mod:`vfiouser.state`) and
wires its parts together; each part does one job:

======================  =============================================================
:class:`Transport`      frames the byte stream; fds travel with their message
:class:`Dispatcher`     a message to its reply: fast path, full path, errors
:class:`CommandHandlers` what each command does (one handler per command)
:class:`Outbox`         replies queued and sent together; our own requests
:class:`SessionObserver` the readable log (-v) and the trace, when either is on
:class:`IrqState`       SET_IRQS and the eventfds: the port's interrupt sink
:class:`DmaMappings`    the DMA_MAP ranges, mmapped where they have an fd
:class:`DmaRequester`   device DMA, in place or by messages: the port's DMA backend
======================  =============================================================

Each wake-up reads every complete message the socket holds, processes them
strictly in arrival order (a read after a posted write sees that write) inside
one :meth:`~vfiouser.devices.port.DevicePort.batch`, and sends the replies
together before the batch ends, so work the device deferred starts only once
the client has its answers (and is free to answer the device's DMA).

Bad input never ends the session: it gets an error reply whose errno says what
was wrong, a log line, and the next message is processed. The exceptions leave
nothing to talk about: a header that cannot be framed, and a failed VERSION
exchange (error reply, then the connection is closed).

When the client goes away the session fails the DMA still waiting for it,
detaches the port, closes every fd the client gave, drops every DMA mapping,
and resets the device with reason ``CLIENT_LOST``: the next client is a new
machine and meets a powered-on device (unless the model keeps its state).
"""

from __future__ import annotations

import logging

from vfiouser.devices.port import DevicePort, ResetReason

from .commands import CommandHandlers
from .dispatch import Dispatcher
from .dma import DmaMappings
from .errors import ConnectionClosed, FramingError
from .irq import IrqState
from . import observe
from .negotiation import ClientCapabilities, ServerCapabilities
from .observe import SessionObserver
from .outbox import Outbox
from .protocol import HEADER, HEADER_SIZE, MsgFlags, MsgType
from .regions import RegionTable
from .requester import DmaRequester
from .state import SessionState
from .transport import Transport, close_fds

__all__ = ["Session", "SessionState", "ClientLog"]

log = logging.getLogger(__name__)

_CLOSED = SessionState.CLOSED


class ClientLog(logging.LoggerAdapter):
    """A logger for one client: its name in front of every line (no Logger object per client)."""

    def process(self, msg, kwargs):
        return f"{self.extra['client']}: {msg}", kwargs


class Session:
    """Serves one client connection for a :class:`~vfiouser.devices.port.DevicePort`.

    ``regions`` is the port's :class:`RegionTable` (the server builds it once); ``initial``
    bytes the server read from the socket before the session existed.
    ``watch(fd, callback)`` / ``unwatch(fd)`` let the session ask the server loop
    to poll extra fds (the INTx resample eventfd). ``observer_class(session, tracer)`` makes
    the observer of a logged or traced session (a replay brings its own).
    """

    def __init__(self, sock, port: DevicePort, *, regions: RegionTable | None = None, name: str = "session",
                 caps: ServerCapabilities | None = None, tracer=None, watch=None, unwatch=None,
                 initial: bytes = b"", observer_class=SessionObserver) -> None:
        self.name = name
        self.log = ClientLog(log, {"client": name})
        self.port = port
        self.regions = regions if regions is not None else RegionTable(port.regions)
        self.caps = caps or ServerCapabilities()
        self.client_caps = ClientCapabilities()
        self.state = SessionState.NEGOTIATING
        #: largest message accepted: max_data_xfer_size of data plus headers (WRITE_MULTI is smaller)
        self.max_msg_size = self.caps.max_data_xfer_size + 4096
        self.transport = Transport(sock, max_msg_size=self.max_msg_size, log=self.log, initial=initial,
                                   max_fds=self.caps.max_msg_fds)
        self.outbox = Outbox(self.transport, self.log)
        #: logs (-v) and traces (--trace) the session, if either is on (:mod:`vfiouser.observe`)
        self.observer = observer_class(self, tracer) if observe.wanted(tracer) else None
        watch = watch or (lambda fd, callback: None)
        self.irqs = IrqState(port.irq_counts, watch=lambda fd: watch(fd, self.irqs.resampled),
                             unwatch=unwatch or (lambda fd: None), log=self.log)
        self.dma_maps = DmaMappings(self.caps.max_dma_maps)
        self.requester = DmaRequester(self.outbox, self.dma_maps, port, self.log,
                                      max_xfer=self.caps.max_data_xfer_size)
        self.dispatcher = Dispatcher(self, CommandHandlers(self))
        self._released = False
        self._batch = port.batch()  # reusable: one per session, entered once per wake-up
        sink, dma = self.irqs, self.requester
        if self.observer is not None:
            self.outbox.observer = self.observer
            self.observer.on_trace_stopped = self._trace_stopped
            self.observer.start()
            sink, dma = self.observer.wrap(sink, dma)
        port.attach(sink, dma)

    @property
    def running(self) -> bool:
        return self.state is SessionState.RUNNING

    @property
    def tracer(self):
        return self.outbox.tracer

    def _trace_stopped(self) -> None:
        """The trace failed: without a log to write either, the observer goes and the fast path
        comes back."""
        if self.observer is not None and not self.observer.verbose:
            self.outbox.observer = None
        self.dispatcher.refresh()

    def _set_state(self, new: SessionState, why: str = "") -> None:
        """The one place the state changes; every transition is logged."""
        old = self.state
        if new is old:
            return
        self.state = new
        self.log.debug("state %s -> %s%s", old.value, new.value, f" ({why})" if why else "")
        self.dispatcher.refresh()

    def negotiated(self, client: ClientCapabilities, minor: int) -> None:
        """VERSION succeeded (called by its handler)."""
        self.client_caps = client
        self.requester.max_xfer = min(client.max_data_xfer_size, self.caps.max_data_xfer_size)
        if client.other:
            self.log.debug("ignoring unknown client capabilities %s", sorted(client.other))
        self.log.info("negotiated protocol 0.%d; client: max_msg_fds %d, max_data_xfer_size %#x, write_multiple %s",
                      minor, client.max_msg_fds, client.max_data_xfer_size, client.write_multiple)
        self._set_state(SessionState.RUNNING, "VERSION")

    def close_after_reply(self, why: str) -> None:
        """Nothing more can be negotiated: send what is queued, then the connection ends."""
        self._set_state(_CLOSED, why)

    # -- event loop entry points ---------------------------------------------------

    def fileno(self) -> int:
        return self.transport.fileno()

    def on_readable(self) -> bool:
        """Process everything that arrived. Returns False when the session is over."""
        frames = self.receive()
        return frames is not None and self.process(frames)

    def receive(self, wait: bool = False) -> list | None:
        """The messages that arrived (with ``wait``, block until some do); None when the
        session is over (end of stream, unframeable input)."""
        if self.state is _CLOSED:
            return None
        try:
            return self.transport.receive(wait)
        except (ConnectionClosed, FramingError) as exc:
            return self.receive_failed(exc)

    def receive_failed(self, exc: ConnectionClosed | FramingError) -> None:
        """The transport says the stream is over (end of stream) or unframeable."""
        if isinstance(exc, FramingError):
            self._framing_failed(exc)
        else:
            self.log.info("client disconnected (%s)", exc)
            self._set_state(_CLOSED, "end of stream")

    def process(self, frames: list) -> bool:
        """Serve ``frames`` in order, in one batch, and send the replies. False when the
        session is over."""
        dispatch = self.dispatcher.dispatch
        done = 0
        with self._batch:  # deferred work starts only once these requests are answered
            try:
                for frame in frames:
                    done += 1
                    if self.state is _CLOSED:  # e.g. a failed VERSION: nothing after it runs
                        close_fds(frame.fds)
                        continue
                    dispatch(frame)
                self.outbox.flush()
            except ConnectionClosed as exc:
                self.log.info("client disconnected while we replied (%s)", exc)
                self._set_state(_CLOSED, "send failed")
                for frame in frames[done:]:  # never dispatched: their fds are ours to close
                    close_fds(frame.fds)
        if self.transport.framing_error is not None and self.state is not _CLOSED:
            self._framing_failed(self.transport.framing_error)
        return self.state is not _CLOSED

    def _framing_failed(self, exc: FramingError) -> None:
        """The stream cannot be framed any more: answer the bad header if we can, then hang up."""
        self.log.error("unframeable input, dropping the connection: %s", exc)
        if exc.raw and len(exc.raw) >= HEADER_SIZE:
            msg_id, cmd, _, flags, _ = HEADER.unpack_from(exc.raw)
            if flags & MsgFlags.TYPE_MASK == MsgType.COMMAND and not flags & MsgFlags.NO_REPLY:
                self.outbox.error(msg_id, cmd, exc.errno)
        try:
            self.outbox.flush()
        except ConnectionClosed:
            pass
        self._set_state(_CLOSED, "unframeable input")

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """The client is gone: fail its waiting DMA, detach the port, release everything it
        gave us (eventfds, DMA mappings, the socket), and power-cycle the device for the next."""
        self._set_state(_CLOSED, "closed")
        if self._released:
            return
        self._released = True
        observer = self.observer
        if observer is not None:
            observer.closing()
        self.requester.close()
        try:
            self.port.detach()
        finally:
            self.irqs.close()
            self.dma_maps.close()
            self.transport.close()
        try:
            self.port.reset(ResetReason.CLIENT_LOST)
        except BaseException:  # a broken model must not take the server with it
            self.log.exception("the device failed to reset after its client left")
        finally:
            if observer is not None:
                observer.stop()
