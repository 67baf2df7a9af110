"""Message traces: a session as JSON lines, for reading (``vfiouser trace show``) and replay (``vfiouser replay``).

``vfiouser serve --trace FILE`` writes one object per line, numbered ``n`` in
the order they happened, ``t`` seconds from the start of the trace. Messages::

    {"n": 7, "t": 0.0123, "dir": "in", "nfds": 0, "msg": "<hex of header and payload>",
     "text": "REGION_READ #5 command offset=0x20 region=0 count=4", "names": "status"}

``dir`` is ``"in"`` (client to server) or ``"out"``; ``names`` (what the access
reaches, from the device port) and ``fds`` (what each fd was: ``{"kind":
"memory", "size": n}`` for guest RAM, ``{"kind": "eventfd"}``, ``{"kind":
"other"}``) appear when there are some. Then what the device did:

==================  ===============================================================================
``dir``             fields
==================  ===============================================================================
``"session"``       ``event`` (``connect``, ``close``), ``client``
``"irq"``           ``kind`` (``intx``, ``msi``, ``msix``), ``level`` or ``vector``, ``sent``
``"dma"``           ``op`` (``read``, ``write``), ``addr``, ``size``, ``data`` (hex, the bytes that
                    moved), ``how`` (``in place``, ``by message``) or ``error``
``"task"``          ``event`` (``start``, ``finish``), ``task`` (numbered from 1), ``name``, ``error``
``"lock"``          a deferred task (``task``) or another thread (``task`` null) took the device
                    lock; ``at``: ``[n, j]``, the serving thread had taken it ``j`` times since
                    serving point ``n`` (a message in, or a session event)
==================  ===============================================================================

Device events carry ``by``: ``["at", n]`` (while serving point ``n``),
``["task", k]`` or ``["other"]``. :func:`load` reads the messages back (the
test-suite keeps traces recorded from QEMU 11.1.3 as byte vectors);
:func:`load_events` reads everything.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from .errors import UsageError
from .protocol import HEADER, HEADER_SIZE, describe

__all__ = ["Tracer", "TracedMessage", "TraceError", "load", "load_events"]


class TraceError(UsageError):
    """A trace file that cannot be read (missing, not JSON lines, not a trace)."""


@dataclass(frozen=True)
class TracedMessage:
    """One message of a trace."""

    t: float
    dir: str
    nfds: int
    msg: bytes

    @property
    def header(self) -> tuple[int, int, int, int, int]:
        """``(msg_id, cmd, msg_size, flags, error_no)``"""
        return HEADER.unpack_from(self.msg)

    @property
    def payload(self) -> bytes:
        return self.msg[HEADER_SIZE:]


class Tracer:
    """Appends messages and events to a JSON-lines file; thread-safe."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._n = 0

    def _write(self, entry: dict) -> int:
        with self._lock:
            self._n += 1
            entry = {"n": self._n, "t": round(time.monotonic() - self._t0, 6), **entry}
            self.out.write(json.dumps(entry) + "\n")
            self.out.flush()
            return self._n

    def record(self, direction: str, msg: bytes, nfds: int = 0, **fields) -> int:
        """Add a message (``direction`` ``"in"`` or ``"out"``); returns its number ``n``."""
        msg_id, cmd, _, flags, _ = HEADER.unpack_from(msg)
        return self._write({"dir": direction, "nfds": nfds, "msg": bytes(msg).hex(),
                            "text": describe(cmd, flags, msg[HEADER_SIZE:], msg_id=msg_id, nfds=nfds), **fields})

    def event(self, kind: str, /, **fields) -> int:
        """Add a device event (``kind`` is its ``dir``: session, irq, dma, task, lock); returns ``n``."""
        return self._write({"dir": kind, **fields})

    def close(self) -> None:
        self.out.close()


def load_events(path: str) -> Iterator[dict]:
    """Every entry of a trace file, in order (messages get ``msg`` as bytes). Raises
    :class:`TraceError` for a file that is not a trace."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"cannot read the trace {path}: {exc.strerror}") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or "dir" not in entry:
                    raise ValueError("no 'dir'")
                if "msg" in entry:
                    entry["msg"] = bytes.fromhex(entry["msg"])
                entry.setdefault("n", number)  # traces written before entries were numbered
            except ValueError as exc:
                raise TraceError(f"{path}:{number} is not a trace entry ({exc}); traces are written by "
                                 f"vfiouser serve --trace") from None
            yield entry


def load(path: str) -> Iterator[TracedMessage]:
    """The messages of a trace file, in order."""
    for e in load_events(path):
        if e["dir"] in ("in", "out"):
            yield TracedMessage(e["t"], e["dir"], e.get("nfds", 0), e["msg"])
