"""Message traces: every message of a session as one JSON line, for debugging and replay.

``vfiouser serve --trace FILE`` writes one object per message::

    {"t": 0.001234, "dir": "in", "nfds": 1, "msg": "<hex of header and payload>",
     "text": "DMA_MAP #3 command +1fd argsz=0x20 flags=0x3 ..."}

``dir`` is ``"in"`` (client to server) or ``"out"``; ``t`` counts seconds from
the start of the trace. :func:`load` reads a trace back; the test-suite keeps
traces recorded from QEMU 11.1.3 as byte vectors.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from .protocol import HEADER, HEADER_SIZE, describe

__all__ = ["Tracer", "TracedMessage", "load"]


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
    """Appends messages to a JSON-lines file; thread-safe."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._t0 = time.monotonic()
        self._lock = threading.Lock()

    def record(self, direction: str, msg: bytes, nfds: int = 0) -> None:
        msg_id, cmd, _, flags, _ = HEADER.unpack_from(msg)
        entry = {
            "t": round(time.monotonic() - self._t0, 6),
            "dir": direction,
            "nfds": nfds,
            "msg": bytes(msg).hex(),
            "text": describe(cmd, flags, msg[HEADER_SIZE:], msg_id=msg_id, nfds=nfds),
        }
        line = json.dumps(entry)
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()

    def close(self) -> None:
        self.out.close()


def load(path: str) -> Iterator[TracedMessage]:
    """The messages of a trace file, in order."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                e = json.loads(line)
                yield TracedMessage(e["t"], e["dir"], e.get("nfds", 0), bytes.fromhex(e["msg"]))
