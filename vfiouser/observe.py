"""Watching a session: the readable ``-v`` log and the message trace, from one set of events.

A session that is logged (this module's logger at DEBUG: ``vfiouser serve -v``)
or traced (``--trace``) gets a :class:`SessionObserver`. It sees:

* every message in and out (the dispatcher's full path and the outbox call it:
  the fast path never runs while a session is observed);
* every interrupt the model raises and every DMA transfer it makes, through
  wrappers around the session's :class:`~vfiouser.devices.port.InterruptSink`
  and :class:`~vfiouser.devices.port.DmaBackend` (:class:`ObservedSink`,
  :class:`ObservedDma`);
* the model's own activity (:class:`~vfiouser.devices.port.ModelActivity`):
  deferred tasks starting and finishing, and, while tracing, every outermost
  take of the device lock by a thread other than the serving one.

Each becomes one line of the log (:mod:`vfiouser.readable`; the record carries
its category as ``record.vfu_category``, for the command line's filters) and one
event of the trace (:mod:`vfiouser.trace`). Every event of the trace says who
caused it (``"by"``): the message being served (``["at", n]``), deferred task
*k* (``["task", k]``) or another thread (``["other"]``); each lock take by a
deferred task says where the serving thread was (``"at": [n, j]``: after its
*j*-th take of the lock since serving point *n*). That is what a replay needs to
put the device's background work back exactly where it happened
(:mod:`vfiouser.replay`).

The observer never makes a request fail: a trace that cannot be written stops
tracing, with one error logged.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time

from vfiouser.devices.pci.dma import DmaError
from vfiouser.devices.port import ActivityWatcher, DmaBackend, InterruptSink

from . import readable
from .protocol import HEADER, REGION_ACCESS, Command, MsgFlags, MsgType

__all__ = ["SessionObserver", "ObservedSink", "ObservedDma", "describe_fd", "wanted"]

log = logging.getLogger(__name__)

_ACCESS = (int(Command.REGION_READ), int(Command.REGION_WRITE))
_TYPE_MASK = int(MsgFlags.TYPE_MASK)
_REPLY = int(MsgType.REPLY)


def wanted(tracer) -> bool:
    """Whether a session with ``tracer`` (or None) needs an observer: it is traced, or this
    module's logger is on at DEBUG (``-v``)."""
    return tracer is not None or log.isEnabledFor(logging.DEBUG)


def describe_fd(fd: int) -> dict:
    """What a replay needs to know about an fd a client sent: ``{"kind": "memory", "size": n}``
    (a file or memfd: guest RAM for DMA_MAP), ``{"kind": "eventfd"}``, or ``{"kind": "other"}``."""
    try:
        st = os.fstat(fd)
    except OSError:
        return {"kind": "closed"}
    if stat.S_ISREG(st.st_mode):
        return {"kind": "memory", "size": st.st_size}
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    return {"kind": "eventfd"} if "eventfd" in target else {"kind": "other"}


class SessionObserver(ActivityWatcher):
    """Logs and traces one session (see the module docstring)."""

    def __init__(self, session, tracer=None) -> None:
        self.session = session
        self.port = session.port
        self.client = session.name
        self.tracer = tracer
        self.verbose = log.isEnabledFor(logging.DEBUG)
        #: called when the trace fails and tracing stops
        self.on_trace_stopped = lambda: None
        self.t0 = time.monotonic()
        #: where the serving thread is: (serving point n, device-lock takes since)
        self.position = (0, 0)
        self.serving = threading.get_ident()
        self._pending: dict[int, tuple] = {}
        self._caused: list[tuple[str, str, float]] = []  # events of the message being served, for -v
        self._local = threading.local()
        self._tasks = 0
        self._count = 0
        self._watching = False

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """The client arrived: note it, and watch the model's own activity."""
        self.point("session", event="connect", client=self.client)
        activity = self.port.activity
        if activity is not None:
            activity.watch(self, lock=self.tracer is not None)
            self._watching = True

    def closing(self) -> None:
        """The client is gone; what the session does next (detach, reset) belongs to this point."""
        self.point("session", event="close", client=self.client)

    def stop(self) -> None:
        """Stop watching the model (after the session's last reset)."""
        if self._watching:
            self._watching = False
            self.port.activity.watch(None)

    def wrap(self, sink: InterruptSink, dma: DmaBackend) -> tuple[InterruptSink, DmaBackend]:
        """The session's sink and DMA backend, observed."""
        return ObservedSink(sink, self), ObservedDma(dma, self)

    # -- recording -------------------------------------------------------------------------

    def _ms(self) -> float:
        return (time.monotonic() - self.t0) * 1000

    def _record(self, kind: str, message: bytes | None = None, nfds: int = 0, /, **fields) -> int:
        tracer = self.tracer
        if tracer is None:
            self._count += 1
            return self._count
        try:
            if message is not None:
                return tracer.record(kind, message, nfds, **fields)
            return tracer.event(kind, **fields)
        except Exception as exc:  # a full disk must not take the device down
            logging.getLogger("vfiouser.session").error("%s: message trace failed (%s); tracing stops",
                                                        self.client, exc)
            self.tracer = None
            self.on_trace_stopped()
            self._count += 1
            return self._count

    def point(self, kind: str, /, **fields) -> int:
        """A serving point (a client's request, a client arriving or leaving): recorded, and what
        the serving thread does from now on is counted from it."""
        n = self._record(kind, **fields)
        self.serving = threading.get_ident()
        self.position = (n, 0)
        if self.verbose and kind == "session":
            self._log(readable.event_line(fields | {"dir": kind}), "setup")
        return n

    def _log(self, text: str, category: str, ms: float | None = None) -> None:
        log.debug("%s%s", readable.prefix(self.client, self._ms() if ms is None else ms), text,
                  extra={"vfu_category": category})

    def _by(self) -> list:
        task = getattr(self._local, "task", None)
        if task is not None:
            return ["task", task]
        if threading.get_ident() == self.serving:
            return ["at", self.position[0]]
        return ["other"]

    def event(self, kind: str, /, **fields) -> None:
        """A device event (interrupt, DMA, task): traced, and logged with ``-v``. Never raises:
        it runs inside the model's calls."""
        try:
            fields["by"] = self._by()
            if self.tracer is not None:
                self._record(kind, **fields)
            if self.verbose:
                line = fields | {"dir": kind}
                text, category = readable.event_line(line), readable.event_category(line)
                if self._pending and fields["by"][0] == "at" and threading.get_ident() == self.serving:
                    self._caused.append((text, category, self._ms()))  # logged after its message
                else:
                    self._log(text, category)
        except Exception:
            log.exception("%s: could not observe a %s event", self.client, kind)

    # -- messages ------------------------------------------------------------------------

    def received(self, frame) -> None:
        """A message from the client (the dispatcher's full path, before it is served)."""
        msg_id, cmd, msg_size, flags, error_no, payload, fds = frame
        message = HEADER.pack(msg_id, cmd, msg_size, flags, error_no) + bytes(payload)
        if flags & _TYPE_MASK == _REPLY:  # the client answering our own request (DMA_READ/WRITE)
            self._record("in", message, len(fds))
            return
        names = ""
        if cmd in _ACCESS and len(payload) >= REGION_ACCESS.size:
            offset, region, count = REGION_ACCESS.unpack_from(payload)
            names = self.port.describe_access(region, offset, count, write=cmd == Command.REGION_WRITE)
        extra = {}
        if names:
            extra["names"] = names
        if fds:
            extra["fds"] = [describe_fd(fd) for fd in fds]
        n = self._record("in", message, len(fds), **extra)
        self.serving = threading.get_ident()
        self.position = (n, 0)
        if self.verbose:
            self._pending[msg_id] = (message, names, len(fds), self._ms())

    def sent(self, message: bytes, nfds: int = 0) -> None:
        """A message to the client: a reply, or a request of the server's own."""
        self._record("out", message, nfds)
        if self.verbose:
            msg_id, cmd, _, flags, _ = HEADER.unpack_from(message)
            pending = self._pending.pop(msg_id, None) if flags & _TYPE_MASK == _REPLY else None
            if pending is not None:
                request, names, nfds_in, ms = pending
                self._log(readable.exchange(request, message, names=names, nfds=nfds_in, reply_nfds=nfds),
                          readable.category(request), ms)
                self._log_caused()

    def done(self, msg_id: int) -> None:
        """The dispatcher is done with message ``msg_id``: log it if no reply did (a posted write)."""
        if self._pending:
            pending = self._pending.pop(msg_id, None)
            if pending is not None:
                request, names, nfds_in, ms = pending
                self._log(readable.exchange(request, None, names=names, nfds=nfds_in), readable.category(request),
                          ms)
        self._log_caused()

    def _log_caused(self) -> None:
        """The events the message just logged caused, after it."""
        caused, self._caused = self._caused, []
        for text, category, ms in caused:
            self._log("    " + text, category, ms)

    # -- the model's own activity (ActivityWatcher) ------------------------------------------

    def task_started(self, name: str) -> None:
        self._tasks += 1
        self._local.task = self._tasks
        self.event("task", event="start", task=self._tasks, name=name)

    def task_finished(self, name: str, error: BaseException | None) -> None:
        task = getattr(self._local, "task", None)
        fields = {"error": f"{type(error).__name__}: {error}"} if error is not None else {}
        self.event("task", event="finish", task=task, name=name, **fields)
        self._local.task = None

    def lock_taken(self) -> None:
        if threading.get_ident() == self.serving and getattr(self._local, "task", None) is None:
            n, j = self.position
            self.position = (n, j + 1)
        elif self.tracer is not None:
            self._record("lock", task=getattr(self._local, "task", None), at=list(self.position))


class ObservedSink(InterruptSink):
    """The session's interrupt sink, with every interrupt the model raises observed."""

    def __init__(self, inner: InterruptSink, observer: SessionObserver) -> None:
        self.inner = inner
        self.observer = observer

    def intx(self, asserted: bool) -> None:
        sent = self.inner.intx(asserted)
        self.observer.event("irq", kind="intx", level=bool(asserted), sent=bool(sent))

    def msi(self, vector: int) -> bool:
        sent = self.inner.msi(vector)
        self.observer.event("irq", kind="msi", vector=vector, sent=bool(sent))
        return sent

    def msix(self, vector: int) -> bool:
        sent = self.inner.msix(vector)
        self.observer.event("irq", kind="msix", vector=vector, sent=bool(sent))
        return sent


class ObservedDma(DmaBackend):
    """The session's DMA backend, with every transfer observed: address, size, the bytes that
    moved (what a replay serves back), in place or by message, or why it failed."""

    def __init__(self, inner: DmaBackend, observer: SessionObserver) -> None:
        self.inner = inner
        self.observer = observer

    def _how(self, addr: int, size: int, write: bool) -> str:
        try:
            return "in place" if self.inner.in_place(addr, size, write) else "by message"
        except Exception:
            return ""

    def read(self, addr: int, size: int, *, may_wait: bool) -> bytes:
        how = self._how(addr, size, False)
        try:
            data = self.inner.read(addr, size, may_wait=may_wait)
        except DmaError as exc:
            self.observer.event("dma", op="read", addr=addr, size=size, error=f"{type(exc).__name__}: {exc}")
            raise
        self.observer.event("dma", op="read", addr=addr, size=size, how=how, data=bytes(data).hex())
        return data

    def write(self, addr: int, data: bytes, *, may_wait: bool) -> None:
        how = self._how(addr, len(data), True)
        try:
            self.inner.write(addr, data, may_wait=may_wait)
        except DmaError as exc:
            self.observer.event("dma", op="write", addr=addr, size=len(data), data=bytes(data).hex(),
                                error=f"{type(exc).__name__}: {exc}")
            raise
        self.observer.event("dma", op="write", addr=addr, size=len(data), how=how, data=bytes(data).hex())

    def mapped(self, addr: int, size: int, write: bool) -> list[tuple[int, int]]:
        return self.inner.mapped(addr, size, write)

    def in_place(self, addr: int, size: int, write: bool) -> bool:
        return self.inner.in_place(addr, size, write)
