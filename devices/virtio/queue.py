"""Split virtqueues (virtio 1.x, §2.7), read and written in guest memory through the DMA API.

The driver owns a descriptor table, an *available* ring (buffers it offers)
and a *used* ring (buffers the device has finished with). The device:

1. reads ``avail.idx``; every index from its own ``last_avail`` up to it is a
   new chain head (:meth:`SplitQueue.pop`);
2. walks the chain through ``next`` links: readable buffers first, then
   device-writable ones;
3. writes its results into the writable buffers, then the used element
   ``(head, bytes written)`` and ``used.idx`` (:meth:`SplitQueue.push`), in
   that order, so the driver never sees an index before its data;
4. interrupts unless the driver set ``VRING_AVAIL_F_NO_INTERRUPT``.

All of it is guest-memory access, so a queue is only processed from deferred
device work (never in a register handler).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vfiouser.devices.errors import DefinitionError, DeviceError

__all__ = ["SplitQueue", "Chain", "VirtqueueError"]

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
NO_VECTOR = 0xFFFF

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")  # id, len


class VirtqueueError(DeviceError):
    """The driver put something impossible in the queue (a loop, an index out of range)."""


@dataclass
class Chain:
    """One descriptor chain: the head index and its buffers as ``(addr, len)`` lists."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def writable_size(self) -> int:
        return sum(length for _, length in self.writable)


class SplitQueue:
    """Device side of one split virtqueue."""

    def __init__(self, device, index: int, max_size: int) -> None:
        if max_size < 1 or max_size > 32768 or max_size & (max_size - 1):
            raise DefinitionError(f"a queue size is a power of two up to 32768, not {max_size}")
        self.device = device
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.desc = 0
        self.driver = 0  # the available ring
        self.used = 0  # the used ring ("device area")
        self.enabled = False
        self.msix_vector = NO_VECTOR
        self.last_avail = 0
        self.used_idx = 0

    # -- the available ring ---------------------------------------------------------

    def _read16(self, addr: int) -> int:
        return int.from_bytes(self.device.dma.read(addr, 2), "little")

    def pending(self) -> bool:
        """Whether the driver has offered buffers we have not taken."""
        return self.enabled and self._read16(self.driver + 2) != self.last_avail

    def pop(self) -> Chain | None:
        """The next offered chain, or ``None``."""
        if not self.enabled:
            return None
        avail_idx = self._read16(self.driver + 2)
        if avail_idx == self.last_avail:
            return None
        if (avail_idx - self.last_avail) & 0xFFFF > self.size:
            raise VirtqueueError(f"queue {self.index}: driver claims {avail_idx - self.last_avail} new buffers")
        slot = self.last_avail % self.size
        head = self._read16(self.driver + 4 + 2 * slot)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
        chain = Chain(head)
        index = head
        for _ in range(self.size):
            if index >= self.size:
                raise VirtqueueError(f"queue {self.index}: descriptor {index} beyond the table ({self.size})")
            addr, length, flags, nxt = _DESC.unpack(self.device.dma.read(self.desc + 16 * index, 16))
            if flags & VRING_DESC_F_INDIRECT:
                raise VirtqueueError(f"queue {self.index}: indirect descriptors were not negotiated")
            if flags & VRING_DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise VirtqueueError(f"queue {self.index}: a readable buffer after a writable one")
            else:
                chain.readable.append((addr, length))
            if not flags & VRING_DESC_F_NEXT:
                return chain
            index = nxt
        raise VirtqueueError(f"queue {self.index}: descriptor chain from {head} loops")

    # -- the used ring --------------------------------------------------------------

    def push(self, chain: Chain, written: int) -> None:
        """Give ``chain`` back to the driver with ``written`` bytes filled in."""
        slot = self.used_idx % self.size
        self.device.dma.write(self.used + 4 + 8 * slot, _USED_ELEM.pack(chain.head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.device.dma.write(self.used + 2, self.used_idx.to_bytes(2, "little"))

    def wants_interrupt(self) -> bool:
        """False when the driver asked not to be interrupted (``VRING_AVAIL_F_NO_INTERRUPT``)."""
        return not self._read16(self.driver) & VRING_AVAIL_F_NO_INTERRUPT
