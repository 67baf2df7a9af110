"""The PCI device framework: config space, BARs, interrupts, and the device base class.

Start with :class:`PciDevice` (``vfiouser.devices.pci.device``); ``docs/writing-a-device.md``
walks through a complete model.
"""

from .bars import MAX_IO_BAR_SIZE, PAGE_SIZE, Bar, BarError, IoBar, MemoryBar, RomBar, SharedMemory
from .config import *  # noqa: F401,F403  (register offsets and bits)
from .config import ConfigSpace, ConfigSpaceError
from .dma import (
    Dma,
    DmaAborted,
    DmaBusMasterDisabled,
    DmaError,
    DmaPermissionError,
    DmaUnavailable,
    DmaUnmapped,
    DmaWouldDeadlock,
)
from .msi import MsiCapability, MsixCapability
from .device import CONFIG_REGION, INTA, INTB, INTC, INTD, NO_PIN, NUM_REGIONS, ROM_REGION, VGA_REGION, PciDevice
from .port import PciPort
from vfiouser.devices.errors import DefinitionError, DeviceError, DeviceUsageError, RegionAccessError
from vfiouser.devices.port import (
    DevicePort,
    DmaBackend,
    InterruptSink,
    IrqCounts,
    RegionInfo,
    RegionKind,
    ResetReason,
    ResetType,
)

__all__ = [
    "PciDevice",
    "PciPort",
    "DevicePort",
    "InterruptSink",
    "DmaBackend",
    "IrqCounts",
    "ResetReason",
    "ResetType",
    "DeviceError",
    "DefinitionError",
    "DeviceUsageError",
    "MsiCapability",
    "MsixCapability",
    "Dma",
    "DmaError",
    "DmaUnmapped",
    "DmaPermissionError",
    "DmaUnavailable",
    "DmaAborted",
    "DmaBusMasterDisabled",
    "DmaWouldDeadlock",
    "RegionInfo",
    "RegionKind",
    "RegionAccessError",
    "ConfigSpace",
    "ConfigSpaceError",
    "Bar",
    "BarError",
    "IoBar",
    "MemoryBar",
    "RomBar",
    "SharedMemory",
    "PAGE_SIZE",
    "MAX_IO_BAR_SIZE",
    "NO_PIN",
    "INTA",
    "INTB",
    "INTC",
    "INTD",
    "ROM_REGION",
    "CONFIG_REGION",
    "VGA_REGION",
    "NUM_REGIONS",
]
