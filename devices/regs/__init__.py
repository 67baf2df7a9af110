"""Register maps declared once: the datasheet's table is the model's decoder.

A :class:`RegisterMap` lists :class:`Register`\\ s (offset, width, reset value,
:class:`Field`\\ s with their software and hardware access, write and read side
effects, interrupt fields), register files and arrays (:func:`group`), aliases
and banked registers (:func:`when`), "frozen while" conditions, and the
block's :class:`AccessPolicy` (what narrow, wide or misaligned accesses do).
``regmap.instantiate(owner)`` builds a live :class:`RegisterBlock`, an I/O
handler to map onto a BAR; behaviour that is not storage lives in hooks
attached by name (:func:`on_read`, :func:`on_write`, :func:`before_write`,
:func:`after_read`).
:mod:`vfiouser.devices.regs.rdl` builds a map from a SystemRDL file.

The same write engine (:func:`apply_write`) applies PCI configuration space's
write masks. ``docs/writing-a-device.md`` starts with this layer.
"""

from .access import (
    ACCESS_KINDS,
    RCLR,
    READ_EFFECTS,
    RO,
    RSET,
    RSVD,
    RW,
    W0C,
    W0S,
    W0T,
    W1C,
    W1S,
    W1T,
    WCLR,
    WO,
    WRITE_EFFECTS,
    WSET,
    Field,
    RegisterDefinitionError,
    apply_write,
)
from .block import RegisterBlock
from .hooks import after_read, before_write, on_read, on_write
from .regmap import RegisterMap
from .policy import DECLINE, DEFAULT_POLICY, EXTEND, LANES, SPLIT, AccessPolicy
from .register import Condition, Register, group, when

__all__ = [
    "Field", "Register", "RegisterMap", "RegisterBlock", "AccessPolicy", "Condition", "RegisterDefinitionError",
    "group", "when", "on_read", "on_write", "before_write", "after_read", "apply_write",
    "RW", "RO", "WO", "RSVD", "W1C", "W1S", "W1T", "W0C", "W0S", "W0T", "WCLR", "WSET", "RCLR", "RSET",
    "ACCESS_KINDS", "WRITE_EFFECTS", "READ_EFFECTS", "LANES", "EXTEND", "DECLINE", "SPLIT", "DEFAULT_POLICY",
]
