"""Trapped BAR access latency through the real QEMU, against QEMU's own ``pci-testdev``.

One QEMU (qtest accelerator, :class:`LeanQtest`) holds every device, so each
figure is taken from the same process under the same conditions:

======  =============================================================  ===========
slot    device                                                         key
======  =============================================================  ===========
05.0    ``pci-testdev,membar=4096,membar-backed=on`` (in QEMU)         ``floor``
04.0    bench device, Python server in its own process                 ``python``
06.0    the same, QEMU told ``x-no-posted-writes=on``                  ``nonposted``
07.0    the same, server does not advertise ``write_multiple``         ``nowm``
08.0    bench device with a shared (mmap-able) BAR2                    ``mmapdev``
09.0    bench device, server busy-polls 50 µs after each message       ``poll``
======  =============================================================  ===========

pci-testdev (hw/misc/pci-testdev.c): BAR0 is 4 KiB of MMIO and BAR1 256 bytes
of port I/O, both trapped into the device's C callbacks (1-byte accesses;
wider ones are split by QEMU's memory core, in process); with ``membar`` BAR2
is a 64-bit prefetchable BAR, plain RAM with ``membar-backed=on``. Accesses at
offset 0x10 do nothing (no test is started), which is what a floor should do.

Each case is measured on its device and on the floor in alternating blocks
(so drift and noise from other processes hit both alike), after a warm-up.
Posted writes return to the vCPU before the server has seen them: their
per-access figure is the issue cost, and each block ends with an untimed read
of the same device that waits for the server to catch up; the block's total
divided by its accesses is reported as the *sustained* cost.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace

from .child import ChildServer, ServeSpec
from .qtest import LeanQtest
from .stats import Summary

__all__ = ["LatencyRig", "Case", "latency_cases", "mmap_cases", "run_cases", "FLOOR_ID", "BENCH_ID"]

log = logging.getLogger(__name__)

FLOOR_ID = 0x0005_1B36  # pci-testdev: 1b36:0005
BENCH_ID = 0xBE4C_1234
MMIO_BASE = 0xE000_0000
IO_BASE = 0xC000
OFFSET = 0x10  # where cases access a BAR
#: what the ``poll`` server busy-polls, µs (the CLI's ``--poll-us``)
POLL_US = 50
DRAIN_OFFSET = 0x20

_READ = {1: "readb", 2: "readw", 4: "readl", 8: "readq"}
_WRITE = {1: "writeb", 2: "writew", 4: "writel", 8: "writeq"}
_IN = {1: "inb", 2: "inw", 4: "inl"}
_OUT = {1: "outb", 2: "outw", 4: "outl"}
_VALUE = 0x5A5A5A5A5A5A5A5A


@dataclass(frozen=True)
class Target:
    """One device in the rig."""

    key: str
    slot: int
    index: int  # picks its addresses
    label: str

    @property
    def mem(self) -> int:
        return MMIO_BASE + self.index * 0x10_0000

    @property
    def io(self) -> int:
        return IO_BASE + self.index * 0x100

    @property
    def shared(self) -> int:
        return self.mem + 0x1000

    @property
    def burst(self) -> int:
        return self.mem + 0x1_0000

    @property
    def block(self) -> int:
        """BAR4 of the bench device: its register file declared on the register layer."""
        return self.mem + 0x2_0000


TARGETS = {
    "floor": Target("floor", 5, 0, "pci-testdev (in QEMU)"),
    "python": Target("python", 4, 1, "Python server"),
    "nonposted": Target("nonposted", 6, 2, "Python server, x-no-posted-writes=on"),
    "nowm": Target("nowm", 7, 3, "Python server, write_multiple not advertised"),
    "mmapdev": Target("mmapdev", 8, 4, "Python server, device with an mmap-able BAR"),
    "poll": Target("poll", 9, 5, "Python server, busy-polling 50 µs (--poll-us 50)"),
}


@dataclass(frozen=True)
class Case:
    """One kind of access, measured on ``target`` and on the floor."""

    group: str
    op: str  # "read" / "write"
    size: int
    mode: str
    target: str
    space: str  # "mem", "io", "shared"
    posted: bool = False

    def command(self, target: Target) -> bytes:
        """The qtest command for this access on ``target``."""
        if self.space == "io":
            port = target.io + OFFSET
            text = f"{_IN[self.size]} {port:#x}" if self.op == "read" else \
                f"{_OUT[self.size]} {port:#x} {_VALUE & ((1 << 8 * self.size) - 1):#x}"
        else:
            addr = {"shared": target.shared, "block": target.block}.get(self.space, target.mem) + OFFSET
            text = f"{_READ[self.size]} {addr:#x}" if self.op == "read" else \
                f"{_WRITE[self.size]} {addr:#x} {_VALUE & ((1 << 8 * self.size) - 1):#x}"
        return text.encode() + b"\n"

    @property
    def name(self) -> str:
        return f"{self.group} {self.op} {self.size}B ({self.mode})"


def latency_cases() -> list[Case]:
    """The trapped cases: I/O and memory BARs, reads, posted and non-posted writes."""
    cases = [Case("I/O BAR", "read", s, "sync", "python", "io") for s in (1, 4)]
    cases += [Case("I/O BAR", "write", s, "sync", "python", "io") for s in (1, 4)]
    cases += [Case("memory BAR", "read", s, "sync", "python", "mem") for s in (1, 4, 8)]
    cases += [Case("memory BAR", "write", s, "posted", "python", "mem", posted=True) for s in (1, 4, 8)]
    cases += [Case("memory BAR", "write", s, "non-posted (x-no-posted-writes=on)", "nonposted", "mem")
              for s in (1, 4, 8)]
    cases += [Case("memory BAR", "read", 4, "sync, write_multiple not advertised", "nowm", "mem"),
              Case("memory BAR", "write", 4, "posted, write_multiple not advertised", "nowm", "mem", posted=True)]
    cases += [Case("register-layer BAR", "read", 4, "sync", "python", "block"),
              Case("register-layer BAR", "write", 4, "posted", "python", "block", posted=True)]
    cases += [Case("I/O BAR", "read", 4, f"sync, server busy-polls {POLL_US} µs", "poll", "io"),
              Case("memory BAR", "read", 4, f"sync, server busy-polls {POLL_US} µs", "poll", "mem"),
              Case("memory BAR", "write", 4, f"posted, server busy-polls {POLL_US} µs", "poll", "mem", posted=True)]
    return cases


def mmap_cases() -> list[Case]:
    """The mmap-able area (fast path) and the trapped writes of a device that has one."""
    cases = [Case("mmap area", "read", s, "mapped into the guest", "mmapdev", "shared") for s in (1, 4, 8)]
    cases += [Case("mmap area", "write", s, "mapped into the guest", "mmapdev", "shared") for s in (1, 4, 8)]
    cases += [Case("memory BAR", "write", 4, "posted (device without an mmap area)", "python", "mem", posted=True)]
    cases += [Case("memory BAR", "write", s, "non-posted (device has an mmap area)", "mmapdev", "mem")
              for s in (1, 4, 8)]
    cases += [Case("memory BAR", "read", 4, "sync (device has an mmap area)", "mmapdev", "mem")]
    return cases


class LatencyRig:
    """The QEMU and the bench servers of the module docstring; ``mmap``: add the mmap device."""

    def __init__(self, *, mmap: bool = True, server_cpus: tuple[int, ...] | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="vfu-lat-")
        self.server_cpus = server_cpus
        self.servers: dict[str, ChildServer] = {}
        self.vm: LeanQtest | None = None
        try:
            self._start(mmap)
        except BaseException:
            self.close()
            raise

    def _start(self, mmap: bool) -> None:
        specs = {
            "python": ServeSpec(os.path.join(self._dir, "python.sock")),
            "nonposted": ServeSpec(os.path.join(self._dir, "nonposted.sock")),
            "nowm": ServeSpec(os.path.join(self._dir, "nowm.sock"), write_multiple=False),
            "poll": ServeSpec(os.path.join(self._dir, "poll.sock"), poll_us=POLL_US),
        }
        if mmap:
            specs["mmapdev"] = ServeSpec(os.path.join(self._dir, "mmapdev.sock"), mmap=True)
        for key, spec in specs.items():
            self.servers[key] = ChildServer(replace(spec, cpus=self.server_cpus))
        floor = TARGETS["floor"]
        devices = [f"pci-testdev,addr={floor.slot:02x}.0,membar=4096,membar-backed=on"]
        for key, server in self.servers.items():
            extra = {"addr": f"{TARGETS[key].slot:02x}.0"}
            if key == "nonposted":
                extra["x-no-posted-writes"] = True
            devices.append(server.qemu_device_json(**extra))
        self.vm = LeanQtest(devices)
        self._program(floor, FLOOR_ID, membar64=True)
        for key in self.servers:
            self._program(TARGETS[key], BENCH_ID, membar64=False)
        self._check()

    def _program(self, target: Target, expect_id: int, membar64: bool) -> None:
        """What firmware does: place the BARs, enable I/O and memory decoding and bus mastering."""
        vm = self.vm
        got = vm.vendor_device(target.slot)
        if got != expect_id:
            raise RuntimeError(f"slot {target.slot:#x}: found {got:#010x}, expected {expect_id:#010x}")
        vm.cfg_write(target.slot, 0x10, target.mem)
        vm.cfg_write(target.slot, 0x14, target.io)
        vm.cfg_write(target.slot, 0x18, target.shared)
        vm.cfg_write(target.slot, 0x1C, 0 if membar64 else target.burst)
        if not membar64:
            vm.cfg_write(target.slot, 0x20, target.block)
        vm.cfg_write(target.slot, 0x04, 0x0007, 2)

    def _check(self) -> None:
        """Every bench device answers through each BAR (a write read back)."""
        vm = self.vm
        for key in self.servers:
            t = TARGETS[key]
            vm.cmd(f"writel {t.mem + 0x40:#x} 0x{t.slot:02x}c0ffee")
            vm.cmd(f"outl {t.io + 0x40:#x} 0x{t.slot:02x}beef")
            if vm.value(f"readl {t.mem + 0x40:#x}") != (t.slot << 24 | 0xC0FFEE):
                raise RuntimeError(f"{t.label}: BAR0 does not read back")
            if vm.value(f"inl {t.io + 0x40:#x}") != (t.slot << 16 | 0xBEEF):
                raise RuntimeError(f"{t.label}: BAR1 does not read back")

    def has(self, key: str) -> bool:
        return key == "floor" or key in self.servers

    def drain(self, target: Target) -> None:
        """An untimed read of ``target``: returns once the server has handled all before it."""
        if target.key != "floor":
            self.vm.cmd(f"readl {target.mem + DRAIN_OFFSET:#x}")

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        try:
            for name in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, name))
            os.rmdir(self._dir)
        except OSError:
            pass

    def __enter__(self) -> LatencyRig:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _measure(rig: LatencyRig, case: Case, target: Target, count: int) -> tuple[list[int], int]:
    """``count`` timed accesses of ``case`` on ``target``; returns the samples and the block's
    duration including the drain (for posted writes)."""
    line = case.command(target)
    t0 = time.perf_counter_ns()
    samples = rig.vm.sample(line, count)
    if case.posted:
        rig.drain(target)
    return samples, time.perf_counter_ns() - t0


def run_case(rig: LatencyRig, case: Case, *, iterations: int, rounds: int, warmup: int) -> dict:
    """One case on its device and on the floor, interleaved in ``rounds`` blocks."""
    targets = [TARGETS[case.target], TARGETS["floor"]]
    samples: dict[str, list[int]] = {t.key: [] for t in targets}
    block_ns = {t.key: 0 for t in targets}
    for t in targets:
        _measure(rig, case, t, warmup)
    per_round = max(1, iterations // rounds)
    for _ in range(rounds):
        for t in targets:
            got, total = _measure(rig, case, t, per_round)
            samples[t.key] += got
            block_ns[t.key] += total
    ours, floor = Summary.of_ns(samples[case.target]), Summary.of_ns(samples["floor"])
    row = {
        "group": case.group, "op": case.op, "size": case.size, "mode": case.mode, "target": case.target,
        "target_label": TARGETS[case.target].label, "ours": ours.as_dict(), "floor": floor.as_dict(),
        "ratio": ours.median / floor.median,
    }
    if case.posted:
        row["sustained_us"] = block_ns[case.target] / len(samples[case.target]) / 1000.0
    log.info("%-62s floor %6.1f us  ours %6.1f us  x%.2f", case.name, floor.median, ours.median, row["ratio"])
    return row


def run_cases(rig: LatencyRig, cases: list[Case], *, iterations: int, rounds: int, warmup: int) -> list[dict]:
    """Every case whose device the rig has."""
    return [run_case(rig, c, iterations=iterations, rounds=rounds, warmup=warmup)
            for c in cases if rig.has(c.target)]


def posted_penalty(rows: list[dict]) -> dict | None:
    """The 4-byte trapped write with posted writes (no mmap area) and without (mmap area)."""
    posted = next((r for r in rows if r["target"] == "python" and r["op"] == "write" and r["size"] == 4
                   and "sustained_us" in r), None)
    lost = next((r for r in rows if r["target"] == "mmapdev" and r["op"] == "write" and r["size"] == 4
                 and r["group"] == "memory BAR"), None)
    if posted is None or lost is None:
        return None
    return {"posted_us": posted["ours"]["median"], "posted_sustained_us": posted["sustained_us"],
            "nonposted_us": lost["ours"]["median"]}


def qtest_round_trip(rig: LatencyRig, *, iterations: int, warmup: int) -> dict:
    """A 4-byte read of guest RAM: the qtest round trip with no device at all."""
    line = b"readl 0x100000\n"
    rig.vm.sample(line, warmup)
    return Summary.of_ns(rig.vm.sample(line, iterations)).as_dict()


def verify_mmap_fast_path(rig: LatencyRig) -> dict:
    """Whether mmap-area accesses stayed away from the server (region access counters)."""
    server = rig.servers.get("mmapdev")
    if server is None:
        return {"checked": False}
    target = TARGETS["mmapdev"]
    server.reset()
    vm = rig.vm
    vm.cmd(f"writel {target.shared + 0x80:#x} 0x12345678")
    value = vm.value(f"readl {target.shared + 0x80:#x}")
    for _ in range(100):
        vm.cmd(f"readq {target.shared:#x}")
    stats = server.stats()
    return {"checked": True, "readback_ok": value == 0x12345678,
            "messages_for_shared_bar": stats["region_accesses"][2]}


def threaded_harness(*, iterations: int, warmup: int, server_cpus=None) -> dict:
    """The 4-byte memory read on the floor and on the Python server, timed through
    :class:`vfiouser.testing.qemu.QtestMachine` (reader thread, qtest log on) as the test-suite drives
    QEMU, to show what such a harness does to the ratio."""
    from ..testing.qemu import QtestMachine

    directory = tempfile.mkdtemp(prefix="vfu-thr-")
    try:
        with ChildServer(ServeSpec(os.path.join(directory, "t.sock"), cpus=server_cpus)) as server:
            floor, ours = TARGETS["floor"], TARGETS["python"]
            devices = [f"pci-testdev,addr={floor.slot:02x}.0", server.qemu_device_json(addr=f"{ours.slot:02x}.0")]
            with QtestMachine(devices) as vm:
                for t in (floor, ours):
                    vm.pci_cfg_write(t.slot, 0x10, t.mem)
                    vm.pci_cfg_write(t.slot, 0x04, 0x0002, 2)
                samples: dict[str, list[int]] = {"floor": [], "python": []}
                clock = time.perf_counter_ns
                for rnd in range(4):
                    for t in (floor, ours):
                        addr = t.mem + OFFSET
                        n = warmup if rnd == 0 else iterations // 3
                        got = []
                        for _ in range(n):
                            t0 = clock()
                            vm.readl(addr)
                            got.append(clock() - t0)
                        if rnd:
                            samples[t.key] += got
    finally:
        try:
            os.rmdir(directory)
        except OSError:
            pass
    f, o = Summary.of_ns(samples["floor"]), Summary.of_ns(samples["python"])
    log.info("QtestMachine harness: floor %.1f us, ours %.1f us, x%.2f", f.median, o.median, o.median / f.median)
    return {"floor": f.as_dict(), "ours": o.as_dict(), "ratio": o.median / f.median}


def unpinned_round_trip(*, iterations: int, warmup: int) -> dict:
    """The qtest round trip (4-byte read of guest RAM) with the scheduler placing the client and a fresh QEMU;
    the caller makes sure this thread is not pinned."""
    with LeanQtest() as vm:
        line = b"readl 0x100000\n"
        vm.sample(line, warmup)
        summary = Summary.of_ns(vm.sample(line, iterations))
    log.info("unpinned qtest round trip: p10 %.1f us, median %.1f us, p90 %.1f us", summary.p10, summary.median,
             summary.p90)
    return summary.as_dict()
