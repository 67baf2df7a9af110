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

    def json_candidates(self) -> list[str]:
        """Compact JSON texts, most complete first; the reply uses the first that fits."""
        full = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": self.pgsizes,
            "max_dma_maps": self.max_dma_maps,
            "write_multiple": self.write_multiple,
        }
        order = ["max_dma_maps", "pgsizes", "write_multiple", "max_msg_fds", "max_data_xfer_size"]
        out = []
        caps = dict(full)
        out.append(json.dumps({"capabilities": caps}, separators=(",", ":")))
        for key in order:
            caps.pop(key)
            out.append(json.dumps({"capabilities": caps}, separators=(",", ":")))
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
        except ValueError as exc:
            raise NegotiationError(f"VERSION JSON does not parse: {exc}") from None
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
              ) -> tuple[ClientCapabilities, bytes, int]:
    """Check a VERSION request and build the reply: ``(client capabilities, reply payload,
    the client's minor version)``. Raises :class:`NegotiationError` for anything invalid
    (fds attached, too short, not parseable, major version other than 0, bad JSON)."""
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
    for text in caps.json_candidates():
        candidate = Version.build(dict(major=0, minor=0, json=text))
        if HEADER_SIZE + len(candidate) <= limit:
            reply = candidate
            break
    return client, reply, req.minor
