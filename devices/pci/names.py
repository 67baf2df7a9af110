"""Names of what an access reaches, for logs and traces: config registers, capabilities, MSI-X.

:class:`AccessNames` answers :meth:`vfiouser.devices.port.DevicePort.describe_access`
for a :class:`~vfiouser.devices.pci.PciDevice`: the type-0 header's registers
(``command``, ``status``, ``BAR2``, ...), the fields of the capabilities in
config space (``MSI.control``, ``MSI-X.table``, ``PM.pmcsr``, ...), the MSI-X
table and pending-bit array inside their BARs (``MSI-X table[3].data``,
``MSI-X PBA``); anything else inside a BAR is named by the model's own
:meth:`~vfiouser.devices.pci.PciDevice.register_names` hook. Names are built
once, from the layout the device froze when it was realized, and looked up
without the device lock (a log line must not change what the model sees).

>>> from vfiouser.devices.edu import Edu
>>> names = AccessNames(Edu())
>>> names.describe(7, 0x04, 4), names.describe(7, 0x40, 4), names.describe(7, 0x44, 4), names.describe(7, 0x80, 4)
('command, status', 'MSI.header, MSI.control', 'MSI.address', '')
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import (
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSI,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_PM,
    PCI_CAP_ID_VNDR,
    PCI_CONFIG_SPACE_SIZE,
)

if TYPE_CHECKING:
    from .device import PciDevice

__all__ = ["AccessNames", "HEADER_REGISTERS", "CAPABILITY_NAMES"]

#: The type-0 header: ``(offset, size, name)``.
HEADER_REGISTERS = (
    (0x00, 2, "vendor_id"), (0x02, 2, "device_id"), (0x04, 2, "command"), (0x06, 2, "status"),
    (0x08, 1, "revision"), (0x09, 3, "class_code"), (0x0C, 1, "cache_line_size"), (0x0D, 1, "latency_timer"),
    (0x0E, 1, "header_type"), (0x0F, 1, "bist"),
    *((0x10 + 4 * i, 4, f"BAR{i}") for i in range(6)),
    (0x28, 4, "cardbus_cis"), (0x2C, 2, "subsystem_vendor_id"), (0x2E, 2, "subsystem_id"),
    (0x30, 4, "rom_address"), (0x34, 1, "capabilities"), (0x35, 7, "reserved"),
    (0x3C, 1, "interrupt_line"), (0x3D, 1, "interrupt_pin"), (0x3E, 1, "min_gnt"), (0x3F, 1, "max_lat"),
)

#: Capability IDs by name (others are shown as ``cap0xNN``).
CAPABILITY_NAMES = {PCI_CAP_ID_PM: "PM", PCI_CAP_ID_MSI: "MSI", PCI_CAP_ID_VNDR: "vendor", PCI_CAP_ID_EXP: "PCIe",
                    PCI_CAP_ID_MSIX: "MSI-X"}

#: Fields of an MSI-X table entry.
_MSIX_ENTRY = ((0, 4, "address"), (4, 4, "address_hi"), (8, 4, "data"), (12, 4, "vector_control"))


def _unique(names) -> str:
    return ", ".join(dict.fromkeys(n for n in names if n))


class AccessNames:
    """Names of the registers an access reaches, for one device (see the module docstring)."""

    def __init__(self, device: PciDevice) -> None:
        self.device = device
        self._config: list[str] | None = None

    def describe(self, index: int, offset: int, size: int, *, write: bool = False) -> str:
        """The registers (and fields) ``size`` bytes at ``offset`` of region ``index`` reach,
        comma-separated; ``""`` where nothing is named."""
        from .device import CONFIG_REGION

        if index == CONFIG_REGION:
            table = self._config if self._config is not None else self._build_config()
            return _unique(table[max(offset, 0) : offset + size])
        msix = self._msix(index, offset, size)
        if msix:
            return msix
        return self.device.register_names(index, offset, size, write=write)

    # -- MSI-X in the BARs ---------------------------------------------------------

    def _msix(self, index: int, offset: int, size: int) -> str:
        cap = self.device.msix
        if cap is None:
            return ""
        out = []
        if cap.table_bar.index == index and cap.table_offset <= offset < cap.table_offset + cap.table_size:
            rel = offset - cap.table_offset
            entry, field = divmod(rel, 16)
            names = [n for start, length, n in _MSIX_ENTRY if start < field + size and field < start + length]
            out.append(f"MSI-X table[{entry}].{'/'.join(names) or 'entry'}")
        if cap.pba_bar.index == index and cap.pba_offset <= offset < cap.pba_offset + cap.pba_size:
            out.append("MSI-X PBA")
        return ", ".join(out)

    # -- config space ---------------------------------------------------------------

    def _build_config(self) -> list[str]:
        device = self.device
        table = [""] * device.config.size
        for start, length, name in HEADER_REGISTERS:
            for i in range(start, start + length):
                table[i] = name
        for bar in device.bars.values():
            if bar.slots == 2:
                reg = 0x10 + 4 * bar.index
                table[reg : reg + 8] = [f"BAR{bar.index}"] * 4 + [f"BAR{bar.index}.high"] * 4
        caps = sorted(device.config.capabilities())
        for i, (offset, cap_id) in enumerate(caps):
            end = caps[i + 1][0] if i + 1 < len(caps) else PCI_CONFIG_SPACE_SIZE
            name = CAPABILITY_NAMES.get(cap_id, f"cap{cap_id:#04x}")
            fields = self._cap_fields(cap_id, offset)
            length = max((s + n for s, n, _ in fields), default=2)
            if cap_id == PCI_CAP_ID_VNDR:
                length = max(length, device.config.get_byte(offset + 2))
            end = min(end, offset + max(length, 2))
            for pos in range(offset, end):
                rel = pos - offset
                field = next((f".{f}" for s, n, f in fields if s <= rel < s + n), f"+{rel:#x}")
                table[pos] = name + field
        self._config = table
        return table

    def _cap_fields(self, cap_id: int, offset: int) -> list[tuple[int, int, str]]:
        """``(offset in the capability, size, name)`` of the fields of a capability we know."""
        fields = [(0, 2, "header")]
        if cap_id == PCI_CAP_ID_MSI and self.device.msi is not None and self.device.msi.offset == offset:
            msi = self.device.msi
            fields += [(2, 2, "control"), (4, 4, "address")]
            if msi.addr64:
                fields.append((8, 4, "address_hi"))
            fields.append((msi._data, 2, "data"))
            if msi.per_vector_mask:
                fields += [(msi._mask, 4, "mask"), (msi._pending, 4, "pending")]
        elif cap_id == PCI_CAP_ID_MSIX:
            fields += [(2, 2, "control"), (4, 4, "table"), (8, 4, "pba")]
        elif cap_id == PCI_CAP_ID_PM:
            fields += [(2, 2, "pmc"), (4, 2, "pmcsr"), (6, 1, "bridge"), (7, 1, "data")]
        elif cap_id == PCI_CAP_ID_VNDR:
            fields.append((2, 1, "length"))
        return fields
