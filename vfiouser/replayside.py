"""The device's side of a replay: its lock, its deferred work, its DMA and its events, put back where
the recording had them (used by :mod:`vfiouser.replay`).

* :class:`LockGate` lets the device's worker take the device lock only where
  the recording says it did: before the serving thread's *j+1*-th take of the
  lock after serving point *n*, every take the trace notes ``"at": [n, j]`` (or
  earlier) has happened, and no other. The serving thread waits for them; the
  worker waits for its turn.
* :class:`ReplayObserver` is the replayed session's observer: it counts
  positions exactly as the recording's observer did, drives the gate, and
  hands every interrupt, DMA transfer and task to :class:`ReplayRecorder`.
* :class:`ReplayDma` serves the model's DMA from what the trace recorded, in
  order, per request or task: reads get the recorded bytes; a transfer that is
  not the one recorded fails (the comparison reports it).
* :class:`ReplayRecorder` stands where the trace file stood: it answers with the
  recorded serving-point numbers and keeps what the model did, per cause, for
  the comparison.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque

from vfiouser.devices.pci import dma as dma_errors
from vfiouser.devices.port import DmaBackend

from .observe import ObservedDma, ObservedSink, SessionObserver

__all__ = ["LockGate", "ReplayObserver", "ReplayDma", "ReplayRecorder", "Discard"]


class LockGate:
    """Orders the worker's takes of the device lock among the serving thread's (module docstring).

    ``regions`` are the recorded takes by deferred tasks, in order: ``((n, j), task)``.
    ``start(task)`` makes sure a task runs (starts it in stepping mode if it has not started).
    """

    def __init__(self, regions, start, timeout: float) -> None:
        self.regions = deque(regions)
        self.start = start
        self.timeout = timeout
        self._cond = threading.Condition()
        self._granted: int | None = None  # the task allowed one take
        self._taken = False
        self._done = False
        self._finished: set[int] = set()
        self._open = False
        #: why the worker did not take the lock where it should have (the first time), or None
        self.failure: str | None = None

    def through(self, position: tuple[int, float]) -> None:
        """Let every recorded worker take at or before ``position`` happen, in order (serving thread).
        A take that does not come is noted in :attr:`failure`, and the gate opens."""
        while self.regions and tuple(self.regions[0][0]) <= position and self.failure is None:
            _, task = self.regions.popleft()
            self._grant(task)

    def _grant(self, task: int) -> None:
        if not self.start(task):
            self._fail(f"the recording's deferred task {task} took the device lock here; the model has no such "
                       f"task to run")
            return
        with self._cond:
            self._granted, self._taken, self._done = task, False, False
            self._cond.notify_all()
            ended = self._cond.wait_for(lambda: self._done or task in self._finished, self.timeout)
            done = self._done
            self._granted = None
        if not done:
            why = "finished without taking it" if ended else f"did not take it within {self.timeout:g} s"
            self._fail(f"deferred task {task} took the device lock here in the recording; the model's task {why}")

    def _fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        self.open()

    def wants(self, task: int) -> None:
        """The worker, running ``task``, is about to take the lock: wait for its turn."""
        with self._cond:
            self._cond.wait_for(lambda: self._open or (self._granted == task and not self._taken))
            if not self._open:
                self._taken = True

    def released(self, task: int) -> None:
        """The worker let the lock go."""
        with self._cond:
            if self._granted == task and self._taken:
                self._done = True
                self._cond.notify_all()

    def finished(self, task: int) -> None:
        """A task ended (it will take the lock no more)."""
        with self._cond:
            self._finished.add(task)
            self._cond.notify_all()

    def wait_finished(self, task: int, timeout: float) -> bool:
        """Wait until ``task`` ended; True if it did."""
        with self._cond:
            return self._cond.wait_for(lambda: task in self._finished, timeout)

    def open(self) -> None:
        """The replay is over: let every thread take the lock."""
        with self._cond:
            self._open = True
            self._cond.notify_all()


class ReplayRecorder:
    """Where the replayed session's observer writes (module docstring).

    ``point`` is the recorded number of the serving point being replayed (the replay sets it
    before each); ``replies`` the messages the session sent since it was last emptied;
    ``events[cause]`` what the model did, as trace events, ``cause`` being ``("at", n)``,
    ``("task", k)`` or ``("other",)``.
    """

    def __init__(self) -> None:
        self.point = 0
        self.replies: list[tuple[bytes, int]] = []
        self.events: dict[tuple, list[dict]] = defaultdict(list)

    def record(self, direction: str, msg: bytes, nfds: int = 0, /, **fields) -> int:
        if direction == "out":
            self.replies.append((bytes(msg), nfds))
        return self.point

    def event(self, kind: str, /, **fields) -> int:
        if kind in ("irq", "dma", "task"):
            self.events[tuple(fields.get("by") or ("other",))].append({"dir": kind, **fields})
        return self.point


class ReplayDma(DmaBackend):
    """The model's DMA, served from the trace (module docstring). ``recorded[cause]`` is the list
    of recorded DMA events of each cause; ``inner`` (the session's own backend) says what is mapped."""

    def __init__(self, inner: DmaBackend, recorded: dict[tuple, list[dict]], cause) -> None:
        self.inner = inner
        self.recorded = {key: deque(events) for key, events in recorded.items()}
        self.cause = cause

    def _next(self, op: str, addr: int, size: int) -> dict:
        queue = self.recorded.get(tuple(self.cause()))
        entry = queue.popleft() if queue else None
        if entry is None or (entry["op"], entry["addr"], entry["size"]) != (op, addr, size):
            recorded = "nothing" if entry is None else f"a {entry['op']} of {entry['size']:#x} at {entry['addr']:#x}"
            raise dma_errors.DmaAborted(f"replay: the recording has {recorded} here", addr, size)
        error = entry.get("error")
        if error:
            name, _, message = error.partition(": ")
            kind = getattr(dma_errors, name, None)
            if not (isinstance(kind, type) and issubclass(kind, dma_errors.DmaError)):
                kind = dma_errors.DmaAborted
            raise kind(message, addr, size)
        return entry

    def read(self, addr: int, size: int, *, may_wait: bool) -> bytes:
        return bytes.fromhex(self._next("read", addr, size).get("data", ""))

    def write(self, addr: int, data: bytes, *, may_wait: bool) -> None:
        self._next("write", addr, len(data))

    def mapped(self, addr: int, size: int, write: bool) -> list[tuple[int, int]]:
        return self.inner.mapped(addr, size, write)

    def in_place(self, addr: int, size: int, write: bool) -> bool:
        return self.inner.in_place(addr, size, write)


class ReplayObserver(SessionObserver):
    """The observer of a replayed session (module docstring): ``gate`` orders the worker's takes
    of the device lock, ``dma_events`` are the recorded DMA events by cause."""

    def __init__(self, session, tracer, *, gate: LockGate, dma_events: dict[tuple, list[dict]]) -> None:
        super().__init__(session, tracer)
        self.gate = gate
        self.dma_events = dma_events

    def wrap(self, sink, dma):
        return ObservedSink(sink, self), ObservedDma(ReplayDma(dma, self.dma_events, self._by), self)

    def current_task(self) -> int | None:
        """The number of the deferred task this thread runs, or None."""
        return getattr(self._local, "task", None)

    def task_finished(self, name: str, error: BaseException | None) -> None:
        task = self.current_task()
        super().task_finished(name, error)
        if task is not None:
            self.gate.finished(task)

    def lock_wanted(self) -> None:
        task = self.current_task()
        if task is not None:
            self.gate.wants(task)
        elif threading.get_ident() == self.serving:
            self.gate.through(self.position)

    def lock_released(self) -> None:
        task = self.current_task()
        if task is not None:
            self.gate.released(task)


class Discard:
    """A transport that sends nowhere: the replay reads the session's replies from its observer."""

    def send_one(self, data) -> None:
        pass

    def send(self, buffers, fds=()) -> None:
        pass
