"""NVM Express 1.4 numbers the controller model needs: opcodes, status codes, command layout.

Everything here is data from the specification (NVM Express Base Specification
1.4, and its NVM command set), named once and used by the other modules of
:mod:`vfiouser.devices.nvme`.

A completion's 15-bit status field is ``SC | SCT << 8 | CRD << 11 | M << 13 |
DNR << 14``; :class:`Status` holds the values as that field encodes them, so a
handler returns ``Status.INVALID_FIELD`` and the queue code shifts it above the
phase bit.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "AdminOpcode",
    "NvmOpcode",
    "Status",
    "Feature",
    "LogPage",
    "Command",
    "Completion",
    "SQE_SIZE",
    "CQE_SIZE",
    "PAGE_SIZE",
    "NSID_ALL",
]

#: Submission queue entry: 64 bytes (CC.IOSQES = 6); completion queue entry: 16 bytes (CC.IOCQES = 4).
SQE_SIZE, CQE_SIZE = 64, 16
SQES_LOG2, CQES_LOG2 = 6, 4
#: The memory page size the model supports (CAP.MPSMIN = CAP.MPSMAX = 0: 4 KiB).
PAGE_SIZE = 4096
#: "Every namespace" in a command's NSID field.
NSID_ALL = 0xFFFF_FFFF


class AdminOpcode(enum.IntEnum):
    """Admin command set opcodes the model implements (any other is Invalid Command Opcode)."""

    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    DOORBELL_BUFFER_CONFIG = 0x7C


class NvmOpcode(enum.IntEnum):
    """NVM command set opcodes the model implements on I/O queues."""

    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


def _status(sct: int, sc: int, dnr: bool = True) -> int:
    return sc | sct << 8 | (1 << 14 if dnr else 0)


class Status(enum.IntEnum):
    """Completion status field values (SCT and SC, with Do Not Retry where retrying cannot help)."""

    SUCCESS = 0
    # Generic command status (SCT 0)
    INVALID_OPCODE = _status(0, 0x01)
    INVALID_FIELD = _status(0, 0x02)
    DATA_TRANSFER_ERROR = _status(0, 0x04, dnr=False)
    INTERNAL_ERROR = _status(0, 0x06, dnr=False)
    ABORT_REQUESTED = _status(0, 0x07)
    INVALID_NAMESPACE = _status(0, 0x0B)
    PRP_OFFSET_INVALID = _status(0, 0x13)
    NAMESPACE_WRITE_PROTECTED = _status(0, 0x20)
    LBA_OUT_OF_RANGE = _status(0, 0x80)
    # Command specific status (SCT 1)
    COMPLETION_QUEUE_INVALID = _status(1, 0x00)
    INVALID_QUEUE_IDENTIFIER = _status(1, 0x01)
    INVALID_QUEUE_SIZE = _status(1, 0x02)
    ASYNC_EVENT_LIMIT_EXCEEDED = _status(1, 0x05)
    INVALID_INTERRUPT_VECTOR = _status(1, 0x08)
    INVALID_LOG_PAGE = _status(1, 0x09)
    INVALID_QUEUE_DELETION = _status(1, 0x0C)
    FEATURE_NOT_SAVEABLE = _status(1, 0x0D)
    # Media and data integrity errors (SCT 2)
    WRITE_FAULT = _status(2, 0x80, dnr=False)
    UNRECOVERED_READ_ERROR = _status(2, 0x81, dnr=False)


class Feature(enum.IntEnum):
    """Feature identifiers (Set/Get Features) the model keeps."""

    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIG = 0x09
    WRITE_ATOMICITY = 0x0A
    ASYNC_EVENT_CONFIG = 0x0B


class LogPage(enum.IntEnum):
    """Log page identifiers (Get Log Page) the model serves."""

    ERROR_INFORMATION = 0x01
    SMART_HEALTH = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NAMESPACES = 0x04


# Asynchronous events: type Notice, information "Namespace Attribute Changed", log page 4.
AER_TYPE_NOTICE = 0x2
AER_INFO_NS_ATTR_CHANGED = 0x00
#: OAES bit and Asynchronous Event Configuration bit for namespace attribute notices.
AEN_NS_ATTR = 1 << 8
#: OACS bit: the controller takes Doorbell Buffer Config.
OACS_DBBUF = 1 << 8
#: An event index no head or tail value reaches: the host rings only when its index wraps.
EVENT_PARKED = 0xFFFF

# -- controller registers (BAR0) ------------------------------------------------------------

CC_EN = 1 << 0
CC_CSS_SHIFT, CC_MPS_SHIFT, CC_AMS_SHIFT, CC_SHN_SHIFT = 4, 7, 11, 14
CC_IOSQES_SHIFT, CC_IOCQES_SHIFT = 16, 20
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
CSTS_SHST_MASK = 0x3 << CSTS_SHST_SHIFT
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2
CSTS_NSSRO = 1 << 4
DOORBELL_BASE = 0x1000

# The one SQE layout: opcode, flags (FUSE, PSDT), CID, NSID, CDW2-3, MPTR, PRP1, PRP2, CDW10-15.
_SQE = struct.Struct("<BBHIQQQQ6I")
_CQE = struct.Struct("<IIHHHH")


@dataclass(frozen=True, slots=True)
class Command:
    """One submission queue entry, decoded."""

    opcode: int
    flags: int
    cid: int
    nsid: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def decode(cls, raw: bytes | memoryview, offset: int = 0) -> Command:
        """The command in the 64 bytes at ``raw[offset:]``."""
        opcode, flags, cid, nsid, _cdw23, _mptr, prp1, prp2, *cdws = _SQE.unpack_from(raw, offset)
        return cls(opcode, flags, cid, nsid, prp1, prp2, *cdws)

    def encode(self) -> bytes:
        """The 64-byte submission queue entry (what a driver writes; tests use it)."""
        return _SQE.pack(self.opcode, self.flags, self.cid, self.nsid, 0, 0, self.prp1, self.prp2, self.cdw10,
                         self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15)

    @property
    def uses_sgl(self) -> bool:
        """Whether PSDT asks for SGLs (the model offers PRPs only)."""
        return bool(self.flags >> 6 & 0x3)

    @property
    def fused(self) -> bool:
        """Whether FUSE marks a fused operation (not offered)."""
        return bool(self.flags & 0x3)


@dataclass(frozen=True, slots=True)
class Completion:
    """What a command returns: its status and Dword 0 of the completion entry."""

    status: int = Status.SUCCESS
    dw0: int = 0

    def entry(self, sqhd: int, sqid: int, cid: int, phase: int) -> bytes:
        """The 16-byte completion queue entry, with ``phase`` as its phase tag."""
        return _CQE.pack(self.dw0 & 0xFFFF_FFFF, 0, sqhd, sqid, cid, (self.status << 1 | phase) & 0xFFFF)


def decode_completion(raw: bytes) -> tuple[int, int, int, int, int, int]:
    """``(dw0, sqhd, sqid, cid, status, phase)`` of a 16-byte completion entry (tests, tools)."""
    dw0, _dw1, sqhd, sqid, cid, sf = _CQE.unpack(raw)
    return dw0, sqhd, sqid, cid, sf >> 1, sf & 1


OK = Completion()
