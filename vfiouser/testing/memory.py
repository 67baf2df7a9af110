"""Guest RAM for a device served in-process: a memfd the test reads and writes, the device DMAs into.

:class:`GuestMemory` is what QEMU's RAM is to a device: ``size`` bytes from
guest address ``base`` (0 by default). The test side reads and writes it
directly; the device side reaches it through DMA, either in place (the memfd
is handed to the server with DMA_MAP, as QEMU does with
``memory-backend-memfd,share=on``) or by DMA_READ/DMA_WRITE messages that the
client answers from the same bytes (:meth:`GuestMemory.serve_dma`, QEMU's
default RAM).

>>> mem = GuestMemory(1 << 20)
>>> mem.write(0x1000, b"hello")
>>> mem.read(0x1000, 5)
b'hello'
>>> mem.write_u32(0x2000, 0xCAFE); hex(mem.read_u32(0x2000))
'0xcafe'
>>> mem.read(0xFFFFF, 2)
Traceback (most recent call last):
    ...
vfiouser.testing.memory.GuestMemoryError: [0xfffff, 0x100001) is outside guest RAM [0x0, 0x100000)
>>> mem.close()
"""

from __future__ import annotations

import errno
import mmap
import os

from vfiouser.errors import UsageError
from vfiouser.protocol import Command

__all__ = ["GuestMemory", "GuestMemoryError", "DEFAULT_MEMORY"]

#: Guest RAM a served device gets by default: 16 MiB from address 0.
DEFAULT_MEMORY = 16 << 20


class GuestMemoryError(UsageError):
    """An access outside the guest RAM, or a size that cannot be RAM."""

    errno = errno.EFAULT


class GuestMemory:
    """``size`` bytes of guest RAM at guest address ``base``, backed by a memfd."""

    def __init__(self, size: int = DEFAULT_MEMORY, base: int = 0) -> None:
        if size <= 0 or size % mmap.PAGESIZE or base < 0 or base % mmap.PAGESIZE:
            raise GuestMemoryError(f"guest RAM must be whole pages at a page-aligned address "
                                   f"(got {size:#x} bytes at {base:#x})")
        self.size = size
        self.base = base
        self.fd = os.memfd_create("vfiouser-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._view = memoryview(self._map)

    def _span(self, addr: int, size: int) -> slice:
        start = addr - self.base
        if size < 0 or start < 0 or start + size > self.size:
            raise GuestMemoryError(f"[{addr:#x}, {addr + size:#x}) is outside guest RAM "
                                   f"[{self.base:#x}, {self.base + self.size:#x})")
        return slice(start, start + size)

    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes at guest address ``addr``."""
        return bytes(self._view[self._span(addr, size)])

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at guest address ``addr``."""
        self._view[self._span(addr, len(data))] = data

    def fill(self, addr: int, size: int, byte: int = 0) -> None:
        """Set ``size`` bytes at ``addr`` to ``byte``."""
        self.write(addr, bytes([byte]) * size)

    def read_u32(self, addr: int) -> int:
        """A little-endian 32-bit word at ``addr``."""
        return int.from_bytes(self.read(addr, 4), "little")

    def write_u32(self, addr: int, value: int) -> None:
        """Store a little-endian 32-bit word at ``addr``."""
        self.write(addr, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    def read_u64(self, addr: int) -> int:
        """A little-endian 64-bit word at ``addr``."""
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u64(self, addr: int, value: int) -> None:
        """Store a little-endian 64-bit word at ``addr``."""
        self.write(addr, (value & (1 << 64) - 1).to_bytes(8, "little"))

    def serve_dma(self, cmd: int, addr: int, count: int, data: bytes) -> bytes | None:
        """A :class:`vfiouser.client.Client` ``dma_handler``: DMA_READ returns the bytes,
        DMA_WRITE stores them; outside the RAM the client answers EFAULT."""
        if cmd == Command.DMA_READ:
            try:
                return self.read(addr, count)
            except GuestMemoryError:
                raise OSError(errno.EFAULT, "DMA outside guest RAM") from None
        try:
            self.write(addr, bytes(data[:count]))
        except GuestMemoryError:
            raise OSError(errno.EFAULT, "DMA outside guest RAM") from None
        return None

    def close(self) -> None:
        """Unmap and close the memfd (a server that mapped it keeps its own mapping)."""
        if self.fd < 0:
            return
        self._view.release()
        self._map.close()
        os.close(self.fd)
        self.fd = -1

    def __repr__(self) -> str:
        return f"<GuestMemory {self.size:#x} bytes at {self.base:#x}>"
