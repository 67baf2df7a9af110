"""Errors of the protocol engine, one class per kind of failure.

Every error of vfiouser derives from the one root :class:`VfioUserError`
(defined in :mod:`vfiouser.iomgr.errors`, the lowest layer, and re-exported
here); each carries ``errno``, the errno a backend answers with. Protocol
errors also carry, where there is one, the offending bytes (``raw``), so a log
line or a test can show exactly what was wrong.
"""

from __future__ import annotations

import errno as _errno

from vfiouser.iomgr.errors import VfioUserError

__all__ = [
    "VfioUserError",
    "ProtocolError",
    "MalformedMessage",
    "MessageTooLarge",
    "UnknownCommand",
    "UnsupportedCommand",
    "BadRegionAccess",
    "BadIrqRequest",
    "BadDmaRequest",
    "NegotiationError",
    "FramingError",
    "ConnectionClosed",
    "ErrorReply",
    "ReplyTimeout",
    "ClientStateError",
    "UsageError",
]


class ProtocolError(VfioUserError):
    """A message the server cannot act on. Answered with an error reply carrying ``errno``.

    ``raw`` holds the offending bytes (a payload or a header), when there are some.
    """

    errno = _errno.EINVAL

    def __init__(self, message: str, *, raw: bytes | None = None, errno: int | None = None) -> None:
        super().__init__(message, errno=errno)
        self.raw = raw

    def __str__(self) -> str:
        text = super().__str__()
        if self.raw:
            shown = self.raw[:32].hex()
            more = "..." if len(self.raw) > 32 else ""
            text = f"{text} [{len(self.raw)} bytes: {shown}{more}]"
        return text


class MalformedMessage(ProtocolError):
    """A payload that does not parse: too short, trailing bytes, bad ``argsz``, bad field values (EINVAL)."""


class MessageTooLarge(ProtocolError):
    """A message larger than the negotiated maximum; its body was discarded (EMSGSIZE)."""

    errno = _errno.EMSGSIZE


class UnknownCommand(ProtocolError):
    """A command number the protocol does not define (ENOSYS)."""

    errno = _errno.ENOSYS


class UnsupportedCommand(ProtocolError):
    """A defined command this server does not offer, e.g. migration (EOPNOTSUPP)."""

    errno = _errno.EOPNOTSUPP


class BadRegionAccess(ProtocolError):
    """A region access outside the device's regions or bigger than allowed (EINVAL)."""


class BadIrqRequest(ProtocolError):
    """A GET_IRQ_INFO/SET_IRQS request that breaks the interrupt rules (EINVAL)."""


class BadDmaRequest(ProtocolError):
    """A DMA_MAP/DMA_UNMAP that cannot be applied: overlap (EEXIST), unknown range (ENOENT), ..."""


class NegotiationError(ProtocolError):
    """The VERSION exchange failed; the connection is closed after the error reply (EINVAL)."""


class FramingError(ProtocolError):
    """The byte stream cannot be split into messages any more (e.g. ``msg_size < 16``).

    The connection is closed after an error reply; the server keeps running.
    """


class ConnectionClosed(VfioUserError):
    """The peer closed the connection (or it broke)."""

    errno = _errno.ECONNRESET


class ErrorReply(VfioUserError):
    """The peer answered a request with an error reply (client side). ``errno`` is positive."""

    def __init__(self, command: str, errno: int) -> None:
        self.command = command
        name = _errno.errorcode.get(errno, str(errno))
        super().__init__(f"{command} failed: {name} ({errno})", errno=errno)


class ReplyTimeout(VfioUserError):
    """No reply arrived in time."""

    errno = _errno.ETIMEDOUT


class ClientStateError(VfioUserError):
    """A client call that is not valid in the connection's current state."""


class UsageError(VfioUserError, ValueError):
    """An argument the engine cannot take (a server option out of range, ...); also a ValueError."""
