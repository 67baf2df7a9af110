"""Servers in their own processes, as ``vfiouser serve`` runs them, with a control pipe.

The latency, protocol and WRITE_MULTI sections serve :class:`BenchDevice` from a
child process (``python -m vfiouser.bench.child SPEC``), so the server never
shares an interpreter (or its GIL) with the measuring client. The child's
stdin and stdout carry a line protocol (``stats``, ``reset``, ``pin CPUS``,
``stop``; JSON answers) that lets the bench choose the server's capabilities, read message
counts and device counters, and stop the child cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass

from ..protocol import HEADER, HEADER_SIZE, Command, Layout
from ..transport import wait_readable

__all__ = ["ServeSpec", "ChildServer", "MessageCounter", "ChildServerError", "rss_kib"]

log = logging.getLogger(__name__)


class ChildServerError(RuntimeError):
    """A bench server process did not start or stopped answering."""


@dataclass(frozen=True)
class ServeSpec:
    """What a child server serves and how."""

    path: str
    mmap: bool = False
    write_multiple: bool = True
    count_messages: bool = False
    #: the server's ``poll_us`` (busy-polling after each wake-up; 0: none)
    poll_us: float = 0.0
    #: CPUs the server runs on (None: the parent's)
    cpus: tuple[int, ...] | None = None


class MessageCounter:
    """A tracer (the ``record`` interface of :class:`vfiouser.trace.Tracer`) that only counts
    incoming messages per command, and the writes carried by REGION_WRITE_MULTI."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.multi_writes = 0
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}

    def record(self, direction: str, msg: bytes, nfds: int = 0) -> None:
        if direction != "in":
            return
        cmd = HEADER.unpack_from(msg)[1]
        self.counts[cmd] += 1
        now = time.monotonic()
        self.first.setdefault(cmd, now)
        self.last[cmd] = now
        if cmd == Command.REGION_WRITE_MULTI:
            self.multi_writes += Layout.WRITE_MULTI_COUNT.unpack_from(msg, HEADER_SIZE)[0]

    def reset(self) -> None:
        self.counts.clear()
        self.multi_writes = 0
        self.first.clear()
        self.last.clear()

    def snapshot(self) -> dict:
        return {"counts": {Command(c).name: n for c, n in self.counts.items()},
                "multi_writes": self.multi_writes,
                "first": {Command(c).name: t for c, t in self.first.items()},
                "last": {Command(c).name: t for c, t in self.last.items()}}


def rss_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of process ``pid`` in KiB, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def _device_stats(dev, counter: MessageCounter | None) -> dict:
    burst = dev.burst
    return {
        "region_accesses": list(dev.region_accesses),
        "burst": {"writes": burst.writes, "bytes": burst.bytes_written, "stall_end": burst.stall_end,
                  "first_write": burst.first_write, "last_write": burst.last_write},
        "messages": counter.snapshot() if counter is not None else None,
        "rss": rss_kib(os.getpid()),
    }


def _pin_all_threads(cpus: set[int]) -> None:
    """Move every thread of this process to ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that just ended
            pass


def _serve_child(spec: ServeSpec) -> None:
    """Child process body: serve a BenchDevice; answer control lines on stdin until
    ``stop`` or end of file. Replies are JSON lines on stdout."""
    from ..server import Server
    from ..session import ServerCapabilities
    from .device import BenchDevice

    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    logging.basicConfig(level=logging.WARNING, format="bench-server %(name)s %(levelname)s: %(message)s")
    out = sys.stdout

    def reply(obj) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        dev = BenchDevice(mmap=spec.mmap)
        counter = MessageCounter() if spec.count_messages else None
        server = Server(dev, spec.path, caps=ServerCapabilities(write_multiple=spec.write_multiple), tracer=counter,
                        poll_us=spec.poll_us)
    except Exception as exc:  # reported to the parent, which raises it
        reply({"error": f"{type(exc).__name__}: {exc}"})
        return
    thread = threading.Thread(target=server.serve_forever, name="bench-server", daemon=True)
    thread.start()
    reply({"ready": server.qemu_device_json()})
    try:
        for line in sys.stdin:
            request = line.strip()
            if request == "stop":
                break
            if request == "stats":
                reply(_device_stats(dev, counter))
            elif request == "reset":
                dev.burst.reset_counters()
                dev.region_accesses[:] = [0] * len(dev.region_accesses)
                if counter is not None:
                    counter.reset()
                reply("ok")
            elif request.startswith("pin "):
                _pin_all_threads({int(c) for c in request[4:].split(",")})
                reply("ok")
            else:
                reply({"error": f"unknown request {request!r}"})
    finally:
        server.stop()
        thread.join(10)
        server.close()


def _child_env() -> dict[str, str]:
    """The environment of a child: this package importable even from a plain checkout."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class ChildServer:
    """A :class:`BenchDevice` served by a child process (see the module docstring)."""

    def __init__(self, spec: ServeSpec, *, timeout: float = 30.0) -> None:
        self.spec = spec
        self.timeout = timeout
        arg = json.dumps(asdict(spec))
        self.proc = subprocess.Popen([sys.executable, "-m", "vfiouser.bench.child", arg], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=_child_env())
        try:
            first = self._read(timeout)
        except ChildServerError:
            self.close()
            raise
        if "ready" not in first:
            self.close()
            raise ChildServerError(f"the bench server for {spec.path} failed: {first.get('error', first)}")
        self.device_json: str = first["ready"]
        log.debug("bench server pid %d serves %s", self.proc.pid, spec.path)

    def _read(self, timeout: float):
        if not wait_readable(self.proc.stdout, timeout):
            raise ChildServerError(f"the bench server for {self.spec.path} did not answer within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise ChildServerError(f"the bench server for {self.spec.path} exited ({self.proc.poll()})")
        return json.loads(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def qemu_device_json(self, **extra) -> str:
        """``-device`` JSON for this server, with extra properties (``addr``, ``x-no-posted-writes``)."""
        spec = json.loads(self.device_json)
        spec.update(extra)
        return json.dumps(spec, separators=(",", ":"))

    def _ask(self, request: str):
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self._read(self.timeout)

    def stats(self) -> dict:
        """Device counters, message counts (if counted) and the process's memory."""
        return self._ask("stats")

    def reset(self) -> None:
        """Zero the device and message counters."""
        self._ask("reset")

    def pin(self, cpus) -> None:
        """Move every thread of the server to ``cpus``."""
        self._ask("pin " + ",".join(str(c) for c in sorted(cpus)))

    def close(self) -> None:
        """Stop the child (politely, then SIGTERM/SIGKILL to its pid) and reap it."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
            except (OSError, ValueError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def __enter__(self) -> ChildServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    _args = json.loads(sys.argv[1])
    if _args.get("cpus") is not None:
        _args["cpus"] = tuple(_args["cpus"])
    _serve_child(ServeSpec(**_args))
