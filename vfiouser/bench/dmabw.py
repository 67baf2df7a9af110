"""DMA bandwidth: a device model reading and writing guest memory through the real QEMU.

Two modes, as QEMU offers them:

* **mmap** - guest RAM is a shared memfd (``QtestMachine(memfd=True)``): DMA_MAP
  carries the fd, the server maps it and ``dma.read``/``dma.write`` copy in place;
* **message** - QEMU's default RAM: no fd, so every transfer is DMA_READ /
  DMA_WRITE messages that QEMU answers (reads in 32 KiB pieces, see
  ``docs/design.md``).

Two engines serve the same model, one after the other in the same run: ours
(:class:`vfiouser.server.Server`) and libvfio-user (the C library through ctypes,
:class:`vfiouser.libvfio_user.server.LibvfioUserServer`; in mmap mode it copies
in place with ``vfu_sgl_read``/``vfu_sgl_write``, in message mode our requests go
over the socket it shares). Each mode runs ours, then libvfio-user, each with a
QEMU of its own. libvfio-user comes from ``$VFIOUSER_LIBVFIO_USER`` or the
cache (:func:`vfiouser.libvfio_user.find_library`); without it, or if it fails,
its entry says why (``unavailable``/``error``) and ours is measured all the same.
libvfio-user's C ``gpio-pci-idio-16`` sample does no DMA, so there is no C
reference for this section (:data:`C_REFERENCE`).

The server runs in this process, on a thread of its own, as ``vfiouser serve``
runs it; the transfers run on another thread, like a model's deferred work
(``dma.read`` may not run on the server loop). Both threads sit on the server's
CPU; QEMU on the harness CPU. Each size is transferred repeatedly; the figure is
the size divided by the median transfer time. The first transfer of each size
is checked against what qtest wrote (or reads back what was written), and each
mode checks that the model's memory is (mmap) or is not (message) reached in
place.

The results: ``{"mmap": rows, "message": rows}`` for ours (as before), with
``"libvfio-user": {"library": path, "mmap": rows, "message": rows}`` (or
``{"unavailable": why}``/``{"error": what}``) and ``"c_reference"`` next to them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

from ..testing.qemu import QtestMachine
from ..server import Server
from .device import BenchDevice
from .stats import Summary

__all__ = ["run", "SIZES", "MODES", "C_REFERENCE", "LibraryUnavailable", "libvfio_user_library"]

log = logging.getLogger(__name__)

#: ``(name, guest RAM is a shared memfd)``, in the order they run
MODES = (("mmap", True), ("message", False))
#: Why this section has no C figures.
C_REFERENCE = ("not available: libvfio-user's C gpio-pci-idio-16 sample does no DMA, so there is no C server "
               "to compare DMA with")

SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20)
SRC = 0x100_0000
DST = 0x200_0000


class DmaCheckFailed(RuntimeError):
    """A DMA transfer moved the wrong bytes, or went another way than the mode says."""


class LibraryUnavailable(RuntimeError):
    """libvfio-user cannot be measured here (the reason is the message)."""


def libvfio_user_library() -> str:
    """The ``libvfio-user.so.0`` to measure: :func:`vfiouser.libvfio_user.find_library`'s
    (``$VFIOUSER_LIBVFIO_USER``, else the cache); :class:`LibraryUnavailable` with the reason
    if there is none, or at once when ``$VFIOUSER_LIBVFIO_USER_ERROR`` says why
    ``scripts/bench`` could not build it."""
    if os.environ.get("VFIOUSER_LIBVFIO_USER_ERROR"):
        raise LibraryUnavailable(os.environ["VFIOUSER_LIBVFIO_USER_ERROR"])
    from ..libvfio_user import LibraryNotFound, find_library

    try:
        return find_library()
    except LibraryNotFound as exc:
        raise LibraryUnavailable(str(exc)) from None


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
                  cpus, backend: str = "vfiouser") -> dict:
    """Read and write ``size`` bytes repeatedly; check the data once each way, and that the
    transfers went in place exactly when guest RAM is shared (``memfd``)."""
    payload = os.urandom(size)
    vm.memwrite(SRC, payload)
    if _run_on(cpus, lambda: dev.dma.read(SRC, size)) != payload:
        raise DmaCheckFailed(f"DMA read of {size} bytes returned other bytes than the guest's")
    if dev.dma.in_place(SRC, size) != memfd or dev.dma.in_place(DST, size, write=True) != memfd:
        raise DmaCheckFailed(f"{backend}: {size}-byte transfers do {'not ' if memfd else ''}go in place "
                             f"with {'fd-backed' if memfd else 'message-only'} guest RAM")
    read = _run_on(cpus, lambda: _time_transfers(lambda: dev.dma.read(SRC, size), min_reps, min_seconds))
    back = payload[::-1]
    write = _run_on(cpus, lambda: _time_transfers(lambda: dev.dma.write(DST, back), min_reps, min_seconds))
    if vm.memread(DST, size) != back:
        raise DmaCheckFailed(f"DMA write of {size} bytes did not land in guest memory")
    row = {"size": size, "read": read.as_dict(), "write": write.as_dict(),
           "read_MBps": size / read.median, "write_MBps": size / write.median}
    log.info("DMA %-12s %-7s %8d B: read %8.1f MB/s, write %8.1f MB/s", backend, "mmap" if memfd else "message",
             size, row["read_MBps"], row["write_MBps"])
    return row


def _server(backend: str, dev: BenchDevice, path: str, library: str | None):
    if backend == "vfiouser":
        return Server(dev, path)
    from ..libvfio_user.server import LibvfioUserServer

    return LibvfioUserServer(dev, path, library=library)


def _mode(memfd: bool, sizes, min_reps: int, min_seconds: float, server_cpus, backend: str = "vfiouser",
          library: str | None = None) -> list[dict]:
    dev = BenchDevice()
    directory = tempfile.mkdtemp(prefix="vfu-dma-")
    path = os.path.join(directory, "dma.sock")
    server = _server(backend, dev, path, library)
    thread = _serve(server, server_cpus)
    rows = []
    try:
        with QtestMachine([server.qemu_device_json(addr="04.0")], memfd=memfd, memory="128M") as vm:
            vm.pci_cfg_write(4, 0x04, 0x0006, 2)  # memory decoding + bus master
            for size in sizes:
                rows.append(_measure_size(vm, dev, size, memfd, min_reps, min_seconds, server_cpus, backend))
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
    """MB/s (10^6 bytes per second) for each size, in both modes, ours and libvfio-user's
    (see the module docstring for the shape). A failure of libvfio-user's part is reported in
    its entry; one of ours ends the section, as before."""
    out: dict = {"c_reference": C_REFERENCE}
    try:
        library = libvfio_user_library()
        lvu: dict = {"library": library}
    except LibraryUnavailable as exc:
        log.warning("DMA through libvfio-user not measured: %s", exc)
        library, lvu = None, {"unavailable": str(exc)}
    for mode, memfd in MODES:
        out[mode] = _mode(memfd, sizes, min_reps, min_seconds, server_cpus)
        if library is None or "error" in lvu:
            continue
        try:
            lvu[mode] = _mode(memfd, sizes, min_reps, min_seconds, server_cpus, "libvfio-user", library)
        except Exception as exc:  # ours stands without it
            log.exception("DMA through libvfio-user, %s mode, failed", mode)
            lvu = {"library": library, "error": f"{type(exc).__name__}: {exc}"}
    out["libvfio-user"] = lvu
    return out
