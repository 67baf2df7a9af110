"""The device lock: a reentrant lock that a backend can watch while it records or replays a session.

Every call a backend makes into a model holds the model's lock, and deferred
tasks and host-side code take it around the state they touch (see
:mod:`vfiouser.devices.pci.device`). So the order in which threads take it *is*
the order in which a request and the device's own work saw each other's
effects. A backend that records a session (``vfiouser serve --trace``) notes
that order; one that replays it lets the device's threads take the lock in the
same order again (:mod:`vfiouser.devices.pci.activity`).

:class:`DeviceLock` is a :class:`threading.RLock` (the C one, subclassed: taking
it costs what an ``RLock`` costs, which matters on the hot path). While a watcher
is set, the lock switches to a subclass whose methods tell the watcher about
every *outermost* take and release, in any thread; the watcher may make a thread
wait before it takes the lock (a replay does, to keep the recorded order).
:class:`threading.Condition` works on it as on any ``RLock``, but its ``wait()``
releases and retakes the lock without telling the watcher (a condition binds the
lock's internals when it is made).

>>> lock = DeviceLock()
>>> class Counter:
...     taken = 0
...     def lock_wanted(self): pass
...     def lock_taken(self): self.taken += 1
...     def lock_released(self): pass
>>> watcher = Counter()
>>> lock.watch(watcher)
>>> with lock:
...     with lock:          # reentrant: only the outermost take is reported
...         pass
>>> lock.watch(None)
>>> with lock:
...     pass
>>> watcher.taken
1
"""

from __future__ import annotations

import _thread

__all__ = ["DeviceLock"]


class DeviceLock(_thread.RLock):
    """A :class:`threading.RLock` that can be watched (see the module docstring)."""

    __slots__ = ("_watcher",)

    def watch(self, watcher) -> None:
        """Report outermost takes and releases to ``watcher`` (an object with ``lock_wanted()``,
        called before a thread takes the lock and allowed to block, ``lock_taken()`` and
        ``lock_released()``), or stop with ``None``. Set it while no other thread holds the lock."""
        self._watcher = watcher
        self.__class__ = _WatchedLock if watcher is not None else DeviceLock


class _WatchedLock(DeviceLock):
    """The lock while it is watched: every outermost take and release is reported."""

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        watcher = getattr(self, "_watcher", None)
        outermost = watcher is not None and not self._is_owned()
        if outermost:
            watcher.lock_wanted()
        got = _thread.RLock.acquire(self, blocking, timeout)
        if got and outermost:
            watcher.lock_taken()
        return got

    def release(self) -> None:
        _thread.RLock.release(self)
        watcher = getattr(self, "_watcher", None)
        if watcher is not None and not self._is_owned():
            watcher.lock_released()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
