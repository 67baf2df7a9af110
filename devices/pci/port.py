"""The device port of a :class:`~vfiouser.devices.pci.PciDevice`: how any backend serves it.

:class:`PciPort` implements :class:`~vfiouser.devices.port.DevicePort` for the
PCI framework (``device.port``). It is where a region access is checked, once
(region index, bounds, the region's access rights), before it goes to config
space, the ROM or a BAR; a BAR access then goes to the handler the guest's
programming of the BAR put in the IoManager (see :mod:`vfiouser.devices.pci.bars`).
The REGION_READ path of any backend is therefore::

    port.region_read(index, offset, buf)
      -> access table[index]: (size, writable, read, write)    bounds and rights, here only
      -> with device.lock: read(offset, buf)
           config space: device.config_read (write masks, W1C and hooks on write)
           ROM:          its bytes
           BAR n:        IoManager.mmio_read/pio_read(BAR n's guest address + offset)
                         -> handler.read(base, offset, buf); not decoded / unclaimed: all-ones

>>> from vfiouser.devices.idio16 import Idio16
>>> port = Idio16().port
>>> [(r.index, r.kind, r.size) for r in port.regions if r.size]
[(2, 'io', 256), (7, 'config', 256)]
>>> buf = bytearray(2); port.region_read(7, 0, buf); buf.hex()     # vendor 0x494f
'4f49'
>>> port.region_read(2, 0x100, bytearray(1))
Traceback (most recent call last):
    ...
vfiouser.devices.errors.RegionAccessError: read of region 2: [0x100, +0x1) is outside its 0x100 bytes
"""

from __future__ import annotations

import errno

from vfiouser.devices.errors import RegionAccessError
from vfiouser.devices.port import DevicePort, DmaBackend, InterruptSink, IrqCounts, RegionInfo, ResetReason
from vfiouser.devices.shortcut import CALL, SLOW, guard
from vfiouser.iomgr import NoDevice

from .dma import NO_BACKEND
from .device import CONFIG_REGION, NO_SINK, ROM_REGION, PciDevice
from .activity import PciActivity
from .names import AccessNames

__all__ = ["PciPort"]


class PciPort(DevicePort):
    """The port of one PCI device (see the module docstring). Realizes the device."""

    def __init__(self, device: PciDevice) -> None:
        device.realize()
        self.device = device
        self._regions = device.regions()
        self._irq_counts = IrqCounts(
            intx=1 if device.interrupt_pin else 0,
            msi=device.msi.vectors if device.msi is not None else 0,
            msix=device.msix.vectors if device.msix is not None else 0,
            err=1,
            req=1,
        )
        #: per region: (size, writable, read(offset, buf), write(offset, data))
        self._table = tuple(self._route(r) for r in self._regions)
        self._count = len(self._table)
        self._lock = device.lock
        self._names: AccessNames | None = None
        self._activity: PciActivity | None = None
        # Shortcuts skip region_read and region_write: not for a subclass that changes them.
        plain = type(self).region_read is PciPort.region_read and type(self).region_write is PciPort.region_write
        self.shortcut_lock = device.lock if plain else None

    def _route(self, region: RegionInfo) -> tuple:
        device = self.device
        if region.index == CONFIG_REGION:
            return region.size, True, device.config_read, device.config_write, None
        if region.index == ROM_REGION and device.rom is not None:
            return region.size, False, device.rom.read, None, None
        bar = device.bars.get(region.index)
        if bar is not None:
            return region.size, True, bar.read, bar.write, bar
        return 0, False, None, None, None

    # -- the region table --------------------------------------------------------

    @property
    def regions(self) -> tuple[RegionInfo, ...]:
        return self._regions

    @property
    def irq_counts(self) -> IrqCounts:
        return self._irq_counts

    def describe(self) -> str:
        return repr(self.device)

    @property
    def activity(self) -> PciActivity:
        """The device's deferred tasks and lock, for backends that record or replay sessions."""
        if self._activity is None:
            self._activity = PciActivity(self.device)
        return self._activity

    def describe_access(self, index: int, offset: int, size: int, *, write: bool = False) -> str:
        """Config registers and capability fields by name, the MSI-X table and PBA, and in the
        BARs whatever the model's :meth:`~vfiouser.devices.pci.PciDevice.register_names` says
        (:mod:`vfiouser.devices.pci.names`)."""
        try:
            names = self._names
            if names is None:
                names = self._names = AccessNames(self.device)
            return names.describe(index, offset, size, write=write)
        except Exception:  # a log line must never fail
            return ""

    # -- access (the hot path) ---------------------------------------------------

    def _refuse(self, op: str, index: int, offset: int, size: int) -> RegionAccessError:
        if not 0 <= index < self._count:
            return RegionAccessError(f"{op} of region {index}: there are {self._count} regions", index, offset, size)
        limit = self._table[index][0]
        if size and 0 <= offset and offset + size <= limit:  # in bounds, so it was the access right
            return RegionAccessError(f"{op} of region {index}: the region is read-only", index, offset, size,
                                     errno=errno.EACCES)
        return RegionAccessError(f"{op} of region {index}: [{offset:#x}, +{size:#x}) is outside its {limit:#x} bytes",
                                 index, offset, size)

    def region_read(self, index: int, offset: int, data: bytearray | memoryview) -> None:
        size = len(data)
        if 0 <= index < self._count:
            limit, _, read, _, bar = self._table[index]
            if size and 0 <= offset and offset + size <= limit:
                with self._lock:
                    # A decoded BAR: straight to the IoManager (Bar.read without its call; Bar.read
                    # handles the rest: not decoded, unclaimed).
                    if bar is not None and bar.address is not None:
                        try:
                            bar._bus_read(bar._io.current, bar.address + offset, data)
                            return
                        except NoDevice:
                            pass
                    read(offset, data)
                return
        raise self._refuse("read", index, offset, size)

    def region_write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        size = len(data)
        if 0 <= index < self._count:
            limit, writable, _, write, bar = self._table[index]
            if writable and size and 0 <= offset and offset + size <= limit:
                with self._lock:
                    if bar is not None and bar.address is not None:  # as in region_read
                        try:
                            bar._bus_write(bar._io.current, bar.address + offset, data)
                            return
                        except NoDevice:
                            pass
                    write(offset, data)
                return
        raise self._refuse("write", index, offset, size)

    def shortcut(self, index: int, offset: int, size: int, write: bool) -> tuple | None:
        """A BAR access as a shortcut (:mod:`vfiouser.devices.shortcut`): while the BAR is not
        decoded, or no handler takes the whole access, SLOW (region_read decides); else the
        handler's own shortcut (a register block's), or a CALL of its read/write. Guarded by the
        BAR's address and the IoManager snapshot. None for config space, the ROM, an access
        out of bounds, and for a port whose class changes region_read or region_write."""
        if self.shortcut_lock is None or not 0 <= index < self._count:
            return None
        limit, writable, _, _, bar = self._table[index]
        if bar is None or not size or offset < 0 or offset + size > limit or (write and not writable):
            return None
        address = bar.address
        if address is None:
            return (SLOW, (guard(bar, "address"),))
        io = bar._io
        snapshot = io.current
        guards = (guard(bar, "address"), (io, "current", snapshot))
        target = (snapshot.pio_target if bar.is_io else snapshot.mmio_target)(address + offset, size)
        if target is None:
            return (SLOW, guards)
        handler, base = target
        rel = address + offset - base
        own = getattr(handler, "shortcut", None)
        cut = own(rel, size, write) if own is not None else None
        if cut is not None:
            return (cut[0], guards + cut[1]) + cut[2:]
        if bar.is_io:
            fn = handler.pio_write if write else handler.pio_read
        else:
            fn = handler.write if write else handler.read
        return (CALL, guards, fn, base, rel)

    def batch(self):
        """The device's worker, whose context holds deferred work (reentrant, no lock taken)."""
        return self.device.worker

    # -- life cycle ----------------------------------------------------------------

    def reset(self, reason: ResetReason) -> None:
        self.device._reset(reason)

    def attach(self, sink: InterruptSink, dma: DmaBackend) -> None:
        device = self.device
        with device.lock:
            device._sink = sink
            device.dma.backend = dma
            if device.intx_pending():
                sink.intx(True)

    def detach(self) -> None:
        device = self.device
        with device.lock:
            device._sink = NO_SINK
            device.dma.backend = NO_BACKEND

    def routes_changed(self) -> None:
        self.device._deliver_pending()

    def dma_allowed(self) -> bool:
        return self.device.bus_master_enabled()
