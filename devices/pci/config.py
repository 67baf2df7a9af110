"""PCI configuration space emulation.

A :class:`ConfigSpace` holds the bytes of a function's configuration space
(256 bytes, or 4096 with PCI Express extended space) and, per byte, which bits
the guest may change:

* ``wmask``: bits a write replaces (read-write);
* ``w1cmask``: bits a write of 1 clears (write-1-to-clear, e.g. status errors);
* every other bit is read-only: writes leave it alone;
* ``stickymask``: bits a reset leaves alone (PCI's sticky RWS/RW1CS bits).

Writes go through :meth:`ConfigSpace.write`, which applies the masks byte by
byte with the register layer's write engine
(:func:`vfiouser.devices.regs.apply_write`, the one BAR registers use) and then calls the *write hooks* registered on the touched registers
(the command register, capabilities, ...). The device model and the framework
change read-only bits directly with the ``set_*`` methods.

>>> cs = ConfigSpace()
>>> cs.set_word(PCI_VENDOR_ID, 0x1234)
>>> cs.set_wmask_word(PCI_COMMAND, PCI_COMMAND_IO | PCI_COMMAND_MEMORY)
>>> cs.write(PCI_VENDOR_ID, b"\\xff\\xff")          # read-only: ignored
>>> cs.write(PCI_COMMAND, b"\\xff\\xff")             # only the writable bits stick
>>> hex(cs.get_word(PCI_VENDOR_ID)), hex(cs.get_word(PCI_COMMAND))
('0x1234', '0x3')
"""

from __future__ import annotations

from vfiouser.devices.errors import DefinitionError
from vfiouser.devices.regs.access import apply_write

import struct
from collections.abc import Callable, Iterator

__all__ = [
    "ConfigSpace",
    "ConfigSpaceError",
    "WriteHook",
    "PCI_CONFIG_SPACE_SIZE",
    "PCIE_CONFIG_SPACE_SIZE",
    "PCI_VENDOR_ID",
    "PCI_DEVICE_ID",
    "PCI_COMMAND",
    "PCI_STATUS",
    "PCI_REVISION_ID",
    "PCI_CLASS_PROG",
    "PCI_CLASS_DEVICE",
    "PCI_CACHE_LINE_SIZE",
    "PCI_LATENCY_TIMER",
    "PCI_HEADER_TYPE",
    "PCI_BIST",
    "PCI_BASE_ADDRESS_0",
    "PCI_SUBSYSTEM_VENDOR_ID",
    "PCI_SUBSYSTEM_ID",
    "PCI_ROM_ADDRESS",
    "PCI_CAPABILITY_LIST",
    "PCI_INTERRUPT_LINE",
    "PCI_INTERRUPT_PIN",
    "PCI_MIN_GNT",
    "PCI_MAX_LAT",
    "PCI_COMMAND_IO",
    "PCI_COMMAND_MEMORY",
    "PCI_COMMAND_MASTER",
    "PCI_COMMAND_PARITY",
    "PCI_COMMAND_SERR",
    "PCI_COMMAND_INTX_DISABLE",
    "PCI_STATUS_INTERRUPT",
    "PCI_STATUS_CAP_LIST",
    "PCI_STATUS_W1C",
    "PCI_BASE_ADDRESS_SPACE_IO",
    "PCI_BASE_ADDRESS_MEM_TYPE_64",
    "PCI_BASE_ADDRESS_MEM_PREFETCH",
    "PCI_BASE_ADDRESS_IO_MASK",
    "PCI_BASE_ADDRESS_MEM_MASK",
    "PCI_ROM_ADDRESS_ENABLE",
    "PCI_CAP_LIST_FIRST",
    "PCI_CAP_ID_PM",
    "PCI_CAP_ID_VNDR",
    "PCI_CAP_ID_MSI",
    "PCI_CAP_ID_EXP",
    "PCI_CAP_ID_MSIX",
]

PCI_CONFIG_SPACE_SIZE = 256
PCIE_CONFIG_SPACE_SIZE = 4096

# Type-0 header offsets.
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BIST = 0x0F
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_MIN_GNT = 0x3E
PCI_MAX_LAT = 0x3F

# Command register bits.
PCI_COMMAND_IO = 0x0001
PCI_COMMAND_MEMORY = 0x0002
PCI_COMMAND_MASTER = 0x0004
PCI_COMMAND_PARITY = 0x0040
PCI_COMMAND_SERR = 0x0100
PCI_COMMAND_INTX_DISABLE = 0x0400

# Status register bits.
PCI_STATUS_INTERRUPT = 0x0008
PCI_STATUS_CAP_LIST = 0x0010
#: Error bits a write of 1 clears: master data parity error, signalled/received
#: target abort, received master abort, signalled system error, detected parity error.
PCI_STATUS_W1C = 0x0100 | 0x0800 | 0x1000 | 0x2000 | 0x4000 | 0x8000

# BAR low bits.
PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8
PCI_BASE_ADDRESS_IO_MASK = 0xFFFF_FFFC
PCI_BASE_ADDRESS_MEM_MASK = 0xFFFF_FFF0
PCI_ROM_ADDRESS_ENABLE = 0x1

#: First offset a capability may use (right after the type-0 header).
PCI_CAP_LIST_FIRST = 0x40

# Capability IDs.
PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11

#: ``hook(offset, size)`` is called after a guest write touched ``[offset, offset+size)``
#: of the register the hook is registered on (offsets are absolute).
WriteHook = Callable[[int, int], None]

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class ConfigSpaceError(DefinitionError):
    """A device model asked for an impossible config-space layout (overlap, no room, bad offset)."""


class ConfigSpace:
    """The bytes of a PCI function's configuration space with per-bit write semantics."""

    def __init__(self, size: int = PCI_CONFIG_SPACE_SIZE) -> None:
        if size not in (PCI_CONFIG_SPACE_SIZE, PCIE_CONFIG_SPACE_SIZE):
            raise ConfigSpaceError(f"config space is 256 or 4096 bytes, not {size}")
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self.stickymask = bytearray(size)
        self._hooks: list[tuple[int, int, WriteHook]] = []
        self._used = bytearray(size)  # 1 where a capability lives
        self._used[:PCI_CAP_LIST_FIRST] = b"\x01" * PCI_CAP_LIST_FIRST
        self._defaults: bytes | None = None

    # -- raw accessors (device side: ignore masks) ----------------------------

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ConfigSpaceError(f"[{offset:#x}, +{size}) is outside the {self.size}-byte config space")

    def get_byte(self, offset: int) -> int:
        """The byte at ``offset``."""
        return self.data[offset]

    def get_word(self, offset: int) -> int:
        """The little-endian 16-bit value at ``offset``."""
        return _U16.unpack_from(self.data, offset)[0]

    def get_dword(self, offset: int) -> int:
        """The little-endian 32-bit value at ``offset``."""
        return _U32.unpack_from(self.data, offset)[0]

    def set_byte(self, offset: int, value: int) -> None:
        """Set the byte at ``offset``, whatever its write mask."""
        self._check(offset, 1)
        self.data[offset] = value & 0xFF

    def set_word(self, offset: int, value: int) -> None:
        """Set the 16-bit value at ``offset``, whatever its write mask."""
        self._check(offset, 2)
        _U16.pack_into(self.data, offset, value & 0xFFFF)

    def set_dword(self, offset: int, value: int) -> None:
        """Set the 32-bit value at ``offset``, whatever its write mask."""
        self._check(offset, 4)
        _U32.pack_into(self.data, offset, value & 0xFFFF_FFFF)

    def set_bytes(self, offset: int, value: bytes) -> None:
        """Copy ``value`` to ``offset``, whatever the write masks."""
        self._check(offset, len(value))
        self.data[offset : offset + len(value)] = value

    def set_bits_word(self, offset: int, mask: int, on: bool) -> None:
        """Set (``on``) or clear the bits of ``mask`` in the word at ``offset``."""
        value = self.get_word(offset)
        self.set_word(offset, (value | mask) if on else (value & ~mask))

    # -- masks ----------------------------------------------------------------

    def set_wmask(self, offset: int, mask: bytes) -> None:
        """Make the bits set in ``mask`` (bytes from ``offset`` on) guest-writable; clear the others."""
        self._check(offset, len(mask))
        self.wmask[offset : offset + len(mask)] = mask

    def set_wmask_byte(self, offset: int, mask: int) -> None:
        """Guest-writable bits of the byte at ``offset``."""
        self.set_wmask(offset, bytes([mask & 0xFF]))

    def set_wmask_word(self, offset: int, mask: int) -> None:
        """Guest-writable bits of the word at ``offset``."""
        self.set_wmask(offset, _U16.pack(mask & 0xFFFF))

    def set_wmask_dword(self, offset: int, mask: int) -> None:
        """Guest-writable bits of the dword at ``offset``."""
        self.set_wmask(offset, _U32.pack(mask & 0xFFFF_FFFF))

    def set_w1cmask(self, offset: int, mask: bytes) -> None:
        """Make the bits set in ``mask`` write-1-to-clear (and not otherwise writable)."""
        self._check(offset, len(mask))
        self.w1cmask[offset : offset + len(mask)] = mask
        for i, m in enumerate(mask):
            self.wmask[offset + i] &= ~m & 0xFF

    def set_stickymask(self, offset: int, mask: bytes) -> None:
        """Make the bits set in ``mask`` survive :meth:`reset` (sticky)."""
        self._check(offset, len(mask))
        self.stickymask[offset : offset + len(mask)] = mask

    def set_w1cmask_word(self, offset: int, mask: int) -> None:
        """Write-1-to-clear bits of the word at ``offset``."""
        self.set_w1cmask(offset, _U16.pack(mask & 0xFFFF))

    # -- guest side -----------------------------------------------------------

    def read(self, offset: int, data: bytearray | memoryview) -> None:
        """Fill ``data`` with the bytes at ``offset`` (a guest config read)."""
        self._check(offset, len(data))
        data[:] = self.data[offset : offset + len(data)]

    def write(self, offset: int, value: bytes | memoryview) -> None:
        """A guest config write: apply the masks byte by byte, then run the write hooks."""
        n = len(value)
        self._check(offset, n)
        data, wmask, w1c = self.data, self.wmask, self.w1cmask
        for i in range(n):
            pos = offset + i
            data[pos] = apply_write(data[pos], value[i], 0xFF, wmask[pos], w1c[pos])
        end = offset + n
        for start, size, hook in self._hooks:
            if start < end and offset < start + size:
                hook(offset, n)

    def add_write_hook(self, offset: int, size: int, hook: WriteHook) -> None:
        """Call ``hook(offset, size)`` after every guest write that touches ``[offset, offset+size)``."""
        self._check(offset, size)
        self._hooks.append((offset, size, hook))

    # -- capabilities ---------------------------------------------------------

    def add_capability(
        self,
        cap_id: int,
        body: bytes,
        *,
        wmask: bytes | None = None,
        w1cmask: bytes | None = None,
        offset: int | None = None,
    ) -> int:
        """Append a standard capability and link it into the capability list.

        ``body`` is the capability without its 2-byte header (ID and next
        pointer, which the list owns). ``wmask``/``w1cmask`` cover ``body``.
        The capability goes at ``offset`` (dword-aligned, >= 0x40) or at the
        first free dword-aligned place. Returns the capability's offset.
        """
        length = 2 + len(body)
        if offset is None:
            offset = self._find_room(length)
        if offset % 4 or offset < PCI_CAP_LIST_FIRST or offset + length > PCI_CONFIG_SPACE_SIZE:
            raise ConfigSpaceError(f"capability at {offset:#x} (+{length}) must be dword-aligned in 0x40..0xff")
        if any(self._used[offset : offset + length]):
            raise ConfigSpaceError(f"capability at {offset:#x} (+{length}) overlaps another")
        self._used[offset : offset + length] = b"\x01" * length
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        self.data[offset + 2 : offset + length] = body
        if wmask is not None:
            self.set_wmask(offset + 2, wmask)
        if w1cmask is not None:
            self.set_w1cmask(offset + 2, w1cmask)
        # Link at the end of the list.
        last = None
        for cap_offset, _ in self.capabilities():
            last = cap_offset
        if last is None:
            self.data[PCI_CAPABILITY_LIST] = offset
        else:
            self.data[last + 1] = offset
        self.set_bits_word(PCI_STATUS, PCI_STATUS_CAP_LIST, True)
        return offset

    def _find_room(self, length: int) -> int:
        for offset in range(PCI_CAP_LIST_FIRST, PCI_CONFIG_SPACE_SIZE - length + 1, 4):
            if not any(self._used[offset : offset + length]):
                return offset
        raise ConfigSpaceError(f"no room left for a {length}-byte capability")

    def capabilities(self) -> Iterator[tuple[int, int]]:
        """The capability list as ``(offset, cap_id)`` pairs, in list order."""
        seen = set()
        pos = self.data[PCI_CAPABILITY_LIST] & ~0x3
        while pos and pos not in seen and pos < PCI_CONFIG_SPACE_SIZE - 1:
            seen.add(pos)
            yield pos, self.data[pos]
            pos = self.data[pos + 1] & ~0x3

    def find_capability(self, cap_id: int) -> int | None:
        """Offset of the first capability with ``cap_id``, or ``None``."""
        return next((off for off, cid in self.capabilities() if cid == cap_id), None)

    # -- reset ----------------------------------------------------------------

    def freeze_defaults(self) -> None:
        """Remember the current contents as the power-on/reset state."""
        self._defaults = bytes(self.data)

    def reset(self, *, cold: bool = False) -> None:
        """Return to the state remembered by :meth:`freeze_defaults`: a function-level
        reset keeps the sticky bits' values, a power cycle (``cold``) does not."""
        if self._defaults is None:
            return
        if cold or not any(self.stickymask):
            self.data[:] = self._defaults
            return
        for i, (now, default, sticky) in enumerate(zip(self.data, self._defaults, self.stickymask)):
            self.data[i] = (now & sticky) | (default & ~sticky & 0xFF)

    def __repr__(self) -> str:
        return f"ConfigSpace({self.get_word(0):04x}:{self.get_word(2):04x}, {self.size} bytes)"
