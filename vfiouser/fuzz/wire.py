"""What the fuzzer puts on the wire: the protocol's constants, one planned message
(:class:`Msg`), one planned session (:class:`SessionPlan`), and the failure a check raises
(:class:`FuzzFailure`)."""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

from ..protocol import Command, MsgFlags

HDR = struct.Struct("<HHIII")  # msg_id, cmd, msg_size, flags, error_no
ACCESS = struct.Struct("<QII")  # REGION_READ/WRITE: offset, region, count
MULTI_ENTRY = struct.Struct("<QII8s")
IRQ_SET = struct.Struct("<IIIII")
DMA_ACCESS = struct.Struct("<QQ")

NO_REPLY = int(MsgFlags.NO_REPLY)
ERROR = int(MsgFlags.ERROR)
TYPE_MASK = int(MsgFlags.TYPE_MASK)
REPLY_TYPE = 1

#: The server's message size limit: max_data_xfer_size (1 MiB) plus 4 KiB of headers.
SERVER_MAX_MSG = (1 << 20) + 4096
#: Size of the memfd that stands for guest RAM (covers every map of the recorded sessions).
RAM_SIZE = 128 << 20
CONFIG_REGION = 7
ROM_REGION = 6

#: Errnos a correct server may answer fuzzed input with (docs/design.md, "Choices made").
#: EIO means an unexpected exception inside the server or a model: always a failure.
EXPECTED_ERRNOS = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EMSGSIZE, errno.E2BIG,
                             errno.EACCES, errno.EEXIST, errno.ENOENT, errno.ENOSPC})
#: Expected only for a message that came with fds: more than ``max_msg_fds`` (16), whose extra
#: ones the kernel could not pass, get EMFILE (never a success reply that lost an eventfd).
FD_ERRNOS = frozenset({errno.EMFILE})

#: The built-in devices the fuzzer serves (every one ``vfiouser serve NAME`` takes without parameters).
BUILTIN = ("idio16", "edu", "pci-serial", "virtio-rng", "ivshmem-plain")


class FuzzFailure(Exception):
    """A check failed. ``kind`` names the check; ``index`` is the plan message it concerns (if any);
    ``suspects`` are other messages the report should show (e.g. all those sent since the last reply)."""

    def __init__(self, kind: str, message: str, index: int | None = None, suspects=()) -> None:
        super().__init__(message)
        self.kind = kind
        self.index = index
        self.suspects = list(suspects)
        #: what the server's threads were doing when the failure was seen (hangs, spins)
        self.server_state = ""


@dataclass
class Msg:
    """One message of a session plan, as it will go on the wire.

    ``size`` is the declared ``msg_size`` when a mutation set it outright (below
    16, or 2**31 and more); ``size_extra`` makes it claim bytes that are never
    sent; otherwise it is header plus payload. ``fds`` are fd kinds (see
    :class:`FdFactory`); they travel with fragment ``fd_frag``, or with the
    fragments listed in ``frag_fds`` (fds sent in the middle of the message).
    ``ends``: ``"framing"`` (msg_size below 16) or ``"truncate"`` (declared size
    larger than what is sent): the session ends after it. ``close_ok``: the
    server may close the connection once it got this message.
    """

    cmd: int
    flags: int
    payload: bytes
    fds: list[str] = field(default_factory=list)
    origin: str = ""
    error_no: int = 0
    msg_id: int = 0
    size: int | None = None
    #: bytes the declared size claims beyond what is sent (truncate-then-disconnect)
    size_extra: int = 0
    splits: list[int] = field(default_factory=list)
    fd_frag: int = 0
    frag_fds: dict[int, list[str]] = field(default_factory=dict)
    fd_check: bool = False
    ends: str | None = None
    close_ok: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def declared(self) -> int:
        """The ``msg_size`` the header carries."""
        if self.size is not None:
            return self.size
        return HDR.size + len(self.payload) + self.size_extra

    def wire(self) -> bytes:
        """Header and payload, exactly as sent."""
        return HDR.pack(self.msg_id, self.cmd, self.declared & 0xFFFFFFFF, self.flags, self.error_no) + self.payload

    def fragments(self) -> list[bytes]:
        """The wire bytes cut at ``splits``: one send each."""
        data = self.wire()
        points = [0, *sorted(p for p in set(self.splits) if 0 < p < len(data)), len(data)]
        return [data[a:b] for a, b in zip(points, points[1:])]

    @property
    def expects_reply(self) -> bool:
        """A command (any type but reply) without NO_REPLY must be answered exactly once."""
        return (self.flags & TYPE_MASK) != REPLY_TYPE and not self.flags & NO_REPLY

    def describe(self) -> str:
        """One line: position in the session's origin, header fields and mutations."""
        name = cmd_name(self.cmd)
        text = (f"id={self.msg_id:#06x} {name} flags={self.flags:#x} msg_size={self.declared:#x} "
                f"payload={len(self.payload)}B")
        if self.error_no:
            text += f" error_no={self.error_no:#x}"
        if self.fds or self.frag_fds:
            text += f" fds={self.fds}" + (f" on fragment {self.fd_frag}" if self.fd_frag else "")
            if self.frag_fds:
                text += f" mid-message fds={self.frag_fds}"
        if self.splits:
            text += f" split at {sorted(set(self.splits))}"
        return text


@dataclass
class SessionPlan:
    """Everything one session does, decided before it starts."""

    number: int
    device: str
    shape: str
    msgs: list[Msg]
    #: indexes after which the runner waits for every outstanding reply
    flush_after: set[int]
    #: (message index, bytes of it sent) where the session ends abruptly, or None
    cut: tuple[int, int] | None = None
    #: half-close at the end and require the server to close its side
    half_close: bool = False
    #: measure the server's CPU use while idle at the end of the session
    idle_check: bool = False
    #: stay connected this long at the end, so deferred device work runs while the client is there
    linger: float = 0.0
    mutated: list[int] = field(default_factory=list)


def ranges(indexes) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``0-2, 5, 7-8``."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(indexes):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def cmd_name(cmd: int) -> str:
    """The command's name (``CMD_<n>`` for a number the protocol does not define)."""
    try:
        return Command(cmd).name
    except ValueError:
        return f"CMD_{cmd}"
