"""The queues of an NVMe controller at work: doorbells, fetching, completions, interrupts.

:class:`QueueEngine` owns the controller's submission and completion queues
(:mod:`.queues`) and moves commands through them:

* a doorbell write (the serving thread, device lock held) records the SQ's new
  tail or the CQ's new head;
* an SQ with new commands is run (:meth:`QueueEngine.run_sq`): its commands
  are fetched from guest memory in batches, executed (:mod:`.admin` on queue
  0, :mod:`.nvm` on I/O queues) and completed at the tail of their CQ with the
  CQ's phase tag;
* when the SQ is empty, one interrupt per CQ that got completions: its MSI-X
  vector, or, without MSI-X, INTx held while any CQ has unconsumed entries and
  INTMS does not mask it.

Where an SQ runs: the admin queue always on the device's worker (deferred
work, as any model's DMA). An I/O queue whose rings are guest memory the
server reaches in place runs right in its doorbell's handler: in-place DMA
needs no message, so it may, and it saves a wake-up of another thread on the
path of every I/O. Memory that would need a DMA message sends the rest of the
queue to the worker from the command that meets it (DMA raises
``DmaWouldDeadlock`` before a byte moves; then every queue goes to the worker
until the next controller enable).

A read or write larger than :data:`INLINE_LIMIT` runs on one of
:data:`IO_THREADS` I/O threads instead, wherever its queue runs: it would hold
the serving thread, and the host often has several in flight at once (Linux
splits a 1 MiB request into commands of at most 128 pages), which then
overlap, as in QEMU's own devices, whose block layer hands them to a thread
pool. The queue goes on with the next command meanwhile; the completion is
posted when the transfer ends, so large commands may complete out of order
(NVMe allows it), and the last one running for a CQ sends its interrupt. A
controller reset does not wait for them: what they post after it is dropped
(the generation), and a transfer queued but not yet started never starts. A
shutdown (CC.SHN) waits for them before it flushes the image.

Completions go to a CQ's backlog when it is full, and out when the host frees
entries. A command that cannot be fetched, or a completion that cannot be
written, is a controller fatal status (CSTS.CFS). Shadow doorbells (Doorbell
Buffer Config) are kept here too: see :mod:`.queues` for what they are.
"""

from __future__ import annotations

import logging
import threading
from queue import SimpleQueue
from typing import TYPE_CHECKING

from vfiouser.devices.pci import DmaError, DmaWouldDeadlock

from .queues import CompletionQueue, PrpError, SubmissionQueue
from .spec import CSTS_CFS, CSTS_RDY, DOORBELL_BASE, EVENT_PARKED, SQE_SIZE, Command, Completion, NvmOpcode, Status

if TYPE_CHECKING:
    from .controller import NvmeController

__all__ = ["QueueEngine", "FETCH_BATCH", "INTERRUPT_BATCH", "INLINE_LIMIT", "IO_THREADS"]

log = logging.getLogger(__name__)

#: Commands fetched from an SQ in one DMA read.
FETCH_BATCH = 32
#: Completions posted before an interrupt goes out even though the SQ still has commands.
INTERRUPT_BATCH = 32
#: Largest transfer run in a doorbell's handler: a bigger one would hold the serving thread (and
#: every message QEMU sends the device meanwhile) for a millisecond, so the worker does it.
INLINE_LIMIT = 64 << 10
#: Threads that run reads and writes larger than :data:`INLINE_LIMIT` (see the module docstring);
#: 0 runs them on the worker, one after the other.
IO_THREADS = 2


class IoThreads:
    """Daemon threads that run large transfers in parallel, started on first use (one per
    submission until there are ``count``); idle ones wait on the queue, costing nothing."""

    def __init__(self, name: str, count: int) -> None:
        self.name, self.count = name, count
        self._queue: SimpleQueue = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, fn, *args) -> None:
        if len(self._threads) < self.count:
            with self._lock:
                if len(self._threads) < self.count:
                    thread = threading.Thread(target=self._run, name=f"{self.name}-io{len(self._threads)}",
                                              daemon=True)
                    thread.start()
                    self._threads.append(thread)
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except Exception:  # a task's own errors are its business; the thread goes on
                log.exception("%s: I/O task failed", self.name)


class QueueEngine:
    """The queues of one controller (see the module docstring)."""

    def __init__(self, ctrl: NvmeController, *, inline: bool = True) -> None:
        self.ctrl = ctrl
        self.lock, self.dma, self.log, self.defer = ctrl.lock, ctrl.dma, ctrl.log, ctrl.defer
        #: whether I/O queues may run in their doorbell's handler (see the module docstring)
        self.inline_allowed = inline
        self._inline = inline
        self.generation = 0
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        #: (shadow doorbell page, event index page) once the host sent Doorbell Buffer Config
        self.shadow: tuple[int, int] | None = None
        self._warned: set[tuple] = set()
        #: large transfers (see the module docstring); None: on the worker, in turn
        self.io = IoThreads(type(ctrl).__name__, IO_THREADS) if IO_THREADS else None
        self._io_idle = threading.Condition()
        self._io_running = 0

    def reset(self) -> None:
        """A controller reset: every queue gone; work queued for them never runs (generation)."""
        self.generation += 1
        self.sqs, self.cqs = {}, {}
        self.shadow = None
        self.update_intx()

    def enable(self, asq: int, sq_size: int, acq: int, cq_size: int) -> None:
        """CC.EN set: the admin queue pair from AQA, ASQ and ACQ."""
        cq = CompletionQueue(0, acq, cq_size, vector=0, interrupts=True)
        cq.sqs.add(0)
        self.cqs = {0: cq}
        self.sqs = {0: SubmissionQueue(0, asq, sq_size, cq)}
        self._inline = self.inline_allowed

    # -- doorbells (serving thread, device lock held: the hot path) --------------------------

    def doorbell(self, offset: int, data) -> None:
        """A doorbell write: record the new SQ tail or CQ head; SQ processing is deferred."""
        if len(data) != 4 or offset & 3 or not self.ctrl.regs.values["CSTS"] & CSTS_RDY:
            return
        qid, is_cq = offset >> 3, offset & 4
        value = int.from_bytes(data, "little")
        if is_cq:
            cq = self.cqs.get(qid)
            if cq is None or value >= cq.size:
                self._warn_once(("doorbell", offset), "CQ head doorbell %#x: %d is not valid here",
                                DOORBELL_BASE + offset, value)
                return
            cq.head = value
            if cq.backlog:
                self.defer(self._drain, cq, self.generation)
            elif not self.ctrl.msix_enabled():
                self.update_intx()
            return
        sq = self.sqs.get(qid)
        if sq is None or value >= sq.size:
            self._warn_once(("doorbell", offset), "SQ tail doorbell %#x: %d is not valid here",
                            DOORBELL_BASE + offset, value)
            return
        if sq.shadow is None:
            sq.tail = value
        else:  # with shadow doorbells the ring is only a wake-up: the tail is in memory
            sq.rung = True  # a task running now reads the tail again before it stops
        if sq.scheduled:
            return
        if self._inline and sq.in_place:
            self.run_sq(sq, self.generation)
        else:
            sq.scheduled = True
            self.defer(self.run_sq, sq, self.generation)

    # -- processing -------------------------------------------------------------------------

    def run_sq(self, sq: SubmissionQueue, generation: int) -> None:
        """Fetch and run what the host queued on ``sq``, posting a completion for each, and
        interrupt once the queue is empty (or every :data:`INTERRUPT_BATCH` completions)."""
        posted = 0
        try:
            while True:
                if sq.shadow is not None and not self._refresh_tail(sq, generation):
                    return
                with self.lock:
                    if generation != self.generation or self.sqs.get(sq.qid) is not sq:
                        return
                    count = min(sq.waiting(), FETCH_BATCH)
                    if count == 0 and sq.rung:
                        continue  # rung after the tail was read: read it again
                    if count == 0 or sq.cq.backlog:
                        sq.scheduled = False  # the next doorbell (or the CQ's drain) schedules it again
                        return
                    head = sq.head
                try:
                    first = min(count, sq.size - head)
                    raw = self.dma.read(sq.base + SQE_SIZE * head, SQE_SIZE * first)
                    if count > first:
                        raw += self.dma.read(sq.base, SQE_SIZE * (count - first))
                except DmaWouldDeadlock:
                    self._to_worker(sq, generation)
                    return
                except DmaError as exc:
                    self._fatal(generation, f"cannot fetch commands from SQ {sq.qid}: {exc}")
                    return
                inline = self.ctrl.worker.held_here()  # in the doorbell's handler
                for i in range(count):
                    cmd = Command.decode(raw, SQE_SIZE * i)
                    if self._large(cmd):
                        if self.io is not None:  # on an I/O thread, beside the next commands
                            with self.lock:
                                if generation != self.generation:
                                    return
                                sq.head = (head + i + 1) % sq.size
                            self._start_io(sq, cmd, generation)
                            continue
                        if inline:  # would hold the serving thread: the worker does it
                            self._to_worker(sq, generation, memory_in_place=True)
                            return
                    try:
                        done = self._execute(sq, cmd)
                    except DmaWouldDeadlock:  # inline only: this command and the rest go to the worker
                        self._to_worker(sq, generation)
                        return
                    with self.lock:
                        if generation != self.generation:
                            return
                        sq.head = (head + i + 1) % sq.size
                    if done is not None:
                        if not self._post(sq.cq, sq.qid, cmd.cid, done, generation):
                            return
                        posted += 1
                if posted >= INTERRUPT_BATCH:  # a long burst: let the host start on what is done
                    self._interrupt(sq.cq)
                    posted = 0
        finally:
            # One interrupt when the queue is empty, not one per command: the host takes every
            # completion it finds, and signalling wakes QEMU, which can hold this thread's CPU.
            if posted:
                self._interrupt(sq.cq)

    def _large(self, cmd: Command) -> bool:
        """A read or write of more than :data:`INLINE_LIMIT` bytes."""
        return cmd.opcode in (NvmOpcode.READ, NvmOpcode.WRITE) and \
            (cmd.cdw12 & 0xFFFF) + 1 << self.ctrl.block_shift > INLINE_LIMIT

    def _start_io(self, sq: SubmissionQueue, cmd: Command, generation: int) -> None:
        with self._io_idle:
            self._io_running += 1
            sq.cq.io_running += 1
        self.io.submit(self._run_io, sq, cmd, generation)

    def _run_io(self, sq: SubmissionQueue, cmd: Command, generation: int) -> None:
        """A large transfer on an I/O thread: execute and post; the last of its CQ's to finish
        interrupts for every completion they posted."""
        cq, posted = sq.cq, False
        try:
            if generation == self.generation:  # not after a reset
                done = self._execute(sq, cmd)
                posted = done is not None and self._post(cq, sq.qid, cmd.cid, done, generation)
        finally:
            with self._io_idle:
                self._io_running -= 1
                cq.io_running -= 1
                cq.io_unsignalled |= posted
                signal = cq.io_running == 0 and cq.io_unsignalled
                if signal:
                    cq.io_unsignalled = False
                self._io_idle.notify_all()
        if signal:
            self._interrupt(cq)

    def wait_io(self, timeout: float = 30.0) -> bool:
        """Wait until no large transfer runs (a shutdown's flush must come after them); False if
        some still ran after ``timeout`` seconds."""
        with self._io_idle:
            return self._io_idle.wait_for(lambda: self._io_running == 0, timeout)

    def _to_worker(self, sq: SubmissionQueue, generation: int, *, memory_in_place: bool = False) -> None:
        """Inline processing hands the queue to the worker: for a large transfer, or because it met
        guest memory it cannot reach in place (then every queue goes to the worker until the next
        controller enable)."""
        with self.lock:
            if not memory_in_place:
                self._inline = False
            sq.scheduled = True
            self.defer(self.run_sq, sq, generation)

    def _refresh_tail(self, sq: SubmissionQueue, generation: int) -> bool:
        """Shadow doorbells: publish the tail consumed so far as the SQ's event index, then read the
        tail the host wrote (in that order, so a command queued meanwhile is seen here or rings the
        doorbell). False if the queue cannot be read (controller fatal status) or went away."""
        with self.lock:
            sq.rung = False
        try:
            self._set_event(sq, sq.head)
            tail = self.dma.read_u32(sq.shadow)
        except DmaWouldDeadlock:
            self._to_worker(sq, generation)
            return False
        except DmaError as exc:
            self._fatal(generation, f"cannot read the shadow doorbell of SQ {sq.qid}: {exc}")
            return False
        with self.lock:
            if tail < sq.size:
                sq.tail = tail
            else:
                self._warn_once(("shadow", sq.qid), "shadow tail doorbell of SQ %d holds %d (size %d); ignored",
                                sq.qid, tail, sq.size)
        return True

    def _execute(self, sq: SubmissionQueue, cmd: Command) -> Completion | None:
        try:
            return self.ctrl.admin.execute(cmd) if sq.qid == 0 else self.ctrl.nvm.execute(cmd)
        except DmaWouldDeadlock:
            raise
        except PrpError as exc:
            self.log.debug("command %d on SQ %d: %s", cmd.cid, sq.qid, exc)
            return Completion(exc.status)
        except DmaError as exc:
            self.log.warning("command %d (opcode %#04x) on SQ %d: %s", cmd.cid, cmd.opcode, sq.qid, exc)
            return Completion(Status.DATA_TRANSFER_ERROR)
        except Exception:
            self.log.exception("command %d (opcode %#04x) on SQ %d failed", cmd.cid, cmd.opcode, sq.qid)
            return Completion(Status.INTERNAL_ERROR)

    def _post(self, cq: CompletionQueue, sqid: int, cid: int, done: Completion, generation: int) -> bool:
        """Write a completion at ``cq``'s tail (or keep it until the host frees an entry); False
        if the controller was reset meanwhile or the entry could not be written."""
        if cq.shadow is not None and cq.full():
            try:
                self._refresh_head(cq)
            except DmaError as exc:
                self._fatal(generation, f"cannot read the shadow doorbell of CQ {cq.qid}: {exc}")
                return False
        with self.lock:
            if generation != self.generation or self.cqs.get(cq.qid) is not cq:
                return False
            sq = self.sqs.get(sqid)
            sqhd = sq.head if sq is not None else 0
            if cq.full() or cq.backlog:
                cq.backlog.append((sqid, sqhd, cid, done))
                entry = None
            else:
                addr, entry = cq.entry_address(), done.entry(sqhd, sqid, cid, cq.phase)
                cq.advance()
        try:
            if entry is not None:
                self.dma.write(addr, entry)
            if cq.event is not None:
                self._set_event(cq, self._cq_event(cq))
        except DmaWouldDeadlock:  # inline, and the CQ is no longer in place: the worker writes it
            with self.lock:
                self._inline = False
            self.defer(self._post_late, cq, addr if entry is not None else None, entry, generation)
        except DmaError as exc:
            self._fatal(generation, f"cannot post a completion on CQ {cq.qid}: {exc}")
            return False
        return True

    def _post_late(self, cq: CompletionQueue, addr: int | None, entry: bytes | None, generation: int) -> None:
        with self.lock:
            if generation != self.generation:
                return
        try:
            if entry is not None:
                self.dma.write(addr, entry)
            if cq.event is not None:
                self._set_event(cq, self._cq_event(cq))
        except DmaError as exc:
            self._fatal(generation, f"cannot post a completion on CQ {cq.qid}: {exc}")
            return
        self._interrupt(cq)

    def _drain(self, cq: CompletionQueue, generation: int) -> None:
        """The host freed entries of a CQ with completions waiting: post them, restart its SQs."""
        while True:
            with self.lock:
                if generation != self.generation or not cq.backlog or cq.full():
                    break
                sqid, sqhd, cid, done = cq.backlog.pop(0)
                addr, phase = cq.entry_address(), cq.phase
                cq.advance()
            try:
                self.dma.write(addr, done.entry(sqhd, sqid, cid, phase))
            except DmaError as exc:
                self._fatal(generation, f"cannot post a completion on CQ {cq.qid}: {exc}")
                return
        self._interrupt(cq)
        with self.lock:
            for qid in sorted(cq.sqs):
                sq = self.sqs.get(qid)
                if generation == self.generation and sq is not None and not cq.backlog and not sq.scheduled:
                    sq.scheduled = True
                    self.defer(self.run_sq, sq, generation)

    def _interrupt(self, cq: CompletionQueue) -> None:
        with self.lock:
            if not cq.interrupts:
                return
            if self.ctrl.msix_enabled():
                self.ctrl.fire_msix(cq.vector)
            else:
                self.update_intx()

    def update_intx(self) -> None:
        """INTx mode: the pin is asserted while a CQ with interrupts enabled has entries the host has
        not consumed, unless INTMS masks it (bit 0: all queues share vector 0 then)."""
        with self.lock:
            if self.ctrl.msix_enabled():
                return
            level = not self.ctrl.regs["INTMS"] & 1 and any(cq.interrupts and cq.pending() for cq in self.cqs.values())
            if level != self.ctrl.intx_level:
                self.ctrl.set_intx(level)

    def _fatal(self, generation: int, why: str) -> None:
        with self.lock:
            if generation == self.generation:
                self.log.error("controller fatal status: %s", why)
                self.ctrl.regs["CSTS"] |= CSTS_CFS

    # -- shadow doorbells (Doorbell Buffer Config) -------------------------------------------

    def use_shadow_doorbells(self, doorbells: int, events: int) -> None:
        """Doorbell Buffer Config: I/O queues, present and future, use shadow doorbells (worker)."""
        with self.lock:
            self.shadow = (doorbells, events)
            queues = [q for q in (*self.sqs.values(), *self.cqs.values()) if q.qid]
        for queue in queues:
            self.attach_shadow(queue)

    def attach_shadow(self, queue: SubmissionQueue | CompletionQueue) -> None:
        """Give an I/O queue its shadow doorbell and event index, if the host configured them."""
        with self.lock:
            if self.shadow is None or not queue.qid:
                return
            doorbells, events = self.shadow
            offset = 8 * queue.qid + (4 if isinstance(queue, CompletionQueue) else 0)
            queue.shadow, queue.event, queue.event_value = doorbells + offset, events + offset, None
        if isinstance(queue, CompletionQueue):
            self._set_event(queue, self._cq_event(queue))
            for qid in list(queue.sqs):
                if qid in self.sqs:
                    self.check_in_place(self.sqs[qid])
        else:
            self._set_event(queue, queue.head)
            self.check_in_place(queue)

    def check_in_place(self, sq: SubmissionQueue) -> None:
        """Whether an I/O SQ may run in its doorbell's handler: its ring, its CQ's ring and their
        shadow doorbells are guest memory the server reaches without a message."""
        cq = sq.cq
        parts = [(sq.base, SQE_SIZE * sq.size, False), (cq.base, 16 * cq.size, True)]
        parts += [(q.shadow, 4, False) for q in (sq, cq) if q.shadow is not None]
        parts += [(q.event, 4, True) for q in (sq, cq) if q.event is not None]
        ok = bool(sq.qid) and all(self.dma.in_place(addr, size, write) for addr, size, write in parts)
        with self.lock:
            sq.in_place = ok

    def _set_event(self, queue: SubmissionQueue | CompletionQueue, value: int) -> None:
        if queue.event is not None and queue.event_value != value:
            self.dma.write_u32(queue.event, value)
            queue.event_value = value

    def _cq_event(self, cq: CompletionQueue) -> int:
        """Where a CQ's event index goes: out of reach while MSI-X tells the host about completions
        (the head is read from the shadow when room is needed), at the head while the controller
        must hear of consumed entries (INTx is asserted for them, or completions wait for room)."""
        return cq.head if cq.backlog or not self.ctrl.msix_enabled() else EVENT_PARKED

    def complete_admin(self, cid: int, done: Completion) -> None:
        """Complete an admin command that was held (worker): post it and interrupt."""
        with self.lock:
            cq, generation = self.cqs.get(0), self.generation
        if cq is not None and self._post(cq, 0, cid, done, generation):
            self._interrupt(cq)

    def _warn_once(self, key: tuple, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log.warning(message, *args)

    def _refresh_head(self, cq: CompletionQueue) -> None:
        head = self.dma.read_u32(cq.shadow)
        with self.lock:
            if head < cq.size:
                cq.head = head

