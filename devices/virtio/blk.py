"""A virtio block device (virtio device ID 2, PCI 1af4:1042) on a raw disk image.

Linux's ``virtio_blk`` binds to it. Each request is a descriptor chain: a
16-byte header (type, reserved, sector) the driver wrote, the data, and one
status byte the device writes last:

===================  ==========================================================
request type         what the model does
===================  ==========================================================
``IN`` (0)           image -> the writable buffers (straight into guest memory)
``OUT`` (1)          the readable buffers -> image (straight from guest memory)
``FLUSH`` (4)        ``fdatasync`` on the image before the status is written
``GET_ID`` (8)       the serial number (up to 20 bytes)
``DISCARD`` (11)     each range becomes a hole in the image (a hint)
``WRITE_ZEROES``     each range reads as zeros
(13)
anything else        ``UNSUPP``
===================  ==========================================================

A request outside the disk, a write to a read-only disk or a failed host I/O
gets ``IOERR``; a chain the driver broke (too short for a header and a status,
a loop, an indirect table inside another) marks the device ``NEEDS_RESET``.

Features offered: ``SIZE_MAX``, ``SEG_MAX`` (a chain's data segments, queue
size minus two), ``BLK_SIZE``, ``FLUSH``, ``TOPOLOGY``, ``RO`` (with
``readonly=on``), ``MQ`` (with ``num_queues`` above 1), ``DISCARD`` and
``WRITE_ZEROES``, and the ring features the queue layer implements: indirect
descriptors and the event index. One MSI-X vector per queue (the transport's).

Where a queue's rings are guest memory the server reaches in place, a kick is
served right in the notification's handler (in-place DMA needs no message, and
no other thread wakes on the path of an I/O); otherwise on the device's
worker, which also takes over from a request larger than :data:`INLINE_LIMIT`
(the request already taken from the ring is handed over with the queue) or
one whose memory turns out not to be in place. While the worker has a queue
(a kick queued or running), that queue's notifications go to the worker too:
two threads never serve one queue.
"""

from __future__ import annotations

import struct

from vfiouser.devices.disk import SECTOR, DiskImage, DiskIoError, DiskRangeError
from vfiouser.devices.errors import DefinitionError
from vfiouser.devices.pci import DmaWouldDeadlock

from .pci import STATUS_NEEDS_RESET, VirtioPciDevice
from .queue import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, Chain, SplitQueue, VirtqueueError

__all__ = ["VirtioBlk"]

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_TOPOLOGY = 1 << 10
VIRTIO_BLK_F_MQ = 1 << 12
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2

_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
_RANGE = struct.Struct("<QII")  # sector, number of sectors, flags (discard / write zeroes)
#: Largest segment and largest discard / write-zeroes request the config space announces.
SIZE_MAX = 1 << 20
MAX_RANGE_SECTORS = (1 << 22) - 1
MAX_RANGES = 32


#: Largest request served in the notification's handler (a bigger one would hold the serving
#: thread, and QEMU's messages for the device, for a millisecond): the worker serves it.
INLINE_LIMIT = 64 << 10


class _TooLarge(Exception):
    """A request to hand to the worker rather than serve in the notification's handler."""


def _data_size(chain: Chain) -> int:
    return sum(n for _, n in chain.readable) + sum(n for _, n in chain.writable)


def _split_front(segments: list[tuple[int, int]], size: int) -> tuple[list, list]:
    """The first ``size`` bytes of a scatter-gather list, and the rest."""
    front, rest = [], []
    for addr, length in segments:
        if size >= length:
            front.append((addr, length))
            size -= length
        elif size:
            front.append((addr, size))
            rest.append((addr + size, length - size))
            size = 0
        else:
            rest.append((addr, length))
    return front, rest


def _split_back(segments: list[tuple[int, int]], size: int) -> tuple[list, list]:
    """A scatter-gather list without its last ``size`` bytes, and those bytes."""
    total = sum(length for _, length in segments)
    return _split_front(segments, max(0, total - size))


class VirtioBlk(VirtioPciDevice):
    """virtio-blk over modern virtio-pci, backed by the raw image ``file`` (see the module docstring).

    ``file``: the raw disk image (a regular file or block device, a whole
    number of sectors); ``readonly``: the disk is read-only (``VIRTIO_BLK_F_RO``,
    image opened read-only); ``num_queues``: request queues (1-16,
    ``VIRTIO_BLK_F_MQ`` above 1); ``queue_size``: entries per queue (a power of
    two, 4-1024); ``serial``: what
    ``GET_ID`` returns (default: from the image's name); ``inline_io``: serve
    kicks in the notification's handler where memory is in place.
    """

    virtio_device_id = 2
    device_config_size = 60

    def __init__(self, file: str = "", readonly: bool = False, num_queues: int = 1, queue_size: int = 256,
                 serial: str = "", inline_io: bool = True) -> None:
        if not 1 <= num_queues <= 16:
            raise DefinitionError(f"num_queues must be 1-16, not {num_queues}")
        if queue_size < 4 or queue_size > 1024 or queue_size & (queue_size - 1):
            raise DefinitionError(f"queue_size must be a power of two from 4 to 1024, not {queue_size}")
        self.disk = DiskImage(file, readonly=readonly)
        self.serial = (serial or file.rsplit("/", 1)[-1]).encode("ascii", "replace")[:20]
        self.queue_sizes = (queue_size,) * num_queues
        features = (VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
                    | VIRTIO_BLK_F_TOPOLOGY | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
                    | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX)
        if readonly:
            features |= VIRTIO_BLK_F_RO
        if num_queues > 1:
            features |= VIRTIO_BLK_F_MQ
        self.device_features = features
        self.inline_io = inline_io
        self._in_place: dict[int, tuple] = {}
        #: (generation, queue index) -> kicks queued or running on the worker
        self._on_worker: dict[tuple[int, int], int] = {}
        #: queue index -> (generation, chain): a large request taken inline, for the worker
        self._carried: dict[int, tuple[int, Chain]] = {}
        super().__init__()
        #: Requests completed, by type (``IN``, ``OUT``, ``FLUSH``, ...).
        self.requests: dict[int, int] = {}

    # -- configuration space ---------------------------------------------------------------

    def device_config(self) -> bytes:
        """``struct virtio_blk_config``: capacity, limits, topology, queues, discard and zeroing."""
        seg_max = self.queue_sizes[0] - 2
        return struct.pack("<QIIHBBIBBHIBBHIIIIIB3x", self.disk.size // SECTOR, SIZE_MAX, seg_max,
                           0, 0, 0,  # geometry: not offered
                           SECTOR,  # blk_size
                           0, 0, 1, 0,  # topology: physical block = logical, no offset, min_io 1, opt_io 0
                           0, 0, len(self.queues),  # writeback (CONFIG_WCE not offered), unused, num_queues
                           MAX_RANGE_SECTORS, MAX_RANGES, 1,  # discard: sectors, segments, alignment
                           MAX_RANGE_SECTORS, MAX_RANGES, 0)  # write zeroes: sectors, segments, may unmap

    # -- requests --------------------------------------------------------------------------

    def _notify_write(self, offset: int, data) -> None:
        """A queue's notification: served here if its rings are in place (see the module
        docstring), else by the transport (deferred to the worker)."""
        index = int.from_bytes(data[:2], "little") if len(data) >= 2 else offset // 4
        if (self.inline_io and index < len(self.queues) and self.driver_ok
                and (self.generation, index) not in self._on_worker):
            queue = self.queues[index]
            if queue.enabled and self._rings_in_place(queue):
                try:
                    self.queue_kick(queue)
                    return
                except (DmaWouldDeadlock, _TooLarge):
                    pass  # memory that needs a message, or a large request: the worker serves the rest
                except Exception:
                    self.log.exception("queue %d failed; the device needs a reset", index)
                    self.status |= STATUS_NEEDS_RESET
                    return
        super()._notify_write(offset, data)

    def _defer_kick(self, index: int) -> None:
        """Count the kick handed to the worker until it has run (see the module docstring)."""
        with self.lock:
            for stale in [key for key in self._on_worker if key[0] != self.generation]:
                del self._on_worker[stale]  # tasks from before a reset never run
            key = (self.generation, index)
            self._on_worker[key] = self._on_worker.get(key, 0) + 1
        super()._defer_kick(index)

    def _kick(self, index: int, generation: int) -> None:
        try:
            super()._kick(index, generation)
        finally:
            with self.lock:
                key = (generation, index)
                left = self._on_worker.get(key, 0) - 1
                if left > 0:
                    self._on_worker[key] = left
                else:
                    self._on_worker.pop(key, None)

    def _take_carried(self, queue: SplitQueue, generation: int) -> Chain | None:
        """The large request the notification's handler took from ``queue`` and left to the
        worker (on the worker only; None if there is none, or it is from before a reset)."""
        if not self._carried or self.worker.held_here():
            return None
        with self.lock:
            carried = self._carried.pop(queue.index, None)
        return carried[1] if carried is not None and carried[0] == generation else None

    def _rings_in_place(self, queue: SplitQueue) -> bool:
        """Whether the queue's rings are reached without messages (remembered per ring layout)."""
        key = (queue.desc, queue.driver, queue.used, queue.size)
        cached = self._in_place.get(queue.index)
        if cached is None or cached[0] != key:
            size = queue.size
            ok = (self.dma.in_place(queue.desc, 16 * size) and self.dma.in_place(queue.driver, 6 + 2 * size)
                  and self.dma.in_place(queue.used, 6 + 8 * size, write=True))
            cached = self._in_place[queue.index] = (key, ok)
        return cached[1]

    def queue_kick(self, queue: SplitQueue) -> None:
        """Serve every request the driver offered, then signal the queue's vector once."""
        served = 0
        try:
            while True:
                with self.lock:
                    generation = self.generation
                taken = queue.last_avail
                try:
                    chain = self._take_carried(queue, generation) or queue.pop()
                    if chain is None:
                        if queue.rearm():
                            continue
                        break
                    if self.worker.held_here() and _data_size(chain) > INLINE_LIMIT:
                        with self.lock:  # the notification's handler would be held: the worker serves it
                            self._carried[queue.index] = (generation, chain)
                        raise _TooLarge
                    status, written = self._serve(chain)
                except DmaWouldDeadlock:
                    queue.last_avail = taken  # not served: the worker takes it from the ring again
                    raise
                with self.lock:
                    if generation != self.generation:
                        return  # reset meanwhile: the buffers are no longer ours
                queue.push(chain, written)
                served += 1
        finally:
            if served and queue.wants_interrupt():
                self.notify_used(queue)

    def _serve(self, chain: Chain) -> tuple[int, int]:
        """One request: ``(status, bytes written into the driver's buffers)``, status included."""
        header, data_out = _split_front(chain.readable, _HEADER.size)
        data_in, status_at = _split_back(chain.writable, 1)
        if sum(n for _, n in header) < _HEADER.size or sum(n for _, n in status_at) != 1:
            raise VirtqueueError(f"request {chain.head}: no room for the header and the status byte")
        kind, _, sector = _HEADER.unpack(self.dma.read_sg(header))
        written = 0
        try:
            status, written = self._execute(kind, sector, data_out, data_in)
        except (DiskIoError, DiskRangeError) as exc:
            self.log.warning("request %d (type %d, sector %d): %s", chain.head, kind, sector, exc)
            status = S_IOERR
        self.dma.write(status_at[0][0], bytes([status]))
        self.requests[kind] = self.requests.get(kind, 0) + 1
        return status, written + 1

    def _execute(self, kind: int, sector: int, data_out: list, data_in: list) -> tuple[int, int]:
        disk = self.disk
        if kind == T_IN:
            size = sum(n for _, n in data_in)
            if size % SECTOR:
                return S_IOERR, 0
            self.dma.write_with(data_in, lambda views: disk.readinto(sector * SECTOR, views))
            return S_OK, size
        if kind == T_OUT:
            size = sum(n for _, n in data_out)
            if disk.readonly or size % SECTOR:
                return S_IOERR, 0
            self.dma.read_with(data_out, lambda views: disk.write_from(sector * SECTOR, views))
            return S_OK, 0
        if kind == T_FLUSH:
            disk.flush()
            return S_OK, 0
        if kind == T_GET_ID:
            size = min(sum(n for _, n in data_in), 20)
            ident = self.serial.ljust(size, b"\0")[:size]
            self.dma.write_sg(_split_front(data_in, size)[0], ident)
            return S_OK, size
        if kind in (T_DISCARD, T_WRITE_ZEROES):
            return self._ranges(kind, data_out), 0
        return S_UNSUPP, 0

    def _ranges(self, kind: int, data_out: list) -> int:
        raw = self.dma.read_sg(data_out)
        if self.disk.readonly or not raw or len(raw) % _RANGE.size or len(raw) // _RANGE.size > MAX_RANGES:
            return S_IOERR
        ranges = [_RANGE.unpack_from(raw, i) for i in range(0, len(raw), _RANGE.size)]
        if any(count > MAX_RANGE_SECTORS or (sector + count) * SECTOR > self.disk.size for sector, count, _ in ranges):
            return S_IOERR
        for sector, count, _flags in ranges:
            if kind == T_DISCARD:
                self.disk.discard(sector * SECTOR, count * SECTOR)
            else:
                self.disk.write_zeroes(sector * SECTOR, count * SECTOR)
        return S_OK
