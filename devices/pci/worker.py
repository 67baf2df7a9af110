"""Deferred device work: run a model's background tasks after the request that caused them is answered.

Device operations that take time or wait for the client (DMA, a computation,
a timer) must not run inside a register handler: QEMU waits for the handler's
reply and cannot serve the device meanwhile. A handler calls
:meth:`vfiouser.devices.pci.PciDevice.defer` instead; the task runs on the device's
worker thread, in submission order, once the backend has sent the replies of
the batch of requests being processed (the backend *holds* the worker while it
dispatches and *releases* it after replying), and after an optional delay.

Tasks run without the device lock; they take ``device.lock`` around the
register state they touch. An exception in a task is logged and the worker
goes on. A task must return: the device's later tasks wait behind it. One that
runs longer than :attr:`DeviceWorker.stall_after` seconds is reported (a
warning, and :attr:`DeviceWorker.stalled` while it lasts) by a watchdog
thread that sleeps whenever no task runs.

For backends that record or replay a session (see
:mod:`vfiouser.devices.pci.activity`): a :attr:`DeviceWorker.watcher` is told
when each task starts and finishes (on the worker thread), and in *stepping*
mode (:meth:`DeviceWorker.set_stepping`) tasks run only when
:meth:`DeviceWorker.start_next` says, whatever their delay.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time

from vfiouser.devices.errors import DeviceError

__all__ = ["DeviceWorker"]

log = logging.getLogger(__name__)


class DeviceWorker:
    """One thread that runs deferred tasks in order (started on first use)."""

    #: Seconds a task may run before it is reported as stalling the worker.
    stall_after: float = 5.0

    def __init__(self, name: str = "device") -> None:
        self.name = name
        #: ``(task, seconds it had run)`` while a task runs past :attr:`stall_after`, else None
        self.stalled: tuple[object, float] | None = None
        #: how many tasks stalled so far
        self.stalls = 0
        self._task: tuple[int, float, object] | None = None  # (sequence, start, fn) of the running task
        self._task_seq = 0
        self._watchdog: threading.Thread | None = None
        self._watchdog_idle = False
        self._cond = threading.Condition()
        self._tasks: list[tuple[float, int, int, object, tuple]] = []  # heap of (due, seq, epoch, fn, args)
        self._held: list[tuple[float, int, object, tuple]] = []
        #: bumped by cancel_pending (a reset): tasks from an older epoch never run
        self.epoch = 0
        self._running_epoch = 0
        self._gate = 0
        self._holder: int | None = None
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._stopping = False
        #: told ``task_started(name)`` and ``task_finished(name, error)`` on the worker thread, if set
        self.watcher = None
        self._stepping = False
        self._chosen: tuple | None = None  # stepping: the heap entry start_next picked

    @staticmethod
    def task_name(fn) -> str:
        """How a task is named in logs and traces: its qualified name (``Edu._run_dma``)."""
        return getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__", None) \
            or type(fn).__name__

    def submit(self, fn, *args, delay: float = 0.0) -> None:
        """Run ``fn(*args)`` on the worker, ``delay`` seconds from now (or from release, if held)."""
        with self._cond:
            # A task submitted by a running task belongs to that task's epoch, so a task that was
            # running when the device was reset cannot keep itself alive by re-submitting.
            epoch = self._running_epoch if threading.current_thread() is self._thread else self.epoch
            # Held: the holding thread's tasks, and anything submitted behind them (order is kept).
            if self._held or (self._gate and self._holder == threading.get_ident()):
                self._held.append((delay, epoch, fn, args))
                return
            self._push(delay, epoch, fn, args)

    def _push(self, delay: float, epoch: int, fn, args) -> None:
        heapq.heappush(self._tasks, (time.monotonic() + delay, next(self._seq), epoch, fn, args))
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-worker", daemon=True)
            self._thread.start()
        if self._watchdog is None or not self._watchdog.is_alive():
            self._watchdog = threading.Thread(target=self._watch, name=f"{self.name}-watchdog", daemon=True)
            self._watchdog.start()
        self._cond.notify_all()

    def hold(self) -> None:
        """Keep the tasks this thread submits back until the matching :meth:`release` (nestable).

        Tasks other threads submit meanwhile are held only if held tasks are waiting (so
        submission order is kept). One thread holds at a time: the backend's loop, once per
        batch of requests. Costs no lock: the gate is that thread's own state.

        vfiouser's C loop does the common case of this and of :meth:`release` itself, on the
        same three attributes (``_gate`` 0 -> 1 with ``_holder`` set; 1 -> 0 when ``_held`` is
        an empty list) and calls these methods otherwise: keep those names and meanings.
        """
        me = threading.get_ident()
        if self._gate and self._holder != me:
            raise DeviceError(f"worker {self.name} is held by another thread")
        self._holder = me
        self._gate += 1

    def stale_here(self) -> bool:
        """Whether the calling thread is this worker running a task from before a reset."""
        return threading.current_thread() is self._thread and self._running_epoch != self.epoch

    def held_here(self) -> bool:
        """Whether the calling thread holds the worker (it is serving a batch of requests)."""
        return bool(self._gate) and self._holder == threading.get_ident()

    def release(self, *_exc) -> None:
        """Let the tasks submitted since :meth:`hold` run (takes the lock only if some were)."""
        self._gate -= 1
        if self._gate == 0 and self._held:
            # Only the holder fills an empty _held, so "empty" cannot change under us here.
            with self._cond:
                held, self._held = self._held, []
                for delay, epoch, fn, args in held:
                    self._push(delay, epoch, fn, args)

    # ``with worker:`` holds it (a device port's batch() is the worker: no wrapper on the hot path).
    __enter__ = hold
    __exit__ = release

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    if self._stepping:
                        entry, self._chosen = self._chosen, None
                        if entry is None:
                            self._cond.wait()
                            continue
                        _, _, epoch, fn, args = entry
                    elif self._tasks and self._tasks[0][0] <= now:
                        _, _, epoch, fn, args = heapq.heappop(self._tasks)
                    else:
                        self._cond.wait(self._tasks[0][0] - now if self._tasks else None)
                        continue
                    if epoch == self.epoch:
                        self._running_epoch = epoch
                        self._busy = True
                        self._task_seq += 1
                        self._task = (self._task_seq, time.monotonic(), fn)
                        self._cond.notify_all()  # the watchdog, and start_next waiting for the start
                        break
                    # from before a reset: dropped
            watcher = self.watcher
            error = None
            if watcher is not None:
                watcher.task_started(self.task_name(fn))
            try:
                fn(*args)
            except BaseException as exc:  # SystemExit and friends too: a task never ends the worker
                error = exc
                log.exception("deferred task %r of %s failed", fn, self.name)
            finally:
                if watcher is not None:
                    watcher.task_finished(self.task_name(fn), error)
                with self._cond:
                    self._busy = False
                    self._task = None
                    self._cond.notify_all()

    def _watch(self) -> None:
        """Report a task that runs past :attr:`stall_after` (and when it ends at last)."""
        with self._cond:
            while not self._stopping:
                if self._task is None:
                    self._watchdog_idle = True
                    self._cond.wait()
                    self._watchdog_idle = False
                    continue
                seq, started, fn = self._task
                left = started + self.stall_after - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self.stalled = (fn, time.monotonic() - started)
                self.stalls += 1
                log.warning("deferred task %r of %s has run for %.1f s: the device's later deferred work waits "
                            "for it (a task must return; wait with a timeout, never for ever)",
                            fn, self.name, self.stalled[1])
                while self._task is not None and self._task[0] == seq and not self._stopping:
                    self._cond.wait()
                log.warning("deferred task %r of %s finished after %.1f s", fn, self.name,
                            time.monotonic() - started)
                self.stalled = None

    # -- stepping (replay) -----------------------------------------------------------------

    def set_stepping(self, on: bool) -> None:
        """In stepping mode a task runs only when :meth:`start_next` picks it (its delay is
        ignored); turning it off lets the waiting tasks run as usual."""
        with self._cond:
            self._stepping = on
            if not on and self._chosen is not None:
                heapq.heappush(self._tasks, self._chosen)
                self._chosen = None
            self._cond.notify_all()

    def start_next(self, name: str | None = None, timeout: float = 5.0) -> bool:
        """Stepping mode: start the oldest waiting task (the oldest named ``name``, if given) and
        return once it runs; False if there is none (tasks held by a batch are not waiting yet)."""
        with self._cond:
            waiting = sorted(t for t in self._tasks if t[2] == self.epoch)
            waiting.sort(key=lambda t: t[1])  # submission order, whatever the delays
            entry = next((t for t in waiting if name is None or self.task_name(t[3]) == name), None)
            if entry is None:
                return False
            self._tasks.remove(entry)
            heapq.heapify(self._tasks)
            self._chosen = entry
            started = self._task_seq
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"{self.name}-worker", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            deadline = time.monotonic() + timeout
            while self._task_seq == started and self._chosen is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def waiting_tasks(self) -> list[str]:
        """The names of the tasks waiting to run (not held, not running), oldest first."""
        with self._cond:
            return [self.task_name(t[3]) for t in sorted(self._tasks, key=lambda t: t[1]) if t[2] == self.epoch]

    def idle(self) -> bool:
        """No task queued, held or running."""
        with self._cond:
            return not (self._tasks or self._held or self._busy)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until :meth:`idle` (tasks due later count as pending); True if it became idle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._tasks or self._held or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def wait_running(self, timeout: float) -> bool:
        """Wait until no task is running (queued ones do not count); True if none is. From
        the worker thread itself (a task waiting for itself) it returns False at once."""
        if threading.current_thread() is self._thread:
            return False
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def cancel_pending(self) -> int:
        """Drop the tasks that have not started (a reset); returns how many. A running task
        finishes, but what it submits from now on is dropped too."""
        with self._cond:
            dropped = len(self._tasks) + len(self._held) + (self._chosen is not None)
            self.epoch += 1
            self._tasks.clear()
            self._held.clear()
            self._chosen = None
            self._cond.notify_all()
            return dropped

    def stop(self, timeout: float = 5.0) -> None:
        """Drop pending tasks and stop the thread (a running task finishes first)."""
        with self._cond:
            self._stopping = True
            self._tasks.clear()
            self._held.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
