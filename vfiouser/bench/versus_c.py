"""Side by side with C: our idio16, on both engines, against libvfio-user's ``gpio-pci-idio-16`` sample.

Servers of the same card (vendor 0x494F, device 0x0DC8, a 256-byte I/O BAR2
whose offset 1 reads inputs and offset 0 takes outputs), each in its own
process, started the way a user starts them:

==========  ===============================================================  =============
key         server                                                           command
==========  ===============================================================  =============
``ours``    our idio16, default settings                                     ``vfiouser serve idio16 --socket S``
``lvu``     our idio16 served through libvfio-user (the C library through    ``... --backend libvfio-user``
            ctypes, :mod:`vfiouser.libvfio_user`), ``$VFIOUSER_LIBVFIO_USER``
            set to the library the C sample was built with (the
            sample is ``build/samples/`` next to its ``build/lib/``)
``poll``    our idio16, busy-polling 50 µs after each message                ``... --poll-us 50``
``c``       libvfio-user's sample (C, release build, :func:`find_sample`)    ``gpio-pci-idio-16 S``
``loop``    a minimal Python loop (:mod:`vfiouser.bench.minimal`)            ``python -m vfiouser.bench.minimal S``
==========  ===============================================================  =============

The C sample is the reference every figure is compared with. ``c`` and ``lvu``
need libvfio-user (:func:`find_built_library`); when it cannot be found, built or
started, the section says so (``sample``/``library`` of the results, or
``missing`` of a part, with the reason) and measures the others.

**Trapped I/O through QEMU** (:func:`trapped`): one QEMU under qtest
(:class:`~vfiouser.bench.qtest.LeanQtest`, as the latency section) holds
QEMU's own ``pci-testdev`` (the floor: its I/O BAR1, handled in QEMU's process)
and the ``ours``, ``lvu``, ``poll`` and ``c`` servers. Each case (1-, 2- and 4-byte
``in``/``out`` on BAR2) is measured on every device in alternating blocks after
a warm-up, so drift and noise hit all alike; I/O writes are not posted (QEMU
waits for the reply of each).

**Without QEMU** (:func:`wire`): for ``ours``, ``lvu``, ``c`` and ``loop``, a
:class:`~vfiouser.client.Client` negotiates and does ``bring_up()``, then its
socket is used raw and blocking: *ping-pong* sends one 1-byte REGION_READ of
BAR2 offset 1 at a time; *pipelined* keeps two batches of 256 in flight. Each
server's CPU time (``utime + stime`` of its process, from ``/proc/PID/stat``,
every thread) is read just before and just after the timed run; a run lasts
until the server has used ``min_ticks`` clock ticks (or ``max_s`` seconds have
passed), so the tick granularity (±1 tick on the difference) is stated with
every figure.

Both parts run under each server placement of the bench (server on its own
CPU, server sharing the harness's, i.e. QEMU's and the client's, CPU).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from .qtest import LeanQtest
from .stats import Summary

__all__ = ["SampleUnavailable", "ServerProcess", "TrappedRig", "CpuBudget", "IoCase", "CASES", "POLL_US", "TICK_HZ",
           "LABELS", "OPTIONAL", "find_built_library", "find_sample", "sample_next_to",
           "cpu_ticks", "stat_ticks", "trapped", "ping_pong", "pipelined", "wire", "run"]

log = logging.getLogger(__name__)

#: What the ``poll`` server busy-polls, µs.
POLL_US = 50
TICK_HZ = os.sysconf("SC_CLK_TCK")
SAMPLE = "gpio-pci-idio-16"
IDIO16_ID = 0x0DC8_494F
FLOOR_ID = 0x0005_1B36  # pci-testdev
FLOOR_OFFSET = 0x10  # pci-testdev's I/O BAR: nothing happens there
WRITE_VALUE = 0x5A5A5A5A

LABELS = {
    "floor": "pci-testdev (in QEMU)",
    "ours": "ours (`vfiouser serve idio16`)",
    "lvu": "ours through libvfio-user (`--backend libvfio-user`)",
    "poll": f"ours, `--poll-us {POLL_US}`",
    "c": "C (libvfio-user `gpio-pci-idio-16`)",
    "loop": "minimal Python loop",
}


#: The servers that need libvfio-user: what each is called when it cannot be measured.
OPTIONAL = {"c": "the C sample", "lvu": "our idio16 through libvfio-user"}


class SampleUnavailable(RuntimeError):
    """libvfio-user (its library or its sample) could not be found, built or started."""


# -- the C sample ------------------------------------------------------------------------


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:] if line.strip())


def find_built_library(root: str, env: dict | None = None, *, timeout: float = 1800.0) -> str:
    """The path of the ``libvfio-user.so.0`` that was built with its samples: the one
    ``$VFIOUSER_LIBVFIO_USER`` names (``scripts/bench`` sets it), else built by running
    ``scripts/get-libvfio-user`` (``root``: the source tree). :class:`SampleUnavailable` with
    the reason otherwise, or at once when ``$VFIOUSER_LIBVFIO_USER_ERROR`` says why
    ``scripts/bench`` could not build it."""
    env = os.environ if env is None else env
    if env.get("VFIOUSER_LIBVFIO_USER_ERROR"):  # scripts/bench tried and failed
        raise SampleUnavailable(env["VFIOUSER_LIBVFIO_USER_ERROR"])
    lib = env.get("VFIOUSER_LIBVFIO_USER")
    if not lib:
        script = os.path.join(root, "scripts", "get-libvfio-user")
        if not os.access(script, os.X_OK):
            raise SampleUnavailable(f"$VFIOUSER_LIBVFIO_USER is not set and {script} does not exist")
        log.info("building libvfio-user and its sample (scripts/get-libvfio-user)")
        try:
            done = subprocess.run([script, "--print-path"], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            raise SampleUnavailable(f"scripts/get-libvfio-user could not run: {exc}") from exc
        if done.returncode != 0 or not done.stdout.strip():
            raise SampleUnavailable(f"scripts/get-libvfio-user failed (exit status {done.returncode}): "
                                    f"{_tail(done.stderr) or 'no output'}")
        lib = done.stdout.strip().splitlines()[-1]
    if not os.path.isfile(lib):
        raise SampleUnavailable(f"no libvfio-user library at {lib}")
    return lib


def sample_next_to(lib: str) -> str:
    """The ``gpio-pci-idio-16`` sample built with the library ``lib`` (``build/lib/X`` ->
    ``build/samples/gpio-pci-idio-16``); :class:`SampleUnavailable` if it is not there."""
    sample = os.path.normpath(os.path.join(os.path.dirname(lib), "..", "samples", SAMPLE))
    if not os.access(sample, os.X_OK):
        raise SampleUnavailable(f"no executable {SAMPLE} sample at {sample} (library: {lib})")
    return sample


def find_sample(root: str, env: dict | None = None, *, timeout: float = 1800.0) -> str:
    """The path of libvfio-user's ``gpio-pci-idio-16`` sample, next to the library
    :func:`find_built_library` finds (same arguments); :class:`SampleUnavailable` with the
    reason otherwise."""
    return sample_next_to(find_built_library(root, env, timeout=timeout))


# -- servers in processes --------------------------------------------------------------------


def stat_ticks(text: str) -> int:
    """``utime + stime`` (fields 14 and 15) of a ``/proc/PID/stat`` line."""
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state); comm may hold spaces and ")"
    return int(fields[11]) + int(fields[12])


def cpu_ticks(pid: int) -> int:
    """``utime + stime`` of process ``pid`` (all its threads), in clock ticks (``TICK_HZ`` a second)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return stat_ticks(f.read())


def pin_process(pid: int, cpus) -> None:
    """Move every thread of process ``pid`` to ``cpus``."""
    cpus = set(cpus)
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        tids = [str(pid)]
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):  # a thread that just ended
            pass


def _listening(path: str) -> bool:
    """Whether a UNIX socket bound at ``path`` listens (``/proc/net/unix``; no connection made,
    which the C sample would take as its client)."""
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:  # __SO_ACCEPTCON
                    return True
    except OSError:
        return os.path.exists(path)
    return False


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


class ServerProcess:
    """A server started from its command line; ready once its socket listens. Output goes to
    ``log_path``; ``env`` is added to this process's environment."""

    def __init__(self, key: str, argv: list[str], path: str, *, timeout: float = 30.0,
                 env: dict[str, str] | None = None) -> None:
        self.key = key
        self.argv = argv
        self.path = path
        self.log_path = path + ".log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=_child_env(env))
        deadline = time.monotonic() + timeout
        while not _listening(path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{LABELS.get(key, key)} exited with status {self.proc.returncode} before "
                                   f"listening: {_tail(self.output()) or 'no output'}")
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{LABELS.get(key, key)} did not listen on {path} within {timeout:g} s")
            time.sleep(0.02)

    @classmethod
    def start(cls, key: str, directory: str, sample: str | None = None, library: str | None = None) -> ServerProcess:
        """The server ``key`` of the module docstring, on a socket in ``directory``; ``c`` needs
        the ``sample``'s path, ``lvu`` the ``library``'s."""
        path = os.path.join(directory, f"{key}.sock")
        env = None
        if key == "ours":
            argv = [sys.executable, "-m", "vfiouser", "serve", "idio16", "--socket", path]
        elif key == "lvu":
            if library is None:
                raise SampleUnavailable("no libvfio-user library")
            argv = [sys.executable, "-m", "vfiouser", "serve", "idio16", "--socket", path, "--backend", "libvfio-user"]
            env = {"VFIOUSER_LIBVFIO_USER": library}
        elif key == "poll":
            argv = [sys.executable, "-m", "vfiouser", "serve", "idio16", "--socket", path, "--poll-us", str(POLL_US)]
        elif key == "c":
            if sample is None:
                raise SampleUnavailable("no C sample")
            argv = [sample, path]
        elif key == "loop":
            argv = [sys.executable, "-m", "vfiouser.bench.minimal", path]
        else:
            raise ValueError(f"unknown server {key!r}")
        return cls(key, argv, path, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def device_json(self, **extra) -> str:
        import json

        spec = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": self.path}, **extra}
        return json.dumps(spec, separators=(",", ":"))

    def pin(self, cpus) -> None:
        if cpus is not None:
            pin_process(self.pid, cpus)

    def cpu_ticks(self) -> int:
        return cpu_ticks(self.pid)

    def output(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for name in (self.path, self.log_path):
            try:
                os.unlink(name)
            except OSError:
                pass


class _Servers:
    """The servers of one part, started together, closed together. A server of
    :data:`OPTIONAL` that cannot start is left out, the reason in ``missing``; one whose
    ``sample``/``library`` is ``None`` is left out quietly (the section says why once)."""

    def __init__(self, keys, sample: str | None, library: str | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="vfu-vsc-")
        self.servers: dict[str, ServerProcess] = {}
        self.missing: dict[str, str] = {}
        try:
            for key in keys:
                if (key == "c" and sample is None) or (key == "lvu" and library is None):
                    continue
                try:
                    self.servers[key] = ServerProcess.start(key, self.dir, sample, library)
                except (RuntimeError, OSError) as exc:
                    if key not in OPTIONAL:
                        raise
                    log.warning("%s did not start: %s", OPTIONAL[key], exc)
                    self.missing[key] = f"{OPTIONAL[key]} did not start: {exc}"
        except BaseException:
            self.close()
            raise

    def drop(self, key: str, why: str) -> None:
        """Leave server ``key`` out of the part, for the reason ``why``."""
        log.warning("%s: %s; measuring without it", OPTIONAL.get(key, key), why)
        self.missing[key] = why
        self.servers.pop(key).close()

    def pin(self, cpus) -> None:
        for server in self.servers.values():
            server.pin(cpus)

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> _Servers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- trapped I/O through QEMU --------------------------------------------------------------


@dataclass(frozen=True)
class IoCase:
    """One port access on BAR2 of the idio16s (at ``offset``) and on the floor's I/O BAR."""

    op: str  # "read" / "write"
    size: int
    offset: int

    def command(self, port: int) -> bytes:
        if self.op == "read":
            text = f"{_IN[self.size]} {port:#x}"
        else:
            text = f"{_OUT[self.size]} {port:#x} {WRITE_VALUE & ((1 << 8 * self.size) - 1):#x}"
        return text.encode() + b"\n"

    @property
    def name(self) -> str:
        return f"I/O {self.op} {self.size} B"


_IN = {1: "inb", 2: "inw", 4: "inl"}
_OUT = {1: "outb", 2: "outw", 4: "outl"}

#: 1-byte reads at offset 1 (inputs 0-7), 1-byte writes at offset 0 (outputs 0-7); wider
#: accesses at offset 4 (outputs and inputs 8-15, status: no side effect), aligned as QEMU
#: requires of port I/O to a vfio region.
CASES = [IoCase("read", 1, 1), IoCase("read", 2, 4), IoCase("read", 4, 4),
         IoCase("write", 1, 0), IoCase("write", 2, 4), IoCase("write", 4, 4)]

#: PCI slot and I/O base of each device in the rig
SLOTS = {"floor": (5, 0xC000), "ours": (4, 0xC100), "poll": (6, 0xC200), "c": (7, 0xC300), "lvu": (8, 0xC400)}


class TrappedRig:
    """One QEMU (qtest) with the floor and the ``servers`` (keys ``ours``, ``lvu``, ``poll``, ``c``)."""

    def __init__(self, servers: dict[str, ServerProcess]) -> None:
        self.servers = servers
        devices = [f"pci-testdev,addr={SLOTS['floor'][0]:02x}.0"]
        devices += [s.device_json(addr=f"{SLOTS[k][0]:02x}.0") for k, s in servers.items()]
        self.vm = LeanQtest(devices)
        try:
            self._program()
            self._check()
        except BaseException:
            self.vm.close()
            raise

    @property
    def keys(self) -> list[str]:
        return ["floor", *self.servers]

    def _program(self) -> None:
        """What firmware does: place the I/O BAR, turn I/O decoding on."""
        vm = self.vm
        for key in self.keys:
            slot, io = SLOTS[key]
            want = FLOOR_ID if key == "floor" else IDIO16_ID
            got = vm.vendor_device(slot)
            if got != want:
                raise RuntimeError(f"slot {slot:#x} ({LABELS[key]}): found {got:#010x}, expected {want:#010x}")
            vm.cfg_write(slot, 0x14 if key == "floor" else 0x18, io)
            vm.cfg_write(slot, 0x04, 0x0001, 2)

    def _check(self) -> None:
        """Each server answers through BAR2: ours (either engine) reads back its outputs; the C sample counts
        writes to offset 0 per pin and reads bit n of offset 1 as "pin n's count is a multiple
        of 3", so three writes of 1 must change bit 0 of offset 1."""
        vm = self.vm
        for key in self.servers:
            io = SLOTS[key][1]
            if key == "c":
                seen = set()
                for _ in range(3):
                    seen.add(vm.value(f"inb {io + 1:#x}") & 1)
                    vm.cmd(f"outb {io:#x} 0x1")
                if len(seen) != 2:
                    raise RuntimeError("the C sample's BAR2 does not answer through QEMU (offset 1 did not change)")
            else:
                vm.cmd(f"outb {io:#x} 0x5a")
                if vm.value(f"inb {io:#x}") != 0x5A:
                    raise RuntimeError(f"{LABELS[key]}: BAR2 offset 0 does not read back through QEMU")

    def line(self, case: IoCase, key: str) -> bytes:
        io = SLOTS[key][1]
        return case.command(io + (FLOOR_OFFSET if key == "floor" else case.offset))

    def close(self) -> None:
        self.vm.close()


def _alternating(vm: LeanQtest, lines: dict[str, bytes], *, iterations: int, rounds: int,
                 warmup: int) -> dict[str, list[int]]:
    """Samples (ns) of each command in ``lines``, measured in alternating blocks after a warm-up."""
    for line in lines.values():
        vm.sample(line, warmup)
    samples: dict[str, list[int]] = {k: [] for k in lines}
    per_round = max(1, iterations // rounds)
    for _ in range(rounds):
        for key, line in lines.items():
            samples[key] += vm.sample(line, per_round)
    return samples


def trapped(rig: TrappedRig, *, iterations: int, rounds: int, warmup: int) -> list[dict]:
    """Every case on every device of ``rig``: one row per case."""
    rows = []
    for case in CASES:
        lines = {key: rig.line(case, key) for key in rig.keys}
        samples = _alternating(rig.vm, lines, iterations=iterations, rounds=rounds, warmup=warmup)
        row = {"op": case.op, "size": case.size, "offset": case.offset}
        for key, got in samples.items():
            row[key] = Summary.of_ns(got).as_dict()
        rows.append(row)
        log.info("%-14s %s", case.name, "  ".join(f"{k} {row[k]['median']:6.1f}" for k in samples))
    return rows


# -- ping-pong and pipelined, with CPU time ------------------------------------------------


def _connect_raw(path: str):
    """A Client that negotiated and did ``bring_up()``; its socket, blocking, for raw use."""
    from ..client import Client

    client = Client.connect(path)
    try:
        client.bring_up()
    except BaseException:
        client.close()
        raise
    sock = client.transport.sock
    sock.setblocking(True)
    sock.settimeout(10.0)
    return client, sock


def _read_msg(msg_id: int) -> bytes:
    from .wire import region_read_msg

    return region_read_msg(msg_id, region=2, offset=1, count=1)


REPLY_SIZE = 33  # header, region access, 1 byte


def _check_reply(reply, what: str) -> None:
    from ..protocol import HEADER, HEADER_SIZE, REGION_ACCESS, Command, MsgType

    _, cmd, size, flags, error_no = HEADER.unpack_from(reply)
    access = REGION_ACCESS.unpack_from(reply, HEADER_SIZE)
    if (cmd, size, flags, error_no, access) != (Command.REGION_READ, REPLY_SIZE, MsgType.REPLY, 0, (1, 2, 1)):
        raise RuntimeError(f"{what}: unexpected reply {bytes(reply[:REPLY_SIZE]).hex()}")


@dataclass(frozen=True)
class CpuBudget:
    """How long a CPU-timed run lasts: at least ``min_messages``, then until the server used
    ``min_ticks`` clock ticks or ``max_s`` seconds passed."""

    min_messages: int
    min_ticks: int
    max_s: float


def _cpu_figures(messages: int, ticks: int, wall_s: float) -> dict:
    return {"messages": messages, "cpu_ticks": ticks, "wall_s": wall_s,
            "cpu_us_per_msg": ticks / TICK_HZ / messages * 1e6 if messages else None,
            "cpu_share": ticks / TICK_HZ / wall_s if wall_s else None}


def ping_pong(server: ServerProcess, budget: CpuBudget, warmup: int = 1000, chunk: int = 1000) -> dict:
    """One 1-byte REGION_READ of BAR2 at a time, raw blocking socket: latency and server CPU time."""
    client, sock = _connect_raw(server.path)
    try:
        msg = _read_msg(7)
        buf = bytearray(REPLY_SIZE)
        view = memoryview(buf)
        send, recv_into, clock = sock.send, sock.recv_into, time.perf_counter_ns
        size = REPLY_SIZE

        def block(n: int, out: list | None) -> None:
            for _ in range(n):
                t0 = clock()
                send(msg)
                got = recv_into(view)
                while got < size:
                    got += recv_into(view[got:])
                if out is not None:
                    out.append(clock() - t0)

        block(max(1, warmup), None)
        _check_reply(buf, LABELS[server.key])
        samples: list[int] = []
        pid = server.pid
        ticks0, t0 = cpu_ticks(pid), time.monotonic()
        while True:
            block(chunk, samples)
            ticks = cpu_ticks(pid) - ticks0
            if len(samples) >= budget.min_messages and (ticks >= budget.min_ticks
                                                         or time.monotonic() - t0 >= budget.max_s):
                break
        wall = time.monotonic() - t0
        ticks = cpu_ticks(pid) - ticks0
        _check_reply(buf, LABELS[server.key])
    finally:
        client.close()
    return {**Summary.of_ns(samples).as_dict(), **_cpu_figures(len(samples), ticks, wall)}


def pipelined(server: ServerProcess, budget: CpuBudget, batch: int = 256, chunk: int = 32) -> dict:
    """Two batches of ``batch`` 1-byte REGION_READs of BAR2 in flight: rate and server CPU time."""
    client, sock = _connect_raw(server.path)
    try:
        from .wire import _recv_exact

        burst = b"".join(_read_msg(i) for i in range(batch))
        reply_bytes = REPLY_SIZE * batch
        buf = bytearray(reply_bytes)
        sock.sendall(burst)  # warm-up
        _recv_exact(sock, reply_bytes, buf)
        pid = server.pid
        ticks0, t0 = cpu_ticks(pid), time.perf_counter()
        sock.sendall(burst)
        batches = 0
        while True:
            for _ in range(chunk):
                sock.sendall(burst)
                _recv_exact(sock, reply_bytes, buf)
                batches += 1
            ticks = cpu_ticks(pid) - ticks0
            if batches * batch >= budget.min_messages and (ticks >= budget.min_ticks
                                                           or time.perf_counter() - t0 >= budget.max_s):
                break
        _recv_exact(sock, reply_bytes, buf)  # the batch still in flight
        batches += 1
        wall = time.perf_counter() - t0
        ticks = cpu_ticks(pid) - ticks0
        _check_reply(buf[-REPLY_SIZE:], LABELS[server.key])
    finally:
        client.close()
    messages = batches * batch
    return {"rate": messages / wall, "batch": batch, **_cpu_figures(messages, ticks, wall)}


def wire(servers: dict[str, ServerProcess], *, pingpong: CpuBudget, pipeline: CpuBudget) -> dict:
    """Ping-pong and pipelined figures of each server (one after the other)."""
    out = {}
    for key, server in servers.items():
        pp = ping_pong(server, pingpong)
        pl = pipelined(server, pipeline)
        out[key] = {"ping_pong": pp, "pipelined": pl}
        log.info("%-5s ping-pong %5.1f us, CPU %5.2f us/msg (%d ticks); pipelined %8.0f/s, CPU %5.2f us/msg "
                 "(%d ticks)", key, pp["median"], pp["cpu_us_per_msg"], pp["cpu_ticks"], pl["rate"],
                 pl["cpu_us_per_msg"], pl["cpu_ticks"])
    return out


# -- the section -------------------------------------------------------------------------------


def _part(fn):
    """``fn()``, or what went wrong as a result entry (a part's failure never ends the section)."""
    from . import _unavailable_reason

    try:
        return fn()
    except Exception as exc:
        reason = _unavailable_reason(exc)
        if reason is not None:
            log.warning("not available: %s", reason)
            return {"unavailable": reason}
        log.exception("part of the versus-c section failed")
        return {"error": f"{type(exc).__name__}: {exc}"}


def _trapped_rig(servers: _Servers) -> TrappedRig:
    """A rig with every server QEMU can use: if QEMU fails with all of them, each optional
    server is tried alone next to ours, and those QEMU cannot use are left out (with the reason)."""
    try:
        return TrappedRig(servers.servers)
    except Exception as exc:
        optional = [k for k in servers.servers if k in OPTIONAL]
        if not optional:
            raise
        log.warning("QEMU failed with all the servers (%s); trying %s one by one", exc,
                    ", ".join(OPTIONAL[k] for k in optional))
    required = {k: s for k, s in servers.servers.items() if k not in OPTIONAL}
    for key in optional:
        try:
            TrappedRig({**required, key: servers.servers[key]}).close()
        except Exception as exc:
            servers.drop(key, f"QEMU could not use {OPTIONAL[key]}: {exc}")
    return TrappedRig(servers.servers)


def run(*, root: str, passes: list[tuple[str, tuple[int, ...] | None]], iterations: int, rounds: int,
        warmup: int, pingpong: CpuBudget, pipeline: CpuBudget) -> dict:
    """The whole section (see the module docstring); ``passes``: ``(label, server CPUs)``."""
    started = time.monotonic()
    result: dict = {"tick_hz": TICK_HZ, "iterations": iterations, "rounds": rounds, "poll_us": POLL_US,
                    "budget": {"ping_pong": vars(pingpong), "pipelined": vars(pipeline)}}
    sample = library = None
    try:
        library = find_built_library(root)
        result["library"] = {"path": library}
    except SampleUnavailable as exc:
        log.warning("libvfio-user is not available: %s", exc)
        result["library"] = {"path": None, "unavailable": str(exc)}
        result["sample"] = {"path": None, "unavailable": str(exc)}
    if library is not None:
        try:
            sample = sample_next_to(library)
            result["sample"] = {"path": sample}
        except SampleUnavailable as exc:
            log.warning("the C sample is not available: %s", exc)
            result["sample"] = {"path": None, "unavailable": str(exc)}

    def trapped_part() -> dict:
        with _Servers(["ours", "lvu", "poll", "c"], sample, library) as servers:
            part: dict = {"passes": [], "missing": servers.missing}
            rig = _trapped_rig(servers)
            try:
                for label, cpus in passes:
                    servers.pin(cpus)
                    log.info("versus C, trapped I/O, %s", label)
                    part["passes"].append({"label": label, "rows": trapped(rig, iterations=iterations, rounds=rounds,
                                                                           warmup=warmup)})
            finally:
                rig.close()
            return part

    def wire_part() -> dict:
        with _Servers(["ours", "lvu", "c", "loop"], sample, library) as servers:
            part = {"passes": [], "missing": servers.missing}
            for label, cpus in passes:
                servers.pin(cpus)
                log.info("versus C, ping-pong and pipelined, %s", label)
                part["passes"].append({"label": label, "servers": wire(servers.servers, pingpong=pingpong,
                                                                       pipeline=pipeline)})
            return part

    result["trapped"] = _part(trapped_part)
    result["wire"] = _part(wire_part)
    result["duration_s"] = time.monotonic() - started
    log.info("versus C: %.0f s", result["duration_s"])
    return result
