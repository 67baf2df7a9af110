"""Modern virtio over PCI (virtio 1.x, §4.1): the transport every virtio model builds on.

Identity
    vendor 0x1af4, device 0x1040 + virtio device ID, revision 1 (modern only),
    subsystem 1af4:1100, INTA (used only when MSI-X is off).

BARs
    BAR1: 4 KiB, the MSI-X table (one vector for configuration changes and
    one per queue) and its PBA.
    BAR4: 16 KiB, 64-bit prefetchable, the virtio structures:

    =========  ==================  ===========================================
    BAR4 off   structure           virtio capability (vendor-specific, 0x09)
    =========  ==================  ===========================================
    0x0000     common config       type 1
    0x1000     ISR status          type 3 (read-to-clear: bit 0 queue, bit 1 config)
    0x2000     device config       type 4 (only if the device has one)
    0x3000     notifications       type 2, multiplier 4: queue *n* at 0x3000 + 4n
    =========  ==================  ===========================================

    plus the PCI configuration access window (type 5) the specification asks
    devices to offer.

Common configuration (BAR4 + 0, little-endian)

    ======  ==============================  ==========================================
    offset  field                           behaviour
    ======  ==============================  ==========================================
    0x00    device_feature_select (32)      which 32 bits 0x04 shows
    0x04    device_feature (32, RO)         offered features (VERSION_1 always)
    0x08    driver_feature_select (32)      which 32 bits 0x0c sets
    0x0c    driver_feature (32)             accepted features
    0x10    config_msix_vector (16)         reads back 0xffff if the vector does not exist
    0x12    num_queues (16, RO)
    0x14    device_status (8)               0 resets; FEATURES_OK only sticks if the
                                            accepted features are offered ones and
                                            include VERSION_1
    0x15    config_generation (8, RO)
    0x16    queue_select (16)
    0x18    queue_size (16)                 maximum at reset; 0 for a queue that does
                                            not exist
    0x1a    queue_msix_vector (16)          as config_msix_vector
    0x1c    queue_enable (16)               1 enables the selected queue
    0x1e    queue_notify_off (16, RO)       = the queue index
    0x20    queue_desc (64)                 descriptor table address
    0x28    queue_driver (64)               available ring address
    0x30    queue_device (64)               used ring address
    ======  ==============================  ==========================================

A write to queue *n*'s notification address (posted) wakes the device, which
processes the queue in deferred work (it reads guest memory). Used buffers are
signalled on the queue's MSI-X vector, or, without MSI-X, by setting ISR bit 0
and raising INTx until the driver reads the ISR.

A model subclasses :class:`VirtioPciDevice`, sets ``virtio_device_id``,
``queue_sizes`` and ``device_features``, and implements :meth:`queue_kick`
(and, if it has one, the device configuration through ``device_config``).
"""

from __future__ import annotations

import struct

from vfiouser.devices.pci import INTA, MemoryBar, PciDevice, PCI_CAP_ID_VNDR, ResetType
from vfiouser.iomgr import DeviceIo

from .queue import NO_VECTOR, SplitQueue

__all__ = [
    "VirtioPciDevice",
    "VIRTIO_F_VERSION_1",
    "STATUS_ACKNOWLEDGE",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FEATURES_OK",
    "STATUS_NEEDS_RESET",
    "STATUS_FAILED",
]

VIRTIO_F_VERSION_1 = 1 << 32

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5

VIRTIO_BAR = 4
MSIX_BAR = 1
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
REGION_SIZE = 0x1000
NOTIFY_MULTIPLIER = 4
COMMON_SIZE = 0x40  # through admin_queue_num; bytes beyond read 0

# Common configuration fields: offset -> (name, size, writable)
_COMMON_FIELDS = {
    0x00: ("device_feature_select", 4, True),
    0x04: ("device_feature", 4, False),
    0x08: ("driver_feature_select", 4, True),
    0x0C: ("driver_feature", 4, True),
    0x10: ("config_msix_vector", 2, True),
    0x12: ("num_queues", 2, False),
    0x14: ("device_status", 1, True),
    0x15: ("config_generation", 1, False),
    0x16: ("queue_select", 2, True),
    0x18: ("queue_size", 2, True),
    0x1A: ("queue_msix_vector", 2, True),
    0x1C: ("queue_enable", 2, True),
    0x1E: ("queue_notify_off", 2, False),
    0x20: ("queue_desc", 8, True),
    0x28: ("queue_driver", 8, True),
    0x30: ("queue_device", 8, True),
    0x38: ("queue_notify_data", 2, False),
    0x3A: ("queue_reset", 2, False),
    0x3C: ("admin_queue_index", 2, False),
    0x3E: ("admin_queue_num", 2, False),
}


class _Handler(DeviceIo):
    """Forwards one BAR4 structure to methods of the device."""

    def __init__(self, read, write) -> None:
        self._read, self._write = read, write

    def read(self, base, offset, data):
        self._read(offset, data)

    def write(self, base, offset, data):
        self._write(offset, data)


class VirtioPciDevice(PciDevice):
    """Base class of modern virtio-pci devices (see the module docstring)."""

    vendor_id = 0x1AF4
    revision = 1
    subsystem_vendor_id = 0x1AF4
    subsystem_id = 0x1100
    class_code = 0x00FF00
    interrupt_pin = INTA
    #: The virtio device ID (4 = entropy source, 2 = block, 1 = network, ...).
    virtio_device_id: int = 0
    #: Maximum size of each queue (powers of two).
    queue_sizes: tuple[int, ...] = ()
    #: Device-specific feature bits offered (VERSION_1 is added).
    device_features: int = 0
    #: Size of the device-specific configuration structure (0: none).
    device_config_size: int = 0

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.virtio_device_id:
            cls.device_id = 0x1040 + cls.virtio_device_id

    def __init__(self) -> None:
        super().__init__()
        self.queues = [SplitQueue(self, i, size) for i, size in enumerate(self.queue_sizes)]
        self.offered_features = self.device_features | VIRTIO_F_VERSION_1
        bar4 = self.add_bar(VIRTIO_BAR, MemoryBar(0x4000, bits=64, prefetchable=True))
        bar4.map(_Handler(self._common_read, self._common_write), COMMON_OFF, REGION_SIZE)
        bar4.map(_Handler(self._isr_read, lambda off, data: None), ISR_OFF, REGION_SIZE)
        if self.device_config_size:
            bar4.map(_Handler(self._devcfg_read, self._devcfg_write), DEVICE_OFF, REGION_SIZE)
        bar4.map(_Handler(lambda off, data: data.__setitem__(slice(None), bytes(len(data))), self._notify_write),
                 NOTIFY_OFF, REGION_SIZE)
        self.add_bar(MSIX_BAR, MemoryBar(0x1000))
        self._add_virtio_cap(CAP_COMMON, COMMON_OFF, REGION_SIZE)
        self._add_virtio_cap(CAP_NOTIFY, NOTIFY_OFF, REGION_SIZE, struct.pack("<I", NOTIFY_MULTIPLIER))
        self._add_virtio_cap(CAP_ISR, ISR_OFF, REGION_SIZE)
        if self.device_config_size:
            self._add_virtio_cap(CAP_DEVICE, DEVICE_OFF, REGION_SIZE)
        self._pci_cfg_cap = self._add_virtio_cap(CAP_PCI_CFG, 0, 0, bytes(4), window=True)
        self.add_msix(vectors=len(self.queues) + 1, table_bar=MSIX_BAR, table_offset=0, pba_offset=0x800)
        self._virtio_reset()

    def _add_virtio_cap(self, cfg_type: int, offset: int, length: int, extra: bytes = b"", *,
                        window: bool = False) -> int:
        # struct virtio_pci_cap after the 2-byte header: cap_len, cfg_type, bar, id, padding[2], offset, length
        body = struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, VIRTIO_BAR if not window else 0, 0,
                           offset, length) + extra
        wmask = None
        if window:  # bar, offset, length and the 4 data bytes are the driver's to set
            wmask = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 8 + b"\xff" * 4
        cap = self.config.add_capability(PCI_CAP_ID_VNDR, body, wmask=wmask)
        if window:
            self.config.add_write_hook(cap + 16, 4, self._pci_cfg_window_written)
        return cap

    # -- state -----------------------------------------------------------------------------

    def _virtio_reset(self) -> None:
        self.status = 0
        self.isr = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self.config_msix_vector = NO_VECTOR
        self.config_generation = 0
        self.generation = getattr(self, "generation", 0) + 1  # deferred work from before a reset stops
        for q in self.queues:
            q.reset()
        if self.interrupt_pin and self.intx_level:
            self.lower_intx()

    def reset(self, kind: ResetType = ResetType.WARM) -> None:
        """A function-level reset (or a power cycle) is a virtio reset."""
        self._virtio_reset()

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & STATUS_DRIVER_OK) and not self.status & STATUS_NEEDS_RESET

    def _selected(self) -> SplitQueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    # -- common configuration --------------------------------------------------------------

    def _field(self, name: str) -> int:
        q = self._selected()
        if name == "device_feature":
            return (self.offered_features >> (32 * self.device_feature_select)) & 0xFFFF_FFFF \
                if self.device_feature_select < 2 else 0
        if name == "driver_feature":
            return (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFF_FFFF \
                if self.driver_feature_select < 2 else 0
        if name == "num_queues":
            return len(self.queues)
        if name == "device_status":
            return self.status
        if name.startswith("queue_") and name not in ("queue_select",):
            if q is None:
                return NO_VECTOR if name == "queue_msix_vector" else 0
            return {"queue_size": q.size, "queue_msix_vector": q.msix_vector, "queue_enable": int(q.enabled),
                    "queue_notify_off": q.index, "queue_desc": q.desc, "queue_driver": q.driver,
                    "queue_device": q.used}.get(name, 0)
        return getattr(self, name, 0)

    def _common_read(self, offset: int, data) -> None:
        image = bytearray(COMMON_SIZE)
        for off, (name, size, _) in _COMMON_FIELDS.items():
            image[off : off + size] = self._field(name).to_bytes(size, "little")
        for i in range(len(data)):
            pos = offset + i
            data[i] = image[pos] if pos < COMMON_SIZE else 0

    def _common_write(self, offset: int, data) -> None:
        end = offset + len(data)
        for off, (name, size, writable) in _COMMON_FIELDS.items():
            if not writable or off >= end or off + size <= offset:
                continue
            value = bytearray(self._field(name).to_bytes(size, "little"))
            for pos in range(max(off, offset), min(off + size, end)):
                value[pos - off] = data[pos - offset]
            self._set_field(name, int.from_bytes(value, "little"))

    def _set_field(self, name: str, value: int) -> None:
        q = self._selected()
        if name == "device_feature_select":
            self.device_feature_select = value
        elif name == "driver_feature_select":
            self.driver_feature_select = value
        elif name == "driver_feature":
            if self.driver_feature_select < 2 and not self.status & STATUS_FEATURES_OK:
                shift = 32 * self.driver_feature_select
                self.driver_features = self.driver_features & ~(0xFFFF_FFFF << shift) | value << shift
        elif name == "config_msix_vector":
            self.config_msix_vector = self._valid_vector(value)
        elif name == "device_status":
            self._set_status(value)
        elif name == "queue_select":
            self.queue_select = value
        elif q is None:
            return
        elif name == "queue_size":
            if not q.enabled and value and value <= q.max_size and not value & (value - 1):
                q.size = value
        elif name == "queue_msix_vector":
            q.msix_vector = self._valid_vector(value)
        elif name == "queue_enable":
            if value == 1:
                q.enabled = True
                self.log.debug("queue %d enabled: size %d desc %#x avail %#x used %#x", q.index, q.size, q.desc,
                               q.driver, q.used)
        elif name in ("queue_desc", "queue_driver", "queue_device") and not q.enabled:
            setattr(q, {"queue_desc": "desc", "queue_driver": "driver", "queue_device": "used"}[name], value)

    def _valid_vector(self, vector: int) -> int:
        return vector if self.msix is not None and vector < self.msix.vectors else NO_VECTOR

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.log.debug("virtio reset by the driver")
            self._virtio_reset()
            return
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            unknown = self.driver_features & ~self.offered_features
            if unknown or not self.driver_features & VIRTIO_F_VERSION_1:
                self.log.warning("driver accepted features %#x (offered %#x): FEATURES_OK refused",
                                 self.driver_features, self.offered_features)
                value &= ~STATUS_FEATURES_OK
        self.status = value
        if self.driver_ok:
            for q in self.queues:
                if q.enabled:
                    self.defer(self._kick, q.index, self.generation)  # buffers offered before DRIVER_OK

    # -- ISR, notifications, device configuration ---------------------------------------------

    def _isr_read(self, offset: int, data) -> None:
        value = self.isr if offset == 0 else 0
        if offset == 0:
            self.isr = 0
            if self.intx_level:
                self.lower_intx()
        data[:] = bytes([value]) + bytes(len(data) - 1)

    def _notify_write(self, offset: int, data) -> None:
        index = int.from_bytes(data[:2], "little") if len(data) >= 2 else offset // NOTIFY_MULTIPLIER
        if index < len(self.queues):
            self.defer(self._kick, index, self.generation)

    def _devcfg_read(self, offset: int, data) -> None:
        blob = self.device_config()
        for i in range(len(data)):
            data[i] = blob[offset + i] if offset + i < len(blob) else 0

    def _devcfg_write(self, offset: int, data) -> None:
        self.write_device_config(offset, bytes(data))

    def device_config(self) -> bytes:
        """The device-specific configuration structure (override)."""
        return b""

    def write_device_config(self, offset: int, data: bytes) -> None:
        """A driver write to the device configuration (override; default: ignored)."""

    # -- the PCI configuration access window (VIRTIO_PCI_CAP_PCI_CFG) ----------------------------

    def _cfg_window(self) -> tuple[int, int, int]:
        cap = self._pci_cfg_cap
        return self.config.get_byte(cap + 4), self.config.get_dword(cap + 8), self.config.get_dword(cap + 12)

    def _pci_cfg_window_written(self, offset: int, size: int) -> None:
        bar, off, length = self._cfg_window()
        if length in (1, 2, 4) and bar in self.bars:
            data = bytes(self.config.data[self._pci_cfg_cap + 16 : self._pci_cfg_cap + 16 + length])
            self.bars[bar].local_write(off, data)

    def config_read(self, offset: int, data) -> None:
        window = self._pci_cfg_cap + 16
        if offset < window + 4 and window < offset + len(data):
            bar, off, length = self._cfg_window()
            if length in (1, 2, 4) and bar in self.bars:
                value = bytearray(length)
                self.bars[bar].local_read(off, value)
                self.config.data[window : window + length] = value
        super().config_read(offset, data)

    # -- used-buffer notifications and queue processing -----------------------------------------

    def notify_used(self, queue: SplitQueue) -> None:
        """Tell the driver ``queue`` has used buffers: its MSI-X vector, or ISR bit 0 and INTx."""
        with self.lock:
            if self.msix_enabled():
                if queue.msix_vector != NO_VECTOR:
                    self.fire_msix(queue.msix_vector)
            else:
                self.isr |= 1
                self.raise_intx()

    def _kick(self, index: int, generation: int) -> None:
        with self.lock:
            if generation != self.generation or not self.driver_ok:
                return
            queue = self.queues[index]
        try:
            self.queue_kick(queue)
        except Exception:
            self.log.exception("queue %d failed; the device needs a reset", index)
            with self.lock:
                self.status |= STATUS_NEEDS_RESET

    def queue_kick(self, queue: SplitQueue) -> None:
        """Process ``queue`` (override). Runs as deferred work: guest memory through ``self.dma``."""
