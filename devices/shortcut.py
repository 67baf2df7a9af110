"""Access shortcuts: where a region access ends up, worked out once, as data a backend can run.

Serving a 1-byte read of a register goes ``port.region_read`` -> the BAR -> the
IoManager -> the register block -> the register -> the model's hook: six Python
calls to reach the one that matters. A port that offers shortcuts (its
:attr:`~vfiouser.devices.port.DevicePort.shortcut_lock` is not None) works that
chain out once per (region, offset, size, direction), in Python, and hands back
what it ends in as a tuple; a backend's hot loop (vfiouser's C loop, see
:mod:`vfiouser.fastpath`) keeps the tuple and runs it itself::

    kind      tuple                                     a read gives            a write (value: the data, little-endian)
    --------  ----------------------------------------  ----------------------  -----------------------------------------
    SLOW      (SLOW, guards)                            port.region_read(...)   port.region_write(...)
    CALL      (CALL, guards, fn, base, offset)          fn(base, offset, buf)   fn(base, offset, data)
    VALUE     (VALUE, guards, reg, rmask)               reg.value & rmask
    HOOK      (HOOK, guards, reg, hook, rmask)          h = hook(reg): (reg.value as before the call if h is None else h) & rmask
    SW_READ   (SW_READ, guards, sw_read, lanes)         sw_read(lanes)
    STORE     (STORE, guards, reg, keep, hooks)                                 reg.value = reg.value & keep | value & ~keep,
                                                                                then fn(reg, value) for fn in hooks
    SW_WRITE  (SW_WRITE, guards, sw_write, lanes)                               sw_write(value, lanes)
    COMPOSE   (COMPOSE, guards, fill, parts)            the bytes filled with `fill`, then each part in order:
              parts: ((pos, nbytes, shortcut), ...)     its shortcut (no guards of its own, not SLOW, CALL or
                                                        COMPOSE) on bytes [pos, pos+nbytes) of the access

A read's value fills the access's bytes, little-endian. A backend holds the
port's ``shortcut_lock`` while it checks and runs a shortcut, as ``region_read``
holds it; an exception is the model's, as it would be from ``region_read``.

A shortcut holds while each of its *guards*, ``(obj, name, expected)``, has
``getattr(obj, name) is expected``; a backend checks them before each use (with
the lock held: a thread holding it may be changing them) and asks the port again
when one fails. The guards are the objects that everything
changing where an access goes replaces: the IoManager snapshot a BAR dispatches
through (a BAR programmed, moved or switched off, a handler mapped or unmapped:
each commits a new snapshot), a BAR's address, a register block's decoding
tables (a hook attached: the block rebuilds them). ``port.shortcut`` returns
None only for accesses that can never have one (config space, the ROM, an
access out of bounds); a backend then calls ``region_read``/``region_write``.

Hooks change through the register block's API (``on_read``, ``on_write``,
``bind``...), never by assigning a register's attributes: the same rule the
block's own fast path relies on.

>>> from vfiouser.devices.idio16 import Idio16
>>> dev = Idio16(); port = dev.port
>>> port.shortcut(2, 1, 1, False)[0] == SLOW    # BAR2 is not programmed yet
True
>>> dev.config_write(0x18, (0xC000 | 1).to_bytes(4, "little")); dev.config_write(0x04, b"\\x01\\x00")
>>> cut = port.shortcut(2, 1, 1, False)
>>> cut[0] == HOOK and cut[3] == dev._inputs_low and holds(cut)
True
>>> dev.config_write(0x04, b"\\x00\\x00")        # I/O decoding off: a new snapshot
>>> holds(cut)
False
"""

from __future__ import annotations

__all__ = ["SLOW", "CALL", "VALUE", "HOOK", "SW_READ", "STORE", "SW_WRITE", "COMPOSE", "KINDS", "holds", "guard"]

SLOW = 0
CALL = 1
VALUE = 2
HOOK = 3
SW_READ = 4
STORE = 5
SW_WRITE = 6
COMPOSE = 7

#: names of the kinds, for logs and tests
KINDS = {SLOW: "SLOW", CALL: "CALL", VALUE: "VALUE", HOOK: "HOOK", SW_READ: "SW_READ", STORE: "STORE",
         SW_WRITE: "SW_WRITE", COMPOSE: "COMPOSE"}


def guard(obj: object, name: str) -> tuple[object, str, object]:
    """A guard on ``obj.name`` as it is now."""
    return (obj, name, getattr(obj, name))


def holds(shortcut: tuple) -> bool:
    """Whether every guard of ``shortcut`` still holds (what a backend checks before each use)."""
    return all(getattr(obj, name) is expected for obj, name, expected in shortcut[1])
