"""A recorded trace printed the way ``-v`` logs a live session: ``vfiouser trace show FILE``.

:func:`lines` turns the entries of a trace (:func:`vfiouser.trace.load_events`)
into the lines of :mod:`vfiouser.readable`: each request with its reply on one
line, at the time the request arrived, followed (indented) by the interrupts
and DMA it caused; the device's own work (deferred tasks and what they did) as
it happened; times in milliseconds since the client arrived. The client's
answers to the server's own DMA requests are left out (the DMA lines say what
moved), and so are the lock entries a replay uses. ``raw=True`` prints every
message decoded field by field instead, as ``-vv`` does.

>>> from vfiouser.protocol import HEADER, Command, REGION_ACCESS
>>> request = HEADER.pack(3, Command.REGION_WRITE, 33, 0, 0) + REGION_ACCESS.pack(0, 2, 1) + b"\\x81"
>>> reply = HEADER.pack(3, Command.REGION_WRITE, 32, 1, 0) + REGION_ACCESS.pack(0, 2, 1)
>>> trace = [{"n": 1, "t": 1.0, "dir": "session", "event": "connect", "client": "client1"},
...          {"n": 2, "t": 1.002, "dir": "in", "msg": request, "nfds": 0},
...          {"n": 3, "t": 1.0021, "dir": "irq", "kind": "intx", "level": True, "sent": True, "by": ["at", 2]},
...          {"n": 4, "t": 1.0023, "dir": "out", "msg": reply, "nfds": 0}]
>>> for line in lines(trace):
...     print(line)
client1      0.000 ms  client connected
client1      2.000 ms  #3 write BAR2   +0x000 [1] <- 0x81
client1      2.100 ms      IRQ INTx asserted (signalled)
>>> list(lines(trace, Filter(only=["irq"])))
['client1      2.100 ms      IRQ INTx asserted (signalled)']
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .protocol import HEADER, HEADER_SIZE, MsgFlags, describe
from .readable import Filter, category, event_category, event_line, exchange, is_reply, prefix

__all__ = ["lines"]


class _Request:
    """A request whose line waits for its reply, and the events it caused meanwhile."""

    __slots__ = ("entry", "ms", "caused")

    def __init__(self, entry: dict, ms: float) -> None:
        self.entry = entry
        self.ms = ms
        self.caused: list[tuple[str, str, float]] = []


def lines(entries: Iterable[dict], wanted: Filter | None = None, *, raw: bool = False) -> Iterator[str]:
    """The readable lines of a trace's entries (see the module docstring), filtered by ``wanted``."""
    wanted = wanted or Filter()
    client, t0 = "client", None
    waiting: dict[int, _Request] = {}  # serving point n -> its request, until its reply comes

    def flush(requests: Iterable[_Request]) -> Iterator[str]:
        for request in sorted(requests, key=lambda r: r.entry["n"]):
            waiting.pop(request.entry["n"], None)
            yield from shown(request.entry, None, request)

    def shown(entry: dict, reply: dict | None, request: _Request) -> Iterator[str]:
        msg = entry["msg"]
        if wanted.allows(category(msg)):
            yield prefix(client, request.ms) + exchange(
                msg, reply["msg"] if reply else None, names=entry.get("names", ""), nfds=entry.get("nfds", 0),
                reply_nfds=reply.get("nfds", 0) if reply else 0)
        for text, kind, ms in request.caused:
            if wanted.allows(kind):
                yield prefix(client, ms) + "    " + text

    for entry in entries:
        kind = entry.get("dir")
        t = entry.get("t", 0.0)
        if t0 is None:
            t0 = t
        if kind == "session" and entry.get("event") == "connect":
            yield from flush(list(waiting.values()))
            client, t0 = entry.get("client", client), t
        ms = (t - t0) * 1000
        if kind in ("in", "out"):
            msg = entry["msg"]
            if raw:
                if wanted.allows(category(msg)):
                    msg_id, cmd, _, flags, _ = HEADER.unpack_from(msg)
                    arrow = "<<<" if kind == "in" else ">>>"
                    text = describe(cmd, flags, msg[HEADER_SIZE:], msg_id=msg_id, nfds=entry.get("nfds", 0))
                    yield prefix(client, ms) + f"{arrow} {text}"
                continue
            if kind == "in" and not is_reply(msg):  # a request: its line waits for the reply
                yield from flush([r for r in waiting.values() if HEADER.unpack_from(r.entry["msg"])[3]
                                  & MsgFlags.NO_REPLY])
                waiting[entry["n"]] = _Request(entry, ms)
            elif kind == "out" and is_reply(msg):
                msg_id, cmd = HEADER.unpack_from(msg)[:2]
                request = next((r for r in waiting.values() if HEADER.unpack_from(r.entry["msg"])[:2]
                                == (msg_id, cmd)), None)
                if request is not None:
                    del waiting[request.entry["n"]]
                    yield from shown(request.entry, entry, request)
            continue
        if kind in ("irq", "dma", "task", "session"):
            text, cat = event_line(entry), event_category(entry)
            by = entry.get("by") or []
            if not raw and len(by) == 2 and by[0] == "at" and by[1] in waiting:
                waiting[by[1]].caused.append((text, cat, ms))
            else:
                if kind == "session" and entry.get("event") == "close":
                    yield from flush(list(waiting.values()))
                if wanted.allows(cat):
                    yield prefix(client, ms) + text
    yield from flush(list(waiting.values()))
