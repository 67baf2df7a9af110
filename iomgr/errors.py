"""Errors of the IoManager, one class per kind of failure.

All derive from :class:`IoManagerError`. Each carries the offending range or
access as attributes, so a caller can report it without parsing the text.
"""

from __future__ import annotations

__all__ = [
    "IoManagerError",
    "DeviceOverlap",
    "NoDevice",
    "StraddlingAccess",
    "InvalidRange",
    "TransactionError",
]


class IoManagerError(Exception):
    """Base class of every IoManager error."""


class DeviceOverlap(IoManagerError):
    """A range to register overlaps a registered range (or another in the same list).

    ``space`` is ``"pio"`` or ``"mmio"``; ``new`` and ``existing`` are the two
    ``(base, size)`` pairs that overlap.
    """

    def __init__(self, space: str, new: tuple[int, int], existing: tuple[int, int]) -> None:
        self.space, self.new, self.existing = space, new, existing
        super().__init__(
            f"device address conflicts with existing devices: {space} "
            f"[{new[0]:#x}, +{new[1]:#x}) overlaps [{existing[0]:#x}, +{existing[1]:#x})"
        )


class NoDevice(IoManagerError):
    """No registered range claims an access (or a range to unregister).

    ``space`` is ``"pio"`` or ``"mmio"``, ``addr`` the address and ``size`` the
    access width (or range size).
    """

    def __init__(self, space: str, addr: int, size: int, detail: str = "no such device") -> None:
        self.space, self.addr, self.size = space, addr, size
        super().__init__(f"{detail}: {space} [{addr:#x}, +{size:#x})")


class StraddlingAccess(NoDevice):
    """An access starts inside a registered range but ends beyond it.

    A subclass of :class:`NoDevice`: no single device claims the whole access.
    ``range`` is the ``(base, size)`` of the range the access starts in.
    """

    def __init__(self, space: str, addr: int, size: int, range: tuple[int, int]) -> None:
        self.range = range
        super().__init__(space, addr, size, f"access straddles the end of [{range[0]:#x}, +{range[1]:#x})")


class InvalidRange(IoManagerError):
    """A range is empty, or does not fit in its address space (16-bit PIO, 64-bit MMIO)."""

    def __init__(self, space: str, base: int, size: int, reason: str) -> None:
        self.space, self.base, self.size = space, base, size
        super().__init__(f"invalid {space} range [{base:#x}, +{size:#x}): {reason}")


class TransactionError(IoManagerError):
    """A transaction was used after it was committed or cancelled."""
