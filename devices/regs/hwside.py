"""The side of a register block that is not the bus: interrupts, host-side access, reset, names.

:class:`HardwareSide` is mixed into :class:`~vfiouser.devices.regs.RegisterBlock`:
the OR of the interrupt fields and the callback that follows it, the model's
(or a host API's) reads and writes with the fields' ``hw`` access rules and
sticky bits, reset, and the lookup that names registers and fields for logs.
"""

from __future__ import annotations

from vfiouser.devices.errors import DeviceUsageError

from .access import RO, RW, WO, Field
from .register import Register

__all__ = ["HardwareSide"]


class HardwareSide:
    """Interrupts, hardware-side access, reset and description of a register block."""

    # -- interrupts ---------------------------------------------------------------------------

    def _compile_interrupts(self) -> list:
        out = []
        for r in self.registers:
            for f in r.intr_fields:
                en = mk = None
                for ref, kind in ((f.enable, "enable"), (f.mask_by, "mask")):
                    if ref is None:
                        continue
                    src, sf = self._resolve_value(ref, r.scope)
                    src.irq = True
                    shift, width_mask = (sf.lsb, (1 << sf.width) - 1) if sf is not None else (0, src.full)
                    getter = (lambda s=src, sh=shift, m=width_mask: (s.value >> sh) & m)
                    if kind == "enable":
                        en = getter
                    else:
                        mk = getter
                out.append((r, f, en, mk))
                r.irq = True
        for r in self.registers:  # an alias of an interrupt register changes it too
            if r.alias_of is not None and r.primary.irq:
                r.irq = True
        return out

    def update_interrupt(self) -> None:
        """Recompute the OR of the interrupt fields; call :attr:`on_interrupt` if it changed."""
        level = False
        for r, f, en, mk in self._intr:
            bits = (r.value & f.mask) >> f.lsb
            if en is not None:
                bits &= en()
            if mk is not None:
                bits &= ~mk()
            if bits:
                level = True
                break
        if level != self.irq_level:
            self.irq_level = level
            callback = self.on_interrupt
            if callback is not None:
                callback(level)

    @property
    def has_interrupts(self) -> bool:
        """Whether any field is an interrupt (``intr``)."""
        return bool(self._intr)

    # -- the hardware side ----------------------------------------------------------------------

    def hw_read(self, path: str) -> int:
        """The value of register or field ``path``, as the hardware sees it (``hw`` must allow reads)."""
        reg, field = self._resolve_value(path)
        fields = [field] if field is not None else list(reg.fields)
        denied = [f.name for f in fields if f.hw not in (RW, RO)]
        if denied and field is not None:
            raise DeviceUsageError(f"{path} is not readable by hardware (hw={field.hw})")
        if field is not None:
            return reg.get(field.name)
        return sum(reg.value & f.mask for f in fields if f.hw in (RW, RO))

    def hw_write(self, path: str, value: int) -> None:
        """Write register or field ``path`` from the hardware side (a host API, a device engine):
        only fields whose ``hw`` allows writes change; a sticky field (an interrupt field, unless
        declared otherwise) ORs the new bits in (software clears them). The interrupt line follows."""
        reg, field = self._resolve_value(path)
        if field is not None:
            if field.hw not in (RW, WO):
                raise DeviceUsageError(f"{path} is not writable by hardware (hw={field.hw})")
            if value < 0 or value >> field.width:
                raise DeviceUsageError(f"{value:#x} does not fit in {path} ({field.width} bits)")
            fields, value = [field], value << field.lsb
        else:
            if value < 0 or value > reg.full:
                raise DeviceUsageError(f"{value:#x} does not fit in {path} ({reg.width} bits)")
            fields = [f for f in reg.fields if f.hw in (RW, WO)]
        new = reg.value
        for f in fields:
            bits = value & f.mask
            new = (new | bits) if f.sticky else (new & ~f.mask) | bits
        reg.value = new
        if self._intr:
            self.update_interrupt()

    def reset(self) -> None:
        """Every register back to its reset value (the interrupt line follows)."""
        for r in self.registers:
            if r.alias_of is None:
                r.reset()
        if self._intr:
            self.update_interrupt()

    # -- description ------------------------------------------------------------------------------

    def lookup(self, offset: int, size: int, *, write: bool = False) -> list[tuple[Register, list[Field]]]:
        """The registers (and their fields) an access of ``size`` bytes at ``offset`` reaches
        now (banks as they are selected)."""
        out = []
        for r in self._touched(self._wbytes if write else self._rbytes, offset, size):
            span = self._span(r, offset, size)
            if span is None:
                continue
            lo, hi = span[0] - r.offset, span[1] - r.offset
            out.append((r, r.fields_in(((1 << (8 * (hi - lo))) - 1) << (8 * lo))))
        return out

    def describe(self, offset: int, size: int, *, write: bool = False) -> str:
        """Register and field names for an access, for logs: ``"status (ready, done)"``."""
        parts = []
        for r, fields in self.lookup(offset, size, write=write):
            if r.implicit or not fields:
                parts.append(r.path)
            else:
                parts.append(f"{r.path} ({', '.join(f.name for f in fields)})")
        return ", ".join(parts)

