"""An NVMe controller with one namespace on a raw disk image, for Linux's ``nvme`` driver.

Identity: PCI class 01 08 02 (NVM Express I/O controller), vendor 1234h,
device 5845h, INTA. BAR0 (16 KiB, 64-bit memory) holds the controller
registers (:mod:`.registers`) and, from 1000h, the doorbells, 4 bytes apart
(CAP.DSTRD = 0): queue *y*'s SQ tail at 1000h + 8y, its CQ head at 1004h + 8y.
BAR4 (4 KiB) holds the MSI-X table (one vector per queue, admin included) and
its PBA.

How a command travels: the host writes it into an SQ in guest memory and the
new tail into the SQ's doorbell (a posted write: one message); the queue
engine (:mod:`.engine`) fetches it, runs it (:mod:`.admin`, :mod:`.nvm`:
image I/O, PRP walks, data DMA) and posts a 16-byte completion at the CQ's
tail with the CQ's phase tag; then it signals the CQ's MSI-X vector. The host
consumes the entry and writes the CQ head doorbell (or, with shadow
doorbells, only its copy in memory).

Controller states follow CC and CSTS: CC.EN 0 -> 1 takes the admin queue from
AQA/ASQ/ACQ and sets CSTS.RDY; 1 -> 0 is a controller reset (every queue
deleted, held requests dropped, features back to their defaults, CSTS.RDY
cleared); CC.SHN asks for a shutdown: the image is flushed (``fdatasync``) and
CSTS.SHST reads "complete". A PCI reset does all of it and restores the
registers. Work queued before a reset never reaches the next controller.

The image stays where it is across resets and clients; the host side may
grow it and call :meth:`NvmeController.namespace_changed`, which tells the
guest with an asynchronous event (Linux then reads the new size).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from vfiouser.devices.disk import SECTOR, DiskImage
from vfiouser.devices.errors import DefinitionError
from vfiouser.devices.pci import INTA, MemoryBar, PciDevice, ResetType
from vfiouser.iomgr import DeviceIo

from . import identify
from .admin import NS_ATTR_NOTICE, AdminCommands, Features
from .engine import QueueEngine
from .nvm import NvmCommands
from .queues import prp_segments, unpack_entries
from .registers import CONTROLLER_REGISTERS, REGISTER_SPACE, RegisterFile
from .spec import (
    AEN_NS_ATTR,
    CC_EN,
    CC_IOCQES_SHIFT,
    CC_IOSQES_SHIFT,
    CC_SHN_SHIFT,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_MASK,
    CSTS_SHST_SHIFT,
    DOORBELL_BASE,
    PAGE_SIZE,
    SHST_COMPLETE,
    SHST_OCCURRING,
    Command,
    Completion,
    Feature,
    LogPage,
    Status,
)

__all__ = ["NvmeController", "MAX_IO_QUEUES"]

#: Most I/O queue pairs a controller offers (its MSI-X table has one vector more).
MAX_IO_QUEUES = 64
#: CAP: MQES 1023 (0-based), CQR, TO 15 (7.5 s), CSS bit 37 (NVM command set), MPSMIN = MPSMAX = 0 (4 KiB).
_CAP = 1023 | 1 << 16 | 0x0F << 24 | 1 << 37


class _Registers(DeviceIo):
    def __init__(self, regs: RegisterFile) -> None:
        self.read = lambda base, offset, data: regs.read(offset, data)
        self.write = lambda base, offset, data: regs.write(offset, data)


class _Doorbells(DeviceIo):
    def __init__(self, engine: QueueEngine) -> None:
        self.write = lambda base, offset, data: engine.doorbell(offset, data)

    def read(self, base, offset, data):
        data[:] = bytes(len(data))  # doorbells are write-only: reads return 0


@dataclass
class EventState:
    """Asynchronous events: requests the host left with us, and events waiting for one."""

    #: CIDs of held Asynchronous Event Requests, oldest first
    requests: list[int] = field(default_factory=list)
    #: completion Dword 0 of events no request has taken yet
    pending: list[int] = field(default_factory=list)
    #: NSIDs for the Changed Namespace List log
    changed: set[int] = field(default_factory=set)
    #: log pages whose notices wait until the host reads them
    masked: set[int] = field(default_factory=set)


class NvmeController(PciDevice):
    """An NVMe 1.4 controller, one namespace backed by ``file`` (see the module docstring).

    ``file``: the raw disk image (a regular file or block device, a whole number of sectors);
    ``serial``: the serial number Identify reports (default: derived from the
    image's path); ``readonly``: the namespace is write protected and the
    image opened read-only; ``queues``: I/O queue pairs offered (1-64);
    ``block_size``: 512 or 4096-byte logical blocks; ``inline_io``: I/O queues
    whose memory is in place run in their doorbell's handler (see
    :mod:`.engine`; off: always on the worker).
    """

    vendor_id = 0x1234
    device_id = 0x5845
    subsystem_vendor_id = 0x1234
    subsystem_id = 0x5845
    revision = 0x02
    class_code = 0x010802
    interrupt_pin = INTA

    NSID = 1
    NAMESPACES = 1
    MAX_QUEUE_ENTRIES = 1024
    AER_LIMIT = 4
    ABORT_LIMIT = 4
    #: Largest transfer: 2^MDTS pages (1 MiB).
    MDTS = 8
    MODEL = "vfiouser NVMe (Python)"
    FIRMWARE = "1.0"

    def __init__(self, file: str = "", serial: str = "", readonly: bool = False, queues: int = 4,
                 block_size: int = SECTOR, inline_io: bool = True) -> None:
        if not 1 <= queues <= MAX_IO_QUEUES:
            raise DefinitionError(f"queues must be 1-{MAX_IO_QUEUES}, not {queues}")
        if block_size not in (512, 4096):
            raise DefinitionError(f"block_size must be 512 or 4096, not {block_size}")
        if serial and (len(serial) > 20 or not serial.isprintable() or not serial.isascii()):
            raise DefinitionError(f"serial must be up to 20 printable ASCII characters, not {serial!r}")
        self.disk = DiskImage(file, readonly=readonly)
        if self.disk.size < block_size:
            self.disk.close()
            raise DefinitionError(f"the image has fewer than one {block_size}-byte block")
        self.serial = serial or "VFU" + hashlib.sha256(os.path.realpath(file).encode()).hexdigest()[:12].upper()
        self.max_queues = queues
        self.block_shift = block_size.bit_length() - 1
        self.max_transfer = PAGE_SIZE << self.MDTS
        super().__init__()
        self.regs = RegisterFile(CONTROLLER_REGISTERS, self._register_written)
        self.queues = QueueEngine(self, inline=inline_io)
        bar0 = self.add_bar(0, MemoryBar(0x4000, bits=64))
        bar0.map(_Registers(self.regs), 0, REGISTER_SPACE)
        bar0.map(_Doorbells(self.queues), DOORBELL_BASE, 0x4000 - DOORBELL_BASE)
        self.add_bar(4, MemoryBar(0x1000))
        self.add_msix(vectors=queues + 1, table_bar=4, table_offset=0, pba_offset=0x800)
        self.admin = AdminCommands(self)
        self.nvm = NvmCommands(self)
        self.features = Features()
        self.events = EventState()
        self.power_cycles = 0
        self.unsafe_shutdowns = 0
        self.reset(ResetType.COLD)

    # -- identity --------------------------------------------------------------------------

    def identity(self) -> identify.ControllerIdentity:
        """What Identify Controller reports."""
        oncs = identify.ONCS_WRITE_ZEROES | identify.ONCS_DSM
        return identify.ControllerIdentity(self.vendor_id, self.subsystem_vendor_id, self.serial, self.MODEL,
                                           self.FIRMWARE, self.MDTS, 0, self.NAMESPACES, self.ABORT_LIMIT,
                                           self.AER_LIMIT, self.MAX_QUEUE_ENTRIES, oncs)

    def namespace(self) -> identify.NamespaceIdentity:
        """What Identify Namespace reports for namespace 1."""
        return identify.NamespaceIdentity(self.NSID, self.disk.size >> self.block_shift, 1 << self.block_shift,
                                          self.disk.readonly, self.serial)

    def smart_log(self) -> bytes:
        """The SMART / health log page, from what the disk and the I/O queues counted."""
        stats = self.disk.stats
        return identify.smart_log(bytes_read=stats.bytes_read, bytes_written=stats.bytes_written,
                                  reads=self.nvm.reads, writes=self.nvm.writes, readonly=self.disk.readonly,
                                  power_cycles=self.power_cycles, unsafe_shutdowns=self.unsafe_shutdowns)

    def io_queue_limit(self) -> int:
        """The highest I/O queue ID the host may create now."""
        allocated = self.features.queues_allocated
        return self.max_queues if allocated is None else allocated

    def io_entry_sizes(self) -> tuple[int, int]:
        """CC.IOSQES and CC.IOCQES (log2 of the I/O queue entry sizes)."""
        cc = self.regs["CC"]
        return cc >> CC_IOSQES_SHIFT & 0xF, cc >> CC_IOCQES_SHIFT & 0xF

    # -- registers (serving thread, device lock held) ---------------------------------------

    def _register_written(self, name: str, old: int, new: int) -> None:
        if name == "CC":
            self._cc_written(old, new)
        elif name in ("INTMS", "INTMC"):
            mask = self.regs["INTMS"] | new if name == "INTMS" else self.regs["INTMS"] & ~new
            self.regs["INTMS"] = self.regs["INTMC"] = mask
            self.queues.update_intx()

    def _cc_written(self, old: int, new: int) -> None:
        if new & CC_EN and not old & CC_EN:
            self._enable(new)
        elif old & CC_EN and not new & CC_EN:
            self.log.debug("controller reset (CC.EN cleared)")
            self._controller_reset()
        shn, old_shn = new >> CC_SHN_SHIFT & 0x3, old >> CC_SHN_SHIFT & 0x3
        if shn and not old_shn:
            self._set_shst(SHST_OCCURRING)
            self.defer(self._shutdown, self.queues.generation)
        elif not shn and old_shn:
            self._set_shst(0)

    def _set_shst(self, value: int) -> None:
        self.regs["CSTS"] = self.regs["CSTS"] & ~CSTS_SHST_MASK | value << CSTS_SHST_SHIFT

    def _enable(self, cc: int) -> None:
        aqa, asq, acq = self.regs["AQA"], self.regs["ASQ"], self.regs["ACQ"]
        sq_size, cq_size = (aqa & 0xFFF) + 1, (aqa >> 16 & 0xFFF) + 1
        problems = []
        if cc >> 7 & 0xF:
            problems.append("CC.MPS asks for pages other than 4 KiB")
        if cc >> 4 & 0x7 or cc >> 11 & 0x7:
            problems.append("CC.CSS or CC.AMS is not the NVM command set with round robin")
        if not asq or not acq or sq_size < 2 or cq_size < 2:
            problems.append("the admin queues (AQA, ASQ, ACQ) are not set up")
        if problems:
            self.log.warning("the controller cannot be enabled: %s", "; ".join(problems))
            return
        self.queues.enable(asq, sq_size, acq, cq_size)
        self.regs["CSTS"] = self.regs["CSTS"] & ~CSTS_CFS | CSTS_RDY
        self.log.debug("controller enabled: admin SQ %d at %#x, CQ %d at %#x", sq_size, asq, cq_size, acq)

    def _controller_reset(self) -> None:
        """Everything CC.EN 1 -> 0 resets: queues, held requests, features, CSTS.RDY and CFS."""
        csts = self.regs["CSTS"]
        if csts & CSTS_RDY and csts >> CSTS_SHST_SHIFT & 0x3 != SHST_COMPLETE:
            self.unsafe_shutdowns += 1
        self.regs["CSTS"] = csts & ~(CSTS_RDY | CSTS_CFS)
        self.events = EventState(changed=self.events.changed)
        self.features.defaults(self.max_queues)
        self.queues.reset()

    def _shutdown(self, generation: int) -> None:
        """CC.SHN (deferred): what the host wrote is made durable, then CSTS.SHST says complete."""
        if not self.queues.wait_io():
            self.log.warning("shutdown: large transfers still running after 30 s; flushing anyway")
        try:
            self.disk.flush()
        except Exception:
            self.log.exception("flush at shutdown failed")
        with self.lock:
            if generation == self.queues.generation and self.regs["CC"] >> CC_SHN_SHIFT & 0x3:
                self._set_shst(SHST_COMPLETE)

    def reset(self, kind: ResetType = ResetType.WARM) -> None:
        """A PCI reset: a controller reset, and every register back to its reset value."""
        self._controller_reset()
        if kind is ResetType.COLD:
            self.power_cycles += 1
        self.regs.reset()
        self.regs["CAP"] = _CAP
        self.regs["VS"] = identify.VERSION_1_4

    # -- data transfer (worker, or inline for in-place I/O queues) ---------------------------

    def prps(self, cmd: Command, length: int) -> list[tuple[int, int]]:
        """The guest memory the command's PRPs name for ``length`` bytes."""
        return prp_segments(cmd.prp1, cmd.prp2, length, lambda addr, n: unpack_entries(self.dma.read(addr, 8 * n)))

    def to_host(self, cmd: Command, data: bytes) -> Completion:
        """Copy ``data`` into the memory the command's PRPs name."""
        segments = self.prps(cmd, len(data))
        if len(segments) == 1:
            self.dma.write(segments[0][0], data)
        else:
            self.dma.write_sg(segments, data)
        return Completion()

    def from_host(self, cmd: Command, length: int) -> bytes:
        """``length`` bytes from the memory the command's PRPs name."""
        segments = self.prps(cmd, length)
        if len(segments) == 1:
            return self.dma.read(*segments[0])
        return self.dma.read_sg(segments)

    # -- asynchronous events -----------------------------------------------------------------

    def deliver_events(self) -> None:
        """Hand waiting events to held Asynchronous Event Requests (worker)."""
        with self.lock:
            pairs = []
            while self.events.pending and self.events.requests:
                pairs.append((self.events.requests.pop(0), self.events.pending.pop(0)))
        for cid, dw0 in pairs:
            self.queues.complete_admin(cid, Completion(Status.SUCCESS, dw0))

    def namespace_changed(self) -> None:
        """Host side: the image changed size (or its contents changed under the guest). The new size
        is read, and the host is told with a Namespace Attribute Changed notice (if it enabled them
        and has read the previous one), after which Linux identifies the namespace again."""
        with self.lock:
            self.disk.refresh_size()
            self.events.changed.add(self.NSID)
            enabled = self.features.values.get(Feature.ASYNC_EVENT_CONFIG, 0) & AEN_NS_ATTR
            if enabled and LogPage.CHANGED_NAMESPACES not in self.events.masked and self.regs["CSTS"] & CSTS_RDY:
                self.events.masked.add(LogPage.CHANGED_NAMESPACES)
                self.events.pending.append(NS_ATTR_NOTICE)
            generation = self.queues.generation
        self.defer(self._deliver_if_current, generation)

    def _deliver_if_current(self, generation: int) -> None:
        if generation == self.queues.generation:
            self.deliver_events()
