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

The framework builds the configuration space (type-0 header, BAR registers,
capability list), the region table a backend serves, and an
:class:`~vfiouser.iomgr.CowIoManager` in which every region has a *window* (see
:meth:`PciDevice.region_window`): config space, the ROM and memory BARs on the
MMIO bus, I/O BARs on the PIO bus. A backend (the vfio-user server, or another
transport) turns each region access into :meth:`PciDevice.region_read` /
:meth:`PciDevice.region_write`, which dispatch through that IoManager.

Threading: every call a backend makes into the model (region accesses, reset)
holds :attr:`PciDevice.lock`. Code that changes the model from elsewhere (a
host-side API, a timer thread) must take the same lock.

Nothing here knows about vfio-user: interrupts and DMA go through a
:class:`DeviceBackend` that the backend attaches. Work that must not run
inside a register handler (DMA, anything slow) is deferred with
:meth:`PciDevice.defer` and runs once the triggering request is answered.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from vfiouser.iomgr import CowIoManager, DeviceIo, MmioAddressRange, NoDevice

from .bars import Bar, BarError, RomBar
from .dma import NO_BACKEND, Dma
from .msi import MsiCapability, MsixCapability
from .worker import DeviceWorker
from .config import (
    PCI_BASE_ADDRESS_0,
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
    "InterruptSink",
    "DeviceBackend",
    "Region",
    "RegionKind",
    "RegionAccessError",
    "NO_PIN",
    "INTA",
    "INTB",
    "INTC",
    "INTD",
    "ROM_REGION",
    "CONFIG_REGION",
    "VGA_REGION",
    "NUM_REGIONS",
    "MMIO_WINDOW_SHIFT",
    "PIO_WINDOW_SIZE",
]

log = logging.getLogger(__name__)

# Interrupt pins (config register 0x3d).
NO_PIN, INTA, INTB, INTC, INTD = 0, 1, 2, 3, 4

# Region indexes, as VFIO numbers them: BAR0-5 are 0-5.
ROM_REGION = 6
CONFIG_REGION = 7
VGA_REGION = 8
NUM_REGIONS = 9

#: Region ``i`` (memory BAR, ROM or config space) sits at MMIO ``i << 40`` in the device's IoManager.
MMIO_WINDOW_SHIFT = 40
#: I/O BAR ``i`` sits at port ``i * 0x100`` in the device's IoManager.
PIO_WINDOW_SIZE = 0x100

#: Writable command bits, as QEMU's PCI core has them: I/O, memory, bus master, SERR#,
#: INTx disable. (Parity error response is optional in PCI; a model that checks parity
#: adds PCI_COMMAND_PARITY to ``command_wmask``.)
_COMMAND_WMASK = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE


class RegionKind:
    """What a region is (string constants, for backends and logs)."""

    ABSENT = "absent"
    IO = "io"
    MEMORY = "memory"
    ROM = "rom"
    CONFIG = "config"


@dataclass(frozen=True)
class Region:
    """One region as a backend exposes it: index, size (0 = absent), kind, access rights, and
    the shared areas a client may map (``(offset, size)`` pairs in the file ``mmap_fd``, whose
    offset 0 is the region's offset 0)."""

    index: int
    size: int
    kind: str
    readable: bool
    writable: bool
    mmap_areas: tuple[tuple[int, int], ...] = ()
    mmap_fd: int | None = None


class RegionAccessError(ValueError):
    """A backend asked for an access outside a region (its bug, or a bad client request)."""


class InterruptSink(Protocol):
    """Where a device model's interrupts go; implemented by a backend."""

    def intx(self, asserted: bool) -> None:
        """The effective INTx level changed (pin level, gated by the INTx-disable bit)."""


class DeviceBackend(InterruptSink, Protocol):
    """Everything a backend provides to a model: interrupts and DMA (see :mod:`vfiouser.devices.pci.dma`).

    ``msi``/``msix`` send one vector and return whether they could (False: no
    route for it yet; the framework holds it pending and calls
    :meth:`PciDevice.retry_interrupts` when the backend says routes changed).
    """

    def msi(self, vector: int) -> bool:
        """Send MSI ``vector``; False if there is no route for it."""

    def msix(self, vector: int) -> bool:
        """Send MSI-X ``vector``; False if there is no route for it."""

    def dma_read(self, addr: int, size: int) -> bytes:
        """Guest memory ``[addr, addr+size)``."""

    def dma_write(self, addr: int, data: bytes) -> None:
        """Write ``data`` to guest memory at ``addr``."""


class _ConfigHandler(DeviceIo):
    """Config space as an IoManager handler: forwards to the model's config hooks."""

    __slots__ = ("device",)

    def __init__(self, device: PciDevice) -> None:
        self.device = device

    def read(self, base, offset, data):
        self.device.config_read(offset, data)

    def write(self, base, offset, data):
        self.device.config_write(offset, data)


class _RomHandler(DeviceIo):
    """The expansion ROM: reads return its bytes, writes are ignored."""

    __slots__ = ("rom",)

    def __init__(self, rom: RomBar) -> None:
        self.rom = rom

    def read(self, base, offset, data):
        data[:] = self.rom.data[offset : offset + len(data)]

    def write(self, base, offset, data):
        log.debug("write to the expansion ROM at %#x ignored", offset)


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
    #: Whether a reset drops deferred work that has not started yet (a function-level reset
    #: stops what the device was about to do; a model that must not, like QEMU's edu, says False).
    reset_cancels_deferred: bool = True

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.log = logging.getLogger(f"{type(self).__module__}.{type(self).__name__}")
        self.config = ConfigSpace(self.config_size)
        self.io = CowIoManager()
        self.bars: dict[int, Bar] = {}
        self.rom: RomBar | None = None
        self._intx_level = False
        self._intx_effective = False
        self._sink: InterruptSink | None = None
        #: The MSI capability, once :meth:`add_msi` created it.
        self.msi: MsiCapability | None = None
        #: The MSI-X capability, once :meth:`add_msix` created it.
        self.msix: MsixCapability | None = None
        #: Guest memory, for DMA (see :mod:`vfiouser.devices.pci.dma`).
        self.dma = Dma(self)
        #: Runs deferred work (see :meth:`defer`).
        self.worker = DeviceWorker(type(self).__name__)
        self._realized = False
        #: per region ``(size, window, is_io)``, built on first access (see :meth:`_routes_table`)
        self._routes: tuple[tuple[int, int, bool], ...] | None = None
        self._unclaimed_seen: set[tuple[int, int, int, str]] = set()
        self._build_header()
        with self.io.transaction() as tx:
            self.io.register_device_io(
                tx, _ConfigHandler(self), [MmioAddressRange(self.region_window(CONFIG_REGION), self.config_size)]
            )

    # -- construction -----------------------------------------------------------

    def _build_header(self) -> None:
        cs = self.config
        if not 0 < self.vendor_id < 0xFFFF:
            raise ValueError(f"{type(self).__name__}.vendor_id must be set (got {self.vendor_id:#x})")
        cs.set_word(PCI_VENDOR_ID, self.vendor_id)
        cs.set_word(PCI_DEVICE_ID, self.device_id)
        cs.set_byte(PCI_REVISION_ID, self.revision)
        cs.set_bytes(PCI_CLASS_PROG, self.class_code.to_bytes(3, "little"))
        cs.set_byte(PCI_HEADER_TYPE, 0)
        cs.set_word(PCI_SUBSYSTEM_VENDOR_ID, self.subsystem_vendor_id)
        cs.set_word(PCI_SUBSYSTEM_ID, self.subsystem_id)
        if self.interrupt_pin not in (NO_PIN, INTA, INTB, INTC, INTD):
            raise ValueError(f"interrupt_pin must be 0..4, not {self.interrupt_pin}")
        cs.set_byte(PCI_INTERRUPT_PIN, self.interrupt_pin)
        cs.set_wmask_word(PCI_COMMAND, self.command_wmask)
        cs.set_w1cmask_word(PCI_STATUS, PCI_STATUS_W1C)
        cs.set_wmask_byte(PCI_CACHE_LINE_SIZE, 0xFF)
        cs.set_wmask_byte(PCI_INTERRUPT_LINE, 0xFF)  # the latency timer stays 0, as QEMU's PCI core has it
        cs.add_write_hook(PCI_COMMAND, 2, self._command_written)

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
        bar.index, bar.device = index, self
        self.bars[index] = bar
        self._routes = None
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
        self._routes = None
        self.config.set_dword(PCI_ROM_ADDRESS, 0)
        self.config.set_wmask_dword(PCI_ROM_ADDRESS, rom.address_mask())
        with self.io.transaction() as tx:
            self.io.register_device_io(tx, _RomHandler(rom), [rom.resource(0, rom.size)])
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

        Backends call this once before serving; it is idempotent.
        """
        if not self._realized:
            self.config.freeze_defaults()
            self._realized = True

    # -- regions ----------------------------------------------------------------

    def region_window(self, index: int) -> int:
        """Where region ``index`` lives in the device's IoManager.

        I/O BARs: port ``index * 0x100`` on the PIO bus. Memory BARs, the ROM
        and config space: ``index << 40`` on the MMIO bus. A handler mapped at
        BAR offset ``o`` gets ``base = window + o`` and offsets relative to that.
        """
        return self._region_bus_window(index)[0]

    def _region_bus_window(self, index: int) -> tuple[int, bool]:
        bar = self.bars.get(index)
        if bar is not None and bar.is_io:
            return index * PIO_WINDOW_SIZE, True
        return index << MMIO_WINDOW_SHIFT, False

    def regions(self) -> list[Region]:
        """All ``NUM_REGIONS`` regions, VFIO-numbered, absent ones with size 0."""
        out = []
        for index in range(NUM_REGIONS):
            bar = self.bars.get(index)
            if index < 6 and bar is not None:
                kind = RegionKind.IO if bar.is_io else RegionKind.MEMORY
                shared = getattr(bar, "shared", None)
                if shared is not None:
                    out.append(Region(index, bar.size, kind, True, True, tuple(bar.shared_areas), shared.fd))
                else:
                    out.append(Region(index, bar.size, kind, True, True))
            elif index == ROM_REGION and self.rom is not None:
                out.append(Region(index, self.rom.size, RegionKind.ROM, True, False))
            elif index == CONFIG_REGION:
                out.append(Region(index, self.config_size, RegionKind.CONFIG, True, True))
            else:
                out.append(Region(index, 0, RegionKind.ABSENT, False, False))
        return out

    def region_size(self, index: int) -> int:
        """Size of region ``index`` (0 if absent)."""
        if index == CONFIG_REGION:
            return self.config_size
        if index == ROM_REGION:
            return self.rom.size if self.rom is not None else 0
        bar = self.bars.get(index)
        return bar.size if bar is not None else 0

    def _check_access(self, index: int, offset: int, size: int) -> None:
        limit = self.region_size(index) if 0 <= index < NUM_REGIONS else 0
        if size <= 0 or offset < 0 or offset + size > limit:
            raise RegionAccessError(f"region {index}: [{offset:#x}, +{size:#x}) outside its {limit:#x} bytes")

    def _routes_table(self) -> tuple[tuple[int, int, bool], ...]:
        """``(size, window, is_io)`` of every region: what an access needs, looked up once."""
        self._routes = tuple((self.region_size(i), *self._region_bus_window(i)) for i in range(NUM_REGIONS))
        return self._routes

    def region_read(self, index: int, offset: int, data: bytearray | memoryview) -> None:
        """A read of region ``index`` at ``offset`` into ``data``, through the IoManager.

        Unclaimed offsets read as all-ones (logged, never fatal).
        """
        size = len(data)
        if 0 <= index < NUM_REGIONS:
            limit, window, is_io = (self._routes or self._routes_table())[index]
            if size > 0 and offset >= 0 and offset + size <= limit:
                mgr = self.io.current
                with self.lock:
                    try:
                        if is_io:
                            mgr.pio_read(window + offset, data)
                        else:
                            mgr.mmio_read(window + offset, data)
                    except NoDevice as exc:
                        data[:] = b"\xff" * size
                        self._unclaimed(index, offset, size, "read", exc)
                return
        self._check_access(index, offset, size)  # raises RegionAccessError

    def region_write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        """A write of ``data`` to region ``index`` at ``offset``, through the IoManager.

        Writes to unclaimed offsets are dropped (logged, never fatal).
        """
        size = len(data)
        if 0 <= index < NUM_REGIONS:
            limit, window, is_io = (self._routes or self._routes_table())[index]
            if size > 0 and offset >= 0 and offset + size <= limit:
                if index == ROM_REGION:
                    return
                mgr = self.io.current
                with self.lock:
                    try:
                        if is_io:
                            mgr.pio_write(window + offset, data)
                        else:
                            mgr.mmio_write(window + offset, data)
                    except NoDevice as exc:
                        self._unclaimed(index, offset, size, "write", exc)
                return
        self._check_access(index, offset, size)  # raises RegionAccessError

    def _unclaimed(self, index: int, offset: int, size: int, op: str, exc: NoDevice) -> None:
        key = (index, offset, size, op)
        level = logging.DEBUG if key in self._unclaimed_seen else logging.WARNING
        self._unclaimed_seen.add(key)
        what = "read as all-ones" if op == "read" else "dropped"
        self.log.log(level, "unclaimed %d-byte %s of region %d at %#x %s (%s)", size, op, index, offset, what, exc)

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

    # -- interrupts -------------------------------------------------------------

    def attach(self, backend: DeviceBackend | InterruptSink | None) -> None:
        """Route interrupts (and DMA, if it offers it) to ``backend``; ``None``: nowhere. Backends call this."""
        with self.lock:
            self._sink = backend
            self.dma.backend = backend if backend is not None and hasattr(backend, "dma_read") else NO_BACKEND
            if backend is not None and self._intx_effective:
                backend.intx(True)

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
            raise RuntimeError(f"{type(self).__name__} has no interrupt pin")
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
            raise RuntimeError(f"{type(self).__name__} has no MSI capability")
        with self.lock:
            self.msi.fire(vector)

    def fire_msix(self, vector: int) -> None:
        """Send MSI-X ``vector`` (held in the PBA while it cannot be sent, dropped while MSI-X is disabled)."""
        if self.msix is None:
            raise RuntimeError(f"{type(self).__name__} has no MSI-X capability")
        with self.lock:
            self.msix.fire(vector)

    def retry_interrupts(self) -> None:
        """Send held MSI/MSI-X vectors that can go now. Backends call this when routes change."""
        with self.lock:
            if self.msi is not None:
                self.msi.deliver_pending()
            if self.msix is not None:
                self.msix.deliver_pending()

    def _send_msi(self, vector: int) -> bool:
        sink = self._sink
        return bool(sink is not None and hasattr(sink, "msi") and sink.msi(vector))

    def _send_msix(self, vector: int) -> bool:
        sink = self._sink
        return bool(sink is not None and hasattr(sink, "msix") and sink.msix(vector))

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
            if self._sink is not None:
                self._sink.intx(effective)

    def intx_pending(self) -> bool:
        """Whether INTx is asserted and not disabled (what the interrupt controller sees)."""
        return self._intx_effective

    # -- reset ------------------------------------------------------------------

    def device_reset(self) -> None:
        """Function-level reset, as a backend delivers it: deferred work not yet
        started is dropped (see :attr:`reset_cancels_deferred`), config space goes
        back to its reset state (MSI and MSI-X disabled, nothing pending), INTx is
        deasserted, then the model's :meth:`reset` runs."""
        with self.lock:
            if self.reset_cancels_deferred:
                dropped = self.worker.cancel_pending()
                if dropped:
                    self.log.debug("reset dropped %d deferred task(s)", dropped)
            self.config.reset()
            if self.msi is not None:
                self.msi.reset()
            if self.msix is not None:
                self.msix.reset()
            self._intx_level = False
            self._update_intx()
            self.reset()

    def reset(self) -> None:
        """Model hook: put device registers back to their reset values. Default: nothing."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.vendor_id:04x}:{self.device_id:04x}>"
