"""Hooks declared on a model's methods: what the register map's storage does not do.

Decorate a method of the object that owns a :class:`~vfiouser.devices.regs.RegisterBlock`
(usually the device model) and pass it as ``owner=`` when the block is built; the
block attaches each method to the register or field it names (``"reg"``,
``"reg.field"``, ``"array.reg"`` for every element of an array, ``"array[2].reg"``
for one). ``block=`` restricts a hook to the block of that name, for owners
with several blocks.
"""

from __future__ import annotations

__all__ = ["on_read", "on_write", "before_write", "after_read", "HOOK_ATTR"]

#: The attribute the decorators leave on a method: ``[(kind, path, block), ...]``.
HOOK_ATTR = "_vfiouser_register_hooks"


def _decorator(kind: str, path: str, block: str | None):
    def mark(fn):
        hooks = list(getattr(fn, HOOK_ATTR, ()))
        hooks.append((kind, path, block))
        setattr(fn, HOOK_ATTR, hooks)
        return fn
    return mark


def on_read(path: str, *, block: str | None = None):
    """Mark a method of the owner as the read hook of ``path``: ``fn(reg) -> int | None``
    (the value read; ``None``: the stored one). ``block``: only for the block of that name."""
    return _decorator("read", path, block)


def on_write(path: str, *, block: str | None = None):
    """Mark a method of the owner as a write hook of ``path``: ``fn(reg, value)``, after the
    write took effect (``value``: what software wrote, for a field its bits)."""
    return _decorator("write", path, block)


def before_write(path: str, *, block: str | None = None):
    """Mark a method of the owner as the before-write hook of register ``path``:
    ``fn(reg, value) -> int | None`` gets the value software writes (the whole register,
    lanes merged) and returns what the write engine should apply, or ``None`` to drop the
    write (no other hook runs then)."""
    return _decorator("before", path, block)


def after_read(path: str, *, block: str | None = None):
    """Mark a method of the owner as an after-read hook of ``path``: ``fn(reg, value)``, once
    the read's side effects are done (``value``: what software read)."""
    return _decorator("after", path, block)


