"""What a model's register map says about its BARs, for fault rules: names and defined bits.

A rule may select an access by register name (``"register": "in0_7"``) or by
register and field (``"register": "status.computing"``) wherever the model maps
a :class:`~vfiouser.devices.regs.RegisterBlock` onto a BAR; a block's own name
may prefix it (``"edu.status"``). :class:`RegisterShapes` resolves those names to
``(region, first offset, last offset, bit mask)`` and, for read fuzzing, gives
per byte the bits the map defines for reads (fields software may read), so
"random" leaves reserved bits (and write-only fields) as the model reads them.

>>> from vfiouser.devices.idio16 import Idio16
>>> shapes = RegisterShapes(Idio16().port)
>>> shapes.resolve("in0_7")
(2, 1, 1, 255)
>>> shapes.byte_masks(2, 0, 3)    # out0_7, in0_7 (every bit a field), irq_ctl (reserved: none)
[255, 255, 0]
"""

from __future__ import annotations

from .plan import FaultPlanError

__all__ = ["RegisterShapes"]


class RegisterShapes:
    """Register names and field bits of the model behind ``port`` (a
    :class:`~vfiouser.devices.pci.port.PciPort`; any other port names nothing)."""

    def __init__(self, port) -> None:
        #: name -> (region, first offset, last offset inclusive, mask over the register's value)
        self.names: dict[str, tuple[int, int, int, int]] = {}
        #: region -> {offset: defined bits of that byte}; a region absent here has no map
        self.bytes: dict[int, dict[int, int]] = {}
        #: region -> [(start, end)] spans covered by a register block
        self.spans: dict[int, list[tuple[int, int]]] = {}
        from vfiouser.devices.regs import RegisterBlock  # the register layer imports the PCI framework

        device = getattr(port, "device", None)
        bars = getattr(device, "bars", None) or {}
        for index, bar in bars.items():
            for block_off, block_size, handler in getattr(bar, "mappings", ()):
                if isinstance(handler, RegisterBlock):
                    self._add_block(index, block_off, block_size, handler)

    def _add_block(self, index: int, base: int, size: int, block) -> None:
        self.spans.setdefault(index, []).append((base, base + size))
        masks = self.bytes.setdefault(index, {})
        prefix = f"{block.name}." if block.name else ""
        for reg in block.registers:
            start = base + reg.offset
            defined = 0
            for f in reg.fields:
                if "r" in f.sw:  # a field software reads (not reserved, not write-only)
                    defined |= f.mask
                if not reg.implicit:
                    for name in (f"{reg.path}.{f.name}", f"{prefix}{reg.path}.{f.name}"):
                        self.names.setdefault(name, (index, start, start + reg.nbytes - 1, f.mask))
            for name in (reg.path, f"{prefix}{reg.path}"):
                self.names.setdefault(name, (index, start, start + reg.nbytes - 1, reg.full))
            for i in range(reg.nbytes):
                masks[start + i] = masks.get(start + i, 0) | (defined >> (8 * i)) & 0xFF

    def resolve(self, name: str, rule: int | None = None) -> tuple[int, int, int, int]:
        """``(region, first offset, last offset, mask)`` of register or field ``name``."""
        try:
            return self.names[name]
        except KeyError:
            known = ", ".join(sorted(n for n in self.names if "." not in n)[:12]) or "none: the model has no map"
            raise FaultPlanError(f"the model has no register or field {name!r} (registers: {known})", rule,
                                 "register") from None

    def byte_masks(self, region: int, offset: int, size: int) -> list[int]:
        """Per byte of an access, the bits a field defines: 0xFF where no map covers the byte,
        0 for bytes of a block that no register (or only reserved bits) covers."""
        masks = self.bytes.get(region)
        if masks is None:
            return [0xFF] * size
        spans = self.spans[region]
        out = []
        for pos in range(offset, offset + size):
            if pos in masks:
                out.append(masks[pos])
            else:
                out.append(0 if any(a <= pos < b for a, b in spans) else 0xFF)
        return out
