"""The server under test as a child process (``python -m vfiouser serve DEVICE``), watched
through ``/proc``: alive, its fds, threads, mappings, RSS and CPU time, what its threads wait
in; and :class:`Deadline`, a wait counted in the time the server could actually run."""

from __future__ import annotations

import logging
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Resources:
    """What /proc says about the server process."""

    fds: int
    threads: int
    maps: int
    rss_kb: int

    def __str__(self) -> str:
        return f"fds={self.fds} threads={self.threads} maps={self.maps} rss={self.rss_kb / 1024:.1f}MiB"


class ServerProcess:
    """``python -m vfiouser serve DEVICE`` in a child process, its log in a file."""

    def __init__(self, device: str, workdir: str, command: str | None = None) -> None:
        self.device = device
        self.path = os.path.join(workdir, "dev.sock")
        self.log_path = os.path.join(workdir, f"server-{device}.log")
        if command:
            argv = [a.replace("{socket}", self.path).replace("{device}", device) for a in shlex.split(command)]
        else:
            argv = [sys.executable, "-m", "vfiouser", "serve", device, "--socket", self.path]
        self.argv = argv
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                self.stop()
                raise RuntimeError(f"the server for {device} did not start within 60 s:\n{self.log_tail()}")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                self.stop()
                raise RuntimeError(f"the server for {device} exited at start-up:\n{self.log_tail()}")
            line += chunk
        log.info("server for %s: pid %d, %s", device, self.pid, line.decode(errors="replace").strip())
        #: open fds of the server with no client (a session adds its socket and what the client gave)
        self.idle_fds = self.fd_count()

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def exit_text(self) -> str:
        """How the process ended, readably."""
        code = self.proc.returncode
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def sample(self) -> Resources:
        """fds, threads, memory mappings and RSS, from /proc."""
        base = f"/proc/{self.pid}"
        fds = len(os.listdir(f"{base}/fd"))
        threads = len(os.listdir(f"{base}/task"))
        with open(f"{base}/maps", "rb") as f:
            maps = sum(1 for _ in f)
        rss = 0
        with open(f"{base}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        return Resources(fds, threads, maps, rss)

    def fd_count(self) -> int:
        """Open fds of the server."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_ns(self) -> int:
        """CPU time of all the server's threads so far, in ns (/proc/PID/task/*/schedstat)."""
        total = 0
        base = f"/proc/{self.pid}/task"
        for tid in os.listdir(base):
            try:
                with open(f"{base}/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total

    def run_delay_ns(self) -> int:
        """Time the server's threads spent runnable but waiting for a CPU, in ns (schedstat, 2nd field)."""
        total = 0
        base = f"/proc/{self.pid}/task"
        try:
            for tid in os.listdir(base):
                try:
                    with open(f"{base}/{tid}/schedstat") as f:
                        total += int(f.read().split()[1])
                except (OSError, ValueError, IndexError):
                    pass
        except OSError:
            pass
        return total

    def wait_channels(self) -> str:
        """What each server thread is doing (``/proc/PID/task/*/syscall``): for hangs and spins."""
        names = {0: "read", 1: "write", 7: "poll", 23: "select", 202: "futex", 232: "epoll_wait", 281: "epoll_pwait",
                 45: "recvfrom", 47: "recvmsg", 44: "sendto", 46: "sendmsg", 35: "nanosleep", 230: "clock_nanosleep"}
        out = []
        base = f"/proc/{self.pid}/task"
        try:
            for tid in sorted(os.listdir(base), key=int):
                with open(f"{base}/{tid}/syscall") as f:
                    fields = f.read().split()
                if not fields or fields[0] == "running":
                    out.append(f"[{tid}] running")
                    continue
                number = int(fields[0])
                what = names.get(number, f"syscall {number}")
                if number in (0, 1, 44, 45, 46, 47) and len(fields) > 1:
                    fd = int(fields[1], 16)
                    try:
                        what += f"(fd {fd} -> {os.readlink(f'/proc/{self.pid}/fd/{fd}')})"
                    except OSError:
                        what += f"(fd {fd})"
                out.append(f"[{tid}] {what}")
        except (OSError, ValueError):
            return "(unavailable)"
        return ", ".join(out)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM (the server shuts down cleanly), SIGKILL after 10 s. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
#: At most this much is added to a deadline for time the server could not run.
MAX_EXTENSION = 60.0


def _steal_ns() -> int:
    """CPU time the hypervisor took from this machine's CPUs since boot (``/proc/stat``), in ns."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) * _TICK_NS if len(fields) > 8 else 0
    except (OSError, ValueError):
        return 0


class Deadline:
    """A wait of ``seconds`` of the server's time.

    Time the server could not use does not count: CPU time the hypervisor stole
    from this machine (a server thread on a vCPU the host does not run looks
    "running" and makes no progress), and time the server spent runnable but
    waiting for a CPU (a loaded machine). So a hang is a hang of the server, not
    of the machine; the wait grows by at most :data:`MAX_EXTENSION` seconds.
    """

    def __init__(self, server: ServerProcess, seconds: float) -> None:
        self.server = server
        self.seconds = seconds
        self.restart()

    def restart(self) -> None:
        """Start the wait again (progress was made)."""
        self.t0 = time.monotonic()
        self.steal0 = _steal_ns()
        self.delay0 = self.server.run_delay_ns()

    def lost(self) -> float:
        """Seconds of this wait the server could not run."""
        return max(0, _steal_ns() - self.steal0 + self.server.run_delay_ns() - self.delay0) / 1e9

    def left(self) -> float:
        """Seconds still to wait (0 when the server had its whole deadline)."""
        elapsed = time.monotonic() - self.t0
        if elapsed < self.seconds:
            return self.seconds - elapsed
        return max(0.0, self.seconds + min(self.lost(), MAX_EXTENSION) - elapsed)

    def describe(self) -> str:
        """How long the wait was, for a failure message."""
        lost = self.lost()
        return f"{self.seconds} s" + (f" (plus {lost:.1f} s the server could not run)" if lost >= 0.05 else "")
