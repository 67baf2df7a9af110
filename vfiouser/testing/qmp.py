"""QMP, QEMU's monitor protocol, spoken through the QEMU project's own ``qemu.qmp`` library.

``qemu.qmp`` is asynchronous. :class:`Monitor` runs its ``QMPClient`` on an
event loop of its own, on a daemon thread, so synchronous code on any thread
(a test, a harness, a signal-free shutdown path) calls :meth:`Monitor.execute`
and gets the result, with a timeout, without owning or disturbing an event
loop of its own (a test that runs under an asyncio plugin included). Events
QEMU sends are kept (the last 256) in :attr:`Monitor.events`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import TimeoutError as FutureTimeout

from qemu.qmp import ExecuteError, QMPClient, QMPError

from vfiouser.errors import VfioUserError

__all__ = ["Monitor", "QmpError"]

log = logging.getLogger(__name__)


class QmpError(VfioUserError):
    """A QMP command failed, timed out, or the monitor could not be reached."""


class Monitor:
    """A QMP connection to the monitor socket at ``path`` (QEMU must be listening there).

    ``connect_timeout`` bounds the wait for QEMU to create the socket and greet;
    ``alive`` (optional) is called while waiting and stops the wait early when it
    returns False (QEMU exited)."""

    def __init__(self, path: str, *, connect_timeout: float = 30.0, timeout: float = 30.0,
                 alive=None, name: str = "vfiouser") -> None:
        self.path = path
        self.timeout = timeout
        self.events: deque[dict] = deque(maxlen=256)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vfiouser-qmp", daemon=True)
        self._thread.start()
        self._client = QMPClient(name)
        self._watcher = None
        deadline = time.monotonic() + connect_timeout
        try:
            while True:
                try:
                    self._run(self._client.connect(path), timeout=max(0.5, deadline - time.monotonic()))
                    break
                except (QMPError, OSError, QmpError) as exc:
                    if time.monotonic() > deadline or (alive is not None and not alive()):
                        raise QmpError(f"cannot reach QMP at {path}: {exc}") from None
                    time.sleep(0.05)
            self._watcher = self._run(self._start_watching(), timeout=5)
        except BaseException:
            self._stop_loop()
            raise

    async def _start_watching(self):
        return asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        try:
            async for event in self._client.events:
                self.events.append(dict(event))
        except asyncio.CancelledError:
            pass

    def _run(self, coro, timeout: float | None = None):
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout if timeout is None else timeout)
        except FutureTimeout:
            future.cancel()
            raise QmpError(f"no answer from QMP at {self.path} within {timeout or self.timeout}s") from None

    def execute(self, command: str, **arguments) -> object:
        """Run ``command`` with ``arguments``; its ``return`` value. :class:`QmpError` if QEMU
        answers with an error, the connection is gone, or no answer comes in time."""
        try:
            return self._run(self._client.execute(command, arguments or None))
        except ExecuteError as exc:
            raise QmpError(f"QMP {command} failed: {exc}") from None
        except (QMPError, OSError, EOFError) as exc:
            raise QmpError(f"QMP {command}: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        """Disconnect and stop the loop thread (safe to call twice)."""
        if self._loop.is_closed():
            return
        try:
            if self._watcher is not None:
                self._loop.call_soon_threadsafe(self._watcher.cancel)
            self._run(self._client.disconnect(), timeout=5)
        except (QmpError, QMPError, OSError, EOFError) as exc:
            log.debug("QMP disconnect: %s", exc)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
