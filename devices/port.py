"""The device port: the whole contract between a device model and the backend that serves it.

A *backend* speaks a protocol to a client: the vfio-user server of
:mod:`vfiouser.server`, libvfio-user through ctypes, a test harness. It reaches
a model only through a :class:`DevicePort`; the model reaches the backend only
through the two objects the backend hands over when a client attaches, an
:class:`InterruptSink` and a :class:`DmaBackend`. Nothing else crosses, so any
backend serves any model, and a wrapper port (fault injection, recording) can
sit between the two without either knowing::

    backend                                         device side (a DevicePort)
    ---------------------------------------------   ------------------------------------------
    port.regions, port.irq_counts                   the region table and interrupt counts
    port.attach(sink, dma)                     -->  a client arrived: interrupts and DMA go to it
    with port.batch():                              deferred work waits until the replies are out
        port.region_read(index, offset, buf)   -->  config space, BARs, ROM; checked here, once
        port.region_write(index, offset, data) -->
        port.reset(ResetReason.CLIENT_REQUEST) -->  a warm reset (DEVICE_RESET, system_reset)
    port.routes_changed()                      -->  new interrupt routes: send what was held
    port.dma_allowed()                         -->  bus mastering on? (asked between DMA chunks)
    port.shortcut(index, offset, size, write)  -->  where an access goes, for a hot loop to keep
                                                    (optional: devices/shortcut.py)
    port.describe_access(index, offset, size)  -->  register names, for logs and traces
    port.activity.watch(watcher)               -->  deferred tasks and lock order (trace, replay)
    port.faults                                -->  a fault plan's injector, to watch (or None)
    port.detach()                              -->  the client went away ...
    port.reset(ResetReason.CLIENT_LOST)        -->  ... so the next one meets a powered-on device
    sink.intx(level), sink.msi(v), sink.msix(v)<--  the model's interrupts
    dma.read/write/mapped/in_place             <--  the model's DMA

Threading: a backend calls the port from one thread at a time (its serving
thread), always inside :meth:`DevicePort.batch` for requests; the model may
call the sink and the DMA backend from any thread.

Errors: a port method that fails raises a
:class:`~vfiouser.iomgr.VfioUserError` whose ``errno`` the backend answers with
(:class:`~vfiouser.devices.errors.RegionAccessError`: EINVAL, or EACCES for a
write to a read-only region). Any other exception is a bug in the model: the
backend answers EIO and logs it.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "DevicePort",
    "InterruptSink",
    "DmaBackend",
    "ResetReason",
    "ResetType",
    "RegionInfo",
    "RegionKind",
    "IrqCounts",
    "ActivityWatcher",
    "ModelActivity",
    "as_port",
]


class ResetReason(enum.Enum):
    """Why a backend resets a device (the causes libvfio-user's reset callback gets, and one more).

    The device side turns the cause into a :class:`ResetType`, which is what a model sees.
    """

    #: The client asked (vfio-user DEVICE_RESET: QEMU's system_reset, a guest reboot): warm.
    CLIENT_REQUEST = "client request"
    #: The client went away. The next client is a new machine, so the device is power-cycled
    #: (cold), unless the model says its state must outlive a client (then warm).
    CLIENT_LOST = "client lost"
    #: Back to the state the device had when it was built: cold.
    POWER_ON = "power on"


class ResetType(enum.Enum):
    """What a reset does to a device, as a model's reset hook is told (after QEMU's ``ResetType``)."""

    #: A function-level reset: config space and interrupts go back to their reset state;
    #: sticky bits, and whatever the model keeps over a reset, stay.
    WARM = "warm"
    #: A power cycle: nothing the guest did survives.
    COLD = "cold"


class RegionKind:
    """What a region is (string constants, for backends and logs)."""

    ABSENT = "absent"
    IO = "io"
    MEMORY = "memory"
    ROM = "rom"
    CONFIG = "config"


@dataclass(frozen=True)
class RegionInfo:
    """One region as a backend exposes it, VFIO-numbered (BAR0-5 are 0-5, the ROM 6,
    config space 7): size (0 = absent), kind, access rights, and the areas a client
    may map (``(offset, size)`` pairs in the file ``mmap_fd``, whose offset 0 is the
    region's offset 0)."""

    index: int
    size: int
    kind: str
    readable: bool
    writable: bool
    mmap_areas: tuple[tuple[int, int], ...] = ()
    mmap_fd: int | None = None


class IrqCounts(NamedTuple):
    """Vectors per interrupt index, in VFIO's order (so ``counts[index]`` works)."""

    intx: int
    msi: int
    msix: int
    err: int
    req: int


class InterruptSink(abc.ABC):
    """Where a model's interrupts go; provided by the backend at :meth:`DevicePort.attach`."""

    @abc.abstractmethod
    def intx(self, asserted: bool) -> None:
        """The effective INTx level changed (pin level, gated by INTx-disable and MSI/MSI-X)."""

    @abc.abstractmethod
    def msi(self, vector: int) -> bool:
        """Send MSI ``vector``; False if there is no route for it yet (the model holds it
        pending until :meth:`DevicePort.routes_changed`)."""

    @abc.abstractmethod
    def msix(self, vector: int) -> bool:
        """Send MSI-X ``vector``; False if there is no route for it yet."""


class DmaBackend(abc.ABC):
    """Guest memory, as the backend reaches it; provided at :meth:`DevicePort.attach`.

    Failures raise :class:`~vfiouser.devices.pci.dma.DmaError` subclasses. A transfer
    is *in place* when the backend has the memory mapped (it moves no message and
    never waits for the client); otherwise it is a request to the client. With
    ``may_wait=False`` a transfer that would have to wait for the client raises
    :class:`~vfiouser.devices.pci.dma.DmaWouldDeadlock` before a byte moves (the
    caller is in a request handler, or holds the device lock, and the client cannot
    answer until the handler returns).
    """

    @abc.abstractmethod
    def read(self, addr: int, size: int, *, may_wait: bool) -> bytes:
        """Guest memory ``[addr, addr+size)``."""

    @abc.abstractmethod
    def write(self, addr: int, data: bytes, *, may_wait: bool) -> None:
        """Write ``data`` to guest memory at ``addr``."""

    @abc.abstractmethod
    def mapped(self, addr: int, size: int, write: bool) -> list[tuple[int, int]]:
        """The parts of ``[addr, addr+size)`` the client mapped for this direction, as
        ``(addr, size)``, in order."""

    @abc.abstractmethod
    def in_place(self, addr: int, size: int, write: bool) -> bool:
        """Whether all of ``[addr, addr+size)`` is mapped for this direction *and* reachable
        without a message (so a handler may do this transfer itself)."""

    def read_sg(self, segments: Sequence[tuple[int, int]], *, may_wait: bool) -> bytes:
        """The ``(addr, size)`` segments read in order, concatenated. By default one :meth:`read`
        per segment; a backend that has the memory mapped may do the whole list at once (a
        storage model's PRP or descriptor list is hundreds of pages)."""
        return b"".join(self.read(addr, size, may_wait=may_wait) for addr, size in segments)

    def write_sg(self, segments: Sequence[tuple[int, int]], data: bytes | memoryview, *, may_wait: bool) -> None:
        """``data`` spread over the ``(addr, size)`` segments in order (their sizes add up to
        ``len(data)``). By default one :meth:`write` per segment."""
        view = memoryview(data)
        pos = 0
        for addr, size in segments:
            self.write(addr, view[pos : pos + size], may_wait=may_wait)
            pos += size

    def lend_sg(self, segments: Sequence[tuple[int, int]], write: bool) -> AbstractContextManager | None:
        """Guest memory itself, for a model to read (or, with ``write``, fill) without a copy: a
        context manager whose value is one memoryview per segment, valid until it exits (the
        memory cannot be unmapped meanwhile). None when the backend cannot lend all of it (not
        mapped in place), and by default: the caller then copies through :meth:`read_sg` and
        :meth:`write_sg`."""
        return None


class ActivityWatcher:
    """Told what a model does on its own, by :meth:`ModelActivity.watch` (a backend that logs,
    records or replays a session). Every method is called on the thread concerned and must
    return quickly; the defaults do nothing."""

    def task_started(self, name: str) -> None:
        """A deferred task named ``name`` starts (on the thread that runs it)."""

    def task_finished(self, name: str, error: BaseException | None) -> None:
        """The task ends (``error``: what it raised, if it did)."""

    def lock_wanted(self) -> None:
        """This thread is about to take the device lock (outermost); may block until it may."""

    def lock_taken(self) -> None:
        """This thread took the device lock (outermost)."""

    def lock_released(self) -> None:
        """This thread let the device lock go (outermost)."""


class ModelActivity(abc.ABC):
    """What a model does besides answering requests, for backends that record and replay
    sessions: its deferred tasks, and the order in which threads take its lock (every request
    holds it, and the model's own threads take it around the state they touch, so that order
    is the order in which each saw the other's effects)."""

    @abc.abstractmethod
    def watch(self, watcher: ActivityWatcher | None, *, lock: bool = False) -> None:
        """Tell ``watcher`` about tasks, and with ``lock`` about every outermost take and release
        of the device lock; ``None`` stops. Set it while no request is being served."""

    @abc.abstractmethod
    def set_stepping(self, on: bool) -> None:
        """While on, deferred tasks wait, whatever their delay, until :meth:`start_task` starts one."""

    @abc.abstractmethod
    def start_task(self, name: str | None = None) -> bool:
        """Start the oldest waiting task (the oldest named ``name``); returns once it runs, False
        if none waits."""

    @abc.abstractmethod
    def wait_tasks(self, timeout: float) -> bool:
        """Wait until no task runs; True if none does."""

    @abc.abstractmethod
    def waiting_tasks(self) -> list[str]:
        """The names of the tasks waiting to run, oldest first."""


class DevicePort(abc.ABC):
    """A device model as a backend sees it: the whole contract (see the module docstring)."""

    @property
    @abc.abstractmethod
    def regions(self) -> tuple[RegionInfo, ...]:
        """Every region, VFIO-numbered, absent ones with size 0 (at least 9 for PCI)."""

    @property
    @abc.abstractmethod
    def irq_counts(self) -> IrqCounts:
        """Vectors per interrupt index."""

    @abc.abstractmethod
    def region_read(self, index: int, offset: int, data: bytearray | memoryview) -> None:
        """Fill ``data`` from region ``index`` at ``offset``. Raises
        :class:`~vfiouser.devices.errors.RegionAccessError` for an access outside the region."""

    @abc.abstractmethod
    def region_write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` to region ``index`` at ``offset``. Raises
        :class:`~vfiouser.devices.errors.RegionAccessError` outside the region, or (EACCES)
        for a region that is not writable."""

    @abc.abstractmethod
    def batch(self) -> AbstractContextManager:
        """A context for one batch of requests: work the model defers inside it starts only
        when it ends, which the backend makes after the batch's replies are sent (so the
        client is free to answer the model's DMA). Also marks "inside a request handler"
        for :class:`DmaBackend`'s ``may_wait``. Reusable and reentrant: a backend may take it
        once and enter it for every batch."""

    @abc.abstractmethod
    def reset(self, reason: ResetReason) -> None:
        """Reset the device (see :class:`ResetReason`)."""

    @abc.abstractmethod
    def attach(self, sink: InterruptSink, dma: DmaBackend) -> None:
        """A client is attached: route interrupts to ``sink`` and DMA to ``dma``."""

    @abc.abstractmethod
    def detach(self) -> None:
        """The client is gone: interrupts go nowhere, DMA fails with ``DmaUnavailable``."""

    @abc.abstractmethod
    def routes_changed(self) -> None:
        """Interrupt routes changed (the client installed eventfds): send the vectors held
        for lack of a route."""

    @abc.abstractmethod
    def dma_allowed(self) -> bool:
        """Whether the device may master the bus now (a backend checks it between the chunks
        of a long transfer)."""

    def describe(self) -> str:
        """A short name for logs."""
        return type(self).__name__

    @property
    def activity(self) -> ModelActivity | None:
        """The model's own activity, for backends that record or replay sessions; None for a
        model that has none to show (then a replay cannot place its background work)."""
        return None

    #: The lock a backend holds around a shortcut (:meth:`shortcut`); None: this port offers
    #: none, and every access goes through :meth:`region_read` and :meth:`region_write`.
    shortcut_lock = None

    def shortcut(self, index: int, offset: int, size: int, write: bool) -> tuple | None:
        """Where an access of ``size`` bytes at ``offset`` of region ``index`` goes, as a shortcut
        a backend may keep and run itself (:mod:`vfiouser.devices.shortcut`), or None when it must
        always call :meth:`region_read`/:meth:`region_write`. Only asked when
        :attr:`shortcut_lock` is set. Default: None."""
        return None

    #: The fault plan applied to this port (a :class:`~vfiouser.devices.faults.FaultInjector`), for
    #: backends that report faults (their log and trace watch it); None: the model as it is.
    faults = None

    def describe_access(self, index: int, offset: int, size: int, *, write: bool = False) -> str:
        """The names of the registers (and fields) an access of ``size`` bytes at ``offset`` of
        region ``index`` reaches, comma-separated, for logs and traces (``"status"``,
        ``"MSI.control"``); ``""`` where the model names nothing. Never raises, never takes the
        device lock (it runs while a message is logged, and must not change what the model sees).
        Default: nothing is named."""
        return ""


def as_port(device) -> DevicePort:
    """``device`` itself if it is a :class:`DevicePort`, else its ``port`` (a model's)."""
    return device if isinstance(device, DevicePort) else device.port
