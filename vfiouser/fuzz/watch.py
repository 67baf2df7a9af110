"""The watch on the server's resources between sessions: a baseline after the warm-up, then fds,
threads and memory mappings within a small slack of it, RSS growth bounded, no CPU used while
idle (see ``docs/fuzzing.md``, "What is checked")."""

from __future__ import annotations

import logging
import os
import time

from .child import Deadline, Resources, ServerProcess
from .wire import FuzzFailure

log = logging.getLogger(__name__)

#: How much the server's fds, threads and mappings may exceed the baseline: a session's own are
#: gone once it is over, so the slack only absorbs what a model creates once and keeps (its
#: deferred-work thread and that thread's watchdog, started on the first deferred task, which the
#: unmutated warm-up sessions may not reach) and the allocator's own mappings.
FD_SLACK, THREAD_SLACK, MAP_SLACK = 2, 2, 16
#: RSS growth allowed over a device's run: the fuzzer sends 1 MiB messages and asks for 1 MiB
#: reads, which leave the allocator holding a few MiB; 20 MiB is a leak of 100 bytes per message
#: over a device's share of a million-message run.
RSS_BOUND_KB = 20 * 1024


class ResourceWatch:
    """Samples one server's /proc once the previous session is over and judges the growth."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.baseline: Resources | None = None

    def settle(self, limit: Resources | None) -> Resources:
        """Sample the server when fds, threads and mappings hold still (and are within ``limit``,
        if given), waiting up to 2 s of the server's time for it to finish with the last client."""
        wait = Deadline(self.server, 2.0)
        last = self.server.sample()
        while wait.left() > 0:
            time.sleep(0.01)
            now = self.server.sample()
            steady = (now.fds, now.threads, now.maps) == (last.fds, last.threads, last.maps)
            within = limit is None or (now.fds <= limit.fds and now.threads <= limit.threads
                                       and now.maps <= limit.maps)
            if steady and within:
                return now
            last = now
        return last

    def take_baseline(self) -> Resources:
        """The resources after the warm-up, against which every later sample is judged."""
        self.baseline = self.settle(None)
        log.info("%s: baseline %s", self.server.device, self.baseline)
        return self.baseline

    def check(self, label: str) -> Resources:
        """Fds, threads and mappings within the slack of the baseline, RSS growth bounded, the idle
        server not using the CPU; raises :class:`FuzzFailure` (``leak`` or ``spin``) otherwise."""
        b = self.baseline
        limit = Resources(b.fds + FD_SLACK, b.threads + THREAD_SLACK, b.maps + MAP_SLACK, 0)
        now = self.settle(limit)
        problems = []
        if now.fds > limit.fds:
            problems.append(f"fds {now.fds} > baseline {b.fds} + {FD_SLACK}")
        if now.threads > limit.threads:
            problems.append(f"threads {now.threads} > baseline {b.threads} + {THREAD_SLACK}")
        if now.maps > limit.maps:
            problems.append(f"mappings {now.maps} > baseline {b.maps} + {MAP_SLACK}")
        if now.rss_kb - b.rss_kb > RSS_BOUND_KB:
            problems.append(f"RSS grew {(now.rss_kb - b.rss_kb) / 1024:.1f} MiB (bound {RSS_BOUND_KB // 1024} MiB)")
        if problems:
            raise FuzzFailure("leak", f"{label}: " + "; ".join(problems) + f" (now {now}, baseline {b})\n"
                              f"server fds:\n{self.fd_listing()}")
        t0, c0 = time.monotonic(), self.server.cpu_ns()
        time.sleep(0.02)
        used = (self.server.cpu_ns() - c0) / 1e9
        if used > 0.5 * (time.monotonic() - t0):
            raise FuzzFailure("spin", f"{label}: the idle server used {used * 1000:.0f} ms of CPU in 20 ms")
        return now

    def fd_listing(self) -> str:
        """The server's open fds and what each is, one a line."""
        base = f"/proc/{self.server.pid}/fd"
        try:
            return "\n".join(sorted(f"  {n} -> {os.readlink(f'{base}/{n}')}" for n in os.listdir(base)))
        except OSError:
            return "  (unavailable)"
