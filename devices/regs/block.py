"""A block of registers mapped onto a BAR (or part of one, or anything that routes accesses).

Declare the map once, as the datasheet has it; build a live block per device:

>>> from vfiouser.devices.regs import Field, Register, RegisterMap, W1C, RO
>>> REGS = RegisterMap([
...     Register("ctrl", 0x0, 32, [Field("enable", 0), Field("mode", (3, 1), reset=2)]),
...     Register("status", 0x4, 32, [Field("ready", 0, sw=RO), Field("done", 1, onwrite=W1C, intr=True)]),
... ], name="demo")
>>> regs = REGS.instantiate()
>>> regs.hw_write("status.done", 1)            # the device finished something
>>> regs.irq_level
True
>>> buf = bytearray(4); regs.read(0, 0x4, buf); buf.hex()
'02000000'
>>> regs.write(0, 0x4, (2).to_bytes(4, "little"))   # the driver acknowledges (write 1 to clear)
>>> regs.irq_level, regs.describe(0x4, 4)
(False, 'status (ready, done)')

A :class:`RegisterBlock` is an I/O handler (:class:`~vfiouser.iomgr.DeviceIo`):
``bar.map(regs, offset, size)`` puts it on a BAR. Model behaviour that is not
storage attaches as hooks, by name (``"reg"``, ``"reg.field"``, ``"array.reg"``
for every element of an array): :meth:`RegisterBlock.on_read` supplies a value,
:meth:`RegisterBlock.on_write` reacts to a write, :meth:`RegisterBlock.before_write`
may change or drop one, :meth:`RegisterBlock.after_read` reacts to a read; or decorate
the owner's methods with :func:`on_read`/:func:`on_write`/:func:`before_write`/
:func:`after_read` and pass ``owner=``. Hooks run under whatever lock the caller
holds (a :class:`~vfiouser.devices.pci.PciDevice` holds its ``lock`` around every
access); host-side code that changes registers takes that lock itself.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from vfiouser.devices.shortcut import COMPOSE, HOOK, STORE, SW_READ, SW_WRITE, VALUE
from vfiouser.iomgr import DeviceIo

from .access import Field, RegisterDefinitionError
from .hooks import HOOK_ATTR, after_read, before_write, on_read, on_write
from .hwside import HardwareSide
from .policy import DECLINE, EXTEND
from .register import Condition, Register
from .regmap import RegisterMap

__all__ = ["RegisterMap", "RegisterBlock", "on_read", "on_write", "before_write", "after_read"]

log = logging.getLogger(__name__)

_STRUCTS = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}


class RegisterBlock(HardwareSide, DeviceIo):
    """Live registers of one device, decoding accesses (see the module docstring)."""

    def __init__(self, regmap: RegisterMap, *, owner: object = None, name: str | None = None) -> None:
        self.map = regmap
        self.name = name if name is not None else regmap.name
        self.policy = regmap.policy
        self.registers = [r.clone() for r in regmap.registers]
        self._by_path = {r.path: r for r in self.registers}
        self._by_template: dict[str, list[Register]] = {}
        for r in self.registers:
            r.block = self
            self._by_template.setdefault(r.template, []).append(r)
        for r in self.registers:
            if r.alias_of is not None:
                primary, field = self._resolve_value(r.alias_of, r.scope)
                if field is not None or primary.alias_of is not None or primary.width != r.width:
                    raise RegisterDefinitionError(f"{r.path}: alias_of must name a register of the same width "
                                                  f"that is not an alias itself ({r.alias_of})")
                r.primary = primary
            if r.bank is not None:
                r.bank_ok = r.bank.compile(self, r.scope)
            else:
                r.bank_ok = None
            if isinstance(r.frozen_while, Condition):
                r.frozen = r.frozen_while.compile(self, r.scope)
            elif r.frozen_while is not None:
                r.frozen = r.frozen_while
        self._name_registers()
        #: Called with the new level whenever the OR of the interrupt fields changes.
        self.on_interrupt: Callable[[bool], None] | None = None
        self.irq_level = False
        self._intr = self._compile_interrupts()
        if owner is not None:
            self.bind(owner)
        self._refresh()

    # -- names ----------------------------------------------------------------------------

    def reg(self, path: str) -> Register:
        """The live register called ``path`` (``"status"``, ``"q[2].size"``)."""
        try:
            return self._by_path[path]
        except KeyError:
            raise RegisterDefinitionError(f"{self.name or 'register block'} has no register {path!r}") from None

    def _name_registers(self) -> None:
        """Registers whose names are identifiers (and no attribute of the block) become
        attributes: ``regs.status`` is ``regs.reg("status")``, at an attribute's cost."""
        for path, reg in self._by_path.items():
            if path.isidentifier() and not hasattr(type(self), path) and path not in self.__dict__:
                self.__dict__[path] = reg

    def _resolve_value(self, path: str, scope: str = "") -> tuple[Register, Field | None]:
        """``path`` (a register or ``register.field``, tried inside ``scope`` first)."""
        for candidate in ((scope + path, path) if scope else (path,)):
            if candidate in self._by_path:
                return self._by_path[candidate], None
            head, _, tail = candidate.rpartition(".")
            if head in self._by_path and tail in self._by_path[head]._by_field:
                reg = self._by_path[head]
                return reg, reg.field(tail)
        raise RegisterDefinitionError(f"{self.name or 'register block'} has no register or field {path!r}")

    def _targets(self, path: str) -> list[tuple[Register, Field | None]]:
        """Every (register, field) ``path`` names: one register or field, or the same one in
        every element of an array (``array.reg``)."""
        if path in self._by_path:
            return [(self._by_path[path], None)]
        if path in self._by_template:
            return [(r, None) for r in self._by_template[path]]
        head, _, tail = path.rpartition(".")
        regs = [self._by_path[head]] if head in self._by_path else self._by_template.get(head, [])
        found = [(r, r.field(tail)) for r in regs if tail in r._by_field]
        if not found:
            raise RegisterDefinitionError(f"{self.name or 'register block'} has no register or field {path!r} "
                                          "to attach a hook to")
        return found

    # -- hooks ----------------------------------------------------------------------------

    def on_read(self, path: str, fn: Callable) -> None:
        """``fn(reg) -> int | None`` supplies the value software reads from ``path`` (a
        register, or a field: then the field's value); ``None`` keeps the stored one."""
        for reg, field in self._targets(path):
            if field is None:
                if reg.read_hook is not None:
                    raise RegisterDefinitionError(f"{reg.path} already has a read hook")
                reg.read_hook = fn
            else:
                reg.field_read_hooks.append((field, fn))
        self._refresh()

    def on_write(self, path: str, fn: Callable) -> None:
        """``fn(reg, value)`` runs after software wrote ``path``: ``value`` is what was written
        (a field's bits for a field, whose hook runs only when the write covers it)."""
        for reg, field in self._targets(path):
            if field is None:
                reg.write_hooks.append(fn)
            else:
                reg.field_write_hooks.append((field, fn))
                reg.field_write_hooks.sort(key=lambda h: h[0].lsb)
        self._refresh()

    def before_write(self, path: str, fn: Callable) -> None:
        """``fn(reg, value) -> int | None`` sees every software write to register ``path``
        before it takes effect: it returns the value to write, or ``None`` to drop the write."""
        for reg, field in self._targets(path):
            if field is not None:
                raise RegisterDefinitionError(f"{path}: a before-write hook belongs to a register, not a field")
            if reg.before_write is not None:
                raise RegisterDefinitionError(f"{reg.path} already has a before-write hook")
            reg.before_write = fn
        self._refresh()

    def after_read(self, path: str, fn: Callable) -> None:
        """``fn(reg, value)`` runs after software read ``path`` and its read effects took place."""
        for reg, _field in self._targets(path):
            reg.after_read_hooks.append(fn)
        self._refresh()

    def bind(self, owner: object) -> None:
        """Attach ``owner``'s methods decorated with :func:`on_read`, :func:`on_write`,
        :func:`before_write` and :func:`after_read` (those for this block: no ``block=``, or this block's name)."""
        seen = set()
        for klass in type(owner).__mro__:
            for attr, fn in vars(klass).items():
                hooks = getattr(fn, HOOK_ATTR, None)
                if not hooks or attr in seen:
                    continue
                seen.add(attr)
                bound = getattr(owner, attr)
                for kind, path, block in hooks:
                    if block is not None and block != self.name:
                        continue
                    {"read": self.on_read, "write": self.on_write, "before": self.before_write,
                     "after": self.after_read}[kind](path, bound)

    # -- decoding tables --------------------------------------------------------------------

    def _refresh(self) -> None:
        """Rebuild the decoding tables (after hooks changed which registers decode what)."""
        rbytes: dict[int, list[Register]] = {}
        wbytes: dict[int, list[Register]] = {}
        for r in self.registers:
            reads = r.readable or r.read_hook is not None or r.field_read_hooks or r.after_read_hooks
            writes = r.writable or r.write_hooks or r.field_write_hooks or r.before_write is not None
            for pos in range(r.offset, r.end):
                if reads:
                    rbytes.setdefault(pos, []).append(r)
                if writes:
                    wbytes.setdefault(pos, []).append(r)
        for table, what in ((rbytes, "read"), (wbytes, "written")):
            for pos, regs in table.items():
                if len(regs) > 1 and any(r.bank is None for r in regs):
                    names = ", ".join(r.path for r in regs)
                    raise RegisterDefinitionError(f"offset {pos:#x} is {what} by {names}: registers that share an "
                                                  "offset need bank conditions")
        self._rbytes, self._wbytes = rbytes, wbytes
        # The fast path: a full-width access at a register's offset, the one register there,
        # no bank; entries are (size, struct pack/unpack, register, plain read / write kind).
        self._rfast, self._wfast = {}, {}
        for r in self.registers:
            if r.bank is not None or not self.policy.allows(r.nbytes, r.offset):
                continue
            fmt = _STRUCTS[r.nbytes]
            if all(rbytes.get(p) == [r] for p in range(r.offset, r.end)):
                plain = (r.read_hook is None and not r.field_read_hooks and not r.after_read_hooks
                         and not (r.rclr or r.rset))
                self._rfast[r.offset] = (r.nbytes, fmt.pack_into, r, plain)
            if all(wbytes.get(p) == [r] for p in range(r.offset, r.end)):
                # 0: storage only; 1: storage, then the register's own write hooks; 2: sw_write
                simple = (r.plain_write and not r.field_write_hooks and r.frozen is None and r.before_write is None
                          and not r.irq and r.alias_of is None)
                kind = 2 if not simple else (1 if r.write_hooks else 0)
                self._wfast[r.offset] = (r.nbytes, fmt.unpack_from, r, kind)

    # -- the bus side (DeviceIo) --------------------------------------------------------------

    def read(self, base: int, offset: int, data) -> None:
        """A software read of ``len(data)`` bytes at ``offset`` of the block."""
        hit = self._rfast.get(offset)
        if hit is not None:
            size, pack, r, plain = hit
            if size == len(data):
                pack(data, 0, (r.value & r.rmask) if plain else r.sw_read(r.full))
                return
        self._read_general(offset, data)

    def write(self, base: int, offset: int, data) -> None:
        """A software write of ``data`` at ``offset`` of the block."""
        hit = self._wfast.get(offset)
        if hit is not None:
            size, unpack, r, kind = hit
            if size == len(data):
                value = unpack(data)[0]
                if kind == 2:
                    r.sw_write(value, r.full)
                    return
                keep = r.keep
                r.value = (r.value & keep) | (value & ~keep)
                if kind:
                    for fn in r.write_hooks:
                        fn(r, value)
                return
        self._write_general(offset, data)

    pio_read = read
    pio_write = write

    def shortcut(self, offset: int, size: int, write: bool) -> tuple | None:
        """What :meth:`read` (or :meth:`write`) of ``size`` bytes at ``offset`` does, as a
        shortcut of :mod:`vfiouser.devices.shortcut` guarded by the decoding table it comes
        from; None where it takes the general path (only the fast path's accesses have one)."""
        cls = type(self)
        if cls is not RegisterBlock and (cls.read is not RegisterBlock.read or cls.write is not RegisterBlock.write
                                         or cls.pio_read is not RegisterBlock.read
                                         or cls.pio_write is not RegisterBlock.write):
            return None  # a subclass that decodes differently: no shortcut past it
        table = self._wfast if write else self._rfast
        hit = table.get(offset)
        if hit is None or hit[0] != size:
            return self._composed(offset, size, write)
        cut = self._whole(hit[2], write, hit)
        return (cut[0], ((self, "_wfast" if write else "_rfast", table),)) + cut[2:]

    def _whole(self, r: Register, write: bool, hit: tuple | None = None) -> tuple:
        """The shortcut (no guards yet) of an access that covers register ``r`` exactly, as
        :meth:`read`/:meth:`write` serve it (``hit``: its fast-table entry, if it has one)."""
        if write:
            kind = hit[3] if hit is not None else 2
            if kind == 2:
                return (SW_WRITE, (), r.sw_write, r.full)
            return (STORE, (), r, r.keep, r.write_hooks if kind else ())
        if r.field_read_hooks or r.after_read_hooks or r.rclr or r.rset:
            return (SW_READ, (), r.sw_read, r.full)
        if r.read_hook is None:  # plain, as _refresh decides for the fast table
            return (VALUE, (), r, r.rmask)
        return (HOOK, (), r, r.read_hook, r.rmask)

    def _composed(self, offset: int, size: int, write: bool) -> tuple | None:
        """An access the general decoder serves, when each register it reaches is covered whole
        (an 8-byte read of four 16-bit registers): COMPOSE, each register's part in byte order,
        the rest filled with the policy's ``unmapped`` byte; None otherwise (refused, banked,
        a register cut or extended, nothing reached)."""
        if size > 8 or not self.policy.allows(size, offset):
            return None
        table = self._wbytes if write else self._rbytes
        parts = []
        for r in self._touched(table, offset, size):
            if r.bank is not None or r.alias_of is not None:
                return None
            span = self._span(r, offset, size)
            if span is None:
                continue
            if span != (r.offset, r.end) or r.offset < offset or r.end > offset + size:
                return None  # part of a register, or one an EXTEND access covers from its start
            parts.append((r.offset - offset, r.nbytes, self._whole(r, write)))
        if not parts or any(len(table.get(p, ())) > 1 for p in range(offset, offset + size)):
            return None
        guards = ((self, "_wbytes" if write else "_rbytes", table),)
        return (COMPOSE, guards, self.policy.unmapped, tuple(parts))

    def _touched(self, table: dict, offset: int, size: int) -> list[Register]:
        out: list[Register] = []
        for pos in range(offset, offset + size):
            for r in table.get(pos, ()):
                if r.bank_ok is None or r.bank_ok():
                    if r not in out:
                        out.append(r)
                    break
        return out

    def _span(self, r: Register, offset: int, size: int) -> tuple[int, int] | None:
        """``(start, end)`` of the access inside ``r`` (block offsets), or None if ``r``
        declines it; an EXTEND access covers the whole register."""
        end = offset + size
        policy = self.policy
        if (offset < r.offset or end > r.end) and (r.wide or policy.wide) == DECLINE:
            return None
        if offset > r.offset or end < r.end:
            narrow = r.narrow or policy.narrow
            if narrow == DECLINE:
                return None
            if narrow == EXTEND:
                return (r.offset, r.end) if offset == r.offset else None
        return max(offset, r.offset), min(end, r.end)

    def _refuse(self, op: str, offset: int, size: int) -> bool:
        if self.policy.allows(size, offset):
            return False
        log.debug("%s: %d-byte %s at %#x refused by the access policy", self.name, size, op, offset)
        return True

    def _read_general(self, offset: int, data) -> None:
        size = len(data)
        if self._refuse("read", offset, size):
            data[:] = bytes((self.policy.refused,)) * size
            return
        out = bytearray((self.policy.unmapped,)) * size
        for r in self._touched(self._rbytes, offset, size):
            span = self._span(r, offset, size)
            if span is None:
                continue
            start, end = span
            lo, hi = start - r.offset, end - r.offset
            lanes = ((1 << (8 * (hi - lo))) - 1) << (8 * lo)
            raw = r.sw_read(lanes).to_bytes(r.nbytes, "little")
            if end > offset + size:  # EXTEND: the low bytes of the whole register
                out[:] = raw[:size]
            else:
                out[start - offset:end - offset] = raw[lo:hi]
        data[:] = out

    def _write_general(self, offset: int, data) -> None:
        size = len(data)
        if self._refuse("write", offset, size):
            return
        for r in self._touched(self._wbytes, offset, size):
            span = self._span(r, offset, size)
            if span is None:
                continue
            start, end = span
            if end > offset + size:  # EXTEND: zero-extended to the whole register
                r.sw_write(int.from_bytes(data, "little"), r.full)
                continue
            lo, hi = start - r.offset, end - r.offset
            value = int.from_bytes(data[start - offset:end - offset], "little") << (8 * lo)
            r.sw_write(value, ((1 << (8 * (hi - lo))) - 1) << (8 * lo))

    def markdown(self) -> str:
        """The register table (see :meth:`RegisterMap.markdown`)."""
        return self.map.markdown()

    def __repr__(self) -> str:
        return f"<RegisterBlock {self.name or '?'}: {len(self.registers)} registers>"
