"""Re-run a recorded session against a model, without a VM: ``vfiouser replay FILE DEVICE``.

A trace recorded by ``vfiouser serve --trace`` (:mod:`vfiouser.trace`) holds
every message the client sent, every reply, and what the device did: its
interrupts, its DMA (with the bytes that moved), its deferred tasks and where
each task took the device lock. :func:`replay` feeds the client's messages, in
order, to a fresh model served by the real protocol engine (a
:class:`~vfiouser.session.Session` with nothing on the other end of its
socket) and compares, step by step:

* **every reply**, byte for byte: header (id, command, size, flags, errno),
  payload, and the number of fds it carried;
* **what each message made the device do**, and what each deferred task did:
  interrupts (kind and level or vector), DMA (direction, address, size, the
  bytes written, or the kind of failure) and deferred tasks (name, in order).

It stops at the first difference (a :class:`Divergence`). Whether an interrupt
reached the client (its eventfd signalled) is not compared: that depends on the
client's unmask messages, which the device does not order.

DMA is served from the trace: a read gets the bytes recorded for it (the
recording notes DMA data at the point the device read it, whether it moved in
place or by message, so neither guest RAM nor its fd is needed); a transfer
that is not the one recorded fails with ``DmaAborted`` and the comparison
shows both. Fds the client sent are recreated: eventfds, and memory of the
recorded size for DMA_MAP (so the engine answers as it did).

The device's own work is put back exactly where it happened. Deferred tasks
wait (stepping mode) until the replay starts them, in the recorded order,
whatever their delay; each time a task took the device lock in the recording,
the trace says how often the serving thread had taken it since the last
message, and the replay lets the task in at that very point
(:mod:`vfiouser.replayside`). Since every request holds the device lock, and
the model's own threads take it around what they change, every reply sees the
same state as in the recording. Work of other threads (host-side calls,
timers) is not in the trace and cannot be replayed; the result notes it.

A model that reads the clock or randomness, or a trace recorded by another
version of vfiouser whose replies differ, diverges too: replay compares
behaviour, and that is behaviour.
"""

from __future__ import annotations

import functools
import os
import socket
from collections import defaultdict
from dataclasses import dataclass, field

from vfiouser.devices.port import as_port

from . import readable
from .errors import UsageError
from .protocol import HEADER, HEADER_SIZE
from .replayside import Discard, LockGate, ReplayObserver, ReplayRecorder
from .session import Session
from .transport import Frame, close_fds

__all__ = ["replay", "Divergence", "ReplayResult", "ReplayError", "DEFAULT_TIMEOUT"]

#: Seconds the replay waits for a deferred task to reach the point the recording has it at.
DEFAULT_TIMEOUT = 10.0


class ReplayError(UsageError):
    """A trace that cannot be replayed (no client session in it, a model without what it needs)."""


@dataclass
class Divergence:
    """Where the model first did something else than the recording."""

    #: the trace entry (``n``) where it shows, the client and its time (ms since it arrived)
    entry: int
    client: str
    ms: float
    #: what was being replayed: ``message #57``, ``deferred task 3 (Edu._run_dma)``, ...
    context: str
    #: the request, readable ("" for a task)
    request: str
    recorded: str
    model: str

    def __str__(self) -> str:
        lines = [f"the model differs from the recording at trace entry {self.entry} ({self.client}, "
                 f"{self.ms:.3f} ms, {self.context}):"]
        if self.request:
            lines.append(f"  message:  {self.request}")
        lines.append(f"  recorded: {self.recorded}")
        lines.append(f"  model:    {self.model}")
        return "\n".join(lines)


@dataclass
class ReplayResult:
    """What :func:`replay` found: the first :class:`Divergence` (None if everything matched) and
    how much it compared."""

    divergence: Divergence | None = None
    sessions: int = 0
    messages: int = 0
    replies: int = 0
    events: int = 0
    tasks: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.divergence is None

    def summary(self) -> str:
        """How much matched: messages, replies, interrupts and DMA transfers, deferred tasks."""
        return (f"{self.messages} messages of {self.sessions} session{'s' if self.sessions != 1 else ''}, "
                f"{self.replies} replies, {self.events} interrupts and DMA transfers, {self.tasks} deferred tasks")


# -- the plan: a trace cut into sessions, replies matched to requests, events by cause ---------


class _SessionPlan:
    def __init__(self, connect: dict, *, replies_only: bool = False) -> None:
        self.connect = connect
        #: a trace from before device events were recorded: only replies can be compared
        self.replies_only = replies_only
        self.client = connect.get("client", "client")
        self.entries: list[dict] = []
        self.replies: dict[int, dict] = {}  # request n -> recorded reply entry
        self.events: dict[tuple, list[dict]] = defaultdict(list)  # cause -> irq/dma/task events
        self.regions: list[tuple[tuple, int]] = []  # worker takes of the lock: ((n, j), task)
        self.task_names: dict[int, str] = {}
        self.others = 0

    def add(self, entry: dict, waiting: dict) -> None:
        kind = entry["dir"]
        self.entries.append(entry)
        if kind == "in" and not readable.is_reply(entry["msg"]):
            waiting[HEADER.unpack_from(entry["msg"])[:2]] = entry["n"]
        elif kind == "out" and readable.is_reply(entry["msg"]):
            request = waiting.pop(HEADER.unpack_from(entry["msg"])[:2], None)
            if request is not None:
                self.replies[request] = entry
        elif kind in ("irq", "dma", "task"):
            cause = tuple(entry.get("by") or ("other",))
            self.events[cause].append(entry)
            if cause[0] == "other":
                self.others += 1
            if kind == "task":
                self.task_names[entry["task"]] = entry.get("name", "")
        elif kind == "lock":
            if entry.get("task") is None:
                self.others += 1
            else:
                self.regions.append((tuple(entry["at"]), entry["task"]))


def _plan(entries) -> list[_SessionPlan]:
    sessions: list[_SessionPlan] = []
    waiting: dict = {}
    for entry in entries:
        if entry.get("dir") == "session" and entry.get("event") == "connect":
            sessions.append(_SessionPlan(entry))
            waiting = {}
            continue
        if not sessions and entry.get("dir") == "in":  # a trace from before sessions were noted: one client
            sessions.append(_SessionPlan({"n": 0, "t": entry.get("t", 0.0), "client": "client"}, replies_only=True))
        if sessions:
            sessions[-1].add(entry, waiting)
    return sessions


# -- comparing ---------------------------------------------------------------------------------


def _key(event: dict) -> tuple:
    kind = event["dir"]
    if kind == "irq":
        return kind, event["kind"], event.get("level") if event["kind"] == "intx" else event.get("vector")
    if kind == "dma":
        error = (event.get("error") or "").partition(":")[0]
        return kind, event["op"], event["addr"], event["size"], event.get("data") if event["op"] == "write" else "", \
            error
    return kind, event.get("event"), event.get("name"), (event.get("error") or "").partition(":")[0]


def _first_difference(recorded: list[dict], model: list[dict]) -> tuple[str, str] | None:
    for i in range(max(len(recorded), len(model))):
        a = recorded[i] if i < len(recorded) else None
        b = model[i] if i < len(model) else None
        if a is None or b is None or _key(a) != _key(b):
            return (readable.event_line(a) if a else "(nothing more)", readable.event_line(b) if b else
                    "(nothing more)")
    return None


def _fds(described) -> list[int]:
    """Fresh fds standing for the ones the client sent: memory of the recorded size, eventfds."""
    out = []
    for fd in described:
        if fd.get("kind") == "memory":
            memfd = os.memfd_create("vfiouser-replay", os.MFD_CLOEXEC)
            os.ftruncate(memfd, fd.get("size", 0))
            out.append(memfd)
        else:
            out.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    return out


# -- replaying -----------------------------------------------------------------------------------


class _Replay:
    """One replay of one trace against one model (see :func:`replay`)."""

    def __init__(self, port, timeout: float) -> None:
        self.port = port
        self.activity = port.activity
        self.timeout = timeout
        self.result = ReplayResult()

    def diverged(self, plan: _SessionPlan, entry: dict, context: str, request: str, recorded: str,
                 model: str) -> None:
        ms = (entry.get("t", 0.0) - plan.connect.get("t", 0.0)) * 1000
        self.result.divergence = Divergence(entry["n"], plan.client, ms, context, request, recorded, model)

    def run(self, sessions: list[_SessionPlan]) -> ReplayResult:
        if self.activity is not None:
            self.activity.set_stepping(True)
        try:
            for plan in sessions:
                self.result.sessions += 1
                if plan.replies_only:
                    self.result.notes.append(
                        f"{plan.client}: the trace notes no client arriving, so it is from a vfiouser that recorded "
                        f"messages only: replies are compared, what the device did is not")
                if plan.others:
                    self.result.notes.append(
                        f"{plan.client}: {plan.others} entries come from threads other than the server's and the "
                        f"device's worker (host-side calls, timers); a replay cannot reproduce them")
                if not self.session(plan):
                    break
        finally:
            if self.activity is not None:
                self.activity.set_stepping(False)
        return self.result

    def session(self, plan: _SessionPlan) -> bool:
        """Replay one client session; False at a divergence."""
        if self.activity is None and (plan.regions or any(c[0] == "task" for c in plan.events)):
            raise ReplayError("the trace has deferred work, and the model's port offers no activity to replay it "
                              "with (DevicePort.activity)")
        self.started = 0
        self.plan = plan
        gate = self.gate = LockGate(plan.regions, self.start, self.timeout)
        dma_events = {cause: [e for e in events if e["dir"] == "dma"] for cause, events in plan.events.items()}
        recorder = self.recorder = ReplayRecorder()
        recorder.point = plan.connect["n"]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        session = Session(ours, self.port, name=plan.client, tracer=recorder,
                          observer_class=functools.partial(ReplayObserver, gate=gate, dma_events=dma_events))
        session.outbox.transport = Discard()
        try:
            if not self.events(plan, plan.connect, ("at", plan.connect["n"]), "the client's arrival", ""):
                return False
            for entry in plan.entries:
                if not self.step(session, plan, entry):
                    return False
            return True
        finally:
            gate.open()
            if not session._released:
                session.close()
            theirs.close()

    def step(self, session: Session, plan: _SessionPlan, entry: dict) -> bool:
        kind, n = entry["dir"], entry["n"]
        if kind == "in" and not readable.is_reply(entry["msg"]):
            self.gate.through((n, -1))
            return self.message(session, plan, entry) and self.gate_ok(plan, entry)
        if kind == "task" and entry.get("event") == "finish" and entry.get("task") is not None:
            self.gate.through((self.recorder.point, float("inf")))
            return self.gate_ok(plan, entry) and self.task(plan, entry)
        if kind == "session" and entry.get("event") == "close":
            self.gate.through((n, -1))
            self.recorder.point = n
            session.close()
            return self.gate_ok(plan, entry) and self.events(plan, entry, ("at", n), "the client leaving", "")
        return True

    def gate_ok(self, plan: _SessionPlan, entry: dict) -> bool:
        if self.gate.failure is None:
            return True
        self.diverged(plan, entry, "the device's deferred work", "", "the task takes the device lock",
                      self.gate.failure)
        return False

    def message(self, session: Session, plan: _SessionPlan, entry: dict) -> bool:
        msg, n = entry["msg"], entry["n"]
        msg_id, cmd, msg_size, flags, error_no = HEADER.unpack_from(msg)
        fds = _fds(entry.get("fds", ()))
        request = readable.request_line(msg, names=entry.get("names", ""), nfds=len(fds))
        self.recorder.point = n
        self.recorder.replies.clear()
        try:
            session.process([Frame(msg_id, cmd, msg_size, flags, error_no, memoryview(msg[HEADER_SIZE:]), fds)])
        finally:
            close_fds(fds)  # the ones the session did not keep (it took the others out of the list)
        recorded = plan.replies.get(n)
        replies = self.recorder.replies
        got = replies[0] if replies else None
        want = (recorded["msg"], recorded.get("nfds", 0)) if recorded is not None else None
        if got != want:
            show = lambda reply: (readable.exchange(msg, reply[0], names=entry.get("names", ""), reply_nfds=reply[1])
                                  + (f" (+{reply[1]} fd)" if reply[1] else "")) if reply else "(no reply)"
            if got is not None and want is not None and show(got) == show(want):
                show = lambda reply: f"{reply[0].hex()} (+{reply[1]} fd)" if reply else "(no reply)"
            self.diverged(plan, entry, f"message #{msg_id}", request, show(want), show(got))
            return False
        self.result.messages += 1
        if recorded is not None:
            self.result.replies += 1
        return self.events(plan, entry, ("at", n), f"what message #{msg_id} made the device do", request)

    def events(self, plan: _SessionPlan, entry: dict, cause: tuple, context: str, request: str) -> bool:
        recorded = plan.events.get(cause, [])
        model = self.recorder.events.pop(cause, [])
        if plan.replies_only:
            return True
        difference = _first_difference(recorded, model)
        if difference is not None:
            self.diverged(plan, entry, context, request, *difference)
            return False
        self.result.events += sum(1 for e in recorded if e["dir"] != "task")
        return True

    def start(self, task: int) -> bool:
        """Make sure recorded task ``task`` (and every one before it) has started."""
        while self.started < task:
            name = self.plan.task_names.get(self.started + 1)
            if not self.activity.start_task(name):
                return False
            self.started += 1
        return True

    def task(self, plan: _SessionPlan, entry: dict) -> bool:
        task = entry["task"]
        context = f"deferred task {task} ({entry.get('name', '?')})"
        if not self.start(task):
            waiting = ", ".join(self.activity.waiting_tasks()) or "none"
            self.diverged(plan, entry, context, "", f"task {entry.get('name')} runs here",
                          f"no such task waits to run (waiting: {waiting})")
            return False
        if not self.gate.wait_finished(task, self.timeout):
            self.gate.open()
            self.diverged(plan, entry, context, "", f"task {entry.get('name')} finishes here",
                          f"it did not finish within {self.timeout:g} s (it may wait for the device lock more "
                          f"often than recorded)")
            return False
        self.result.tasks += 1
        return self.events(plan, entry, ("task", task), f"what {context} did", "")


def replay(entries, device, *, timeout: float = DEFAULT_TIMEOUT) -> ReplayResult:
    """Replay the trace ``entries`` (:func:`vfiouser.trace.load_events`) against ``device``, a
    fresh model (or its port); see the module docstring. Raises :class:`ReplayError` for a trace
    without a client session."""
    sessions = _plan(entries)
    if not sessions:
        raise ReplayError("the trace has no client message in it (record one with vfiouser serve --trace FILE, "
                          "then attach a client)")
    return _Replay(as_port(device), timeout).run(sessions)
