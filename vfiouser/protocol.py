"""The vfio-user wire format, each message declared once with construct.

Source: the vfio-user specification (QEMU ``docs/interop/vfio-user.rst``), checked
against what QEMU 11.1.3's ``vfio-user-pci`` client really sends. All integers
are little-endian and every struct is packed.

Every message is a 16-byte :data:`Header` followed by a command-specific
payload. :data:`MESSAGES` binds each :class:`Command` to the construct of its
request payload and of its reply payload; :func:`describe` renders a decoded
message for logs. The hot path (REGION_READ/REGION_WRITE) uses
:class:`struct.Struct` layouts *derived* from the same declarations by
:func:`fixed_layout`, so nothing is declared twice.

>>> raw = Header.build(dict(msg_id=7, cmd=Command.REGION_READ, msg_size=32, flags=0, error_no=0))
>>> HEADER.unpack(raw)
(7, 9, 32, 0, 0)
>>> describe(9, 0, RegionAccess.build(dict(offset=0x10, region=7, count=4, data=b"")), msg_id=7)
'REGION_READ #7 command offset=0x10 region=7 count=4'
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from construct import (
    Array,
    Bytes,
    Construct,
    Container,
    FormatField,
    GreedyBytes,
    Int16ul,
    Int32ul,
    Int64ul,
    ListContainer,
    Renamed,
    Struct,
    Switch,
    ValidationError,
    this,
)
from construct.core import stream_read_entire, stream_write

from .errors import MalformedMessage

__all__ = [
    "Command",
    "MsgType",
    "MsgFlags",
    "DeviceFlags",
    "RegionFlags",
    "RegionCapId",
    "IrqIndex",
    "IrqInfoFlags",
    "IrqSetFlags",
    "DmaMapFlags",
    "DmaUnmapFlags",
    "FeatureFlags",
    "IoFdType",
    "NulTerminatedText",
    "Header",
    "Empty",
    "Version",
    "DmaMap",
    "DmaUnmap",
    "DeviceInfo",
    "RegionInfo",
    "RegionInfoReply",
    "RegionCapHeader",
    "RegionCap",
    "SparseMmapArea",
    "SparseMmapCap",
    "TypeCap",
    "IoFdsRequest",
    "IoFdsReply",
    "IoRegionFd",
    "IrqInfo",
    "IrqSet",
    "RegionAccess",
    "DmaAccess",
    "WriteMultiEntry",
    "WriteMulti",
    "WriteMultiReply",
    "DeviceFeature",
    "MigDataReadRequest",
    "MigData",
    "MessageSpec",
    "MESSAGES",
    "HEADER",
    "HEADER_SIZE",
    "REGION_INFO_SIZE",
    "REGION_ACCESS",
    "DMA_ACCESS",
    "fixed_layout",
    "Layout",
    "build_region_caps",
    "parse_region_caps",
    "describe",
    "command_name",
]

# ----------------------------------------------------------------------------
# Numbers


class Command(enum.IntEnum):
    """Command numbers (``Header.cmd``)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    # 14 was DIRTY_PAGES, removed from the specification.
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MsgType(enum.IntEnum):
    """Message type, ``Header.flags & 0xF``."""

    COMMAND = 0
    REPLY = 1


class MsgFlags(enum.IntFlag):
    """Bits of ``Header.flags`` above the type."""

    TYPE_MASK = 0xF
    NO_REPLY = 0x10
    ERROR = 0x20


class DeviceFlags(enum.IntFlag):
    """DEVICE_GET_INFO ``flags`` (VFIO_DEVICE_FLAGS_*)."""

    RESET = 1 << 0
    PCI = 1 << 1
    PLATFORM = 1 << 2
    AMBA = 1 << 3
    CCW = 1 << 4
    AP = 1 << 5


class RegionFlags(enum.IntFlag):
    """DEVICE_GET_REGION_INFO ``flags`` (VFIO_REGION_INFO_FLAG_*)."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCapId(enum.IntEnum):
    """Region-info capability IDs."""

    SPARSE_MMAP = 1
    TYPE = 2


class IrqIndex(enum.IntEnum):
    """Interrupt indexes of a PCI device (VFIO_PCI_*_IRQ_INDEX)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class IrqInfoFlags(enum.IntFlag):
    """DEVICE_GET_IRQ_INFO ``flags`` (VFIO_IRQ_INFO_*)."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlags(enum.IntFlag):
    """DEVICE_SET_IRQS ``flags``: one data type and one action (VFIO_IRQ_SET_*)."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5

    DATA_TYPE_MASK = DATA_NONE | DATA_BOOL | DATA_EVENTFD
    ACTION_TYPE_MASK = ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER


class DmaMapFlags(enum.IntFlag):
    """DMA_MAP ``flags``: what the device may do to the range."""

    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlags(enum.IntFlag):
    """DMA_UNMAP ``flags``."""

    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1


class FeatureFlags(enum.IntFlag):
    """DEVICE_FEATURE ``flags``: feature index in bits 0-15, then the operation."""

    MASK = 0xFFFF
    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


class IoFdType(enum.IntEnum):
    """DEVICE_GET_REGION_IO_FDS sub-region types."""

    IOEVENTFD = 0
    IOREGIONFD = 1


# ----------------------------------------------------------------------------
# A construct for the VERSION JSON


class NulTerminatedText(Construct):
    """Optional NUL-terminated UTF-8 text that fills the rest of the payload.

    Parses to ``None`` when there is no byte left, else to the text without its
    NUL; the text must end with exactly one NUL and hold no other.
    """

    def _parse(self, stream, context, path):
        data = stream_read_entire(stream, path)
        if not data:
            return None
        if data[-1] != 0:
            raise ValidationError("text is not NUL-terminated", path=path)
        if 0 in data[:-1]:
            raise ValidationError("NUL byte inside the text", path=path)
        try:
            return data[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError(f"text is not UTF-8: {exc}", path=path) from None

    def _build(self, obj, stream, context, path):
        if obj is None:
            return None
        data = obj.encode("utf-8") + b"\0"
        stream_write(stream, data, len(data), path)
        return obj


# ----------------------------------------------------------------------------
# Declarations

#: Every message starts with this. ``msg_size`` counts the header too.
Header = Struct(
    "msg_id" / Int16ul,
    "cmd" / Int16ul,
    "msg_size" / Int32ul,
    "flags" / Int32ul,
    "error_no" / Int32ul,
)

#: A payload with no field (DEVICE_RESET both ways, most replies of commands without output).
Empty = Struct()

#: VERSION request and reply: protocol version, then optional JSON capabilities.
Version = Struct(
    "major" / Int16ul,
    "minor" / Int16ul,
    "json" / NulTerminatedText(),
)

#: DMA_MAP request: make ``[addr, addr+size)`` of the client's address space DMA-able.
DmaMap = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "offset" / Int64ul,  # offset in the passed fd (0 without fd)
    "addr" / Int64ul,
    "size" / Int64ul,
)

#: DMA_UNMAP request, and its reply (the request echoed).
DmaUnmap = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "addr" / Int64ul,
    "size" / Int64ul,
)

#: DEVICE_GET_INFO request and reply.
DeviceInfo = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "num_regions" / Int32ul,
    "num_irqs" / Int32ul,
)

#: DEVICE_GET_REGION_INFO request (and the fixed part of its reply).
RegionInfo = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "cap_offset" / Int32ul,
    "size" / Int64ul,
    "offset" / Int64ul,
)

#: DEVICE_GET_REGION_INFO reply: the fixed part, then the capability chain.
RegionInfoReply = Struct(
    *RegionInfo.subcons,
    "caps" / GreedyBytes,
)

#: Header of a region-info capability; ``next`` is an offset from the start of
#: the region-info struct (0 ends the chain).
RegionCapHeader = Struct(
    "id" / Int16ul,
    "version" / Int16ul,
    "next" / Int32ul,
)

SparseMmapArea = Struct("offset" / Int64ul, "size" / Int64ul)

#: Body of the sparse-mmap capability (id 1, version 1): the mmap-able areas.
SparseMmapCap = Struct(
    "nr_areas" / Int32ul,
    "reserved" / Int32ul,
    "areas" / Array(this.nr_areas, SparseMmapArea),
)

#: Body of the type capability (id 2, version 1): device-specific region type.
TypeCap = Struct("type" / Int32ul, "subtype" / Int32ul)

#: One capability: header and id-dependent body.
RegionCap = Struct(
    *RegionCapHeader.subcons,
    "body" / Switch(this.id, {RegionCapId.SPARSE_MMAP: SparseMmapCap, RegionCapId.TYPE: TypeCap}),
)

#: DEVICE_GET_REGION_IO_FDS request.
IoFdsRequest = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "count" / Int32ul,
)

#: One DEVICE_GET_REGION_IO_FDS sub-region (ioeventfd: ``data`` is datamatch; ioregionfd: user data).
IoRegionFd = Struct(
    "offset" / Int64ul,
    "size" / Int64ul,
    "fd_index" / Int32ul,
    "type" / Int32ul,
    "flags" / Int32ul,
    "padding" / Int32ul,
    "data" / Int64ul,
)

#: DEVICE_GET_REGION_IO_FDS reply.
IoFdsReply = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "count" / Int32ul,
    "sub_regions" / Array(this.count, IoRegionFd),
)

#: DEVICE_GET_IRQ_INFO request and reply.
IrqInfo = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "count" / Int32ul,
)

#: DEVICE_SET_IRQS request; ``data`` holds ``count`` bool bytes with DATA_BOOL
#: (eventfds travel as SCM_RIGHTS, never in the payload).
IrqSet = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "start" / Int32ul,
    "count" / Int32ul,
    "data" / GreedyBytes,
)

#: REGION_READ/REGION_WRITE, both directions: data follows in a WRITE request
#: and a READ reply, and is empty otherwise.
RegionAccess = Struct(
    "offset" / Int64ul,
    "region" / Int32ul,
    "count" / Int32ul,
    "data" / GreedyBytes,
)

#: DMA_READ/DMA_WRITE (server to client), both directions: data follows in a
#: WRITE request and a READ reply.
DmaAccess = Struct(
    "addr" / Int64ul,
    "count" / Int64ul,
    "data" / GreedyBytes,
)

#: One write of REGION_WRITE_MULTI: at most 8 bytes, padded to 8.
WriteMultiEntry = Struct(
    "offset" / Int64ul,
    "region" / Int32ul,
    "count" / Int32ul,
    "data" / Bytes(8),
)

#: REGION_WRITE_MULTI request.
WriteMulti = Struct(
    "wr_cnt" / Int64ul,
    "wrs" / Array(this.wr_cnt, WriteMultiEntry),
)

#: REGION_WRITE_MULTI reply.
WriteMultiReply = Struct("wr_cnt" / Int64ul)

#: DEVICE_FEATURE request and reply.
DeviceFeature = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "data" / GreedyBytes,
)

#: MIG_DATA_READ request.
MigDataReadRequest = Struct("argsz" / Int32ul, "size" / Int32ul)

#: MIG_DATA_READ reply and MIG_DATA_WRITE request.
MigData = Struct(
    "argsz" / Int32ul,
    "size" / Int32ul,
    "data" / GreedyBytes,
)


@dataclass(frozen=True)
class MessageSpec:
    """What a command carries: request and reply payload formats, and who sends it."""

    command: Command
    request: Construct
    reply: Construct
    #: ``"c2s"`` (client to server) or ``"s2c"``.
    direction: str


MESSAGES: dict[Command, MessageSpec] = {
    spec.command: spec
    for spec in (
        MessageSpec(Command.VERSION, Version, Version, "c2s"),
        MessageSpec(Command.DMA_MAP, DmaMap, Empty, "c2s"),
        MessageSpec(Command.DMA_UNMAP, DmaUnmap, DmaUnmap, "c2s"),
        MessageSpec(Command.DEVICE_GET_INFO, DeviceInfo, DeviceInfo, "c2s"),
        MessageSpec(Command.DEVICE_GET_REGION_INFO, RegionInfo, RegionInfoReply, "c2s"),
        MessageSpec(Command.DEVICE_GET_REGION_IO_FDS, IoFdsRequest, IoFdsReply, "c2s"),
        MessageSpec(Command.DEVICE_GET_IRQ_INFO, IrqInfo, IrqInfo, "c2s"),
        MessageSpec(Command.DEVICE_SET_IRQS, IrqSet, Empty, "c2s"),
        MessageSpec(Command.REGION_READ, RegionAccess, RegionAccess, "c2s"),
        MessageSpec(Command.REGION_WRITE, RegionAccess, RegionAccess, "c2s"),
        MessageSpec(Command.DMA_READ, DmaAccess, DmaAccess, "s2c"),
        MessageSpec(Command.DMA_WRITE, DmaAccess, DmaAccess, "s2c"),
        MessageSpec(Command.DEVICE_RESET, Empty, Empty, "c2s"),
        MessageSpec(Command.REGION_WRITE_MULTI, WriteMulti, WriteMultiReply, "c2s"),
        MessageSpec(Command.DEVICE_FEATURE, DeviceFeature, DeviceFeature, "c2s"),
        MessageSpec(Command.MIG_DATA_READ, MigDataReadRequest, MigData, "c2s"),
        MessageSpec(Command.MIG_DATA_WRITE, MigData, Empty, "c2s"),
    )
}


# ----------------------------------------------------------------------------
# Fast layouts derived from the declarations


def fixed_layout(fmt: Struct) -> struct.Struct:
    """The :class:`struct.Struct` of the leading fixed-size integer fields of ``fmt``.

    It stops at the first field that is not a little-endian integer or a
    fixed-length ``Bytes`` (e.g. a trailing ``GreedyBytes``), so
    ``fixed_layout(RegionAccess)`` is ``<QII`` (16 bytes) and
    ``fixed_layout(WriteMultiEntry)`` is ``<QII8s``.
    """
    codes = []
    for sub in fmt.subcons:
        inner = sub.subcon if isinstance(sub, Renamed) else sub
        if isinstance(inner, FormatField) and inner.fmtstr[0] == "<":
            codes.append(inner.fmtstr[1:])
        elif isinstance(inner, Bytes) and isinstance(inner.length, int):
            codes.append(f"{inner.length}s")
        else:
            break
    return struct.Struct("<" + "".join(codes))


class Layout:
    """``struct.Struct`` layouts of the fixed parts of the messages, derived from the
    declarations above (never written by hand). Field order is the declaration's."""

    HEADER = fixed_layout(Header)
    DMA_MAP = fixed_layout(DmaMap)
    DMA_UNMAP = fixed_layout(DmaUnmap)
    DEVICE_INFO = fixed_layout(DeviceInfo)
    REGION_INFO = fixed_layout(RegionInfo)
    IO_FDS = fixed_layout(IoFdsRequest)
    IRQ_INFO = fixed_layout(IrqInfo)
    IRQ_SET = fixed_layout(IrqSet)
    REGION_ACCESS = fixed_layout(RegionAccess)
    DMA_ACCESS = fixed_layout(DmaAccess)
    WRITE_MULTI_COUNT = fixed_layout(WriteMulti)
    WRITE_MULTI_ENTRY = fixed_layout(WriteMultiEntry)
    DEVICE_FEATURE = fixed_layout(DeviceFeature)


#: ``(msg_id, cmd, msg_size, flags, error_no)``
HEADER = Layout.HEADER
HEADER_SIZE = HEADER.size
#: ``(offset, region, count)`` of REGION_READ/REGION_WRITE
REGION_ACCESS = Layout.REGION_ACCESS
#: ``(addr, count)`` of DMA_READ/DMA_WRITE
DMA_ACCESS = Layout.DMA_ACCESS
#: Size of the fixed part of a region-info struct (where capabilities start).
REGION_INFO_SIZE = RegionInfo.sizeof()


# ----------------------------------------------------------------------------
# Region-info capability chain


def build_region_caps(caps: list[dict], start: int = REGION_INFO_SIZE) -> tuple[bytes, int]:
    """Lay out capabilities back to back from ``start`` (offset from the region-info
    struct) and link them. Each cap is a dict with ``id``, ``version`` and ``body``.

    Returns ``(bytes, cap_offset)``; ``cap_offset`` is 0 when ``caps`` is empty.
    """
    blobs = [RegionCap.build(dict(cap, next=0)) for cap in caps]
    out = bytearray()
    pos = start
    for i, cap in enumerate(caps):
        nxt = pos + len(blobs[i]) if i + 1 < len(caps) else 0
        out += RegionCap.build(dict(cap, next=nxt))
        pos += len(blobs[i])
    return bytes(out), (start if caps else 0)


def parse_region_caps(info: bytes, cap_offset: int) -> list[Container]:
    """Walk the capability chain of a region-info reply (``info`` starts at the
    region-info struct). Raises :class:`~vfiouser.errors.MalformedMessage` on a loop or a bad offset."""
    caps = []
    seen = set()
    pos = cap_offset
    while pos:
        if pos in seen or pos < REGION_INFO_SIZE or pos + RegionCapHeader.sizeof() > len(info):
            raise MalformedMessage(f"bad region capability offset {pos:#x}", raw=bytes(info))
        seen.add(pos)
        cap = RegionCap.parse(info[pos:])
        caps.append(cap)
        pos = cap.next
    return caps


# ----------------------------------------------------------------------------
# Readable rendering


def command_name(cmd: int) -> str:
    """``Command`` name of ``cmd``, or ``CMD_<n>`` for numbers the protocol does not define."""
    try:
        return Command(cmd).name
    except ValueError:
        return f"CMD_{cmd}"


def _field(name: str, value) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
        if not value:
            return ""
        shown = value[:16].hex()
        return f"{name}={shown}{'...' if len(value) > 16 else ''}({len(value)})"
    if isinstance(value, ListContainer):
        return f"{name}=[{len(value)}]"
    if isinstance(value, Container):
        return f"{name}={{{' '.join(filter(None, (_field(k, v) for k, v in value.items() if k != '_io')))}}}"
    if isinstance(value, bool) or value is None:
        return f"{name}={value}"
    if isinstance(value, int):
        if name in ("flags", "offset", "addr", "size", "argsz", "cap_offset") and value > 9:
            return f"{name}={value:#x}"
        return f"{name}={value}"
    return f"{name}={value!r}"


def describe(cmd: int, flags: int, payload: bytes | memoryview, *, msg_id: int | None = None, nfds: int = 0) -> str:
    """One line for a message: name, id, kind and decoded fields (for ``-v`` logs)."""
    kind = "reply" if flags & MsgFlags.TYPE_MASK == MsgType.REPLY else "command"
    head = command_name(cmd)
    if msg_id is not None:
        head += f" #{msg_id}"
    head += f" {kind}"
    if flags & MsgFlags.ERROR:
        return f"{head} ERROR"
    if flags & MsgFlags.NO_REPLY:
        head += " no-reply"
    if nfds:
        head += f" +{nfds}fd"
    spec = MESSAGES.get(cmd) if cmd in Command._value2member_map_ else None
    if spec is None:
        return f"{head} {_field('payload', payload)}".rstrip()
    fmt = spec.reply if kind == "reply" else spec.request
    try:
        obj = fmt.parse(bytes(payload))
    except Exception as exc:  # a log line must never fail
        return f"{head} undecodable ({exc.__class__.__name__}) {_field('payload', payload)}".rstrip()
    fields = " ".join(filter(None, (_field(k, v) for k, v in obj.items() if not k.startswith("_"))))
    return f"{head} {fields}".rstrip()
