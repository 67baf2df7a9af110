"""Version negotiation: what each side can do, and the VERSION reply.

The client's VERSION request carries a JSON object of capabilities
(:class:`ClientCapabilities`, validated as libvfio-user validates it); the
server answers with its own (:class:`ServerCapabilities`). QEMU reads the
reply into its request's buffer, so the reply may be no longer than the
request: :func:`negotiate` keeps the longest of the server's JSON texts that
fits, dropping the capabilities a client can best do without first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import NegotiationError
from .protocol import HEADER_SIZE, Version

__all__ = ["ServerCapabilities", "ClientCapabilities", "negotiate"]


@dataclass
class ServerCapabilities:
    """What the server advertises in its VERSION reply."""

    max_msg_fds: int = 16
    max_data_xfer_size: int = 1 << 20
    pgsizes: int = 4096
    max_dma_maps: int = 65535
    write_multiple: bool = True

    def json_candidates(self) -> list[tuple[str, list[str]]]:
        """Compact JSON texts with the keys each leaves out, most complete first; the reply uses
        the first that fits. Keys go in order of need: first those whose value is what a client
        assumes when the key is absent (the specification's defaults), then ``write_multiple``
        (only an optimisation), then the rest, ``max_msg_fds`` last (absent, a client may
        assume a single fd per message)."""
        caps = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": self.pgsizes,
            "max_dma_maps": self.max_dma_maps,
            "write_multiple": self.write_multiple,
        }
        defaults = {"max_data_xfer_size": 1 << 20, "pgsizes": 4096, "max_dma_maps": 65535, "write_multiple": False}

        def need(key: str) -> int:
            if defaults.get(key, object()) == caps[key]:
                return 0
            return {"write_multiple": 1, "max_msg_fds": 3}.get(key, 2)

        order = sorted(caps, key=need)
        out = []
        for n in range(len(order) + 1):
            kept = {k: v for k, v in caps.items() if k not in order[:n]}
            out.append((json.dumps({"capabilities": kept}, separators=(",", ":")), order[:n]))
        return out


@dataclass
class ClientCapabilities:
    """What the client announced in its VERSION request (defaults when absent)."""

    max_msg_fds: int = 1
    max_data_xfer_size: int = 1 << 20
    pgsizes: int = 4096
    max_dma_maps: int = 65535
    write_multiple: bool = False
    migration: dict = field(default_factory=dict)
    other: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str | None) -> ClientCapabilities:
        """Validate and read the JSON of a VERSION request; :class:`NegotiationError` if malformed."""
        caps = cls()
        if text is None:
            return caps
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:  # nested thousands deep: RecursionError
            raise NegotiationError(f"VERSION JSON does not parse: {type(exc).__name__}: {str(exc)[:80]}") from None
        if not isinstance(doc, dict):
            raise NegotiationError("VERSION JSON is not an object")
        body = doc.get("capabilities", {})
        if not isinstance(body, dict):
            raise NegotiationError("VERSION 'capabilities' is not an object")

        def uint(key: str, low: int, high: int) -> None:
            if key in body:
                value = body[key]
                if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                    raise NegotiationError(f"VERSION capability {key}={value!r} is not an integer in [{low}, {high}]")
                setattr(caps, key, value)

        uint("max_msg_fds", 0, 1024)
        uint("max_data_xfer_size", 1, 1 << 32)
        uint("pgsizes", 1, (1 << 64) - 1)
        uint("max_dma_maps", 0, 1 << 32)
        if "write_multiple" in body:
            if not isinstance(body["write_multiple"], bool):
                raise NegotiationError("VERSION capability write_multiple is not a boolean")
            caps.write_multiple = body["write_multiple"]
        if "migration" in body:
            if not isinstance(body["migration"], dict):
                raise NegotiationError("VERSION capability migration is not an object")
            caps.migration = body["migration"]
        known = {"max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps", "write_multiple", "migration"}
        caps.other = {k: v for k, v in body.items() if k not in known}
        return caps


def negotiate(payload: bytes | memoryview, fds: list[int], caps: ServerCapabilities
              ) -> tuple[ClientCapabilities, bytes, int, list[str]]:
    """Check a VERSION request and build the reply: ``(client capabilities, reply payload,
    the client's minor version, the capabilities the reply had to leave out)``. Raises
    :class:`NegotiationError` for anything invalid (fds attached, too short, not parseable,
    major version other than 0, bad JSON)."""
    if fds:
        raise NegotiationError(f"VERSION carries {len(fds)} fd(s)")
    if len(payload) < 4:
        raise NegotiationError(f"VERSION payload is {len(payload)} bytes, needs 4", raw=bytes(payload))
    try:
        req = Version.parse(bytes(payload))
    except Exception as exc:
        raise NegotiationError(f"VERSION does not parse: {exc}", raw=bytes(payload)) from None
    if req.major != 0:
        raise NegotiationError(f"protocol major version {req.major} is not supported (only 0)")
    client = ClientCapabilities.from_json(req.json)
    limit = HEADER_SIZE + len(payload)  # QEMU reads the reply into its request buffer
    reply = Version.build(dict(major=0, minor=0, json=None))
    omitted = list(caps.json_candidates()[-1][1])
    for text, left_out in caps.json_candidates():
        candidate = Version.build(dict(major=0, minor=0, json=text))
        if HEADER_SIZE + len(candidate) <= limit:
            reply, omitted = candidate, left_out
            break
    return client, reply, req.minor, omitted
