"""What an access of an unusual width or alignment does: the device's own rule, declared.

Buses deliver accesses of 1, 2, 4 or 8 bytes at any offset; devices disagree on
what a narrow, wide or misaligned one means. A :class:`AccessPolicy` says it
once for a block of registers (and a register may override ``narrow`` and
``wide``):

=============  ===============================================================================
``sizes``      access sizes the device takes at all; others are *refused*
``aligned``    refuse accesses not aligned to their own size
``refused``    the byte a refused read returns (writes are dropped)
``unmapped``   the byte read where no register is (and where a register declines, below)
``narrow``     an access covering part of a register: ``LANES`` reads those bytes and
               writes only them (byte enables); ``EXTEND`` takes it as the whole register
               when it starts at the register's offset (a read returns the low bytes, a
               write zero-extends; elsewhere the register declines); ``DECLINE`` ignores it
``wide``       an access running past a register: ``SPLIT`` gives each register its bytes;
               ``DECLINE``: the register takes no part
=============  ===============================================================================

>>> p = AccessPolicy(sizes=(4, 8), aligned=True, refused=0x00, unmapped=0xFF, narrow=EXTEND, wide=DECLINE)
>>> p.allows(4, 0x84), p.allows(2, 0x80), p.allows(8, 0x84)
(True, False, False)
"""

from __future__ import annotations

from dataclasses import dataclass

from .access import RegisterDefinitionError

__all__ = ["AccessPolicy", "LANES", "EXTEND", "DECLINE", "SPLIT", "DEFAULT_POLICY"]

LANES, EXTEND, DECLINE, SPLIT = "lanes", "extend", "decline", "split"


@dataclass(frozen=True)
class AccessPolicy:
    """A block's access-width and alignment rules (see the module docstring)."""

    sizes: tuple[int, ...] = (1, 2, 4, 8)
    aligned: bool = False
    refused: int = 0xFF
    unmapped: int = 0x00
    narrow: str = LANES
    wide: str = SPLIT

    def __post_init__(self) -> None:
        if not self.sizes or any(s not in (1, 2, 4, 8) for s in self.sizes):
            raise RegisterDefinitionError(f"access sizes must be among 1, 2, 4, 8, not {self.sizes}")
        object.__setattr__(self, "sizes", tuple(sorted(set(self.sizes))))
        for name in ("refused", "unmapped"):
            if not 0 <= getattr(self, name) <= 0xFF:
                raise RegisterDefinitionError(f"{name} is a byte value, not {getattr(self, name):#x}")
        if self.narrow not in (LANES, EXTEND, DECLINE):
            raise RegisterDefinitionError(f"narrow must be lanes, extend or decline, not {self.narrow!r}")
        if self.wide not in (SPLIT, DECLINE):
            raise RegisterDefinitionError(f"wide must be split or decline, not {self.wide!r}")

    def allows(self, size: int, offset: int) -> bool:
        """Whether an access of ``size`` bytes at ``offset`` reaches the registers at all."""
        return size in self.sizes and not (self.aligned and offset % size)

    def text(self) -> str:
        """One line for a register table."""
        parts = ["accesses of " + "/".join(str(s) for s in self.sizes) + " bytes"]
        if self.aligned:
            parts.append("naturally aligned")
        parts.append(f"others read {self.refused:#04x} bytes and are ignored" if self.sizes != (1, 2, 4, 8)
                     or self.aligned else "")
        parts.append(f"unmapped bytes read {self.unmapped:#04x}")
        parts.append({LANES: "a narrow access reads or writes its byte lanes",
                      EXTEND: "a narrow access at a register's offset is the whole register, zero-extended",
                      DECLINE: "a narrow access is ignored"}[self.narrow])
        parts.append("a wide access is split among registers" if self.wide == SPLIT
                     else "a register ignores an access wider than itself")
        return "; ".join(p for p in parts if p) + "."


DEFAULT_POLICY = AccessPolicy()
