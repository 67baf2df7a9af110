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

Two ring features change this when the driver accepts them (the device offers
them in its ``device_features``; the queue reads what was negotiated):

* **indirect descriptors** (``VIRTIO_RING_F_INDIRECT_DESC``): a descriptor
  flagged ``INDIRECT`` points at a table of descriptors, which holds the whole
  chain (one descriptor in the ring, one DMA read for the table);
* **event index** (``VIRTIO_RING_F_EVENT_IDX``): the driver writes
  ``used_event`` after its available ring, and the device interrupts only when
  the used index passes it (:meth:`SplitQueue.wants_interrupt`); the device
  writes ``avail_event`` after its used ring, and the driver kicks only when
  its available index passes that (:meth:`SplitQueue.rearm` publishes it and
  says whether buffers came meanwhile).

All of it is guest-memory access, so a queue is processed from deferred device
work, or from a handler only where the memory is in place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vfiouser.devices.errors import DefinitionError, DeviceError

__all__ = ["SplitQueue", "Chain", "VirtqueueError", "VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_RING_F_EVENT_IDX"]

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
NO_VECTOR = 0xFFFF
#: Feature bits of the ring layout (virtio 1.x, §6).
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29

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
        #: the used index when the driver was last signalled (event index)
        self.signalled_used = 0
        #: the avail_event last published (event index)
        self.avail_event: int | None = None

    def _negotiated(self, feature: int) -> bool:
        return bool(getattr(self.device, "driver_features", 0) & feature)

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
        if head >= self.size:
            raise VirtqueueError(f"queue {self.index}: descriptor {head} beyond the table ({self.size})")
        addr, length, flags, nxt = _DESC.unpack(self.device.dma.read(self.desc + 16 * head, 16))
        if flags & VRING_DESC_F_INDIRECT:
            if not self._negotiated(VIRTIO_RING_F_INDIRECT_DESC):
                raise VirtqueueError(f"queue {self.index}: indirect descriptors were not negotiated")
            if flags & VRING_DESC_F_NEXT or not length or length % 16:
                raise VirtqueueError(f"queue {self.index}: indirect descriptor {head} with NEXT, or a table of "
                                     f"{length} bytes")
            table = self.device.dma.read(addr, length)
            self._follow(chain, lambda i: _DESC.unpack_from(table, 16 * i), length // 16, 0, indirect=True)
        else:
            first = (addr, length, flags, nxt)
            self._follow(chain, lambda i: first if i == head else
                         _DESC.unpack(self.device.dma.read(self.desc + 16 * i, 16)), self.size, head)
        return chain

    def _follow(self, chain: Chain, descriptor, count: int, start: int, *, indirect: bool = False) -> None:
        """Walk ``count`` descriptors' worth of a chain from ``start`` into ``chain``."""
        index = start
        for _ in range(count):
            if index >= count:
                raise VirtqueueError(f"queue {self.index}: descriptor {index} beyond the table ({count})")
            addr, length, flags, nxt = descriptor(index)
            if flags & VRING_DESC_F_INDIRECT:
                what = "an indirect descriptor inside an indirect table" if indirect else \
                    "an indirect descriptor inside a chain"
                raise VirtqueueError(f"queue {self.index}: {what}")
            if flags & VRING_DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise VirtqueueError(f"queue {self.index}: a readable buffer after a writable one")
            else:
                chain.readable.append((addr, length))
            if not flags & VRING_DESC_F_NEXT:
                return
            index = nxt
        raise VirtqueueError(f"queue {self.index}: descriptor chain from {start} loops")

    # -- the used ring --------------------------------------------------------------

    def push(self, chain: Chain, written: int) -> None:
        """Give ``chain`` back to the driver with ``written`` bytes filled in."""
        slot = self.used_idx % self.size
        self.device.dma.write(self.used + 4 + 8 * slot, _USED_ELEM.pack(chain.head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.device.dma.write(self.used + 2, self.used_idx.to_bytes(2, "little"))

    def wants_interrupt(self) -> bool:
        """Whether to signal the driver for the buffers used since the last signal: with the event
        index, when the used index passed ``used_event``; otherwise unless the driver set
        ``VRING_AVAIL_F_NO_INTERRUPT``."""
        if self._negotiated(VIRTIO_RING_F_EVENT_IDX):
            used_event = self._read16(self.driver + 4 + 2 * self.size)
            new, old = self.used_idx, self.signalled_used
            self.signalled_used = new
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self._read16(self.driver) & VRING_AVAIL_F_NO_INTERRUPT

    def rearm(self) -> bool:
        """Before the device stops looking at the queue: with the event index, publish
        ``avail_event`` (the driver kicks again once it offers a buffer beyond what was taken),
        then look again; True if buffers arrived meanwhile (keep going). Without the event
        index the driver kicks for every buffer: always False."""
        if not self._negotiated(VIRTIO_RING_F_EVENT_IDX) or not self.enabled:
            return False
        if self.avail_event != self.last_avail:
            self.device.dma.write(self.used + 4 + 8 * self.size, self.last_avail.to_bytes(2, "little"))
            self.avail_event = self.last_avail
        return self._read16(self.driver + 2) != self.last_avail
