"""A PCI device's own activity, as a backend that records or replays a session sees it.

:class:`PciActivity` is what :attr:`PciPort.activity <vfiouser.devices.pci.port.PciPort.activity>`
returns: the device's worker (:mod:`vfiouser.devices.pci.worker`) tells a watcher
when each deferred task starts and ends, and its lock
(:mod:`vfiouser.devices.pci.lock`) tells it, while asked to, every outermost take
and release. A replay puts the worker in stepping mode, so tasks start when the
replay says, and makes the device's threads wait at the lock until the recorded
order lets them in (``vfiouser.replay``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vfiouser.devices.port import ActivityWatcher, ModelActivity

if TYPE_CHECKING:
    from .device import PciDevice

__all__ = ["PciActivity"]


class PciActivity(ModelActivity):
    """The activity of one :class:`~vfiouser.devices.pci.PciDevice` (see the module docstring)."""

    def __init__(self, device: PciDevice) -> None:
        self.device = device

    def watch(self, watcher: ActivityWatcher | None, *, lock: bool = False) -> None:
        self.device.worker.watcher = watcher
        self.device.lock.watch(watcher if lock else None)

    def set_stepping(self, on: bool) -> None:
        self.device.worker.set_stepping(on)

    def start_task(self, name: str | None = None) -> bool:
        return self.device.worker.start_next(name)

    def wait_tasks(self, timeout: float) -> bool:
        return self.device.worker.wait_running(timeout)

    def waiting_tasks(self) -> list[str]:
        return self.device.worker.waiting_tasks()
