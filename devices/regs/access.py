"""Fields, their access kinds, and the one write engine every register uses.

A field's behaviour is a datasheet row, spelled with SystemRDL's words:

========================  ====================================================================
``sw``                    what software may do: ``RW`` (read-write), ``RO`` (read-only),
                          ``WO`` (write-only: reads as 0), ``RSVD`` (reserved: reads as 0,
                          writes ignored; SystemRDL's ``na``)
``onwrite``               a write side effect (needs a writable field): ``W1C`` (``woclr``),
                          ``W1S`` (``woset``), ``W1T`` (``wot``, toggle), ``W0C`` (``wzc``),
                          ``W0S`` (``wzs``), ``W0T`` (``wzt``), ``WCLR`` (any write clears),
                          ``WSET`` (any write sets)
``onread``                a read side effect: ``RCLR`` (clear on read), ``RSET`` (set on read)
``hw``                    what the model may do from the host side (``RW``, ``RO``, ``WO``,
                          ``RSVD``): checked by :meth:`RegisterBlock.hw_write`
``intr``                  the field is an interrupt: the block ORs such fields into its
                          interrupt line (a host-side write to it is sticky: it sets bits)
========================  ====================================================================

Bits a register declares no field for are reserved. :func:`apply_write` is the
write engine: the bits a write may replace, the write-1/write-0 effects, and
byte lanes (the bytes the access covers); PCI configuration space applies its
write masks through the same function.

>>> f = Field("err", 3, sw=RW, onwrite=W1C)
>>> f.mask, f.lsb, f.width
(8, 3, 1)
>>> hex(apply_write(0b1010, 0b1010, 0xF, wmask=0b0011, woclr=0b1000))  # W1C bit 3, RW bits 0-1
'0x2'
"""

from __future__ import annotations

from vfiouser.devices.errors import DefinitionError

__all__ = [
    "Field",
    "RegisterDefinitionError",
    "apply_write",
    "RW",
    "RO",
    "WO",
    "RSVD",
    "W1C",
    "W1S",
    "W1T",
    "W0C",
    "W0S",
    "W0T",
    "WCLR",
    "WSET",
    "RCLR",
    "RSET",
    "ACCESS_KINDS",
    "WRITE_EFFECTS",
    "READ_EFFECTS",
]

RW, RO, WO, RSVD = "rw", "r", "w", "na"
W1C, W1S, W1T, W0C, W0S, W0T, WCLR, WSET = "woclr", "woset", "wot", "wzc", "wzs", "wzt", "wclr", "wset"
RCLR, RSET = "rclr", "rset"

#: Software and hardware access kinds.
ACCESS_KINDS = (RW, RO, WO, RSVD)
#: Write side effects, in the order :func:`apply_write` takes their masks.
WRITE_EFFECTS = (W1C, W1S, W1T, W0C, W0S, W0T, WCLR, WSET)
#: Read side effects.
READ_EFFECTS = (RCLR, RSET)

_SHORT = {RW: "RW", RO: "RO", WO: "WO", RSVD: "reserved", W1C: "W1C", W1S: "W1S", W1T: "W1T", W0C: "W0C",
          W0S: "W0S", W0T: "W0T", WCLR: "WCLR", WSET: "WSET", RCLR: "RC", RSET: "RS"}


class RegisterDefinitionError(DefinitionError):
    """A register map declares something that cannot work (overlapping fields or registers,
    an unknown access kind, a hook for a name that does not exist)."""


def apply_write(old: int, data: int, lanes: int, wmask: int, woclr: int = 0, woset: int = 0, wot: int = 0,
                wzc: int = 0, wzs: int = 0, wzt: int = 0, wclr: int = 0, wset: int = 0) -> int:
    """The value a register holds after software writes ``data`` over ``old``.

    Only bits inside ``lanes`` (the bytes the access covers) change: ``wmask`` bits
    take the written value; ``woclr``/``woset``/``wot`` bits are cleared, set or
    toggled where ``data`` has a 1, ``wzc``/``wzs``/``wzt`` where it has a 0;
    ``wclr``/``wset`` bits are cleared or set by any write. Every other bit keeps
    its value (read-only, reserved).
    """
    m = wmask & lanes
    value = (old & ~m) | (data & m)
    ones = data & lanes
    if woclr:
        value &= ~(ones & woclr)
    if woset:
        value |= ones & woset
    if wot:
        value ^= ones & wot
    if wzc or wzs or wzt:
        zeros = ~data & lanes
        value &= ~(zeros & wzc)
        value |= zeros & wzs
        value ^= zeros & wzt
    if wclr:
        value &= ~(lanes & wclr)
    if wset:
        value |= lanes & wset
    return value


def _bits(bits) -> tuple[int, int]:
    """``(lsb, width)`` from ``n`` (one bit) or ``(msb, lsb)`` (a datasheet's ``msb:lsb``)."""
    if isinstance(bits, int):
        return bits, 1
    if isinstance(bits, tuple) and len(bits) == 2 and all(isinstance(b, int) for b in bits):
        msb, lsb = bits
        if msb < lsb:
            raise RegisterDefinitionError(f"bits {bits}: give (msb, lsb), msb first")
        return lsb, msb - lsb + 1
    raise RegisterDefinitionError(f"bits must be a bit number or (msb, lsb), not {bits!r}")


class Field:
    """One field of a register: its bits and behaviour (see the module docstring).

    ``bits`` is a bit number or ``(msb, lsb)``; ``reset`` the field's reset value;
    ``sticky`` (default: an interrupt field is) makes a hardware write set bits, never clear them;
    ``enable``/``mask`` (interrupt fields only) name another field, ``"reg.field"``,
    whose bits enable or mask this one's.
    """

    __slots__ = ("name", "lsb", "width", "mask", "sw", "hw", "reset", "onread", "onwrite", "intr", "sticky",
                 "enable", "mask_by", "doc")

    def __init__(self, name: str, bits, *, sw: str = RW, hw: str = RW, reset: int = 0, onread: str | None = None,
                 onwrite: str | None = None, intr: bool = False, sticky: bool | None = None, enable: str | None = None,
                 mask: str | None = None, doc: str = "") -> None:
        self.name = name
        self.lsb, self.width = _bits(bits)
        if self.lsb < 0:
            raise RegisterDefinitionError(f"field {name}: negative bit number")
        self.mask = ((1 << self.width) - 1) << self.lsb
        for what, kind in (("sw", sw), ("hw", hw)):
            if kind not in ACCESS_KINDS:
                raise RegisterDefinitionError(f"field {name}: {what}={kind!r} is not one of {ACCESS_KINDS}")
        if onwrite is not None and onwrite not in WRITE_EFFECTS:
            raise RegisterDefinitionError(f"field {name}: onwrite={onwrite!r} is not one of {WRITE_EFFECTS}")
        if onread is not None and onread not in READ_EFFECTS:
            raise RegisterDefinitionError(f"field {name}: onread={onread!r} is not one of {READ_EFFECTS}")
        if onwrite is not None and sw not in (RW, WO):
            raise RegisterDefinitionError(f"field {name}: onwrite={onwrite} needs a writable field, not sw={sw}")
        if onread is not None and sw not in (RW, RO):
            raise RegisterDefinitionError(f"field {name}: onread={onread} needs a readable field, not sw={sw}")
        if (enable or mask) and not intr:
            raise RegisterDefinitionError(f"field {name}: enable/mask only apply to an interrupt field (intr=True)")
        if reset < 0 or reset >> self.width:
            raise RegisterDefinitionError(f"field {name}: reset value {reset:#x} does not fit in {self.width} bit(s)")
        self.sw, self.hw, self.reset = sw, hw, reset
        self.onread, self.onwrite = onread, onwrite
        self.intr = bool(intr)
        self.sticky = self.intr if sticky is None else bool(sticky)
        self.enable, self.mask_by = enable, mask
        self.doc = doc

    @property
    def msb(self) -> int:
        """The field's highest bit."""
        return self.lsb + self.width - 1

    @property
    def readable(self) -> bool:
        """Whether software reads the field's value (else it reads as 0)."""
        return self.sw in (RW, RO)

    @property
    def writable(self) -> bool:
        """Whether software writes reach the field."""
        return self.sw in (RW, WO)

    def access_text(self) -> str:
        """Short access description for tables: ``RW``, ``RO``, ``W1C``, ``RO, RC``..."""
        text = _SHORT[self.onwrite] if self.onwrite else _SHORT[self.sw]
        if self.onwrite and self.sw == WO:
            text += " (WO)"
        if self.onread:
            text += ", " + _SHORT[self.onread]
        if self.intr:
            text += ", intr"
        return text

    def bits_text(self) -> str:
        """``7`` or ``7:4``."""
        return str(self.lsb) if self.width == 1 else f"{self.msb}:{self.lsb}"

    def __repr__(self) -> str:
        return f"Field({self.name!r}, {self.bits_text()}, {self.access_text()})"
