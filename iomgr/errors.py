"""The root of every vfiouser error, and the IoManager's own errors.

:class:`VfioUserError` is the one root of the framework's errors: the
IoManager's (here), the device framework's (:mod:`vfiouser.devices.errors`,
:mod:`vfiouser.devices.pci.dma`) and the protocol engine's
(:mod:`vfiouser.errors`). It lives in this, the lowest layer, so that every
layer can derive from it without importing the ones above.

Every error carries ``errno``: the positive errno a backend answers a failed
request with. A backend maps a framework error to its reply by that attribute
alone (``exc.errno``); any other exception from a device model is a bug in the
model and becomes EIO. Subclasses set a class default, and a raise site may
give a more precise one (``RegionAccessError(..., errno=errno.EACCES)``).

The IoManager's errors derive from :class:`IoManagerError`. Each carries the
offending range or access as attributes, so a caller can report it without
parsing the text.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "VfioUserError",
    "IoManagerError",
    "DeviceOverlap",
    "NoDevice",
    "StraddlingAccess",
    "InvalidRange",
    "TransactionError",
    "InvalidAddress",
]


class VfioUserError(Exception):
    """Root of every error vfiouser raises. ``errno``: what a backend answers with (EIO by default)."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "", *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class IoManagerError(VfioUserError):
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


class InvalidAddress(IoManagerError, ValueError):
    """A value does not fit in an address or size type (16-bit PIO, 64-bit MMIO).

    Also a :class:`ValueError`, as the fallible conversions of dbs-device are."""

    def __init__(self, type_name: str, bits: int, value: int) -> None:
        self.type_name, self.bits, self.value = type_name, bits, value
        super().__init__(f"{value:#x} does not fit in {type_name} ({bits} bits)")
