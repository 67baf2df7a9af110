"""A register: offset, width, reset value, fields, and what software reads and writes do.

A :class:`Register` is declared once, in a :class:`~vfiouser.devices.regs.block.RegisterMap`;
every :class:`~vfiouser.devices.regs.block.RegisterBlock` built from the map holds its own
live copy, whose :attr:`Register.value` is the register's storage. Software
accesses go through :meth:`Register.sw_read` and :meth:`Register.sw_write`
(the block calls them with the byte lanes an access covers); the model
changes registers from the hardware side with :meth:`Register.set`,
:attr:`Register.value` or the block's ``hw_write``.

>>> r = Register("status", 0x20, 32, [Field("busy", 0, sw=RO), Field("irq_on", 7)])
>>> live = r.clone()
>>> live.sw_write(0xFFFF_FFFF, live.full)     # only irq_on is writable
>>> hex(live.value), live["busy"], live["irq_on"]
('0x80', 0, 1)
>>> live.set("busy", 1); hex(live.sw_read(live.full))
'0x81'
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from .access import RO, RSVD, RW, WO, Field, RegisterDefinitionError, apply_write

__all__ = ["Register", "Condition", "when", "group"]

log = logging.getLogger(__name__)

_INDEX = re.compile(r"\[\d+\]")


class Condition:
    """``when("lcr.dlab")``: true while that field (or register) is non-zero; ``when(path, v)``:
    while it equals ``v``. Used to select banked registers and for "frozen while"."""

    __slots__ = ("path", "equals")

    def __init__(self, path: str, equals: int | None = None) -> None:
        self.path, self.equals = path, equals

    def compile(self, block, scope: str = "") -> Callable[[], bool]:
        """A function of no arguments that evaluates the condition on ``block``'s registers."""
        reg, field = block._resolve_value(self.path, scope)
        shift, mask = (field.lsb, (1 << field.width) - 1) if field is not None else (0, reg.full)
        if self.equals is None:
            return lambda: bool((reg.value >> shift) & mask)
        equals = self.equals
        return lambda: (reg.value >> shift) & mask == equals

    def __repr__(self) -> str:
        return self.path if self.equals is None else f"{self.path} == {self.equals}"


def when(path: str, equals: int | None = None) -> Condition:
    """A :class:`Condition` on the field or register ``path`` (see there)."""
    return Condition(path, equals)


class Register:
    """One register (see the module docstring).

    ``width`` is in bits (8, 16, 32 or 64). ``fields`` lists its fields; without
    them the register is one field with ``sw``/``onwrite``/``onread``/``reset``.
    Bits no field covers are reserved: they read as 0 and ignore writes.
    ``bank``: a :class:`Condition` under which this register answers at its
    offset (several registers may then share an offset, as the 16550A's DLAB
    banks do). ``frozen_while``: a :class:`Condition` (or a function of no
    arguments) under which software writes are ignored. ``alias_of``: the name of
    the register whose storage this one shares, with fields of its own.
    ``narrow``/``wide`` override the block's :class:`~vfiouser.devices.regs.policy.AccessPolicy`.
    """

    def __init__(self, name: str, offset: int, width: int = 32, fields: list[Field] | None = None, *,
                 sw: str = RW, hw: str = RW, reset: int = 0, onread: str | None = None, onwrite: str | None = None,
                 intr: bool = False, doc: str = "", bank: Condition | None = None,
                 frozen_while: Condition | Callable[[], bool] | None = None, alias_of: str | None = None,
                 narrow: str | None = None, wide: str | None = None) -> None:
        if width not in (8, 16, 32, 64):
            raise RegisterDefinitionError(f"register {name}: width is 8, 16, 32 or 64 bits, not {width}")
        if offset < 0:
            raise RegisterDefinitionError(f"register {name}: negative offset")
        self.name = self.path = self.template = name
        self.index: tuple[int, ...] = ()
        self.scope = ""
        self.offset = offset
        self.width = width
        self.nbytes = width // 8
        self.end = offset + self.nbytes
        self.full = (1 << width) - 1
        if fields is None:
            fields = [Field(name, (width - 1, 0), sw=sw, hw=hw, reset=reset, onread=onread, onwrite=onwrite,
                            intr=intr)]
            self.implicit = True
        else:
            self.implicit = False
            if reset:
                raise RegisterDefinitionError(f"register {name}: give reset values in its fields")
        self.fields = tuple(sorted(fields, key=lambda f: f.lsb))
        self._by_field = {}
        used = 0
        for f in self.fields:
            if f.msb >= width:
                raise RegisterDefinitionError(f"register {name}: field {f.name} (bits {f.bits_text()}) "
                                              f"does not fit in {width} bits")
            if used & f.mask:
                raise RegisterDefinitionError(f"register {name}: field {f.name} overlaps another field")
            if f.name in self._by_field:
                raise RegisterDefinitionError(f"register {name}: two fields named {f.name}")
            used |= f.mask
            self._by_field[f.name] = f
        self.doc = doc
        self.bank = bank
        self.frozen_while = frozen_while
        self.alias_of = alias_of
        self.narrow, self.wide = narrow, wide
        self._compile()
        self.value = self.reset_value
        # Filled in when a block adopts a live copy.
        self.block = None
        self.read_hook = None
        self.before_write = None
        self.field_read_hooks: list = []
        self.write_hooks: list = []
        self.field_write_hooks: list = []
        self.after_read_hooks: list = []
        self.frozen = None
        self.irq = False

    def _compile(self) -> None:
        def mask(pred) -> int:
            m = 0
            for f in self.fields:
                if pred(f):
                    m |= f.mask
            return m

        self.reset_value = sum(f.reset << f.lsb for f in self.fields)
        self.rmask = mask(lambda f: f.readable)
        self.readable = any(f.readable for f in self.fields)
        self.writable = any(f.writable for f in self.fields)
        self.wmasks = (mask(lambda f: f.writable and f.onwrite is None),) + tuple(
            mask(lambda f, e=e: f.writable and f.onwrite == e)
            for e in ("woclr", "woset", "wot", "wzc", "wzs", "wzt", "wclr", "wset"))
        self.rclr = mask(lambda f: f.onread == "rclr")
        self.rset = mask(lambda f: f.onread == "rset")
        self.intr_fields = tuple(f for f in self.fields if f.intr)
        self.plain_write = not any(self.wmasks[1:])
        #: Bits a plain write leaves alone (not plain-writable).
        self.keep = self.full & ~self.wmasks[0]

    # -- copies ---------------------------------------------------------------------------

    def clone(self) -> Register:
        """A live copy (storage at its reset value, no hooks) sharing the declaration."""
        cls = _Alias if self.alias_of is not None else Register
        obj = object.__new__(cls)
        obj.__dict__.update(self.__dict__)
        if cls is _Alias:
            obj.__dict__.pop("value", None)
            obj.primary = None
        else:
            obj.value = self.reset_value
        obj.block = None
        obj.read_hook = None
        obj.before_write = None
        obj.field_read_hooks, obj.write_hooks, obj.field_write_hooks, obj.after_read_hooks = [], [], [], []
        obj.frozen = None
        obj.irq = False
        return obj

    def placed(self, prefix: str, template_prefix: str, offset: int, index: tuple[int, ...]) -> Register:
        """A copy of this declaration inside a group (see :func:`group`)."""
        obj = self.clone()
        obj.name = obj.path = prefix + self.path
        obj.template = template_prefix + self.template
        obj.scope = prefix + self.scope
        obj.offset = offset + self.offset
        obj.end = obj.offset + self.nbytes
        obj.index = index + self.index
        return obj

    # -- the model's side -----------------------------------------------------------------

    def field(self, name: str) -> Field:
        """The field called ``name``."""
        try:
            return self._by_field[name]
        except KeyError:
            raise RegisterDefinitionError(f"register {self.path} has no field {name!r} "
                                          f"(fields: {', '.join(self._by_field)})") from None

    def get(self, name: str) -> int:
        """The value of field ``name``."""
        f = self.field(name)
        return (self.value & f.mask) >> f.lsb

    def set(self, name: str, value: int) -> None:
        """Set field ``name`` (the hardware side: no access rules, no side effects)."""
        f = self.field(name)
        self.value = (self.value & ~f.mask) | ((value << f.lsb) & f.mask)

    __getitem__ = get
    __setitem__ = set

    def reset(self) -> None:
        """Back to the reset value."""
        self.value = self.reset_value

    # -- the software side (the block calls these) ----------------------------------------

    def sw_read(self, lanes: int) -> int:
        """A software read covering ``lanes``: the hooks' or the stored value, readable bits
        only; then clear/set-on-read effects (within ``lanes``) and the after-read hooks."""
        hook = self.read_hook
        value = self.value
        if hook is not None:
            computed = hook(self)
            if computed is not None:
                value = computed
        for f, fn in self.field_read_hooks:
            computed = fn(self)
            if computed is not None:
                value = (value & ~f.mask) | ((computed << f.lsb) & f.mask)
        value &= self.rmask
        if self.rclr or self.rset:
            self.value = (self.value & ~(self.rclr & lanes)) | (self.rset & lanes)
            if self.irq:
                self.block.update_interrupt()
        for fn in self.after_read_hooks:
            fn(self, value)
        return value

    def sw_write(self, data: int, lanes: int) -> None:
        """A software write of ``data`` to the bytes in ``lanes``: nothing while frozen; else
        the before-write hook (which may change the value or drop the write), the write
        engine, then the field hooks (fields the lanes touch, low bits first), then the
        register's hooks, each given the value written (lanes merged with what was there)."""
        frozen = self.frozen
        if frozen is not None and frozen():
            log.debug("write of %#x to %s ignored: frozen", data, self.path)
            return
        old = self.value
        before = self.before_write
        if before is not None:
            data = before(self, (old & ~lanes) | (data & lanes))
            if data is None:
                return
            lanes = self.full
        if self.plain_write:  # apply_write with only the plain mask, inline
            m = self.wmasks[0] & lanes
            self.value = (old & ~m) | (data & m)
        else:
            self.value = apply_write(old, data, lanes, *self.wmasks)
        if self.field_write_hooks or self.write_hooks:
            merged = (old & ~lanes) | (data & lanes)
            for f, fn in self.field_write_hooks:
                if f.mask & lanes:
                    fn(self, (merged & f.mask) >> f.lsb)
            for fn in self.write_hooks:
                fn(self, merged)
        if self.irq:
            self.block.update_interrupt()

    # -- description ------------------------------------------------------------------------

    def fields_in(self, lanes: int) -> list[Field]:
        """The fields whose bits ``lanes`` touches."""
        return [f for f in self.fields if f.mask & lanes]

    def sw_text(self) -> str:
        """Register-level access for tables: RW, RO, WO, reserved or mixed."""
        kinds = {f.sw for f in self.fields}
        if len(kinds) == 1:
            return {RW: "RW", RO: "RO", WO: "WO", RSVD: "reserved"}[kinds.pop()]
        return "mixed"

    def __repr__(self) -> str:
        return f"<Register {self.path} @{self.offset:#x} {self.width}-bit = {self.value:#x}>"


class _Alias(Register):
    """A register that shares the storage of another (``alias_of``)."""

    @property
    def value(self) -> int:
        return self.primary.value

    @value.setter
    def value(self, v: int) -> None:
        self.primary.value = v


def group(name: str, offset: int, registers: list[Register], *, count: int | None = None,
          stride: int | None = None) -> list[Register]:
    """Registers of a register file at ``offset``, named ``name.reg``; with ``count``, an array
    of ``count`` copies ``stride`` bytes apart named ``name[i].reg`` (per-queue blocks).

    A hook attached to ``name.reg`` serves every element (the register's ``index``
    says which); one attached to ``name[2].reg`` only that one. Condition and
    ``alias_of`` paths are looked up inside the element first.
    """
    if count is None:
        return [r.placed(f"{name}.", f"{name}.", offset, ()) for r in registers]
    size = max((r.end for r in registers), default=0)
    if stride is None:
        stride = size
    if count < 1 or stride < size:
        raise RegisterDefinitionError(f"array {name}: {count} elements of {size} bytes cannot be {stride} apart")
    return [r.placed(f"{name}[{i}].", f"{name}.", offset + i * stride, (i,)) for i in range(count) for r in registers]


def template_of(path: str) -> str:
    """``q[2].size`` -> ``q.size``."""
    return _INDEX.sub("", path)
