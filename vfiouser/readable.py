"""Messages and device events as a person reads them: what ``-v`` logs and ``vfiouser trace show`` prints.

One line per request with its reply, and one per event the device caused::

    client1     12.041 ms  #17 read  BAR0   +0x020 [4] -> 0x00000001
    client1     12.113 ms  #18 write config +0x004 [2] command <- 0x0006
    client1     12.180 ms  #19 DMA_MAP 0x0 +0xc0000 read/write, fd -> ok
    client1    131.907 ms  task Edu._run_dma started
    client1    131.950 ms  DMA read 0x100000 +0x100 in place: 03 0a 11 18 1f 26 2d 34 ... (256 bytes)
    client1    132.002 ms  IRQ INTx asserted (signalled)

Regions by name (``BAR0``-``BAR5``, ``ROM``, ``config``, ``VGA``), registers by
the names the device port gives (config registers, capability fields, the
model's own), values as numbers (accesses of 1, 2, 4 or 8 bytes, little-endian;
longer data as bytes), times in milliseconds since the client arrived.

Every line has a *category*, for :class:`Filter`: ``bar0``-``bar5``, ``rom``,
``config``, ``vga`` (region accesses), ``irq`` (interrupts, SET_IRQS and
GET_IRQ_INFO), ``dma`` (transfers, DMA_MAP and DMA_UNMAP), ``task`` (deferred
work), ``setup`` (everything else: VERSION, region information, resets,
clients arriving and leaving). ``bars`` stands for all six BARs.

>>> from vfiouser.protocol import HEADER, Command, REGION_ACCESS
>>> request = HEADER.pack(17, Command.REGION_READ, 32, 0, 0) + REGION_ACCESS.pack(0x20, 0, 4)
>>> reply = HEADER.pack(17, Command.REGION_READ, 36, 1, 0) + REGION_ACCESS.pack(0x20, 0, 4) + bytes([1, 0, 0, 0])
>>> exchange(request, reply, names="status")
'#17 read  BAR0   +0x020 [4] status -> 0x00000001'
>>> category(request)
'bar0'
>>> Filter(only=["bars"], hide=["bar2"]).allows("bar0"), Filter(hide=["config"]).allows("config")
(True, False)
"""

from __future__ import annotations

import errno
import json

from .errors import UsageError
from .protocol import (
    DMA_ACCESS,
    HEADER,
    HEADER_SIZE,
    REGION_ACCESS,
    Command,
    DeviceFlags,
    DmaMapFlags,
    IrqSetFlags,
    Layout,
    MsgFlags,
    MsgType,
    RegionFlags,
    command_name,
    describe,
)

__all__ = ["exchange", "request_line", "event_line", "category", "event_category", "Filter", "CATEGORIES", "region_name",
           "value_text", "prefix", "UnknownCategory"]

REGION_NAMES = ("BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "config", "VGA")
IRQ_NAMES = ("INTx", "MSI", "MSI-X", "ERR", "REQ")
#: Every category a line can have (see the module docstring); ``bars`` is a shorthand.
CATEGORIES = ("bar0", "bar1", "bar2", "bar3", "bar4", "bar5", "rom", "config", "vga", "irq", "dma", "task", "setup")
_SHORTHANDS = {"bars": ("bar0", "bar1", "bar2", "bar3", "bar4", "bar5")}
_ACCESS = (int(Command.REGION_READ), int(Command.REGION_WRITE))
_IRQ_COMMANDS = (int(Command.DEVICE_GET_IRQ_INFO), int(Command.DEVICE_SET_IRQS))
_DMA_COMMANDS = (int(Command.DMA_MAP), int(Command.DMA_UNMAP), int(Command.DMA_READ), int(Command.DMA_WRITE))
#: Bytes of data shown before "..." (the rest is counted).
SHOWN_BYTES = 16


class UnknownCategory(UsageError):
    """A filter named a category that does not exist."""


def region_name(index: int) -> str:
    """``BAR0``-``BAR5``, ``ROM``, ``config``, ``VGA``, else ``region N``."""
    return REGION_NAMES[index] if 0 <= index < len(REGION_NAMES) else f"region {index}"


def value_text(data: bytes) -> str:
    """An access's data as a number (1, 2, 4, 8 bytes, little-endian), else as bytes."""
    if len(data) in (1, 2, 4, 8):
        return f"0x{int.from_bytes(data, 'little'):0{2 * len(data)}x}"
    return bytes_text(data)


def bytes_text(data: bytes) -> str:
    """The first bytes in hex, and how many there are."""
    shown = " ".join(f"{b:02x}" for b in data[:SHOWN_BYTES])
    return f"{shown} ... ({len(data)} bytes)" if len(data) > SHOWN_BYTES else shown or "(none)"


def _few(names: str, most: int = 4) -> str:
    """Register names, the first and last of them only when an access reaches many."""
    parts = names.split(", ")
    return names if len(parts) <= most else f"{parts[0]} ... {parts[-1]} ({len(parts)} registers)"


def prefix(client: str, ms: float) -> str:
    """The start of every line: who and when (milliseconds since the client arrived)."""
    return f"{client} {ms:10.3f} ms  "


def _flags_text(value: int, names: dict[int, str]) -> str:
    return "/".join(name for bit, name in names.items() if value & bit) or "none"


# -- messages ------------------------------------------------------------------------------


def category(message: bytes) -> str:
    """The category of a message (header and payload), for :class:`Filter`."""
    _, cmd, _, _, _ = HEADER.unpack_from(message)
    if cmd in _ACCESS and len(message) >= HEADER_SIZE + REGION_ACCESS.size:
        _, region, _ = REGION_ACCESS.unpack_from(message, HEADER_SIZE)
        return region_name(region).lower() if region < len(REGION_NAMES) else "setup"
    if cmd == Command.REGION_WRITE_MULTI and len(message) >= HEADER_SIZE + 8 + 16:
        region = Layout.WRITE_MULTI_ENTRY.unpack_from(message, HEADER_SIZE + 8)[1]
        return region_name(region).lower() if region < len(REGION_NAMES) else "setup"
    if cmd in _IRQ_COMMANDS:
        return "irq"
    if cmd in _DMA_COMMANDS:
        return "dma"
    return "setup"


def _error(reply: bytes | None) -> str | None:
    if reply is None:
        return None
    _, _, _, flags, err = HEADER.unpack_from(reply)
    if flags & MsgFlags.ERROR:
        return f"error {errno.errorcode.get(err, err)}"
    return None


def exchange(request: bytes, reply: bytes | None, *, names: str = "", nfds: int = 0, reply_nfds: int = 0) -> str:
    """One line for a request (header and payload) and its reply (``None``: none came, e.g.
    a posted write)."""
    msg_id, cmd, _, flags, _ = HEADER.unpack_from(request)
    payload = request[HEADER_SIZE:]
    posted = " (posted)" if flags & MsgFlags.NO_REPLY else ""
    error = _error(reply)
    ok_reply = reply if reply is not None and not error else None
    try:
        if cmd in _ACCESS:
            return _access(msg_id, cmd, payload, reply, names, error) + posted
        text, answer = _SUMMARIES.get(cmd, _raw)(cmd, payload, ok_reply, nfds, reply_nfds)
    except Exception:  # a message too short or malformed to summarise: show it decoded as is
        text, answer = describe(cmd, flags, payload, nfds=nfds).replace(" command", "", 1), None
    if error:
        return f"#{msg_id} {text} -> {error}"
    if reply is None:
        return f"#{msg_id} {text}{posted}"
    return f"#{msg_id} {text} -> {answer or 'ok'}"


def request_line(request: bytes, *, names: str = "", nfds: int = 0) -> str:
    """A request alone, without what came back (``#19 read  BAR0   +0x000 [4]``)."""
    msg_id, cmd, _, flags, _ = HEADER.unpack_from(request)
    posted = " (posted)" if flags & MsgFlags.NO_REPLY else ""
    if cmd in _ACCESS:
        line = _access(msg_id, cmd, request[HEADER_SIZE:], None, names, None, alone=True)
    else:
        line = exchange(request, None, names=names, nfds=nfds)
    return line if line.endswith(posted) else line + posted


def _access(msg_id: int, cmd: int, payload: bytes, reply: bytes | None, names: str, error: str | None, *,
            alone: bool = False) -> str:
    offset, region, count = REGION_ACCESS.unpack_from(payload)
    head = f"#{msg_id} {'read ' if cmd == Command.REGION_READ else 'write'} {region_name(region):6} " \
           f"+{offset:#05x} [{count}]" + (f" {_few(names)}" if names else "")
    if error:
        return f"{head} -> {error}"
    if cmd == Command.REGION_WRITE:
        return f"{head} <- {value_text(payload[REGION_ACCESS.size:])}"
    if alone:
        return head
    if reply is None:
        return f"{head} -> (no reply)"
    return f"{head} -> {value_text(reply[HEADER_SIZE + REGION_ACCESS.size:])}"


# Each summary: (cmd, request payload, successful reply or None, fds sent, fds replied)
# -> (what the request says, what the reply says or None for a plain "ok").


def _raw(cmd, payload, reply, nfds, reply_nfds):
    return describe(cmd, 0, payload, nfds=nfds).replace(" command", "", 1), None


def _version(cmd, payload, reply, nfds, reply_nfds):
    text = f"VERSION {int.from_bytes(payload[0:2], 'little')}.{int.from_bytes(payload[2:4], 'little')}"
    if reply is None or len(reply) < HEADER_SIZE + 4:
        return text, None
    body = reply[HEADER_SIZE:]
    caps = body[4:].rstrip(b"\0").decode("utf-8", "replace")
    try:
        caps = ", ".join(f"{k} {v}" for k, v in json.loads(caps).get("capabilities", {}).items())
    except (ValueError, AttributeError):
        pass
    return text, f"{int.from_bytes(body[0:2], 'little')}.{int.from_bytes(body[2:4], 'little')} ({caps})"


def _device_info(cmd, payload, reply, nfds, reply_nfds):
    if reply is None:
        return "GET_INFO", None
    _, flags, regions, irqs = Layout.DEVICE_INFO.unpack_from(reply, HEADER_SIZE)
    names = {int(DeviceFlags.PCI): "PCI", int(DeviceFlags.RESET): "reset"}
    return "GET_INFO", f"{_flags_text(flags, names)}, {regions} regions, {irqs} interrupt indexes"


def _region_info(cmd, payload, reply, nfds, reply_nfds):
    text = f"GET_REGION_INFO {region_name(Layout.REGION_INFO.unpack_from(payload)[2])}"
    if reply is None:
        return text, None
    _, flags, _, cap_offset, size, _ = Layout.REGION_INFO.unpack_from(reply, HEADER_SIZE)
    if not size:
        return text, "absent"
    rights = {int(RegionFlags.READ): "read", int(RegionFlags.WRITE): "write", int(RegionFlags.MMAP): "mmap"}
    extra = (", sparse mmap areas" if cap_offset else "") + (f", +{reply_nfds} fd" if reply_nfds else "")
    return text, f"{size:#x} bytes {_flags_text(flags, rights)}{extra}"


def _irq_info(cmd, payload, reply, nfds, reply_nfds):
    index = Layout.IRQ_INFO.unpack_from(payload)[2]
    text = f"GET_IRQ_INFO {IRQ_NAMES[index] if index < len(IRQ_NAMES) else index}"
    if reply is None:
        return text, None
    count = Layout.IRQ_INFO.unpack_from(reply, HEADER_SIZE)[3]
    return text, f"{count} vector{'s' if count != 1 else ''}"


def _set_irqs(cmd, payload, reply, nfds, reply_nfds):
    _, flags, index, start, count = Layout.IRQ_SET.unpack_from(payload)
    action = {int(IrqSetFlags.ACTION_TRIGGER): "trigger", int(IrqSetFlags.ACTION_MASK): "mask",
              int(IrqSetFlags.ACTION_UNMASK): "unmask"}.get(flags & IrqSetFlags.ACTION_TYPE_MASK, f"flags {flags:#x}")
    kind = flags & IrqSetFlags.DATA_TYPE_MASK
    data = ""
    if kind == IrqSetFlags.DATA_BOOL:
        data = " (bool)"
    elif kind == IrqSetFlags.DATA_EVENTFD:
        data = f" eventfd{'s' if count != 1 else ''}" if nfds else " (no eventfd)"
    name = IRQ_NAMES[index] if index < len(IRQ_NAMES) else f"index {index}"
    if count == 0:
        return f"SET_IRQS {name} disable", None
    vectors = f"{start}" if count == 1 else f"{start}-{start + count - 1}"
    return f"SET_IRQS {name} {vectors} {action}{data}", None


def _dma_map(cmd, payload, reply, nfds, reply_nfds):
    _, flags, offset, addr, size = Layout.DMA_MAP.unpack_from(payload)
    rights = _flags_text(flags, {int(DmaMapFlags.READ): "read", int(DmaMapFlags.WRITE): "write"})
    where = f", fd at {offset:#x}" if nfds and offset else (", fd" if nfds else "")
    return f"DMA_MAP {addr:#x} +{size:#x} {rights}{where}", None


def _dma_unmap(cmd, payload, reply, nfds, reply_nfds):
    _, flags, addr, size = Layout.DMA_UNMAP.unpack_from(payload)
    return f"DMA_UNMAP {addr:#x} +{size:#x}" + (" all" if flags & 2 else ""), None


def _write_multi(cmd, payload, reply, nfds, reply_nfds):
    count = Layout.WRITE_MULTI_COUNT.unpack_from(payload)[0]
    parts = []
    for i in range(min(count, 4)):
        offset, region, size, data = Layout.WRITE_MULTI_ENTRY.unpack_from(payload, 8 + 24 * i)
        parts.append(f"{region_name(region)} +{offset:#05x} [{size}] <- {value_text(data[:size])}")
    more = f", ... ({count} writes)" if count > 4 else ""
    return f"WRITE_MULTI {'; '.join(parts)}{more}", None


def _dma_access(cmd, payload, reply, nfds, reply_nfds):
    addr, count = DMA_ACCESS.unpack_from(payload)
    return f"{command_name(cmd)} {addr:#x} +{count:#x}", None


_SUMMARIES = {
    int(Command.VERSION): _version,
    int(Command.DEVICE_GET_INFO): _device_info,
    int(Command.DEVICE_GET_REGION_INFO): _region_info,
    int(Command.DEVICE_GET_IRQ_INFO): _irq_info,
    int(Command.DEVICE_SET_IRQS): _set_irqs,
    int(Command.DMA_MAP): _dma_map,
    int(Command.DMA_UNMAP): _dma_unmap,
    int(Command.REGION_WRITE_MULTI): _write_multi,
    int(Command.DMA_READ): _dma_access,
    int(Command.DMA_WRITE): _dma_access,
    int(Command.DEVICE_RESET): lambda *a: ("DEVICE_RESET", None),
}


def is_reply(message: bytes) -> bool:
    """Whether a message (header and payload) is a reply."""
    return HEADER.unpack_from(message)[3] & MsgFlags.TYPE_MASK == MsgType.REPLY


# -- device events ---------------------------------------------------------------------------


def event_category(event: dict) -> str:
    """The category of a trace event (a message or a device event), for :class:`Filter`."""
    kind = event.get("dir")
    if kind in ("in", "out"):
        return category(bytes.fromhex(event["msg"])) if isinstance(event.get("msg"), str) else category(event["msg"])
    return {"irq": "irq", "dma": "dma", "task": "task"}.get(kind, "setup")


def event_line(event: dict) -> str:
    """One line for a device event: an interrupt, a DMA transfer, a deferred task, a client."""
    kind = event.get("dir")
    if kind == "irq":
        what = event["kind"]
        if what == "intx":
            state = "asserted" if event.get("level") else "deasserted"
            sent = " (signalled)" if event.get("level") and event.get("sent") else \
                (" (masked: waits for the client's unmask)" if event.get("level") else "")
            return f"IRQ INTx {state}{sent}"
        name = "MSI" if what == "msi" else "MSI-X"
        state = "sent" if event.get("sent") else "held (no route from the client yet, or masked)"
        return f"IRQ {name} vector {event.get('vector', 0)} {state}"
    if kind == "dma":
        head = f"DMA {event['op']:5} {event['addr']:#x} +{event['size']:#x}"
        if event.get("error"):
            return f"{head} failed: {event['error']}"
        how = f" {event['how']}" if event.get("how") else ""
        data = bytes.fromhex(event.get("data", ""))
        return f"{head}{how}: {bytes_text(data)}"
    if kind == "task":
        name = event.get("name", "?")
        if event.get("event") == "start":
            return f"task {name} started"
        error = f", raised {event['error']}" if event.get("error") else ""
        return f"task {name} finished{error}"
    if kind == "session":
        return {"connect": "client connected", "close": "client gone"}.get(event.get("event"), event.get("event"))
    return json.dumps(event)


# -- filters ---------------------------------------------------------------------------------


class Filter:
    """Which categories to show: ``only`` these (all when empty), minus ``hide``.

    Names are categories (:data:`CATEGORIES`) or ``bars``; an unknown one raises
    :class:`UnknownCategory`, naming the valid ones.
    """

    def __init__(self, only=(), hide=()) -> None:
        self.only = self._expand(only)
        self.hide = self._expand(hide)

    @staticmethod
    def _expand(names) -> frozenset[str]:
        out = set()
        for item in names:
            for name in filter(None, (n.strip().lower() for n in item.split(","))):
                if name in _SHORTHANDS:
                    out.update(_SHORTHANDS[name])
                elif name in CATEGORIES:
                    out.add(name)
                else:
                    raise UnknownCategory(f"unknown category {name!r}: choose from "
                                          f"{', '.join((*CATEGORIES, *_SHORTHANDS))}")
        return frozenset(out)

    @property
    def everything(self) -> bool:
        """Whether this filter lets every line through."""
        return not self.only and not self.hide

    def allows(self, name: str) -> bool:
        """Whether lines of category ``name`` are shown."""
        return (not self.only or name in self.only) and name not in self.hide
