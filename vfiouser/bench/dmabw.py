"""DMA bandwidth: a device model reading and writing guest memory through the real QEMU.

Two modes, as QEMU offers them:

* **mmap** - guest RAM is a shared memfd (``QtestMachine(memfd=True)``): DMA_MAP
  carries the fd, the server maps it and ``dma.read``/``dma.write`` copy in place;
* **message** - QEMU's default RAM: no fd, so every transfer is DMA_READ /
  DMA_WRITE messages that QEMU answers (reads in 32 KiB pieces, see
  ``docs/design.md``).

The server runs in this process, on a thread of its own, as ``vfiouser serve``
runs it; the transfers run on another thread, like a model's deferred work
(``dma.read`` may not run on the server loop). Both threads sit on the server's
CPU; QEMU on the harness CPU. Each size is transferred repeatedly; the figure is
the size divided by the median transfer time. The first transfer of each size
is checked against what qtest wrote (or reads back what was written).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

from ..qemu import QtestMachine
from ..server import Server
from .device import BenchDevice
from .stats import Summary

__all__ = ["run", "SIZES"]

log = logging.getLogger(__name__)

SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20)
SRC = 0x100_0000
DST = 0x200_0000


class DmaCheckFailed(RuntimeError):
    """A DMA transfer moved the wrong bytes."""


def _serve(server: Server, cpus) -> threading.Thread:
    def loop() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        server.serve_forever()

    thread = threading.Thread(target=loop, name="bench-dma-server", daemon=True)
    thread.start()
    return thread


def _run_on(cpus, fn):
    """Run ``fn()`` on a new thread pinned to ``cpus`` (like a device's worker); its result."""
    box: dict = {}

    def body() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=body, name="bench-dma-worker")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _time_transfers(fn, min_reps: int, min_seconds: float) -> Summary:
    samples = []
    start = time.perf_counter()
    while len(samples) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
        if len(samples) >= 2000:
            break
    return Summary.of_ns(samples)


def _measure_size(vm: QtestMachine, dev: BenchDevice, size: int, memfd: bool, min_reps: int, min_seconds: float,
                  cpus) -> dict:
    """Read and write ``size`` bytes repeatedly; check the data once each way."""
    payload = os.urandom(size)
    vm.memwrite(SRC, payload)
    if _run_on(cpus, lambda: dev.dma.read(SRC, size)) != payload:
        raise DmaCheckFailed(f"DMA read of {size} bytes returned other bytes than the guest's")
    read = _run_on(cpus, lambda: _time_transfers(lambda: dev.dma.read(SRC, size), min_reps, min_seconds))
    back = payload[::-1]
    write = _run_on(cpus, lambda: _time_transfers(lambda: dev.dma.write(DST, back), min_reps, min_seconds))
    if vm.memread(DST, size) != back:
        raise DmaCheckFailed(f"DMA write of {size} bytes did not land in guest memory")
    row = {"size": size, "read": read.as_dict(), "write": write.as_dict(),
           "read_MBps": size / read.median, "write_MBps": size / write.median}
    log.info("DMA %-7s %8d B: read %8.1f MB/s, write %8.1f MB/s", "mmap" if memfd else "message",
             size, row["read_MBps"], row["write_MBps"])
    return row


def _mode(memfd: bool, sizes, min_reps: int, min_seconds: float, server_cpus) -> list[dict]:
    dev = BenchDevice()
    directory = tempfile.mkdtemp(prefix="vfu-dma-")
    path = os.path.join(directory, "dma.sock")
    server = Server(dev, path)
    thread = _serve(server, server_cpus)
    rows = []
    try:
        with QtestMachine([server.qemu_device_json(addr="04.0")], memfd=memfd, memory="128M") as vm:
            vm.pci_cfg_write(4, 0x04, 0x0006, 2)  # memory decoding + bus master
            for size in sizes:
                rows.append(_measure_size(vm, dev, size, memfd, min_reps, min_seconds, server_cpus))
            maps = list(server.session.dma_maps) if server.session is not None else []
            fd_backed = any(r.mem is not None for r in maps)
            if fd_backed != memfd:
                raise DmaCheckFailed(f"expected {'fd-backed' if memfd else 'message-only'} guest RAM maps")
    finally:
        server.stop()
        thread.join(10)
        server.close()
        try:
            os.rmdir(directory)
        except OSError:
            pass
    return rows


def run(*, sizes=SIZES, min_reps: int = 5, min_seconds: float = 0.2, server_cpus=None) -> dict:
    """MB/s (10^6 bytes per second) for each size, in both modes."""
    return {"mmap": _mode(True, sizes, min_reps, min_seconds, server_cpus),
            "message": _mode(False, sizes, min_reps, min_seconds, server_cpus)}
