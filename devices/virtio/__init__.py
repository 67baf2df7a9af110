"""Virtio devices over modern virtio-pci: the transport, split virtqueues, and the models.

* :mod:`vfiouser.devices.virtio.pci` - :class:`VirtioPciDevice`, the virtio 1.x PCI transport;
* :mod:`vfiouser.devices.virtio.queue` - :class:`SplitQueue`, the device side of a split virtqueue;
* :mod:`vfiouser.devices.virtio.rng` - :class:`VirtioRng`, an entropy source;
* :mod:`vfiouser.devices.virtio.blk` - :class:`VirtioBlk`, a block device on a raw image.
"""

from .pci import VIRTIO_F_VERSION_1, VirtioPciDevice
from .queue import Chain, SplitQueue, VirtqueueError
from .rng import EntropySource, VirtioRng, entropy_stream
from .blk import VirtioBlk

__all__ = ["VirtioPciDevice", "VIRTIO_F_VERSION_1", "SplitQueue", "Chain", "VirtqueueError", "VirtioRng",
           "EntropySource", "entropy_stream", "VirtioBlk"]
