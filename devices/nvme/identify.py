"""The data structures an NVMe controller returns: Identify data and log pages.

Each builder returns the exact bytes the specification lays out (Identify:
4096 bytes; log pages: their own sizes), from the few facts the controller
knows. Offsets are the specification's; fields not set are zero, which means
"not supported" or "not reported" for every one of them.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass

from .spec import AEN_NS_ATTR, CQES_LOG2, OACS_DBBUF, SQES_LOG2

__all__ = ["ControllerIdentity", "NamespaceIdentity", "identify_controller", "identify_namespace",
           "active_namespaces", "namespace_descriptors", "smart_log", "firmware_slot_log", "IDENTIFY_SIZE",
           "ONCS_DSM", "ONCS_WRITE_ZEROES"]

IDENTIFY_SIZE = 4096
VERSION_1_4 = 0x0001_0400
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
#: Composite temperature we report, and the thresholds (kelvin).
TEMPERATURE_K = 308
WARNING_TEMP_K = 343
CRITICAL_TEMP_K = 373


def _ascii(text: str, size: int) -> bytes:
    """An NVMe ASCII field: printable characters, left-justified, space-padded."""
    raw = "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in text).encode("ascii")
    return raw[:size].ljust(size, b" ")


@dataclass(frozen=True)
class ControllerIdentity:
    """What Identify Controller says about the controller."""

    vendor_id: int
    subsystem_vendor_id: int
    serial: str
    model: str
    firmware: str
    #: Maximum data transfer size as a power of two of the page size (MDTS).
    mdts: int
    controller_id: int
    namespaces: int
    #: Aborts and asynchronous event requests the controller takes at once (1-based).
    abort_limit: int
    aer_limit: int
    max_queue_entries: int
    #: Optional NVM commands (ONCS): Dataset Management, Write Zeroes.
    oncs: int
    #: Whether Doorbell Buffer Config (shadow doorbells) is offered (OACS bit 8).
    shadow_doorbells: bool = True

    @property
    def subnqn(self) -> str:
        """The NVM subsystem's NQN, unique per serial number."""
        return f"nqn.2014-08.org.nvmexpress:uuid:{namespace_uuid(self.serial, 0)}"


def identify_controller(ident: ControllerIdentity) -> bytes:
    """Identify Controller (CNS 01h)."""
    out = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", out, 0, ident.vendor_id, ident.subsystem_vendor_id)
    out[4:24] = _ascii(ident.serial, 20)
    out[24:64] = _ascii(ident.model, 40)
    out[64:72] = _ascii(ident.firmware, 8)
    out[72] = 6  # RAB: recommended arbitration burst, 2^6 commands
    out[77] = ident.mdts
    struct.pack_into("<HI", out, 78, ident.controller_id, VERSION_1_4)
    struct.pack_into("<I", out, 92, AEN_NS_ATTR)  # OAES: namespace attribute notices
    out[111] = 1  # CNTRLTYPE: I/O controller
    struct.pack_into("<H", out, 256, OACS_DBBUF if ident.shadow_doorbells else 0)  # OACS
    out[258] = ident.abort_limit - 1  # ACL, 0-based
    out[259] = ident.aer_limit - 1  # AERL, 0-based
    out[260] = 0x03  # FRMW: one firmware slot, slot 1 read-only
    out[261] = 0x01 | 0x04  # LPA: SMART log per namespace; extended data for Get Log Page
    out[262] = 0  # ELPE: one error log entry (0-based)
    struct.pack_into("<HH", out, 266, WARNING_TEMP_K, CRITICAL_TEMP_K)  # WCTEMP, CCTEMP
    out[512] = SQES_LOG2 | SQES_LOG2 << 4  # SQES: required and maximum entry size, 64 bytes
    out[513] = CQES_LOG2 | CQES_LOG2 << 4  # CQES: 16 bytes
    struct.pack_into("<HIH", out, 514, ident.max_queue_entries, ident.namespaces, ident.oncs)  # MAXCMD, NN, ONCS
    out[525] = 0x01  # VWC: a volatile write cache is present (the host's page cache), Flush empties it
    out[768:1024] = ident.subnqn.encode("ascii").ljust(256, b"\0")[:256]
    # Power state 0: 25 W maximum, operational, no entry or exit latency.
    struct.pack_into("<H", out, 2048, 2500)
    return bytes(out)


@dataclass(frozen=True)
class NamespaceIdentity:
    """What Identify Namespace says about a namespace."""

    nsid: int
    blocks: int
    block_size: int
    readonly: bool
    serial: str

    @property
    def nguid(self) -> bytes:
        """A 16-byte globally unique identifier, stable for a serial number and NSID."""
        return hashlib.sha256(f"vfiouser-nvme:{self.serial}:{self.nsid}".encode()).digest()[:16]

    @property
    def uuid(self) -> uuid.UUID:
        return namespace_uuid(self.serial, self.nsid)


def namespace_uuid(serial: str, nsid: int) -> uuid.UUID:
    """A name-based UUID for a controller (``nsid`` 0) or one of its namespaces."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"vfiouser-nvme:{serial}:{nsid}")


def identify_namespace(ns: NamespaceIdentity) -> bytes:
    """Identify Namespace (CNS 00h) for an active namespace."""
    out = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<QQQ", out, 0, ns.blocks, ns.blocks, ns.blocks)  # NSZE, NCAP, NUSE
    out[25] = 0  # NLBAF: one LBA format (0-based)
    out[26] = 0  # FLBAS: format 0, no metadata
    out[99] = 0x01 if ns.readonly else 0x00  # NSATTR bit 0: write protected
    out[104:120] = ns.nguid
    lbads = ns.block_size.bit_length() - 1
    struct.pack_into("<I", out, 128, lbads << 16)  # LBAF0: no metadata, 2^LBADS bytes, best performance
    return bytes(out)


def active_namespaces(after: int, namespaces: list[int]) -> bytes:
    """Active Namespace ID list (CNS 02h): the active NSIDs above ``after``, ascending."""
    out = bytearray(IDENTIFY_SIZE)
    ids = [n for n in sorted(namespaces) if n > after][: IDENTIFY_SIZE // 4]
    struct.pack_into(f"<{len(ids)}I", out, 0, *ids)
    return bytes(out)


def namespace_descriptors(ns: NamespaceIdentity) -> bytes:
    """Namespace Identification Descriptor list (CNS 03h): the NGUID and the UUID."""
    out = bytearray(IDENTIFY_SIZE)
    pos = 0
    for nidt, nid in ((0x2, ns.nguid), (0x3, ns.uuid.bytes)):
        struct.pack_into("<BBxx", out, pos, nidt, len(nid))
        out[pos + 4 : pos + 4 + len(nid)] = nid
        pos += 4 + len(nid)
    return bytes(out)


def _units(byte_count: int) -> int:
    """SMART "data units": thousands of 512-byte units, rounded up."""
    return (byte_count // 512 + 999) // 1000


def smart_log(*, bytes_read: int, bytes_written: int, reads: int, writes: int, readonly: bool,
              power_cycles: int, unsafe_shutdowns: int) -> bytes:
    """SMART / Health Information (log page 02h), 512 bytes."""
    out = bytearray(512)
    out[0] = 0x08 if readonly else 0  # critical warning: media in read-only mode
    struct.pack_into("<HBBB", out, 1, TEMPERATURE_K, 100, 10, 0)  # temperature, spare, threshold, used
    for offset, value in ((32, _units(bytes_read)), (48, _units(bytes_written)), (64, reads), (80, writes),
                          (112, power_cycles), (144, unsafe_shutdowns)):
        out[offset : offset + 16] = value.to_bytes(16, "little")
    return bytes(out)


def firmware_slot_log(firmware: str) -> bytes:
    """Firmware Slot Information (log page 03h), 512 bytes: slot 1 active."""
    out = bytearray(512)
    out[0] = 0x01  # AFI: the running firmware is from slot 1
    out[8:16] = _ascii(firmware, 8)
    return bytes(out)
