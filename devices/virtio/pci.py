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

Common configuration (BAR4 + 0, little-endian; accesses of any width reach the
bytes they cover, bytes past 0x40 read 0). The ``queue_*`` registers show the
queue ``queue_select`` names (all 0, vector 0xffff, for a queue that does not
exist). This table is ``COMMON_CFG_REGS.markdown()``, checked by
tests/test_regs_models.py:

| offset | register | bits | access | reset | description |
| --- | --- | --- | --- | --- | --- |
| 0x00 | device_feature_select | 31:0 | RW | 0x0 | which 32 bits device_feature shows |
| 0x04 | device_feature | 31:0 | RO | 0x0 | offered features (VERSION_1 always) |
| 0x08 | driver_feature_select | 31:0 | RW | 0x0 | which 32 bits driver_feature sets |
| 0x0c | driver_feature | 31:0 | RW | 0x0 | accepted features (fixed once FEATURES_OK is set) |
| 0x10 | config_msix_vector | 15:0 | RW | 0xffff | configuration-change vector; reads back 0xffff if the vector does not exist |
| 0x12 | num_queues | 15:0 | RO | 0x0 | number of queues |
| 0x14 | device_status | 7:0 | RW | 0x0 | 0 resets; FEATURES_OK only sticks if the accepted features are offered ones and include VERSION_1 |
| 0x15 | config_generation | 7:0 | RO | 0x0 | changes when the device configuration does |
| 0x16 | queue_select | 15:0 | RW | 0x0 | the queue the queue_* registers show |
| 0x18 | queue_size | 15:0 | RW | 0x0 | maximum at reset; a power of two up to it, while the queue is off |
| 0x1a | queue_msix_vector | 15:0 | RW | 0x0 | as config_msix_vector |
| 0x1c | queue_enable | 15:0 | RW | 0x0 | 1 enables the selected queue |
| 0x1e | queue_notify_off | 15:0 | RO | 0x0 | = the queue index |
| 0x20 | queue_desc | 63:0 | RW | 0x0 | descriptor table address (while the queue is off) |
| 0x28 | queue_driver | 63:0 | RW | 0x0 | available ring address (while the queue is off) |
| 0x30 | queue_device | 63:0 | RW | 0x0 | used ring address (while the queue is off) |
| 0x38 | queue_notify_data | 15:0 | RO | 0x0 | not offered: 0 |
| 0x3a | queue_reset | 15:0 | RO | 0x0 | not offered: 0 |
| 0x3c | admin_queue_index | 15:0 | RO | 0x0 | no admin queue: 0 |
| 0x3e | admin_queue_num | 15:0 | RO | 0x0 | no admin queue: 0 |

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
from vfiouser.devices.regs import RO, Register, RegisterMap, before_write, on_write
from vfiouser.iomgr import DeviceIo

from .queue import NO_VECTOR, SplitQueue

__all__ = [
    "VirtioPciDevice",
    "COMMON_CFG_REGS",
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

U32 = 0xFFFF_FFFF

COMMON_CFG_REGS = RegisterMap([
    Register("device_feature_select", 0x00, 32, doc="which 32 bits device_feature shows"),
    Register("device_feature", 0x04, 32, sw=RO, doc="offered features (VERSION_1 always)"),
    Register("driver_feature_select", 0x08, 32, doc="which 32 bits driver_feature sets"),
    Register("driver_feature", 0x0C, 32, doc="accepted features (fixed once FEATURES_OK is set)"),
    Register("config_msix_vector", 0x10, 16, reset=NO_VECTOR,
             doc="configuration-change vector; reads back 0xffff if the vector does not exist"),
    Register("num_queues", 0x12, 16, sw=RO, doc="number of queues"),
    Register("device_status", 0x14, 8, doc="0 resets; FEATURES_OK only sticks if the accepted features "
                                           "are offered ones and include VERSION_1"),
    Register("config_generation", 0x15, 8, sw=RO, doc="changes when the device configuration does"),
    Register("queue_select", 0x16, 16, doc="the queue the queue_* registers show"),
    Register("queue_size", 0x18, 16, doc="maximum at reset; a power of two up to it, while the queue is off"),
    Register("queue_msix_vector", 0x1A, 16, doc="as config_msix_vector"),
    Register("queue_enable", 0x1C, 16, doc="1 enables the selected queue"),
    Register("queue_notify_off", 0x1E, 16, sw=RO, doc="= the queue index"),
    Register("queue_desc", 0x20, 64, doc="descriptor table address (while the queue is off)"),
    Register("queue_driver", 0x28, 64, doc="available ring address (while the queue is off)"),
    Register("queue_device", 0x30, 64, doc="used ring address (while the queue is off)"),
    Register("queue_notify_data", 0x38, 16, sw=RO, doc="not offered: 0"),
    Register("queue_reset", 0x3A, 16, sw=RO, doc="not offered: 0"),
    Register("admin_queue_index", 0x3C, 16, sw=RO, doc="no admin queue: 0"),
    Register("admin_queue_num", 0x3E, 16, sw=RO, doc="no admin queue: 0"),
], name="virtio common configuration", size=COMMON_SIZE)

#: The queue_* registers and the SplitQueue attribute each shows.
_QUEUE_VIEW = {"queue_size": "size", "queue_msix_vector": "msix_vector", "queue_enable": "enabled",
               "queue_notify_off": "index", "queue_desc": "desc", "queue_driver": "driver", "queue_device": "used"}


def _register_value(name: str, doc: str) -> property:
    """A transport attribute that is a common-configuration register's storage."""
    def get(self) -> int:
        return getattr(self.common, name).value

    def put(self, value: int) -> None:
        getattr(self.common, name).value = value

    return property(get, put, doc=doc)


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
        #: The common configuration's registers (behaviour in the hooks below).
        self.common = COMMON_CFG_REGS.instantiate(self)
        bar4 = self.add_bar(VIRTIO_BAR, MemoryBar(0x4000, bits=64, prefetchable=True))
        bar4.map(self.common, COMMON_OFF, REGION_SIZE)
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

    status = _register_value("device_status", "The device status the driver set (and NEEDS_RESET).")
    queue_select = _register_value("queue_select", "The queue the queue_* registers show.")
    config_msix_vector = _register_value("config_msix_vector", "The configuration-change MSI-X vector.")
    config_generation = _register_value("config_generation", "The configuration generation.")

    def _virtio_reset(self) -> None:
        self.common.reset()
        self.isr = 0
        self.driver_features = 0
        self.generation = getattr(self, "generation", 0) + 1  # deferred work from before a reset stops
        for q in self.queues:
            q.reset()
        self._show_state()
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

    # -- common configuration ------------------------------------------------------------

    def _show_state(self) -> None:
        """Load the registers that show state kept elsewhere (the offered and accepted
        features, the queue count, the selected queue) with what they show now."""
        regs = self.common
        select = regs.device_feature_select.value
        regs.device_feature.value = (self.offered_features >> (32 * select)) & U32 if select < 2 else 0
        select = regs.driver_feature_select.value
        regs.driver_feature.value = (self.driver_features >> (32 * select)) & U32 if select < 2 else 0
        regs.num_queues.value = len(self.queues)
        q = self._selected()
        for name, attr in _QUEUE_VIEW.items():
            regs.reg(name).value = int(getattr(q, attr)) if q is not None else 0
        if q is None:
            regs.queue_msix_vector.value = NO_VECTOR

    @on_write("device_feature_select")
    @on_write("driver_feature_select")
    @on_write("queue_select")
    def _selected_other(self, reg, value: int) -> None:
        self._show_state()

    @on_write("driver_feature")
    def _driver_feature(self, reg, value: int) -> None:
        select = self.common.driver_feature_select.value
        if select < 2 and not self.status & STATUS_FEATURES_OK:
            shift = 32 * select
            self.driver_features = self.driver_features & ~(U32 << shift) | value << shift
        self._show_state()

    @before_write("config_msix_vector")
    def _config_vector(self, reg, value: int) -> int:
        return self._valid_vector(value)

    @before_write("device_status")
    def _device_status(self, reg, value: int) -> int | None:
        if value == 0:
            self.log.debug("virtio reset by the driver")
            self._virtio_reset()
            return None
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            unknown = self.driver_features & ~self.offered_features
            if unknown or not self.driver_features & VIRTIO_F_VERSION_1:
                self.log.warning("driver accepted features %#x (offered %#x): FEATURES_OK refused",
                                 self.driver_features, self.offered_features)
                value &= ~STATUS_FEATURES_OK
        return value

    @on_write("device_status")
    def _device_status_set(self, reg, value: int) -> None:
        if self.driver_ok:
            for q in self.queues:
                if q.enabled:
                    self._defer_kick(q.index)  # buffers offered before DRIVER_OK

    @on_write("queue_size")
    @on_write("queue_msix_vector")
    @on_write("queue_enable")
    @on_write("queue_desc")
    @on_write("queue_driver")
    @on_write("queue_device")
    def _queue_register(self, reg, value: int) -> None:
        q = self._selected()
        if q is not None:
            name = reg.name
            if name == "queue_msix_vector":
                q.msix_vector = self._valid_vector(value)
            elif name == "queue_enable":
                if value == 1:
                    q.enabled = True
                    self.log.debug("queue %d enabled: size %d desc %#x avail %#x used %#x", q.index, q.size,
                                   q.desc, q.driver, q.used)
            elif q.enabled:
                pass  # size and ring addresses are fixed while the queue is on
            elif name == "queue_size":
                if value and value <= q.max_size and not value & (value - 1):
                    q.size = value
            else:
                setattr(q, _QUEUE_VIEW[name], value)
        self._show_state()  # what was refused reads back as it was

    def _valid_vector(self, vector: int) -> int:
        return vector if self.msix is not None and vector < self.msix.vectors else NO_VECTOR

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
            self._defer_kick(index)

    def _defer_kick(self, index: int) -> None:
        """Serve queue ``index`` on the worker (a model that also serves queues elsewhere
        overrides this to know when the worker has one)."""
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
