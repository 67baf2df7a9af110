"""A virtio entropy device (virtio device ID 4, PCI 1af4:1044).

One queue (``requestq``, 64 entries). The driver offers device-writable
buffers; the device fills each with random bytes, returns it on the used ring
and signals the queue's MSI-X vector. Linux's ``virtio_rng`` module binds to
it and feeds ``/dev/hwrng``.

The bytes come from :class:`EntropySource`: the operating system's random
generator by default, or, with ``seed=N``, a reproducible stream (counter-mode
SHA-256 of the seed) that does not depend on how the driver slices its reads,
so a test can predict exactly what the guest reads (:func:`entropy_stream`).
:attr:`VirtioRng.produced` counts what was handed out. One buffer gets at most
64 KiB (:data:`MAX_REQUEST`; the used length tells the driver how much), and a
buffer the driver did not map for writing is returned empty, so a descriptor
that claims 256 MiB costs nothing.
"""

from __future__ import annotations

import hashlib
import os

from vfiouser.devices.port import ResetType

from .pci import VirtioPciDevice

__all__ = ["VirtioRng", "EntropySource", "entropy_stream"]


def _block(seed: int, counter: int) -> bytes:
    return hashlib.sha256(seed.to_bytes(16, "little", signed=True) + counter.to_bytes(8, "little")).digest()


def entropy_stream(seed: int, size: int, start: int = 0) -> bytes:
    """Bytes ``[start, start+size)`` of the stream ``EntropySource(seed)`` produces."""
    first, last = start // 32, (start + size + 31) // 32
    blob = b"".join(_block(seed, i) for i in range(first, last))
    return blob[start - first * 32 : start - first * 32 + size]


class EntropySource:
    """Random bytes: ``os.urandom``, or a reproducible stream when ``seed`` is given."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.position = 0

    def take(self, size: int) -> bytes:
        if self.seed is None:
            data = os.urandom(size)
        else:
            data = entropy_stream(self.seed, size, self.position)
        self.position += size
        return data


#: Most bytes produced for one buffer (what Linux's virtio_rng asks for is far less).
MAX_REQUEST = 64 * 1024


def _first_bytes(segments: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """The first ``limit`` bytes of a scatter-gather list."""
    out = []
    for addr, size in segments:
        if limit <= 0:
            break
        out.append((addr, min(size, limit)))
        limit -= size
    return out


class VirtioRng(VirtioPciDevice):
    """virtio-rng over modern virtio-pci. ``seed``: make the byte stream reproducible."""

    virtio_device_id = 4
    queue_sizes = (64,)

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.source = EntropySource(seed)
        #: Bytes handed to the guest so far.
        self.produced = 0

    def reset(self, kind: ResetType) -> None:
        """A virtio reset; a power cycle (a new VM) also starts a seeded stream over."""
        super().reset(kind)
        if kind is ResetType.COLD:
            self.source.position = 0

    def queue_kick(self, queue) -> None:
        served = 0
        while True:
            with self.lock:
                generation = self.generation
            chain = queue.pop()
            if chain is None:
                break
            # The driver says how much it wants; the device may give less (the used length says
            # how much), so one buffer costs at most MAX_REQUEST, whatever its descriptors claim,
            # and nothing is produced for memory the driver did not map.
            segments = _first_bytes(chain.writable, MAX_REQUEST)
            if all(self.dma.mapped(addr, size, write=True) == [(addr, size)] for addr, size in segments):
                data = self.source.take(sum(size for _, size in segments))
                self.dma.write_sg(segments, data)
            else:
                self.log.warning("queue %d: a buffer the driver did not map for writing; returned empty",
                                 queue.index)
                data = b""
            with self.lock:
                if generation != self.generation:
                    return  # reset meanwhile: the buffers are no longer ours
                self.produced += len(data)
            queue.push(chain, len(data))  # DMA: never with the lock held
            served += 1
        if served and queue.wants_interrupt():
            self.notify_used(queue)
