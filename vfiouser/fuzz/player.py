"""The session player: plays one plan against the server, over one connection, and checks
what comes back (the replies through :class:`~vfiouser.fuzz.replies.ReplyBook`) and what the
server does meanwhile (closes, hangs, fds it must not hold, CPU while idle)."""

from __future__ import annotations

import array
import fcntl
import select
import socket
import termios
import time

from .child import Deadline, ServerProcess
from .fds import FdFactory
from .inbox import Inbox
from .replies import ReplyBook, SessionResult
from .wire import HDR, SERVER_MAX_MSG, FuzzFailure, Msg, SessionPlan, cmd_name


class PeerClosed(Exception):
    """The server closed the connection (end of stream, or a send failed)."""


class SessionRunner:
    """Plays one plan against the server and checks every reply (see ``docs/fuzzing.md``)."""

    def __init__(self, server: ServerProcess, plan: SessionPlan, workdir: str, *, deadline: float) -> None:
        self.server = server
        self.plan = plan
        self.deadline = deadline
        self.fds = FdFactory(workdir)
        self.result = SessionResult()
        self.book = ReplyBook(plan, self.result, lambda: self.current)
        self.sock: socket.socket | None = None
        self.inbox: Inbox | None = None
        self.expect_close = False  # the client did something after which the server must close
        self.current = 0  # plan index being sent

    # -- the session ------------------------------------------------------------------

    def run(self) -> SessionResult:
        """Play the plan; raises :class:`FuzzFailure` on the first failed check."""
        try:
            self._run()
        except FuzzFailure as exc:
            if exc.kind in ("hang", "spin", "no-close") and self.server.alive():
                exc.server_state = self.server.wait_channels()  # before our fds go, which may unblock it
            raise
        finally:
            if self.sock is not None:
                self.sock.close()
            self.fds.close()
        return self.result

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.deadline)
        try:
            sock.connect(self.server.path)
        except OSError as exc:
            sock.close()
            raise FuzzFailure("connect", f"cannot connect to the server: {exc}") from None
        sock.setblocking(False)
        self.sock = sock
        self.inbox = Inbox(sock, self.book.on_message)

    def _run(self) -> None:
        plan = self.plan
        self._connect()
        try:
            for i, m in enumerate(plan.msgs):
                self.current = i
                if plan.cut is not None and plan.cut[0] == i:
                    self._send_cut(m, plan.cut[1])
                    return
                self._send_msg(i, m)
                if m.ends == "framing":
                    self._flush_and_wait()
                    self._require_close(f"msg_size {m.declared} cannot be framed")
                    return
                if m.ends == "truncate":
                    self._flush_and_wait()
                    self.result.abrupt = True
                    return
                if i in plan.flush_after:
                    self._flush_and_wait()
            if plan.linger:
                self._linger(plan.linger)
            if plan.idle_check:
                self._idle_check()
            if plan.half_close:
                self.sock.shutdown(socket.SHUT_WR)
                self._require_close("the client half-closed (end of stream)")
        except PeerClosed:
            self._peer_closed()

    # -- sending ------------------------------------------------------------------------

    def _send_msg(self, i: int, m: Msg) -> None:
        frags = m.fragments()
        own = [self.fds.make(k) for k in m.fds]
        fd_frag = min(m.fd_frag, len(frags) - 1)
        before = self._steady_fds() if m.fd_check else None
        # Expect the reply before sending: the server may answer while the rest is still going out.
        if m.close_ok:
            self.book.allow_close(i)
        # A message never completed has nothing to answer, unless its header alone tells the server it
        # cannot take it (msg_size below 16 or over the limit): then it may answer, or not, at once.
        header_refuses = not HDR.size <= m.declared <= SERVER_MAX_MSG
        optional = m.ends is not None and header_refuses
        if m.ends is None or optional:
            self.book.expect(i, m, optional)
        # The server may keep the fds of the first fragment that carries any: Linux ends a receive
        # after the first send with fds, so it may read them together with the header (a message
        # starts in that receive: the fds are the message's). The fds of any later fragment never.
        counts = [(len(own) if k == fd_frag else 0) + len(m.frag_fds.get(k, ())) for k in range(len(frags))]
        may_keep = next((n for n in counts if n), 0)
        for k, frag in enumerate(frags):
            fds = list(own) if k == fd_frag else []
            fds += [self.fds.make(kind) for kind in m.frag_fds.get(k, ())]
            if before is not None and k == len(frags) - 1:
                self._check_fragment_fds(i, before, may_keep)
            self._send(frag, fds)
        self.result.sent += 1

    def _send_cut(self, m: Msg, nbytes: int) -> None:
        data = m.wire()[:nbytes]
        if len(data) >= HDR.size and not HDR.size <= m.declared <= SERVER_MAX_MSG:
            # The header alone tells the server the message cannot be taken: it may answer at once.
            self.book.allow_close(self.current)
            self.book.expect(self.current, m, optional=True)
        if data:
            self._send(data, [self.fds.make(k) for k in m.fds])
            self.result.sent += 1
        self.result.abrupt = True

    def _send(self, data: bytes, fds: list[int]) -> None:
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        wait = Deadline(self.server, self.deadline)
        while view:
            try:
                n = self.sock.sendmsg([view], anc, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                left = wait.left()
                if left <= 0:
                    raise FuzzFailure("hang", f"the server took no bytes for {wait.describe()} while message "
                                              f"{self.current} was being sent", self.current) from None
                got = select.poll()
                got.register(self.sock, select.POLLOUT | select.POLLIN)
                events = got.poll(left * 1000)
                if any(ev & (select.POLLIN | select.POLLHUP | select.POLLERR) for _, ev in events):
                    self.inbox.pump()
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise PeerClosed() from None
            anc = []
            view = view[n:]
            wait.restart()

    def _flush_answers(self) -> None:
        while self.book.answers:
            self._send(self.book.answers.pop(0), [])

    # -- waiting for the server ---------------------------------------------------------

    def _flush_and_wait(self) -> None:
        """Send queued answers, then wait until every outstanding message is answered."""
        self._flush_answers()
        wait = Deadline(self.server, self.deadline)
        book = self.book
        while book.waiting():
            before = len(book.outstanding)
            self.inbox.pump()
            if self.inbox.eof:
                raise PeerClosed()
            self._flush_answers()
            if len(book.outstanding) < before:
                wait.restart()
                continue
            left = wait.left()
            if left <= 0:
                e = book.outstanding[0]
                stuck = range(e.index, self.current + 1)
                where = (f"; the server is stuck on one of messages {e.index}-{self.current}, all sent since its "
                         "last reply" if len(stuck) > 1 else "")
                raise FuzzFailure("hang", f"no reply to message {e.index} ({cmd_name(e.msg.cmd)} id "
                                          f"{e.msg.msg_id:#x}) within {wait.describe()}{where}", e.index, stuck)
            select.select([self.sock], [], [], left)
        self.inbox.pump()
        if self.inbox.eof:
            raise PeerClosed()

    def _require_close(self, why: str) -> None:
        """The server must close the connection within the deadline (``why`` says why)."""
        self.expect_close = True
        wait = Deadline(self.server, self.deadline)
        while not self.inbox.eof:
            left = wait.left()
            if left <= 0:
                raise FuzzFailure("no-close", f"{why}, but the server did not close the connection within "
                                              f"{wait.describe()}", self.current)
            if not select.select([self.sock], [], [], left)[0]:
                continue
            self.inbox.pump()
            self._flush_answers_quietly()
        self._peer_closed()

    def _flush_answers_quietly(self) -> None:
        try:
            self._flush_answers()
        except PeerClosed:
            self.book.answers.clear()

    def _peer_closed(self) -> None:
        """The server closed: read what it sent before, then judge whether it was allowed to."""
        self.result.closed_by_server = not self.expect_close
        try:  # what it sent before closing is still to be read (a send may have failed first)
            self.inbox.pump()
        except OSError:
            pass
        self.inbox.eof = True
        self.inbox.frames()
        owed = self.book.owed_at_close()
        limit = 0 if not self.book.negotiated else self.book.close_from
        if owed:
            e = owed[0]
            after = f", sent before message {limit} (after which a close is allowed)" if limit is not None else ""
            raise FuzzFailure("closed", f"the server closed the connection without answering message {e.index} "
                                        f"({cmd_name(e.msg.cmd)}){after}", e.index)
        if limit is not None:
            return
        if not self.expect_close:
            raise FuzzFailure("closed", "the server closed the connection unprompted", self.current)

    # -- extra checks ------------------------------------------------------------------

    def _consumed(self, timeout: float = 1.0) -> None:
        """Wait until the server has read every byte sent (the socket's output queue is empty)."""
        deadline = time.monotonic() + timeout
        buf = bytearray(4)
        while True:
            fcntl.ioctl(self.sock, termios.TIOCOUTQ, buf)
            if int.from_bytes(buf, "little") == 0 or time.monotonic() > deadline:
                return
            time.sleep(0.001)

    def _steady_fds(self) -> int:
        """The server's fd count once it has read everything and the count holds still."""
        self._consumed()
        last = self.server.fd_count()
        for _ in range(100):
            time.sleep(0.002)
            now = self.server.fd_count()
            if now == last:
                break
            last = now
        return last

    def _check_fragment_fds(self, index: int, before: int, own: int) -> None:
        """Fds sent in the middle of a message cannot belong to it: the server must not hold them
        (``own``: how many it may hold as the message's, see :meth:`_send_msg`)."""
        self._consumed()
        wait = Deadline(self.server, 1.0)
        count = self.server.fd_count()
        while count > before + own + 1 and wait.left() > 0:
            time.sleep(0.005)
            count = self.server.fd_count()
        if count > before + own + 1:
            raise FuzzFailure("held-fds", f"the server holds {count - before - own} fd(s) that came with fragments "
                                          f"of the unfinished message {index}",
                              index)

    def _linger(self, seconds: float) -> None:
        """Stay connected, answering the server's requests, and check what arrives meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if select.select([self.sock], [], [], left)[0]:
                self.inbox.pump()
                if self.inbox.eof:
                    raise PeerClosed()
                self._flush_answers()

    def _idle_check(self) -> None:
        """An idle server must not use the CPU (a spinning loop does)."""
        for attempt in range(2):
            t0, c0 = time.monotonic(), self.server.cpu_ns()
            time.sleep(0.03)
            used = (self.server.cpu_ns() - c0) / 1e9
            if used < 0.5 * (time.monotonic() - t0):
                return
        raise FuzzFailure("spin", f"the server used {used * 1000:.0f} ms of CPU in {(time.monotonic() - t0) * 1000:.0f}"
                                  " ms while the client was idle", self.current)
