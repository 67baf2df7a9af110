"""iomgr: trapped-I/O dispatch for device models, after the Rust crate dbs-device.

The flow, end to end:

1. **Resources.** A device is given address ranges, described as
   :mod:`~vfiouser.iomgr.resources` (:class:`PioAddressRange`, :class:`MmioAddressRange`,
   and non-I/O variants such as :class:`LegacyIrq` that the manager ignores).
2. **Device.** The device implements :class:`DeviceIo` (thread-safe handlers),
   or :class:`DeviceIoMut` wrapped in :class:`LockedDevice`.
3. **Register.** ``IoManager.register_device_io(device, resources)`` traps every
   PIO/MMIO range of the list to the device, all or nothing.
4. **Dispatch.** ``mmio_read/mmio_write/pio_read/pio_write(addr, data)`` find
   the range containing ``addr`` and call the device with
   ``(range base, addr - base, data)``. A miss raises :class:`NoDevice`.
5. **Change at run time.** :class:`CowIoManager` stages registrations in a
   transaction and publishes them atomically while readers keep dispatching.

In vfiouser, every region access QEMU sends (REGION_READ/REGION_WRITE) becomes
one of these dispatch calls; see ``docs/design.md``.

>>> from vfiouser.iomgr import IoManager, DeviceIo, PioAddressRange, MmioAddressRange, NoDevice
>>> class Latch(DeviceIo):
...     "One byte register, on a port and in memory."
...     value = 0
...     def pio_read(self, base, offset, data):  data[0] = self.value
...     def pio_write(self, base, offset, data): self.value = data[0]
...     read, write = pio_read, pio_write
>>> mgr = IoManager()
>>> latch = Latch()
>>> mgr.register_device_io(latch, [PioAddressRange(0x80, 1), MmioAddressRange(0xFED0_0000, 1)])
>>> mgr.pio_write(0x80, b"\\x2a")
>>> buf = bytearray(1); mgr.mmio_read(0xFED0_0000, buf); buf[0]
42
>>> try:
...     mgr.pio_read(0x81, bytearray(1))
... except NoDevice as exc:
...     print(exc)
no such device: pio [0x81, +0x1)
"""

from .device import DeviceIo, DeviceIoMut, LockedDevice
from .errors import (
    DeviceOverlap,
    InvalidAddress,
    InvalidRange,
    IoManagerError,
    NoDevice,
    StraddlingAccess,
    TransactionError,
    VfioUserError,
)
from .manager import IoManager
from .resources import (
    DeviceResources,
    GenericIrqConstraint,
    KvmMemSlot,
    KvmMemSlotConstraint,
    LegacyIrq,
    LegacyIrqConstraint,
    MacAddress,
    MemAddressConstraint,
    MemAddressRange,
    MmioAddressConstraint,
    MmioAddressRange,
    MsiIrq,
    MsiIrqType,
    PciMsiIrqConstraint,
    PciMsixIrqConstraint,
    PioAddressConstraint,
    PioAddressRange,
    Resource,
    ResourceConstraint,
)
from .transaction import CowIoManager, IoManagerContext, Transaction
from .types import IoAddress, IoSize, PioAddress, PioSize

__all__ = [
    "IoManager",
    "IoManagerContext",
    "CowIoManager",
    "Transaction",
    "DeviceIo",
    "DeviceIoMut",
    "LockedDevice",
    "VfioUserError",
    "IoManagerError",
    "InvalidAddress",
    "DeviceOverlap",
    "NoDevice",
    "StraddlingAccess",
    "InvalidRange",
    "TransactionError",
    "IoAddress",
    "IoSize",
    "PioAddress",
    "PioSize",
    "Resource",
    "PioAddressRange",
    "MmioAddressRange",
    "MemAddressRange",
    "LegacyIrq",
    "MsiIrq",
    "MsiIrqType",
    "MacAddress",
    "KvmMemSlot",
    "DeviceResources",
    "ResourceConstraint",
    "PioAddressConstraint",
    "MmioAddressConstraint",
    "MemAddressConstraint",
    "LegacyIrqConstraint",
    "PciMsiIrqConstraint",
    "PciMsixIrqConstraint",
    "GenericIrqConstraint",
    "KvmMemSlotConstraint",
]
