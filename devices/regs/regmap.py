"""The declaration of a block of registers: what a datasheet's register table says.

A :class:`RegisterMap` is built once (a module constant, next to the model) and
checked when built: unique names, no two registers answering the same bytes in
the same direction unless banked. Each device builds a live
:class:`~vfiouser.devices.regs.RegisterBlock` from it with :meth:`RegisterMap.instantiate`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .access import RegisterDefinitionError
from .policy import DEFAULT_POLICY, AccessPolicy
from .register import Register
from .table import markdown_table

if TYPE_CHECKING:
    from .block import RegisterBlock

__all__ = ["RegisterMap"]


def _flatten(items) -> list[Register]:
    out = []
    for item in items:
        if isinstance(item, Register):
            out.append(item)
        else:
            out.extend(_flatten(item))
    return out


class RegisterMap:
    """The declaration: registers (with :func:`~vfiouser.devices.regs.register.group` for
    register files and arrays), a name, the access policy, the size it spans."""

    def __init__(self, registers: Iterable, *, name: str = "", policy: AccessPolicy = DEFAULT_POLICY,
                 size: int | None = None, doc: str = "") -> None:
        self.registers = _flatten(registers)
        self.name, self.policy, self.doc = name, policy, doc
        paths = set()
        for r in self.registers:
            if r.path in paths:
                raise RegisterDefinitionError(f"{name or 'register map'}: two registers named {r.path}")
            paths.add(r.path)
        self._check_overlaps()
        end = max((r.end for r in self.registers), default=0)
        if size is not None and size < end:
            raise RegisterDefinitionError(f"{name or 'register map'}: registers reach {end:#x}, past size {size:#x}")
        self.size = size if size is not None else end

    def _check_overlaps(self) -> None:
        regs = sorted(self.registers, key=lambda r: r.offset)
        for i, a in enumerate(regs):
            for b in regs[i + 1:]:
                if b.offset >= a.end:
                    break
                banked = a.bank is not None and b.bank is not None
                both_read = a.readable and b.readable
                both_write = a.writable and b.writable
                if not banked and (both_read or both_write):
                    raise RegisterDefinitionError(
                        f"{self.name or 'register map'}: {a.path} ({a.offset:#x}) and {b.path} ({b.offset:#x}) "
                        "overlap; give both a bank condition, or make one read-only and the other write-only")

    def instantiate(self, owner: object = None, *, name: str | None = None) -> RegisterBlock:
        """A live :class:`RegisterBlock` of this map, with ``owner``'s decorated hooks bound."""
        from .block import RegisterBlock

        return RegisterBlock(self, owner=owner, name=name)

    def markdown(self) -> str:
        """The register table, in Markdown (offset, register, bits, field, access, reset, description)."""
        return markdown_table(self)

    def __repr__(self) -> str:
        return f"<RegisterMap {self.name or '?'}: {len(self.registers)} registers, {self.size:#x} bytes>"


