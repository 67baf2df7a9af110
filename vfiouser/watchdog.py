"""A watchdog for the server loop: say when serving one wake-up takes long enough to hurt.

QEMU waits ``x-msg-timeout`` (5 s by default) for each reply. A model that
takes longer (a handler at a breakpoint, a slow computation, a loop) makes QEMU
give up: the guest reads all-ones, and the late reply arriving afterwards
breaks the connection for the rest of the VM. The loop cannot answer before
its handler returns, so the watchdog says so in the log while it happens: once
the wake-up has run ``warn_after`` seconds (2 by default), and again past the
client's timeout, naming what to do about it.

The loop marks the start and end of each batch by storing the clock in
:attr:`LoopWatchdog.since` (0 when idle: no call, two stores); the watchdog
thread looks twice a second and does nothing else.
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
        #: when the batch being served started (time.monotonic); 0.0 while the loop is idle
        self.since = 0.0
        self._warned_for = 0.0  # the ``since`` already warned about, and how far
        self._warned = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: how many callbacks were reported as slow
        self.reports = 0

    def busy(self) -> None:
        """The loop starts serving a batch (the serving loop stores :attr:`since` itself)."""
        self.since = time.monotonic()

    def idle(self) -> None:
        """The loop is done with the batch."""
        self.since = 0.0

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
            since = self.since
            if not since:
                continue
            if since != self._warned_for:
                self._warned_for, self._warned = since, 0
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
