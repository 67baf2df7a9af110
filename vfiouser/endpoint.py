"""The served device as the vfio-user protocol sees it.

A :class:`DeviceEndpoint` wraps one :class:`vfiouser.devices.pci.PciDevice` for the whole
life of a server: it realizes the model, answers the questions about regions
and interrupts that DEVICE_GET_INFO, GET_REGION_INFO and GET_IRQ_INFO ask, and
routes the model's interrupts and DMA to whichever session is connected (or
nowhere, between clients). Sessions come and go; the endpoint and the device state stay.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vfiouser.devices.pci import NUM_REGIONS, PciDevice, RegionKind
from vfiouser.devices.pci.dma import DmaUnavailable

from .protocol import IrqIndex, RegionCapId, RegionFlags

__all__ = ["DeviceEndpoint", "RegionEntry"]


@dataclass(frozen=True)
class RegionEntry:
    """One region as DEVICE_GET_REGION_INFO reports it."""

    index: int
    size: int
    flags: int
    kind: str


class DeviceEndpoint:
    """A device model made servable: region table, interrupt counts, interrupt routing."""

    def __init__(self, model: PciDevice) -> None:
        model.realize()
        self.model = model
        self.regions: list[RegionEntry] = []
        #: Region-info capabilities per region (dicts for ``protocol.RegionCap``), e.g. sparse mmap areas.
        self.region_caps: list[list[dict]] = []
        #: The fd sent with a region's info when the client may mmap part of it (else None).
        self.region_fds: list[int | None] = []
        self._mmap_bytes: list[int] = []
        for region in model.regions():
            flags = 0
            caps: list[dict] = []
            if region.size:
                if region.readable:
                    flags |= RegionFlags.READ
                if region.writable:
                    flags |= RegionFlags.WRITE
                if region.mmap_areas:
                    flags |= RegionFlags.MMAP
                    if list(region.mmap_areas) != [(0, region.size)]:  # no cap: the whole region
                        areas = [dict(offset=o, size=n) for o, n in region.mmap_areas]
                        caps.append(dict(id=RegionCapId.SPARSE_MMAP, version=1,
                                         body=dict(nr_areas=len(areas), reserved=0, areas=areas)))
            self.regions.append(RegionEntry(region.index, region.size, int(flags), region.kind))
            self.region_caps.append(caps)
            self.region_fds.append(region.mmap_fd if region.mmap_areas else None)
            self._mmap_bytes.append(sum(n for _, n in region.mmap_areas))
        assert len(self.regions) == NUM_REGIONS
        #: Region sizes by index, for the hot path's bounds checks.
        self.region_sizes = [r.size for r in self.regions]
        self.region_writable = [bool(r.flags & RegionFlags.WRITE) for r in self.regions]
        self.irq_counts = [0] * 5
        self.irq_counts[IrqIndex.INTX] = 1 if model.interrupt_pin else 0
        self.irq_counts[IrqIndex.MSI] = model.msi.vectors if model.msi is not None else 0
        self.irq_counts[IrqIndex.MSIX] = model.msix.vectors if model.msix is not None else 0
        self.irq_counts[IrqIndex.ERR] = 1
        self.irq_counts[IrqIndex.REQ] = 1
        self._session = None
        self._lock = threading.Lock()
        model.attach(self)

    @property
    def num_regions(self) -> int:
        return len(self.regions)

    @property
    def num_irqs(self) -> int:
        return len(self.irq_counts)

    def describe_regions(self) -> str:
        """One line per present region, for the server's start-up log."""
        lines = []
        for r in self.regions:
            if r.size and r.kind != RegionKind.CONFIG:
                shared = self._mmap_bytes[r.index]
                mapped = f", {shared:#x} mmap-able" if shared else ""
                lines.append(f"region {r.index}: {r.kind} {r.size:#x} bytes{mapped}")
        return "; ".join(lines) or "no BARs"

    # -- the model's backend: interrupts and DMA go to the connected session --------

    def connect(self, session) -> None:
        """Route the model's interrupts and DMA to ``session``."""
        with self._lock:
            self._session = session

    def disconnect(self, session) -> None:
        with self._lock:
            if self._session is session:
                self._session = None

    def intx(self, asserted: bool) -> None:
        session = self._session
        if session is not None:
            session.irqs.intx(asserted)

    def msi(self, vector: int) -> bool:
        session = self._session
        return session is not None and session.irqs.fire_vector(IrqIndex.MSI, vector)

    def msix(self, vector: int) -> bool:
        session = self._session
        return session is not None and session.irqs.fire_vector(IrqIndex.MSIX, vector)

    def intx_level(self) -> bool:
        """The model's effective INTx level (asserted and not disabled)."""
        return self.model.intx_pending()

    def dma_read(self, addr: int, size: int) -> bytes:
        session = self._session
        if session is None:
            raise DmaUnavailable("no client is connected", addr, size)
        return session.dma_read(addr, size)

    def dma_mapped(self, addr: int, size: int, write: bool) -> list[tuple[int, int]]:
        session = self._session
        if session is None:
            raise DmaUnavailable("no client is connected", addr, size)
        return session.dma_mapped(addr, size, write)

    def dma_write(self, addr: int, data: bytes) -> None:
        session = self._session
        if session is None:
            raise DmaUnavailable("no client is connected", addr, len(data))
        session.dma_write(addr, data)
