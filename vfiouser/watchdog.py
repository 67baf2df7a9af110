"""A watchdog for the server loop: say when serving one wake-up takes long enough to hurt.

QEMU waits ``x-msg-timeout`` (5 s by default) for each reply. A model that
takes longer (a handler at a breakpoint, a slow computation, a loop) makes QEMU
give up: the guest reads all-ones, and the late reply arriving afterwards
breaks the connection for the rest of the VM. The loop cannot answer before
its handler returns, so the watchdog says so in the log while it happens: once
the wake-up has run ``warn_after`` seconds (2 by default), and again past the
client's timeout, naming what to do about it.

The loop marks the start and end of each callback (:meth:`LoopWatchdog.busy`,
:meth:`LoopWatchdog.idle`: one clock read and two stores); the watchdog thread
looks twice a second and does nothing else.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["LoopWatchdog"]

log = logging.getLogger(__name__)

#: QEMU's default x-msg-timeout, in seconds.
CLIENT_TIMEOUT = 5.0


class LoopWatchdog:
    """Watches the server loop from a thread of its own (started by :meth:`start`)."""

    def __init__(self, *, warn_after: float = 2.0, client_timeout: float = CLIENT_TIMEOUT) -> None:
        self.warn_after = warn_after
        self.client_timeout = client_timeout
        self._since = 0.0  # when the current callback started; 0: the loop is idle
        self._warned = 0  # 0: not for this callback, 1: slow, 2: past the client's timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: how many callbacks were reported as slow
        self.reports = 0

    def busy(self) -> None:
        """The loop starts serving a callback."""
        self._warned = 0
        self._since = time.monotonic()

    def idle(self) -> None:
        """The loop is done with the callback."""
        self._since = 0.0

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="vfiouser-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            since = self._since
            if not since:
                continue
            took = time.monotonic() - since
            if took >= self.client_timeout and self._warned < 2:
                self._warned = 2
                log.error("a request has been served for %.1f s: the client has probably given up waiting for "
                          "its reply (QEMU: x-msg-timeout, 5 s by default), and a late reply breaks its "
                          "connection", took)
            elif took >= self.warn_after and self._warned < 1:
                self._warned = 1
                self.reports += 1
                log.warning("a request has been served for %.1f s by the device model; QEMU gives up after its "
                            "x-msg-timeout (5 s by default). Debugging? Raise it: -device "
                            "'{\"driver\":\"vfio-user-pci\",...,\"x-msg-timeout\":600000}'", took)
