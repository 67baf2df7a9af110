"""Address and size types of the two I/O address spaces.

Port I/O (PIO) is 16 bits wide, memory-mapped I/O (MMIO) 64 bits. Each space
has an address type and a size type. They are ``int`` subclasses, so they can
be used anywhere an ``int`` is expected, but constructing one checks the range:
``PioAddress(0x10000)`` raises :class:`~vfiouser.iomgr.errors.InvalidAddress` (a
:class:`ValueError`), like the fallible
``TryFrom`` conversions of dbs-device.

>>> PioAddress(0x40).raw_value()
64
>>> IoAddress(PioAddress(0x40))          # widening always works
IoAddress(0x40)
>>> PioAddress.try_from(IoAddress(0x12_3456))
Traceback (most recent call last):
    ...
vfiouser.iomgr.errors.InvalidAddress: 0x123456 does not fit in PioAddress (16 bits)
"""

from __future__ import annotations

from .errors import InvalidAddress

__all__ = ["IoAddress", "IoSize", "PioAddress", "PioSize", "PIO_SPACE_SIZE", "MMIO_SPACE_SIZE"]

#: Number of addresses in the port I/O space (``0 .. 0xFFFF``).
PIO_SPACE_SIZE = 1 << 16
#: Number of addresses in the memory-mapped I/O space (``0 .. 2**64-1``).
MMIO_SPACE_SIZE = 1 << 64


class _Bounded(int):
    """An ``int`` that must fit in ``_bits`` unsigned bits."""

    _bits = 64

    def __new__(cls, value: int = 0):
        value = int(value)
        if not 0 <= value < (1 << cls._bits):
            raise InvalidAddress(cls.__name__, cls._bits, value)
        return super().__new__(cls, value)

    def raw_value(self) -> int:
        """The plain integer value."""
        return int(self)

    @classmethod
    def try_from(cls, value: int):
        """Convert ``value`` (possibly of a wider type); :class:`InvalidAddress` if it does not fit."""
        return cls(value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self):#x})"


class IoAddress(_Bounded):
    """An MMIO address (64 bits). Also used for offsets inside an MMIO range."""

    _bits = 64


class IoSize(_Bounded):
    """The size of an MMIO range (64 bits)."""

    _bits = 64


class PioAddress(_Bounded):
    """A port I/O address (16 bits). Also used for offsets inside a PIO range."""

    _bits = 16


class PioSize(_Bounded):
    """The size of a PIO range (16 bits, so at most 0xFFFF ports in one range)."""

    _bits = 16
