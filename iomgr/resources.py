"""Resource descriptors: what a device asks for and what it was given.

A :class:`ResourceConstraint` is an allocation *request* (``"I need 0x1000
bytes of MMIO, 4 KiB aligned"``); a :class:`Resource` is an allocated resource
(``"MMIO [0xe000_0000, +0x1000)"``). :class:`DeviceResources` is an ordered list
of resources with typed getters. The :class:`~vfiouser.iomgr.manager.IoManager` only
looks at the PIO and MMIO ranges of a list and ignores every other variant, so
a caller can pass a device's whole resource list without filtering it.

>>> res = DeviceResources()
>>> res.append(MmioAddressRange(0xE000_0000, 0x1000))
>>> res.append(LegacyIrq(5))
>>> res.get_mmio_address_ranges(), res.get_legacy_irq()
([(3758096384, 4096)], 5)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

__all__ = [
    "MsiIrqType",
    "ResourceConstraint",
    "PioAddressConstraint",
    "MmioAddressConstraint",
    "MemAddressConstraint",
    "LegacyIrqConstraint",
    "PciMsiIrqConstraint",
    "PciMsixIrqConstraint",
    "GenericIrqConstraint",
    "KvmMemSlotConstraint",
    "Resource",
    "PioAddressRange",
    "MmioAddressRange",
    "MemAddressRange",
    "LegacyIrq",
    "MsiIrq",
    "MacAddress",
    "KvmMemSlot",
    "DeviceResources",
]


class MsiIrqType(enum.Enum):
    """Kind of message-signalled interrupt."""

    PCI_MSI = "pci-msi"
    PCI_MSIX = "pci-msix"
    GENERIC_MSI = "generic-msi"


# --------------------------------------------------------------------------
# Constraints (requests)


class ResourceConstraint:
    """Base class of allocation requests. Use the ``new_*`` constructors."""

    __slots__ = ()

    @staticmethod
    def new_pio(size: int) -> PioAddressConstraint:
        """A PIO range of ``size`` ports, anywhere, byte aligned."""
        return PioAddressConstraint(range=None, align=1, size=size)

    @staticmethod
    def pio_with_constraints(size: int, range: tuple[int, int] | None, align: int) -> PioAddressConstraint:
        """A PIO range of ``size`` ports inside ``range`` (min, max), ``align``-aligned."""
        return PioAddressConstraint(range=range, align=align, size=size)

    @staticmethod
    def new_mmio(size: int) -> MmioAddressConstraint:
        """An MMIO range of ``size`` bytes, anywhere, 4 KiB aligned."""
        return MmioAddressConstraint(range=None, align=0x1000, size=size)

    @staticmethod
    def mmio_with_constraints(size: int, range: tuple[int, int] | None, align: int) -> MmioAddressConstraint:
        """An MMIO range of ``size`` bytes inside ``range`` (min, max), ``align``-aligned."""
        return MmioAddressConstraint(range=range, align=align, size=size)

    @staticmethod
    def new_mem(size: int) -> MemAddressConstraint:
        """A guest-memory range of ``size`` bytes, anywhere, 4 KiB aligned."""
        return MemAddressConstraint(range=None, align=0x1000, size=size)

    @staticmethod
    def mem_with_constraints(size: int, range: tuple[int, int] | None, align: int) -> MemAddressConstraint:
        """A guest-memory range of ``size`` bytes inside ``range`` (min, max), ``align``-aligned."""
        return MemAddressConstraint(range=range, align=align, size=size)

    @staticmethod
    def new_legacy_irq(irq: int | None) -> LegacyIrqConstraint:
        """A legacy (INTx / GSI) interrupt, optionally a given one."""
        return LegacyIrqConstraint(irq=irq)

    @staticmethod
    def new_pci_msi_irq(size: int) -> PciMsiIrqConstraint:
        """``size`` PCI MSI vectors."""
        return PciMsiIrqConstraint(size=size)

    @staticmethod
    def new_pci_msix_irq(size: int) -> PciMsixIrqConstraint:
        """``size`` PCI MSI-X vectors."""
        return PciMsixIrqConstraint(size=size)

    @staticmethod
    def new_generic_irq(size: int) -> GenericIrqConstraint:
        """``size`` generic message-signalled interrupts."""
        return GenericIrqConstraint(size=size)

    @staticmethod
    def new_kvm_mem_slot(size: int, slot: int | None) -> KvmMemSlotConstraint:
        """``size`` KVM memory slots, optionally starting at ``slot`` (note: size first)."""
        return KvmMemSlotConstraint(slot=slot, size=size)


@dataclass(frozen=True, slots=True)
class PioAddressConstraint(ResourceConstraint):
    """Request for a PIO range."""

    range: tuple[int, int] | None
    align: int
    size: int


@dataclass(frozen=True, slots=True)
class MmioAddressConstraint(ResourceConstraint):
    """Request for an MMIO range."""

    range: tuple[int, int] | None
    align: int
    size: int


@dataclass(frozen=True, slots=True)
class MemAddressConstraint(ResourceConstraint):
    """Request for a guest-memory range."""

    range: tuple[int, int] | None
    align: int
    size: int


@dataclass(frozen=True, slots=True)
class LegacyIrqConstraint(ResourceConstraint):
    """Request for a legacy interrupt (``None``: any)."""

    irq: int | None


@dataclass(frozen=True, slots=True)
class PciMsiIrqConstraint(ResourceConstraint):
    """Request for PCI MSI vectors."""

    size: int


@dataclass(frozen=True, slots=True)
class PciMsixIrqConstraint(ResourceConstraint):
    """Request for PCI MSI-X vectors."""

    size: int


@dataclass(frozen=True, slots=True)
class GenericIrqConstraint(ResourceConstraint):
    """Request for generic message-signalled interrupts."""

    size: int


@dataclass(frozen=True, slots=True)
class KvmMemSlotConstraint(ResourceConstraint):
    """Request for KVM memory slots."""

    slot: int | None
    size: int


# --------------------------------------------------------------------------
# Resources (allocations)


class Resource:
    """Base class of allocated resources."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class PioAddressRange(Resource):
    """Ports ``[base, base + size)``. Trapped by the IoManager's PIO bus."""

    base: int
    size: int

    def __repr__(self) -> str:
        return f"PioAddressRange(base={self.base:#x}, size={self.size:#x})"


@dataclass(frozen=True, slots=True)
class MmioAddressRange(Resource):
    """Memory-mapped I/O ``[base, base + size)``. Trapped by the IoManager's MMIO bus."""

    base: int
    size: int

    def __repr__(self) -> str:
        return f"MmioAddressRange(base={self.base:#x}, size={self.size:#x})"


@dataclass(frozen=True, slots=True)
class MemAddressRange(Resource):
    """Guest memory ``[base, base + size)`` (not trapped)."""

    base: int
    size: int


@dataclass(frozen=True, slots=True)
class LegacyIrq(Resource):
    """A legacy interrupt line."""

    irq: int


@dataclass(frozen=True, slots=True)
class MsiIrq(Resource):
    """``size`` message-signalled interrupts of kind ``ty`` starting at ``base``."""

    ty: MsiIrqType
    base: int
    size: int


@dataclass(frozen=True, slots=True)
class MacAddress(Resource):
    """A network MAC address, as text."""

    address: str


@dataclass(frozen=True, slots=True)
class KvmMemSlot(Resource):
    """A KVM memory slot."""

    slot: int


class DeviceResources(Sequence[Resource]):
    """An ordered list of :class:`Resource` with typed getters.

    It behaves as a read-only sequence (``len``, indexing, iteration) plus
    :meth:`append`. Equality is order-sensitive.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[Resource] = ()) -> None:
        self._items: list[Resource] = list(items)
        for item in self._items:
            _check_resource(item)

    def append(self, entry: Resource) -> None:
        """Add a resource at the end (no de-duplication)."""
        _check_resource(entry)
        self._items.append(entry)

    @overload
    def __getitem__(self, index: int) -> Resource: ...
    @overload
    def __getitem__(self, index: slice) -> list[Resource]: ...
    def __getitem__(self, index):
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Resource]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DeviceResources):
            return self._items == other._items
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._items))

    def __repr__(self) -> str:
        return f"DeviceResources({self._items!r})"

    def get_pio_address_ranges(self) -> list[tuple[int, int]]:
        """Every PIO range as ``(base, size)``, in insertion order."""
        return [(r.base, r.size) for r in self._items if isinstance(r, PioAddressRange)]

    def get_mmio_address_ranges(self) -> list[tuple[int, int]]:
        """Every MMIO range as ``(base, size)``, in insertion order."""
        return [(r.base, r.size) for r in self._items if isinstance(r, MmioAddressRange)]

    def get_mem_address_ranges(self) -> list[tuple[int, int]]:
        """Every guest-memory range as ``(base, size)``, in insertion order."""
        return [(r.base, r.size) for r in self._items if isinstance(r, MemAddressRange)]

    def get_legacy_irq(self) -> int | None:
        """The first legacy interrupt, or ``None``."""
        return next((r.irq for r in self._items if isinstance(r, LegacyIrq)), None)

    def _msi(self, ty: MsiIrqType) -> tuple[int, int] | None:
        return next(((r.base, r.size) for r in self._items if isinstance(r, MsiIrq) and r.ty is ty), None)

    def get_pci_msi_irqs(self) -> tuple[int, int] | None:
        """The first PCI MSI allocation as ``(base, size)``, or ``None``."""
        return self._msi(MsiIrqType.PCI_MSI)

    def get_pci_msix_irqs(self) -> tuple[int, int] | None:
        """The first PCI MSI-X allocation as ``(base, size)``, or ``None``."""
        return self._msi(MsiIrqType.PCI_MSIX)

    def get_generic_msi_irqs(self) -> tuple[int, int] | None:
        """The first generic MSI allocation as ``(base, size)``, or ``None``."""
        return self._msi(MsiIrqType.GENERIC_MSI)

    def get_kvm_mem_slots(self) -> list[int]:
        """Every KVM memory slot, in insertion order."""
        return [r.slot for r in self._items if isinstance(r, KvmMemSlot)]

    def get_mac_address(self) -> str | None:
        """The first MAC address, or ``None``."""
        return next((r.address for r in self._items if isinstance(r, MacAddress)), None)

    def get_all_resources(self) -> list[Resource]:
        """All resources, as a new list."""
        return list(self._items)


def _check_resource(item: object) -> None:
    if not isinstance(item, Resource):
        raise TypeError(f"not a Resource: {item!r}")
