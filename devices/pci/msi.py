"""Message-signalled interrupts: the MSI and MSI-X capabilities, built and run by the framework.

A model declares them once and fires vectors; it never sees eventfds::

    self.msi = self.add_msi(vectors=4, addr64=True, per_vector_mask=True)
    self.msix = self.add_msix(vectors=8, table_bar=4)     # table at BAR4+0, PBA after it
    ...
    self.fire_msi(0)        # or self.fire_msix(3)

**MSI** (capability 0x05): 1-32 vectors (a power of two), 32- or 64-bit
message address, optional per-vector mask and pending bits. The guest's
writes to the capability (enable, multiple-message enable, address, data,
masks) land in config space with the right write masks; multiple-message
enable is clamped to what the capability offers. A vector fires only while
MSI is enabled, bus mastering is on and the vector is below the enabled
count; a vector masked by its mask bit is latched in its pending bit and sent
when the guest unmasks it.

**MSI-X** (capability 0x11): 1-2048 vectors, table and pending-bit array
(PBA) placed in memory BARs, function mask. The framework maps handlers for
the table and the PBA. The *client* delivers MSI-X messages and, with QEMU,
emulates the table itself (including per-vector masking): a vector is sent
when the backend has a route for it (an eventfd from the client); otherwise,
or while the function is masked, it is latched in the PBA and sent as soon as
a route appears or the function mask is cleared. The PBA therefore shows
exactly the vectors the device is still holding.

A vector fired while its capability is disabled or bus mastering is off is
dropped, MSI and MSI-X alike (a function without bus mastering cannot send a
message; QEMU's own devices lose it the same way). Disabling MSI or MSI-X
forgets the vectors held for it. Enabling either deasserts INTx (the PCI rule,
and what QEMU's PCI core does). A reset disables both and clears every
pending bit.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vfiouser.iomgr import DeviceIo

from vfiouser.devices.errors import DeviceUsageError

from .config import PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX, ConfigSpaceError

if TYPE_CHECKING:
    from .bars import Bar
    from .device import PciDevice

__all__ = ["MsiCapability", "MsixCapability", "MSI_MAX_VECTORS", "MSIX_MAX_VECTORS"]

log = logging.getLogger(__name__)

MSI_MAX_VECTORS = 32
MSIX_MAX_VECTORS = 2048

# MSI message control bits.
MSI_FLAGS_ENABLE = 0x0001
MSI_FLAGS_QMASK = 0x000E  # multiple message capable
MSI_FLAGS_QSIZE = 0x0070  # multiple message enable
MSI_FLAGS_64BIT = 0x0080
MSI_FLAGS_MASKBIT = 0x0100

# MSI-X message control bits.
MSIX_FLAGS_QSIZE = 0x07FF
MSIX_FLAGS_MASKALL = 0x4000
MSIX_FLAGS_ENABLE = 0x8000

MSIX_ENTRY_SIZE = 16


class MsiCapability:
    """The MSI capability of a device (see the module docstring). Created by :meth:`PciDevice.add_msi`."""

    def __init__(self, device: PciDevice, vectors: int = 1, *, addr64: bool = True,
                 per_vector_mask: bool = False, offset: int | None = None) -> None:
        if vectors < 1 or vectors > MSI_MAX_VECTORS or vectors & (vectors - 1):
            raise ConfigSpaceError(f"MSI offers 1, 2, 4, 8, 16 or 32 vectors, not {vectors}")
        self.device = device
        self.vectors = vectors
        self.addr64 = addr64
        self.per_vector_mask = per_vector_mask
        mmc = vectors.bit_length() - 1
        ctrl = (mmc << 1) | (MSI_FLAGS_64BIT if addr64 else 0) | (MSI_FLAGS_MASKBIT if per_vector_mask else 0)
        # Layout after the 2-byte header: control, address low, [address high], data, [reserved, mask, pending].
        self._addr_hi = 8 if addr64 else None
        self._data = 12 if addr64 else 8
        self._mask = (self._data + 4) if per_vector_mask else None
        self._pending = (self._mask + 4) if per_vector_mask else None
        length = (self._pending + 4) if per_vector_mask else (self._data + 2)
        body = bytearray(length - 2)
        body[0:2] = ctrl.to_bytes(2, "little")
        wmask = bytearray(length - 2)
        wmask[0:2] = (MSI_FLAGS_ENABLE | MSI_FLAGS_QSIZE).to_bytes(2, "little")
        wmask[2:6] = (0xFFFF_FFFC).to_bytes(4, "little")
        if addr64:
            wmask[6:10] = b"\xff" * 4
        wmask[self._data - 2 : self._data] = b"\xff\xff"
        if per_vector_mask:
            vmask = (1 << vectors) - 1
            wmask[self._mask - 2 : self._mask + 2] = vmask.to_bytes(4, "little")
        self.offset = device.config.add_capability(PCI_CAP_ID_MSI, bytes(body), wmask=bytes(wmask), offset=offset)
        self.length = length
        self._was_enabled = False
        self._held = 0  # vectors fired but not sent yet (masked, or no route)
        device.config.add_write_hook(self.offset, length, self._written)

    # -- registers --------------------------------------------------------------

    @property
    def control(self) -> int:
        return self.device.config.get_word(self.offset + 2)

    @property
    def enabled(self) -> bool:
        """MSI enable bit."""
        return bool(self.control & MSI_FLAGS_ENABLE)

    @property
    def enabled_vectors(self) -> int:
        """How many vectors the guest enabled (multiple message enable, clamped)."""
        return 1 << ((self.control & MSI_FLAGS_QSIZE) >> 4)

    @property
    def address(self) -> int:
        cs = self.device.config
        low = cs.get_dword(self.offset + 4)
        return low | (cs.get_dword(self.offset + self._addr_hi) << 32 if self.addr64 else 0)

    @property
    def data(self) -> int:
        return self.device.config.get_word(self.offset + self._data)

    def masked(self, vector: int) -> bool:
        """Whether ``vector``'s mask bit is set (always False without per-vector masking)."""
        if self._mask is None:
            return False
        return bool(self.device.config.get_dword(self.offset + self._mask) >> vector & 1)

    @property
    def pending_bits(self) -> int:
        return self.device.config.get_dword(self.offset + self._pending) if self._pending is not None else 0

    def _set_pending(self, vector: int, on: bool) -> None:
        if self._pending is None:
            return
        cs = self.device.config
        bits = cs.get_dword(self.offset + self._pending)
        cs.set_dword(self.offset + self._pending, bits | (1 << vector) if on else bits & ~(1 << vector))

    # -- behaviour --------------------------------------------------------------

    def _written(self, offset: int, size: int) -> None:
        cs = self.device.config
        ctrl = self.control
        mme = (ctrl & MSI_FLAGS_QSIZE) >> 4
        mmc = (ctrl & MSI_FLAGS_QMASK) >> 1
        if mme > mmc:  # never more vectors than offered (as QEMU's msi_write_config does)
            cs.set_word(self.offset + 2, (ctrl & ~MSI_FLAGS_QSIZE) | (mmc << 4))
        enabled = self.enabled
        if enabled != self._was_enabled:
            self._was_enabled = enabled
            if not enabled:  # a vector held for the old driver must not reach the next one
                self._held = 0
                if self._pending is not None:
                    cs.set_dword(self.offset + self._pending, 0)
            self.device._irq_mode_changed()
        if enabled:
            self.deliver_pending()

    def fire(self, vector: int) -> None:
        """Signal ``vector`` (held pending while masked; dropped while disabled or without bus mastering)."""
        if not 0 <= vector < self.vectors:
            raise DeviceUsageError(f"MSI vector {vector} out of range (0-{self.vectors - 1})")
        if not self.enabled or vector >= self.enabled_vectors:
            log.debug("MSI vector %d dropped: MSI disabled or vector not enabled", vector)
            return
        if not self.device.bus_master_enabled():
            log.debug("MSI vector %d dropped: bus mastering is off", vector)
            return
        if self.masked(vector) or not self.device._sink.msi(vector):
            self._set_pending(vector, True)
            self._held |= 1 << vector

    def deliver_pending(self) -> None:
        """Send the vectors held back that may go now (after an unmask or a new route)."""
        held = self._held
        if not held or not self.enabled:
            return
        for vector in range(self.vectors):
            if held >> vector & 1 and vector < self.enabled_vectors and not self.masked(vector):
                if self.device.bus_master_enabled() and self.device._sink.msi(vector):
                    held &= ~(1 << vector)
                    self._set_pending(vector, False)
        self._held = held

    def reset(self) -> None:
        """Forget held vectors (config space itself is reset by the device)."""
        self._held = 0
        self._was_enabled = False


class _MsixTable(DeviceIo):
    """The MSI-X table as the device holds it. QEMU emulates the table itself and never
    forwards accesses here; other clients may."""

    def __init__(self, cap: MsixCapability) -> None:
        self.cap = cap
        self.mem = bytearray(cap.vectors * MSIX_ENTRY_SIZE)
        self.reset()

    def reset(self) -> None:
        self.mem[:] = bytes(len(self.mem))
        for v in range(self.cap.vectors):
            self.mem[v * MSIX_ENTRY_SIZE + 12] = 1  # vector control: masked at reset

    def read(self, base, offset, data):
        data[:] = self.mem[offset : offset + len(data)]

    def write(self, base, offset, data):
        self.mem[offset : offset + len(data)] = data


class _MsixPba(DeviceIo):
    """The pending-bit array: one bit per vector the device holds back. Writes are ignored."""

    def __init__(self, cap: MsixCapability) -> None:
        self.cap = cap

    def read(self, base, offset, data):
        bits = self.cap.pending_bits.to_bytes(self.cap.pba_size, "little")
        data[:] = bits[offset : offset + len(data)]

    def write(self, base, offset, data):
        log.debug("write to the MSI-X PBA ignored")


class MsixCapability:
    """The MSI-X capability of a device (see the module docstring). Created by :meth:`PciDevice.add_msix`."""

    def __init__(self, device: PciDevice, vectors: int, table_bar: Bar, table_offset: int,
                 pba_bar: Bar, pba_offset: int, *, offset: int | None = None) -> None:
        if not 1 <= vectors <= MSIX_MAX_VECTORS:
            raise ConfigSpaceError(f"MSI-X offers 1-{MSIX_MAX_VECTORS} vectors, not {vectors}")
        for what, bar, off, size in (("table", table_bar, table_offset, vectors * MSIX_ENTRY_SIZE),
                                     ("PBA", pba_bar, pba_offset, ((vectors + 63) // 64) * 8)):
            if bar.is_io or bar.index is None or bar.device is not device:
                raise ConfigSpaceError(f"the MSI-X {what} must be in a memory BAR of this device")
            if off % 8 or off + size > bar.size:
                raise ConfigSpaceError(f"the MSI-X {what} [{off:#x}, +{size:#x}) must be 8-byte aligned "
                                       f"inside BAR{bar.index} ({bar.size:#x} bytes)")
        self.table_size = vectors * MSIX_ENTRY_SIZE
        self.pba_size = ((vectors + 63) // 64) * 8
        if table_bar is pba_bar and table_offset < pba_offset + self.pba_size and pba_offset < table_offset + \
                self.table_size:
            raise ConfigSpaceError("the MSI-X table and PBA overlap")
        self.device = device
        self.vectors = vectors
        self.table_bar, self.table_offset = table_bar, table_offset
        self.pba_bar, self.pba_offset = pba_bar, pba_offset
        body = bytearray(10)
        body[0:2] = (vectors - 1).to_bytes(2, "little")
        body[2:6] = (table_offset | table_bar.index).to_bytes(4, "little")
        body[6:10] = (pba_offset | pba_bar.index).to_bytes(4, "little")
        wmask = bytearray(10)
        wmask[0:2] = (MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL).to_bytes(2, "little")
        self.offset = device.config.add_capability(PCI_CAP_ID_MSIX, bytes(body), wmask=bytes(wmask), offset=offset)
        self.table = _MsixTable(self)
        table_bar.map(self.table, table_offset, self.table_size)
        pba_bar.map(_MsixPba(self), pba_offset, self.pba_size)
        self.pending_bits = 0
        self._was_enabled = False
        device.config.add_write_hook(self.offset + 2, 2, self._written)

    @property
    def control(self) -> int:
        return self.device.config.get_word(self.offset + 2)

    @property
    def enabled(self) -> bool:
        """MSI-X enable bit."""
        return bool(self.control & MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        """MSI-X function mask bit."""
        return bool(self.control & MSIX_FLAGS_MASKALL)

    def pending(self, vector: int) -> bool:
        return bool(self.pending_bits >> vector & 1)

    def _written(self, offset: int, size: int) -> None:
        enabled = self.enabled
        if enabled != self._was_enabled:
            self._was_enabled = enabled
            if not enabled:  # a vector held for the old driver must not reach the next one
                self.pending_bits = 0
            self.device._irq_mode_changed()
        self.deliver_pending()

    def fire(self, vector: int) -> None:
        """Signal ``vector``; held in the PBA while it cannot be sent (function masked, no route
        yet); dropped while MSI-X is disabled or bus mastering is off, as QEMU's devices do."""
        if not 0 <= vector < self.vectors:
            raise DeviceUsageError(f"MSI-X vector {vector} out of range (0-{self.vectors - 1})")
        if not self.enabled:
            log.debug("MSI-X vector %d dropped: MSI-X disabled", vector)
            return
        if not self.device.bus_master_enabled():
            log.debug("MSI-X vector %d dropped: bus mastering is off", vector)
            return
        if self.function_masked or not self.device._sink.msix(vector):
            self.pending_bits |= 1 << vector

    def deliver_pending(self) -> None:
        """Send held vectors that may go now (function unmasked, a route appeared)."""
        if not self.pending_bits or not self.enabled or self.function_masked or not self.device.bus_master_enabled():
            return
        for vector in range(self.vectors):
            if self.pending_bits >> vector & 1 and self.device._sink.msix(vector):
                self.pending_bits &= ~(1 << vector)

    def reset(self) -> None:
        self.pending_bits = 0
        self._was_enabled = False
        self.table.reset()
