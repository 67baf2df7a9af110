"""The NVM command set: what the host sends on I/O queues, against the one namespace.

=========================  ==============================================================
command                    what the model does
=========================  ==============================================================
Read (02h)                 image -> the command's PRPs
Write (01h)                PRPs -> image; with FUA (CDW12 bit 30), or with the volatile
                           write cache turned off, ``fdatasync`` before completing
Flush (00h)                ``fdatasync`` on the image before completing
Write Zeroes (08h)         the range reads as zeros (``fallocate`` zero range, or zeros
                           written)
Dataset Management (09h)   ranges marked Deallocate become holes in the image (a hint:
                           they may keep their data where the host cannot punch holes)
=========================  ==============================================================

A command for another NSID is Invalid Namespace; a range past the end of the
namespace is LBA Out of Range; more than MDTS bytes is Invalid Field; a write
to a read-only disk is Namespace Is Write Protected. A failed host I/O is a
media error (Write Fault, Unrecovered Read Error); guest memory the command
names but QEMU did not map is a Data Transfer Error.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vfiouser.devices.disk import DiskIoError

from .spec import NSID_ALL, OK, Command, Completion, Feature, NvmOpcode, Status

if TYPE_CHECKING:
    from .controller import NvmeController

__all__ = ["NvmCommands"]

_FUA = 1 << 30
_DSM_DEALLOCATE = 1 << 2
_DSM_RANGE = struct.Struct("<IIQ")  # context attributes, length in blocks, starting LBA


class NvmCommands:
    """Executes NVM commands for one controller."""

    def __init__(self, ctrl: NvmeController) -> None:
        self.ctrl = ctrl
        self.disk = ctrl.disk
        self._handlers = {
            NvmOpcode.READ: self.read,
            NvmOpcode.WRITE: self.write,
            NvmOpcode.FLUSH: self.flush,
            NvmOpcode.WRITE_ZEROES: self.write_zeroes,
            NvmOpcode.DATASET_MANAGEMENT: self.dataset_management,
        }
        #: I/O commands completed, reads and writes (the SMART log reports them).
        self.reads = 0
        self.writes = 0

    def execute(self, cmd: Command) -> Completion:
        handler = self._handlers.get(cmd.opcode)
        if handler is None:
            return Completion(Status.INVALID_OPCODE)
        if cmd.fused or cmd.uses_sgl:
            return Completion(Status.INVALID_FIELD)
        if cmd.nsid != self.ctrl.NSID and not (cmd.opcode == NvmOpcode.FLUSH and cmd.nsid == NSID_ALL):
            return Completion(Status.INVALID_NAMESPACE)
        try:
            return handler(cmd)
        except DiskIoError as exc:
            self.ctrl.log.error("namespace %d: %s", self.ctrl.NSID, exc)
            return Completion(Status.UNRECOVERED_READ_ERROR if cmd.opcode == NvmOpcode.READ else Status.WRITE_FAULT)

    def _range(self, cmd: Command) -> tuple[int, int, int | None]:
        """``(byte offset, byte length, status)`` of a command's LBA range (status None: in range)."""
        shift = self.ctrl.block_shift
        slba, blocks = cmd.cdw10 | cmd.cdw11 << 32, (cmd.cdw12 & 0xFFFF) + 1
        if slba + blocks > self.disk.size >> shift:
            return 0, 0, Status.LBA_OUT_OF_RANGE
        return slba << shift, blocks << shift, None

    def _writable(self) -> bool:
        return not self.disk.readonly

    def read(self, cmd: Command) -> Completion:
        offset, length, bad = self._range(cmd)
        if bad is not None:
            return Completion(bad)
        if length > self.ctrl.max_transfer:
            return Completion(Status.INVALID_FIELD)
        # The image straight into the command's buffers (guest memory itself, where it is in place).
        self.ctrl.dma.write_with(self.ctrl.prps(cmd, length), lambda views: self.disk.readinto(offset, views))
        self.reads += 1
        return OK

    def write(self, cmd: Command) -> Completion:
        offset, length, bad = self._range(cmd)
        if bad is not None:
            return Completion(bad)
        if length > self.ctrl.max_transfer:
            return Completion(Status.INVALID_FIELD)
        if not self._writable():
            return Completion(Status.NAMESPACE_WRITE_PROTECTED)
        self.ctrl.dma.read_with(self.ctrl.prps(cmd, length), lambda views: self.disk.write_from(offset, views))
        if cmd.cdw12 & _FUA or not self.ctrl.features.values.get(Feature.VOLATILE_WRITE_CACHE, 1):
            self.disk.flush()  # forced unit access: durable before it completes
        self.writes += 1
        return OK

    def flush(self, cmd: Command) -> Completion:
        self.disk.flush()
        return OK

    def write_zeroes(self, cmd: Command) -> Completion:
        offset, length, bad = self._range(cmd)
        if bad is not None:
            return Completion(bad)
        if not self._writable():
            return Completion(Status.NAMESPACE_WRITE_PROTECTED)
        self.disk.write_zeroes(offset, length)
        if cmd.cdw12 & _FUA:
            self.disk.flush()
        return OK

    def dataset_management(self, cmd: Command) -> Completion:
        count = (cmd.cdw10 & 0xFF) + 1
        if not cmd.cdw11 & _DSM_DEALLOCATE:
            return OK  # only attributes (access frequency hints): nothing to do
        if not self._writable():
            return Completion(Status.NAMESPACE_WRITE_PROTECTED)
        raw = self.ctrl.from_host(cmd, count * _DSM_RANGE.size)
        shift = self.ctrl.block_shift
        ranges = []
        for i in range(count):
            _attrs, blocks, slba = _DSM_RANGE.unpack_from(raw, i * _DSM_RANGE.size)
            if slba + blocks > self.disk.size >> shift:
                return Completion(Status.LBA_OUT_OF_RANGE)
            ranges.append((slba << shift, blocks << shift))
        for offset, length in ranges:
            self.disk.discard(offset, length)
        return OK
