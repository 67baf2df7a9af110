"""The ledger of a session's replies: what the server owes, what it must never answer, and the
check of every message it sends (see ``docs/fuzzing.md``, "What is checked")."""

from __future__ import annotations

import errno
import json
import struct
from collections import Counter
from dataclasses import dataclass, field

from ..protocol import Command
from .wire import (ACCESS, ERROR, EXPECTED_ERRNOS, FD_ERRNOS, HDR, NO_REPLY, REPLY_TYPE, TYPE_MASK, FuzzFailure,
                   Msg, SessionPlan, cmd_name)


@dataclass
class Expect:
    """A message sent that must be answered exactly once."""

    index: int
    msg: Msg
    #: the server may answer it or not (an unframeable header, an over-limit message never completed)
    optional: bool = False


@dataclass
class SessionResult:
    """What one session did."""

    sent: int = 0
    replies: int = 0
    errors: Counter = field(default_factory=Counter)
    server_requests: int = 0
    closed_by_server: bool = False
    abrupt: bool = False


class ReplyBook:
    """Replies owed and forbidden in one session, checked as the server's messages arrive.

    ``current()`` gives the plan index being sent (for failures that concern no reply).
    The server's own requests (DMA_READ/DMA_WRITE) are answered with EFAULT: their answers
    wait in ``answers`` for the player to send.
    """

    def __init__(self, plan: SessionPlan, result: SessionResult, current) -> None:
        self.plan = plan
        self.result = result
        self.current = current
        self.outstanding: list[Expect] = []
        self.silent: dict[int, int] = {}  # msg_id -> index of messages that must never be answered
        self.answered: set[int] = set()
        self.answers: list[bytes] = []
        self.negotiated = False
        #: the first message after which the server may close the connection (None: nowhere yet)
        self.close_from: int | None = None

    def expect(self, index: int, m: Msg, optional: bool = False) -> None:
        """Message ``index`` was (or is being) sent: it must be answered, or must never be."""
        if m.expects_reply:
            self.outstanding.append(Expect(index, m, optional))
        else:
            self.silent[m.msg_id] = index

    def allow_close(self, index: int) -> None:
        """From message ``index`` on, the server may close the connection (an unframeable header, a
        message over its limit, a failed VERSION)."""
        self.close_from = index if self.close_from is None else min(self.close_from, index)

    def waiting(self) -> bool:
        """Whether a reply that must come has not come yet."""
        return any(not e.optional for e in self.outstanding)

    def owed_at_close(self) -> list[Expect]:
        """Replies the server still owed when it closed: without a successful VERSION it may hang up
        at once; otherwise only from the message that allows it on, answering all before that one."""
        limit = 0 if not self.negotiated else self.close_from
        return [e for e in self.outstanding if not e.optional and (limit is None or e.index < limit)]

    def on_message(self, msg_id, cmd, size, flags, err, payload, fds) -> None:
        """Check one message of the server (see :class:`~vfiouser.fuzz.inbox.Inbox`)."""
        mtype = flags & TYPE_MASK
        if mtype == 0:
            self._server_request(msg_id, cmd, flags, payload, fds)
            return
        if mtype != REPLY_TYPE:
            raise FuzzFailure("server-type", f"the server sent message type {mtype} (flags {flags:#x})")
        if msg_id in self.silent:
            i = self.silent[msg_id]
            m = self.plan.msgs[i]
            raise FuzzFailure("reply-to-no-reply", f"the server replied (flags {flags:#x}, errno {err}) to message "
                                                   f"{i}, sent with flags {m.flags:#x} (NO_REPLY or a reply)", i)
        if not self.outstanding or self.outstanding[0].msg.msg_id != msg_id:
            later = next((e for e in self.outstanding if e.msg.msg_id == msg_id), None)
            if later is not None:
                raise FuzzFailure("reply-order", f"reply to message {later.index} came before the reply to message "
                                                 f"{self.outstanding[0].index}", later.index)
            what = "a second reply" if msg_id in self.answered else "a reply nobody asked for"
            raise FuzzFailure("unexpected-reply", f"{what}: id {msg_id:#x} cmd {cmd} flags {flags:#x}",
                              self.current())
        exp = self.outstanding.pop(0)
        self.answered.add(msg_id)
        m = exp.msg
        self.result.replies += 1
        if cmd != m.cmd:
            raise FuzzFailure("reply-cmd", f"reply to message {exp.index} says cmd {cmd}, the request had {m.cmd}",
                              exp.index)
        if fds and not (cmd == Command.DEVICE_GET_REGION_INFO and not flags & ERROR and len(fds) == 1):
            raise FuzzFailure("reply-fds", f"reply to message {exp.index} carries {len(fds)} fd(s)", exp.index)
        if flags & ERROR:
            name = errno.errorcode.get(err, str(err))
            self.result.errors[name] += 1
            if size != HDR.size:
                raise FuzzFailure("error-reply", f"error reply to message {exp.index} has a {size - 16}-byte payload",
                                  exp.index)
            if err == errno.EBUSY:
                raise FuzzFailure("ebusy", f"message {exp.index} was answered EBUSY: the server still served "
                                           "the previous connection, whose client is gone", exp.index)
            if err == errno.EIO:
                raise FuzzFailure("eio", f"message {exp.index} was answered EIO: an exception inside the server "
                                         "or the device model (see the server log)", exp.index)
            if err not in EXPECTED_ERRNOS and not (err in FD_ERRNOS and (m.fds or m.frag_fds)):
                raise FuzzFailure("errno", f"message {exp.index} was answered with unexpected errno {name}",
                                  exp.index)
            if m.cmd == Command.VERSION and not self.negotiated:
                self.allow_close(exp.index)
            return
        self._check_success(exp.index, m, size, payload)
        if m.cmd == Command.VERSION and (m.flags & TYPE_MASK) == 0:
            self.negotiated = True

    def _check_success(self, index: int, m: Msg, size: int, payload: bytes) -> None:
        limit = m.declared
        p = m.payload
        if m.cmd == Command.REGION_READ and len(p) >= 16:
            count = ACCESS.unpack_from(p)[2]
            if size != 32 + count or payload[:16] != p[:16]:
                raise FuzzFailure("reply-format", f"REGION_READ reply to message {index} is {size} bytes for count "
                                                  f"{count}, echo {payload[:16].hex()}", index)
            return
        if m.cmd == Command.DEVICE_GET_REGION_INFO and len(p) >= 4:
            limit = max(limit, HDR.size + struct.unpack_from("<I", p)[0])
        if size > limit:
            raise FuzzFailure("reply-size", f"reply to message {index} is {size} bytes, more than QEMU's receive "
                                            f"buffer for it ({limit})", index)
        if m.cmd == Command.VERSION:
            if len(payload) < 4 or struct.unpack_from("<HH", payload) != (0, 0):
                raise FuzzFailure("reply-format", f"VERSION reply is not version 0.0: {payload[:4].hex()}", index)
            if len(payload) > 4:
                try:
                    doc = json.loads(payload[4:-1].decode()) if payload[-1] == 0 else None
                except ValueError:
                    doc = None
                if not isinstance(doc, dict) or not isinstance(doc.get("capabilities"), dict):
                    raise FuzzFailure("reply-format", f"VERSION reply JSON is invalid: {payload[4:80]!r}", index)

    def _server_request(self, msg_id, cmd, flags, payload, fds) -> None:
        self.result.server_requests += 1
        if cmd not in (Command.DMA_READ, Command.DMA_WRITE):
            raise FuzzFailure("server-request", f"the server sent a {cmd_name(cmd)} request (flags {flags:#x})")
        if fds:
            raise FuzzFailure("server-request", f"the server's {cmd_name(cmd)} request carries {len(fds)} fd(s)")
        if not flags & NO_REPLY:  # answered with an error: the fuzzer has no guest memory to give
            self.answers.append(HDR.pack(msg_id, cmd, HDR.size, REPLY_TYPE | ERROR, errno.EFAULT))

