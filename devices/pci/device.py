"""The PCI device model base class.

A device model subclasses :class:`PciDevice`, states its identity as class
attributes, declares its BARs in ``__init__`` and maps handlers onto them::

    class Uart(PciDevice):
        vendor_id, device_id = 0x1B36, 0x0002
        class_code = 0x070002           # serial controller, 16550
        interrupt_pin = INTA

        def __init__(self):
            super().__init__()
            self.add_bar(0, IoBar(8)).map(self)   # this object handles BAR0

        def pio_read(self, base, offset, data): ...
        def pio_write(self, base, offset, data): ...
        def reset(self, reason): ...            # registers back to their reset values

The framework builds the configuration space (type-0 header, BAR registers,
capability list) and a :class:`~vfiouser.iomgr.CowIoManager` that holds each
BAR's handlers at the guest address the guest programmed, while the command
register lets the BAR decode (so a handler's ``base`` is the guest address of
its block and ``offset`` is relative to it). A backend never calls the model
directly: it goes through the device's :attr:`PciDevice.port`
(:mod:`vfiouser.devices.pci.port`), the one seam between protocol and model.

Threading: every call a backend makes into the model (region accesses, reset)
holds :attr:`PciDevice.lock`. Code that changes the model from elsewhere (a
host-side API, a timer thread) must take the same lock.

Nothing here knows about vfio-user: interrupts and DMA go to the
:class:`~vfiouser.devices.port.InterruptSink` and
:class:`~vfiouser.devices.port.DmaBackend` the backend attaches. Work that must
not run inside a register handler (DMA, anything slow) is deferred with
:meth:`PciDevice.defer` and runs once the triggering request is answered.
"""

from __future__ import annotations

import inspect
import logging

from vfiouser.devices.errors import DefinitionError, DeviceUsageError
from vfiouser.devices.port import InterruptSink, RegionInfo, RegionKind, ResetReason, ResetType
from vfiouser.iomgr import CowIoManager, DeviceIo, NoDevice

from .bars import Bar, BarError, RomBar
from .dma import Dma
from .lock import DeviceLock
from .msi import MsiCapability, MsixCapability
from .worker import DeviceWorker
from .config import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_IO_MASK,
    PCI_BASE_ADDRESS_MEM_MASK,
    PCI_CACHE_LINE_SIZE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_COMMAND_SERR,
    PCI_CONFIG_SPACE_SIZE,
    PCI_DEVICE_ID,
    PCI_HEADER_TYPE,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_REVISION_ID,
    PCI_ROM_ADDRESS,
    PCI_STATUS,
    PCI_STATUS_INTERRUPT,
    PCI_STATUS_W1C,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
    ConfigSpace,
    ConfigSpaceError,
)

__all__ = [
    "PciDevice",
    "NO_PIN",
    "INTA",
    "INTB",
    "INTC",
    "INTD",
    "ROM_REGION",
    "CONFIG_REGION",
    "VGA_REGION",
    "NUM_REGIONS",
    "COLD_RESET_WAIT",
]

log = logging.getLogger(__name__)

# Interrupt pins (config register 0x3d).
NO_PIN, INTA, INTB, INTC, INTD = 0, 1, 2, 3, 4

# Region indexes, as VFIO numbers them: BAR0-5 are 0-5.
ROM_REGION = 6
CONFIG_REGION = 7
VGA_REGION = 8
NUM_REGIONS = 9

#: Seconds a power cycle waits for a deferred task that is running to finish.
COLD_RESET_WAIT = 2.0
#: Distinct unclaimed accesses remembered (to warn once about each); beyond that, debug only.
_UNCLAIMED_MEMORY = 1024
#: The x86 port I/O space the guest decodes I/O BARs in.
_IO_SPACE_END = 0x10000

#: Writable command bits, as QEMU's PCI core has them: I/O, memory, bus master, SERR#,
#: INTx disable. (Parity error response is optional in PCI; a model that checks parity
#: adds PCI_COMMAND_PARITY to ``command_wmask``.)
_COMMAND_WMASK = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE


class _NoSink(InterruptSink):
    """No client: interrupts go nowhere (MSI/MSI-X vectors are held pending)."""

    def intx(self, asserted: bool) -> None:
        pass

    def msi(self, vector: int) -> bool:
        return False

    def msix(self, vector: int) -> bool:
        return False


NO_SINK = _NoSink()


class PciDevice(DeviceIo):
    """Base class of a PCI (type-0) device model. See the module docstring."""

    #: Vendor ID (config 0x00).
    vendor_id: int = 0xFFFF
    #: Device ID (config 0x02).
    device_id: int = 0xFFFF
    #: Subsystem vendor ID (config 0x2c).
    subsystem_vendor_id: int = 0
    #: Subsystem ID (config 0x2e).
    subsystem_id: int = 0
    #: Revision ID (config 0x08).
    revision: int = 0
    #: Class code, 24 bits: base class, subclass, programming interface (config 0x09-0x0b).
    class_code: int = 0xFF0000
    #: Interrupt pin (config 0x3d): ``NO_PIN`` or ``INTA``..``INTD``.
    interrupt_pin: int = NO_PIN
    #: Config space size: 256, or 4096 for PCI Express extended space.
    config_size: int = PCI_CONFIG_SPACE_SIZE
    #: Guest-writable bits of the command register.
    command_wmask: int = _COMMAND_WMASK
    #: Whether a warm reset drops deferred work that has not started yet (a function-level
    #: reset stops what the device was about to do; a model that must not, like QEMU's edu,
    #: says False). A power cycle always drops it.
    reset_cancels_deferred: bool = True
    #: Whether a client that goes away power-cycles the device, so the next client (a new
    #: VM) meets it as built. A model whose state must outlive a VM says False: losing the
    #: client is then a warm reset, which keeps what a warm reset keeps.
    power_cycle_on_disconnect: bool = True

    def __init__(self) -> None:
        #: Held by every call a backend makes into the model; take it around state you change
        #: from elsewhere. A reentrant lock (:class:`~vfiouser.devices.pci.lock.DeviceLock`).
        self.lock = DeviceLock()
        self.log = logging.getLogger(f"{type(self).__module__}.{type(self).__name__}")
        self.config = ConfigSpace(self.config_size)
        self.io = CowIoManager()
        self.bars: dict[int, Bar] = {}
        self.rom: RomBar | None = None
        self._intx_level = False
        self._intx_effective = False
        #: Where interrupts go; set by the device port while a client is attached.
        self._sink: InterruptSink = NO_SINK
        #: The MSI capability, once :meth:`add_msi` created it.
        self.msi: MsiCapability | None = None
        #: The MSI-X capability, once :meth:`add_msix` created it.
        self.msix: MsixCapability | None = None
        #: Guest memory, for DMA (see :mod:`vfiouser.devices.pci.dma`).
        self.dma = Dma(self)
        #: Runs deferred work (see :meth:`defer`).
        self.worker = DeviceWorker(type(self).__name__)
        self._realized = False
        self._port = None
        self._unclaimed_seen: set[tuple] = set()
        self._build_header()

    # -- construction -----------------------------------------------------------

    def _build_header(self) -> None:
        cs = self.config
        if not 0 < self.vendor_id < 0xFFFF:
            raise DefinitionError(f"{type(self).__name__}.vendor_id must be set (got {self.vendor_id:#x})")
        cs.set_word(PCI_VENDOR_ID, self.vendor_id)
        cs.set_word(PCI_DEVICE_ID, self.device_id)
        cs.set_byte(PCI_REVISION_ID, self.revision)
        cs.set_bytes(PCI_CLASS_PROG, self.class_code.to_bytes(3, "little"))
        cs.set_byte(PCI_HEADER_TYPE, 0)
        cs.set_word(PCI_SUBSYSTEM_VENDOR_ID, self.subsystem_vendor_id)
        cs.set_word(PCI_SUBSYSTEM_ID, self.subsystem_id)
        if self.interrupt_pin not in (NO_PIN, INTA, INTB, INTC, INTD):
            raise DefinitionError(f"interrupt_pin must be 0..4, not {self.interrupt_pin}")
        cs.set_byte(PCI_INTERRUPT_PIN, self.interrupt_pin)
        cs.set_wmask_word(PCI_COMMAND, self.command_wmask)
        cs.set_w1cmask_word(PCI_STATUS, PCI_STATUS_W1C)
        cs.set_wmask_byte(PCI_CACHE_LINE_SIZE, 0xFF)
        cs.set_wmask_byte(PCI_INTERRUPT_LINE, 0xFF)  # the latency timer stays 0, as QEMU's PCI core has it
        cs.add_write_hook(PCI_COMMAND, 2, self._command_written)
        cs.add_write_hook(PCI_BASE_ADDRESS_0, 24, self._decode)

    def add_bar(self, index: int, bar: Bar) -> Bar:
        """Declare BAR ``index`` (0-5) and program its register; returns ``bar``.

        A 64-bit memory BAR also takes register ``index + 1``.
        """
        if isinstance(bar, RomBar):
            raise BarError("the expansion ROM is set with set_rom(), not add_bar()")
        if self._realized:
            raise BarError("BARs must be declared before the device is served")
        if not 0 <= index <= 5 or index + bar.slots > 6:
            raise BarError(f"BAR{index} with {bar.slots} register(s) does not fit in BAR0-BAR5")
        taken = {i + k for i, b in self.bars.items() for k in range(b.slots)}
        wanted = {index + k for k in range(bar.slots)}
        if taken & wanted:
            raise BarError(f"BAR register(s) {sorted(taken & wanted)} already used")
        if bar.device is not None:
            raise BarError(f"{bar!r} already belongs to a device")
        bar.index, bar.device, bar._io = index, self, self.io
        self.bars[index] = bar
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        value, mask = bar.type_bits(), bar.address_mask()
        self.config.set_dword(reg, value)
        self.config.set_wmask_dword(reg, mask & 0xFFFF_FFFF)
        if bar.slots == 2:
            self.config.set_dword(reg + 4, 0)
            self.config.set_wmask_dword(reg + 4, mask >> 32)
        return bar

    def set_rom(self, rom: RomBar) -> RomBar:
        """Give the device an expansion ROM (region 6, config 0x30)."""
        if self.rom is not None or self._realized:
            raise BarError("the ROM can be set once, before the device is served")
        rom.index, rom.device = ROM_REGION, self
        self.rom = rom
        self.config.set_dword(PCI_ROM_ADDRESS, 0)
        self.config.set_wmask_dword(PCI_ROM_ADDRESS, rom.address_mask())
        return rom

    def add_msi(self, vectors: int = 1, *, addr64: bool = True, per_vector_mask: bool = False,
                offset: int | None = None) -> MsiCapability:
        """Give the device an MSI capability with ``vectors`` (1-32, a power of two) vectors."""
        if self.msi is not None or self._realized:
            raise ConfigSpaceError("MSI can be added once, before the device is served")
        self.msi = MsiCapability(self, vectors, addr64=addr64, per_vector_mask=per_vector_mask, offset=offset)
        return self.msi

    def add_msix(self, vectors: int, table_bar: int | Bar, table_offset: int = 0, *,
                 pba_bar: int | Bar | None = None, pba_offset: int | None = None,
                 offset: int | None = None) -> MsixCapability:
        """Give the device an MSI-X capability with ``vectors`` vectors.

        The table lives at ``table_offset`` of memory BAR ``table_bar``; the PBA
        at ``pba_offset`` of ``pba_bar`` (default: the same BAR, right after the
        table). The framework maps both; keep them clear of your own handlers.
        """
        if self.msix is not None or self._realized:
            raise ConfigSpaceError("MSI-X can be added once, before the device is served")

        def bar_of(ref):
            bar = self.bars.get(ref) if isinstance(ref, int) else ref
            if bar is None:
                raise ConfigSpaceError(f"BAR{ref} is not declared; add it before MSI-X")
            return bar

        tbar = bar_of(table_bar)
        pbar = bar_of(pba_bar) if pba_bar is not None else tbar
        if pba_offset is None:
            pba_offset = (table_offset + vectors * 16 + 7) & ~7 if pbar is tbar else 0
        self.msix = MsixCapability(self, vectors, tbar, table_offset, pbar, pba_offset, offset=offset)
        return self.msix

    def realize(self) -> None:
        """Freeze the layout: the current config space becomes the reset state.

        Called when the :attr:`port` is first asked for; idempotent.
        """
        if not self._realized:
            self.config.freeze_defaults()
            self._realized = True

    #: The class of :attr:`port` (``None``: :class:`~vfiouser.devices.pci.port.PciPort`); a
    #: subclass of it can watch or change every access a backend makes.
    port_class: type | None = None

    @property
    def port(self):
        """The device port (:class:`~vfiouser.devices.pci.port.PciPort`): what a backend serves.
        The first use realizes the device (its layout is frozen from then on)."""
        if self._port is None:
            from .port import PciPort

            self._port = (self.port_class or PciPort)(self)
        return self._port

    # -- regions ----------------------------------------------------------------

    def regions(self) -> tuple[RegionInfo, ...]:
        """All ``NUM_REGIONS`` regions, VFIO-numbered, absent ones with size 0."""
        out = []
        for index in range(NUM_REGIONS):
            bar = self.bars.get(index)
            if index < 6 and bar is not None:
                kind = RegionKind.IO if bar.is_io else RegionKind.MEMORY
                shared = bar.shared
                if shared is not None:
                    out.append(RegionInfo(index, bar.size, kind, True, True, tuple(bar.shared_areas), shared.fd))
                else:
                    out.append(RegionInfo(index, bar.size, kind, True, True))
            elif index == ROM_REGION and self.rom is not None:
                out.append(RegionInfo(index, self.rom.size, RegionKind.ROM, True, False))
            elif index == CONFIG_REGION:
                out.append(RegionInfo(index, self.config_size, RegionKind.CONFIG, True, True))
            else:
                out.append(RegionInfo(index, 0, RegionKind.ABSENT, False, False))
        return tuple(out)

    # -- decoding: where the guest put the BARs ---------------------------------

    def bar_address(self, bar: Bar) -> int | None:
        """The guest address ``bar`` decodes at under the current config space, or None.

        The rules of QEMU's PCI core (``pci_bar_address``): I/O or memory decoding
        must be on in the command register; address 0 and a range that wraps (or, for
        a 32-bit BAR, crosses 4 GiB) are not decoded. One more of ours: an I/O BAR must
        lie in the 64 KiB x86 port space, the IoManager's PIO bus (QEMU could not reach
        it there either). A BAR whose window overlaps another's does not decode either
        (see :meth:`_decode_targets`).
        """
        return self._decodable_address(bar, self.config.get_word(PCI_COMMAND))

    def _decodable_address(self, bar: Bar, command: int) -> int | None:
        reg = PCI_BASE_ADDRESS_0 + 4 * bar.index
        if bar.is_io:
            if not command & PCI_COMMAND_IO:
                return None
            addr = self.config.get_dword(reg) & PCI_BASE_ADDRESS_IO_MASK
            last_allowed = _IO_SPACE_END - 1
        else:
            if not command & PCI_COMMAND_MEMORY:
                return None
            addr = self.config.get_dword(reg) & PCI_BASE_ADDRESS_MEM_MASK
            if bar.slots == 2:
                addr |= self.config.get_dword(reg + 4) << 32
            # QEMU takes an all-ones last address for "unmapped", and a 32-bit BAR must end below 4 GiB.
            last_allowed = (1 << (64 if bar.slots == 2 else 32)) - 2
        addr &= ~(bar.size - 1)
        if addr == 0 or addr + bar.size - 1 > last_allowed:
            return None
        return addr

    def _decode_targets(self) -> dict[Bar, int | None]:
        """Where each BAR should decode now. Two BARs whose windows overlap in the same space
        cannot both decode: one that already decodes there keeps it, else the lower index wins."""
        wanted = {bar: self.bar_address(bar) for bar in self.bars.values()}
        order = sorted(self.bars.values(), key=lambda b: (wanted[b] != b.address, b.index))
        claimed: list[tuple[bool, int, int]] = []
        targets: dict[Bar, int | None] = {}
        for bar in order:
            addr = wanted[bar]
            if addr is not None:
                clash = next((b for io, b, end in claimed if io == bar.is_io and b < addr + bar.size and addr < end),
                             None)
                if clash is not None:
                    if bar._blocked_at != addr:
                        self.log.warning("BAR%d at %#x overlaps another BAR of the device; it does not decode "
                                         "until one of them moves", bar.index, addr)
                    bar._blocked_at = addr
                    addr = None
                else:
                    bar._blocked_at = None
                    claimed.append((bar.is_io, addr, addr + bar.size))
            targets[bar] = addr
        return targets

    def _decode(self, offset: int = 0, size: int = 0) -> None:
        """Bring the IoManager in line with the BAR registers and the command register's
        decode bits, in one transaction (a write hook of both; called with the lock held)."""
        moved = [(bar, new) for bar, new in self._decode_targets().items() if new != bar.address]
        if not moved:
            return
        with self.io.transaction() as tx:
            for bar, _ in moved:
                bar.unregister(self.io, tx)
            for bar, new in moved:
                if new is not None:
                    bar.register_at(self.io, tx, new)  # windows do not overlap: cannot clash
        for bar, _ in moved:
            where = f"{bar.address:#x}" if bar.address is not None else "nowhere (not decoded)"
            self.log.debug("BAR%d now at %s", bar.index, where)

    def _master_abort(self, bar: Bar, offset: int, size: int, op: str) -> None:
        """An access to a BAR that is not decoded: what a bus does without a target."""
        reasons = []
        if not self.config.get_word(PCI_COMMAND) & (PCI_COMMAND_IO if bar.is_io else PCI_COMMAND_MEMORY):
            reasons.append(("I/O" if bar.is_io else "memory") + " decoding is off in the command register")
        with_decoding = self.config.get_word(PCI_COMMAND) | PCI_COMMAND_IO | PCI_COMMAND_MEMORY
        if self._decodable_address(bar, with_decoding) is None:
            reasons.append("its address is not programmed, or not one the bus decodes")
        why = " and ".join(reasons) or "it overlaps another BAR of the device"
        what = "reads as all-ones" if op == "read" else "is dropped"
        self._warn_once(("abort", bar.index, op), "%d-byte %s of BAR%d at %#x %s: BAR%d is not decoded, %s",
                        size, op, bar.index, offset, what, bar.index, why)

    def _unclaimed(self, index: int, offset: int, size: int, op: str, exc: NoDevice) -> None:
        what = "read as all-ones" if op == "read" else "dropped"
        self._warn_once((index, offset, size, op), "unclaimed %d-byte %s of region %d at %#x %s (%s)",
                        size, op, index, offset, what, exc)

    def _warn_once(self, key: tuple, message: str, *args) -> None:
        """Log at WARNING the first time ``key`` is seen (for a bounded number of keys), else DEBUG."""
        seen = self._unclaimed_seen
        if key in seen or len(seen) >= _UNCLAIMED_MEMORY:
            self.log.debug(message, *args)
        else:
            seen.add(key)
            self.log.warning(message, *args)

    def register_names(self, index: int, offset: int, size: int, *, write: bool = False) -> str:
        """Model hook for logs and traces: the names of the registers (and fields) that an
        access of ``size`` bytes at ``offset`` of BAR ``index`` reaches, comma-separated
        (``"status"``, ``"doorbell (ring 3)"``); ``""`` for none. Called without the device
        lock; it must not change the device. Config space and the MSI-X table and PBA are
        named by the framework. Default: the registers and fields of a
        :class:`~vfiouser.devices.regs.RegisterBlock` mapped on the BAR
        (``"edu.status (computing)"``); nothing elsewhere."""
        from vfiouser.devices.regs import RegisterBlock

        bar = self.bars.get(index)
        if bar is None:
            return ""
        for block_off, block_size, handler in bar.mappings:
            if isinstance(handler, RegisterBlock) and block_off <= offset < block_off + block_size:
                names = handler.describe(offset - block_off, size, write=write)
                if names:
                    prefix = f"{handler.name}." if handler.name else ""
                    return f"{prefix}{names}"
        return ""

    # -- config space hooks (override for device-specific registers) -------------

    def config_read(self, offset: int, data: bytearray | memoryview) -> None:
        """A guest config-space read. Override to compute registers on the fly."""
        self.config.read(offset, data)

    def config_write(self, offset: int, data: bytes | memoryview) -> None:
        """A guest config-space write (masks applied by :class:`ConfigSpace`)."""
        self.config.write(offset, data)

    def bus_master_enabled(self) -> bool:
        """Whether the command register allows the function to do DMA (and send MSIs)."""
        return bool(self.config.get_word(PCI_COMMAND) & PCI_COMMAND_MASTER)

    def _command_written(self, offset: int, size: int) -> None:
        self._update_intx()
        self._decode()

    # -- interrupts -------------------------------------------------------------

    def defer(self, fn, *args, delay: float = 0.0) -> None:
        """Run ``fn(*args)`` on the device's worker thread once the current request is answered.

        For work that must not run in a register handler: DMA, anything slow,
        anything that waits. ``delay`` (seconds) postpones it further. The task
        runs without the device lock: take ``self.lock`` around register state,
        never around DMA.
        """
        self.worker.submit(fn, *args, delay=delay)

    @property
    def intx_level(self) -> bool:
        """Whether the device asserts its INTx pin (whatever the INTx-disable bit says)."""
        return self._intx_level

    def raise_intx(self) -> None:
        """Assert the INTx pin (level-triggered: it stays asserted until :meth:`lower_intx`)."""
        self.set_intx(True)

    def lower_intx(self) -> None:
        """Deassert the INTx pin."""
        self.set_intx(False)

    def set_intx(self, level: bool) -> None:
        """Drive the INTx pin to ``level``; mirrored in the status register's interrupt bit."""
        if not self.interrupt_pin:
            raise DeviceUsageError(f"{type(self).__name__} has no interrupt pin")
        if self._from_before_reset("INTx"):
            return
        with self.lock:
            self._intx_level = bool(level)
            self.config.set_bits_word(PCI_STATUS, PCI_STATUS_INTERRUPT, self._intx_level)
            self._update_intx()

    def msi_enabled(self) -> bool:
        """Whether the guest enabled MSI."""
        return self.msi is not None and self.msi.enabled

    def msix_enabled(self) -> bool:
        """Whether the guest enabled MSI-X."""
        return self.msix is not None and self.msix.enabled

    def fire_msi(self, vector: int = 0) -> None:
        """Send MSI ``vector`` (held pending while masked, dropped while MSI is disabled)."""
        if self.msi is None:
            raise DeviceUsageError(f"{type(self).__name__} has no MSI capability")
        if self._from_before_reset(f"MSI vector {vector}"):
            return
        with self.lock:
            self.msi.fire(vector)

    def fire_msix(self, vector: int) -> None:
        """Send MSI-X ``vector`` (held in the PBA while it cannot be sent, dropped while MSI-X is disabled)."""
        if self.msix is None:
            raise DeviceUsageError(f"{type(self).__name__} has no MSI-X capability")
        if self._from_before_reset(f"MSI-X vector {vector}"):
            return
        with self.lock:
            self.msix.fire(vector)

    def _from_before_reset(self, what: str) -> bool:
        """Whether the caller is a deferred task that was running when the device was reset:
        what it does to the bus (interrupts, DMA) is dropped, it belongs to the old state."""
        if self.worker.stale_here():
            self.log.debug("%s from a task that started before a reset; dropped", what)
            return True
        return False

    def _deliver_pending(self) -> None:
        """Send held MSI/MSI-X vectors that can go now (interrupt routes changed)."""
        with self.lock:
            if self.msi is not None:
                self.msi.deliver_pending()
            if self.msix is not None:
                self.msix.deliver_pending()

    def _irq_mode_changed(self) -> None:
        """MSI or MSI-X was switched on or off: enabling either drops INTx."""
        if self.msi_enabled() or self.msix_enabled():
            self._intx_level = False
            self.config.set_bits_word(PCI_STATUS, PCI_STATUS_INTERRUPT, False)
        self._update_intx()

    def _update_intx(self) -> None:
        disabled = bool(self.config.get_word(PCI_COMMAND) & PCI_COMMAND_INTX_DISABLE)
        disabled = disabled or self.msi_enabled() or self.msix_enabled()
        effective = self._intx_level and not disabled
        if effective != self._intx_effective:
            self._intx_effective = effective
            self._sink.intx(effective)

    def intx_pending(self) -> bool:
        """Whether INTx is asserted and not disabled (what the interrupt controller sees)."""
        return self._intx_effective

    # -- reset ------------------------------------------------------------------

    def _reset(self, reason: ResetReason) -> None:
        """Reset as a backend delivers it (through the port). A warm reset drops deferred
        work not yet started (see :attr:`reset_cancels_deferred`); a power cycle drops
        all of it and waits (up to :data:`COLD_RESET_WAIT`) for a task that is running.
        Then config space goes back to its reset state (sticky bits too, on a power
        cycle), MSI and MSI-X are disabled with nothing pending, INTx is deasserted,
        the BARs stop decoding, and the model's :meth:`reset` runs."""
        kind = self.reset_type(reason)
        cold = kind is ResetType.COLD
        # A lost client never leaves work behind for the next one, whatever the model keeps.
        if cold or self.reset_cancels_deferred or reason is ResetReason.CLIENT_LOST:
            dropped = self.worker.cancel_pending()
            if dropped:
                self.log.debug("reset (%s) dropped %d deferred task(s)", reason.value, dropped)
        if cold and not self.worker.wait_running(COLD_RESET_WAIT):
            self.log.warning("a deferred task is still running after %.0f s; resetting (%s) anyway",
                             COLD_RESET_WAIT, reason.value)
        with self.lock:
            self.config.reset(cold=cold)
            if self.msi is not None:
                self.msi.reset()
            if self.msix is not None:
                self.msix.reset()
            self._intx_level = False
            self._update_intx()
            self._decode()
            if self._reset_takes_kind():
                self.reset(kind)
            else:
                self.reset()

    def reset_type(self, reason: ResetReason) -> ResetType:
        """What a reset for ``reason`` does to this device: a client's request is warm, a
        power-on cold, and a lost client cold unless :attr:`power_cycle_on_disconnect` is off."""
        if reason is ResetReason.POWER_ON or (reason is ResetReason.CLIENT_LOST and self.power_cycle_on_disconnect):
            return ResetType.COLD
        return ResetType.WARM

    def _reset_takes_kind(self) -> bool:
        try:
            return len(inspect.signature(self.reset).parameters) > 0
        except (TypeError, ValueError):
            return True

    def reset(self, kind: ResetType = ResetType.WARM) -> None:
        """Model hook: put device registers back to their reset values.

        ``kind`` (:class:`~vfiouser.devices.port.ResetType`) is ``WARM`` for a
        function-level reset (the client's DEVICE_RESET: a guest reboot) and
        ``COLD`` for a power cycle (a new client), after which nothing the guest
        did may show. A model whose registers reset the same way either time can
        ignore it; one written as ``def reset(self)`` is called without it.
        Default: nothing.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.vendor_id:04x}:{self.device_id:04x}>"
