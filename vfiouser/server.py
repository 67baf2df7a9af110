"""The vfio-user server: a UNIX socket that serves one device model to one client at a time.

QEMU opens one connection per ``vfio-user-pci`` device and never reconnects,
so the server serves clients one after another: when a client goes away its
fds and mappings are released, the device is power-cycled (reset with reason
``CLIENT_LOST``: a new client is a new machine), and the next ``connect()``
gets a fresh session on the same device. A client that connects while another
is being served gets an EBUSY error reply to its first message and is
disconnected.

The server serves a :class:`~vfiouser.devices.port.DevicePort`, or a device
model (it then serves the model's ``port``).

One thread runs the loop (:meth:`Server.serve_forever`); :meth:`Server.stop`
may be called from any thread or a signal handler.

>>> import tempfile, os
>>> from vfiouser.devices.idio16 import Idio16
>>> path = os.path.join(tempfile.mkdtemp(), "idio16.sock")
>>> with Server(Idio16(), path) as server:
...     print(server.qemu_device_json())  # doctest: +ELLIPSIS
{"driver":"vfio-user-pci","socket":{"type":"unix","path":"...idio16.sock"}}
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import socket
import stat
import threading
import time

from vfiouser.devices.port import as_port

from . import fastpath
from .errors import ConnectionClosed, FramingError, UsageError, VfioUserError
from .negotiation import ServerCapabilities
from .protocol import HEADER, HEADER_SIZE, MsgFlags, MsgType
from .regions import RegionTable
from .session import Session
from .watchdog import LoopWatchdog

__all__ = ["Server", "SocketInUse", "SocketPathError", "serve_in_thread", "device_json", "prepare_socket_path",
           "remove_socket_path", "MAX_SOCKET_PATH"]

log = logging.getLogger(__name__)

#: Seconds a second client may take to send its first header before it is dropped.
BUSY_CLIENT_DEADLINE = 5.0


_EPOLL_READ = select.EPOLLIN | select.EPOLLPRI


class _Poller:
    """The loop's fds: one ``select.epoll`` and a dict from fd to ``(fileobj, callback)``.

    What ``selectors.EpollSelector`` did for the loop, minus its per-event key objects
    (about 0.5 µs a wake-up less). Like it, refuses fds epoll cannot watch (a regular
    file: ``PermissionError``). A callback unregistered by an earlier callback of the same
    round is not called.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self.entries: dict[int, tuple[object, object]] = {}

    @staticmethod
    def _fd(fileobj) -> int:
        return fileobj if isinstance(fileobj, int) else fileobj.fileno()

    def register(self, fileobj, callback) -> None:
        fd = self._fd(fileobj)
        if fd < 0 or fd in self.entries:
            raise KeyError(f"{fileobj!r} cannot be registered (closed, or registered already)")
        self._epoll.register(fd, _EPOLL_READ)
        self.entries[fd] = (fileobj, callback)

    def unregister(self, fileobj) -> None:
        """Stop watching ``fileobj``: an fd number (matched by value), or the object that was
        registered (matched by identity, so a socket closed since, whose ``fileno()`` is -1,
        is still found)."""
        if isinstance(fileobj, int):
            fd = fileobj
        else:
            fd = fileobj.fileno()
            if self.entries.get(fd, (None,))[0] is not fileobj:
                fd = next((f for f, (obj, _) in self.entries.items() if obj is fileobj), -1)
        if self.entries.pop(fd, None) is None:
            raise KeyError(f"{fileobj!r} is not registered")
        try:
            self._epoll.unregister(fd)
        except OSError:  # closed already: the kernel dropped it
            pass

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        return self._epoll.poll(timeout)

    def close(self) -> None:
        self.entries.clear()
        self._epoll.close()


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer of ``sock`` has closed its end (data may still be unread)."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP) for _, ev in poller.poll(0))


class _WaitingClients:
    """Clients that connect while another is served: each gets EBUSY in reply to its first
    message and is hung up on, or, if the served client turns out to be gone meanwhile, is
    served itself; one that sends no whole header within ``BUSY_CLIENT_DEADLINE`` is dropped."""

    def __init__(self, server: Server) -> None:
        self.server = server
        #: connection -> (deadline, header bytes read so far)
        self.conns: dict[socket.socket, tuple[float, bytearray]] = {}

    def add(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            self.server._sel.register(conn, self.readable)
        except Exception:
            conn.close()
            raise
        self.conns[conn] = (time.monotonic() + BUSY_CLIENT_DEADLINE, bytearray())

    def readable(self, conn: socket.socket) -> None:
        server = self.server
        buf = self.conns[conn][1]
        try:
            data = conn.recv(HEADER_SIZE - len(buf))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and server._hand_over(conn, bytes(buf + data)):  # the other one left: serve this one
            del self.conns[conn]
            server._sel.unregister(conn)  # before this thread polls again: it is the serving thread's
            return
        if data and len(buf) + len(data) < HEADER_SIZE:
            buf += data
            return  # wait for a whole header (or the deadline)
        if data:
            msg_id, cmd, _, flags, _ = HEADER.unpack(bytes(buf + data))
            if flags & MsgFlags.TYPE_MASK == MsgType.COMMAND and not flags & MsgFlags.NO_REPLY:
                reply = HEADER.pack(msg_id, cmd, HEADER_SIZE, MsgType.REPLY | MsgFlags.ERROR, errno.EBUSY)
                try:
                    conn.send(reply)
                except OSError:
                    pass
        self.close(conn)

    def close(self, conn: socket.socket) -> None:
        self.conns.pop(conn, None)
        try:
            self.server._sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def expire(self) -> None:
        now = time.monotonic()
        for conn, (deadline, _) in list(self.conns.items()):
            if now > deadline:
                log.warning("a waiting second client sent no header within %ss; dropped", BUSY_CLIENT_DEADLINE)
                self.close(conn)


class SocketInUse(VfioUserError):
    """The socket path belongs to a live server, or is not a socket at all."""


class SocketPathError(UsageError):
    """A socket path that cannot be bound: too long for AF_UNIX, or in a folder that does not exist."""


#: Longest AF_UNIX socket path in bytes (``sun_path`` is 108 bytes, NUL included).
MAX_SOCKET_PATH = 107


def device_json(path: str, **extra) -> str:
    """The JSON for QEMU's ``-device`` option that attaches to a server on ``path``."""
    spec = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": path}}
    spec.update(extra)
    return json.dumps(spec, separators=(",", ":"))


def prepare_socket_path(path: str) -> None:
    """Remove a stale socket at ``path``; refuse a live one or a non-socket file
    (:class:`SocketInUse`), and a path that cannot be bound (:class:`SocketPathError`)."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise SocketPathError(f"the path is {size} bytes and AF_UNIX allows at most {MAX_SOCKET_PATH}: use a "
                              f"shorter one (e.g. /tmp/{os.path.basename(path)[-40:]})")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise SocketPathError(f"its folder {folder} does not exist: create it (mkdir -p {folder}) or choose "
                              f"another path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    except OSError as exc:
        raise SocketInUse(f"{path}: cannot tell whether it is in use ({exc})") from exc
    finally:
        probe.close()
    raise SocketInUse(f"{path} is in use by a running server")


def remove_socket_path(path: str) -> None:
    """Remove the socket a server listened on, if it is still a socket (never another file put
    there meanwhile); nothing if it is already gone."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


class Server:
    """Serves ``device`` on the UNIX socket ``path``.

    The socket is created (mode 0600) by the constructor, so a client may
    connect as soon as it returns; :meth:`serve_forever` accepts and serves.
    ``trace`` is an optional :class:`vfiouser.trace.Tracer`. ``poll_us`` (default 0) makes
    the loop busy-poll that long after each wake-up before it sleeps again.
    """

    def __init__(
        self,
        device,
        path: str,
        *,
        caps: ServerCapabilities | None = None,
        tracer=None,
        backlog: int = 4,
        poll_us: float = 0.0,
        fast_loop: bool = True,
    ) -> None:
        if not 0 <= poll_us <= 1e6:
            raise UsageError(f"poll_us must be between 0 and 1e6 µs, not {poll_us}")
        self.path = os.path.abspath(path)
        #: the device port served, and the model behind it (``device`` as given)
        self.port = as_port(device)
        self.device = device
        self.regions = RegionTable(self.port.regions)
        self.caps = caps or ServerCapabilities()
        self.tracer = tracer
        #: µs the loop keeps polling (busy, yielding the CPU) for the next message after
        #: serving; 0: sleep in epoll at once. Worth it when the server has a CPU of its own.
        self.poll_us = poll_us
        #: serve the fast path's messages with the C loop (:mod:`vfiouser.fastpath`) when it is built
        self.fast_loop = fastpath.wanted(fast_loop)
        self.session: Session | None = None
        self.sessions_served = 0
        #: warns when serving one request takes long enough for the client to give up
        self.watchdog = LoopWatchdog()
        self._sel = _Poller()
        self._stopping = False
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # An fd kept in reserve: with none left, accept() fails with EMFILE and the pending
        # connection stays in the backlog, so epoll reports it at once, for ever (see _shed).
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._last_shed = -1e9
        prepare_socket_path(self.path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            os.chmod(self.path, 0o600)
            self._listener.listen(backlog)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self._sel.register(self._listener, self._on_accept)
        self._sel.register(self._wake_r, self._on_wake)
        self._watched: dict[int, object] = {}
        self._waiting = _WaitingClients(self)
        self._cond = threading.Condition()  # guards the hand-over of a client to the serving thread
        self._handoff: tuple[socket.socket, bytes] | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._loop_done = threading.Event()  # set while serve_forever is not running
        self._loop_done.set()
        log.info("serving %s on %s (%s)", self.port.describe(), self.path, self.regions.describe())

    # -- public ------------------------------------------------------------------

    def qemu_device_json(self, **extra) -> str:
        """The JSON for QEMU's ``-device`` option that attaches to this server."""
        return device_json(self.path, **extra)

    def serve_forever(self) -> None:
        """Accept and serve clients until :meth:`stop`.

        This thread serves the connected client: it waits in ``recvmsg`` on the client's
        socket, so a message costs no poll of its own. A control thread watches everything
        else (the listening socket, clients that come while one is served, the stop pipe, the
        INTx resample eventfd). Nothing a client does ends this loop: an unexpected exception
        while serving a connection is logged and ends that connection only.
        """
        self._loop_done.clear()
        self.watchdog.start()
        control = threading.Thread(target=self._control_loop, name="vfiouser-control", daemon=True)
        control.start()
        try:
            while not self._stopping:
                handed = self._take_client(1.0)
                if handed is not None:
                    self._start_session(*handed)
                    self._serve_session()
        finally:
            self.stop()
            control.join(10)
            self.watchdog.stop()
            self._end_session()
            with self._cond:
                if self._handoff is not None:
                    self._handoff[0].close()
                    self._handoff = None
            self._loop_done.set()

    def _serve_session(self) -> None:
        """Serve the current session until it ends: wait for messages, serve each batch.

        The hot loop: one blocking receive, the batch, one send (in ``process``); the watchdog
        costs two stores, no call."""
        session = self.session
        watchdog = self.watchdog
        monotonic = time.monotonic
        spin = self.poll_us / 1e6
        transport, dispatcher = session.transport, session.dispatcher
        receive, process = transport.receive, session.process
        fast = fastpath.for_session(session, watchdog=watchdog, spin=spin) if self.fast_loop else None
        try:
            while not self._stopping:
                if fast is not None and dispatcher.fast and transport.drained:
                    frames = fastpath.serve(session, fast)
                elif spin:
                    frames = self._poll_then_wait(session, spin)
                else:
                    try:
                        frames = receive(True)
                    except (ConnectionClosed, FramingError) as exc:
                        frames = session.receive_failed(exc)
                if frames is None:
                    break
                watchdog.since = monotonic()
                try:
                    if not process(frames):
                        break
                finally:
                    watchdog.since = 0.0
        except Exception:
            log.exception("unexpected error serving %s; dropping that connection", session.name)
        finally:
            self._end_session()

    @staticmethod
    def _poll_then_wait(session: Session, spin: float) -> list | None:
        """Busy-poll for ``spin`` seconds after serving, as QEMU's own event loop does: a request
        that comes meanwhile is taken without waking this process, which costs 15-40 µs on a VM
        whose idle vCPUs halt. Yielding lets a QEMU thread that shares this CPU run first.
        Then wait as usual."""
        until = time.monotonic() + spin
        while True:
            frames = session.receive()
            if frames is None or frames:
                return frames
            if time.monotonic() >= until:
                return session.receive(wait=True)
            os.sched_yield()

    def _control_loop(self) -> None:
        """Everything but the served client's socket (see :meth:`serve_forever`)."""
        poll = self._sel.poll
        entries = self._sel.entries
        while not self._stopping:
            for fd, _ in poll(1.0):
                entry = entries.get(fd)
                if entry is None:  # unregistered by an earlier callback of this round
                    continue
                fileobj, callback = entry
                try:
                    callback(fileobj)
                except Exception:
                    log.exception("unexpected error serving %r; dropping that connection", fileobj)
                    self._drop(fileobj)
                if self._stopping:
                    break
            if self._waiting.conns:
                self._waiting.expire()

    def _drop(self, fileobj) -> None:
        if fileobj in self._waiting.conns:
            self._waiting.close(fileobj)

    def stop(self) -> None:
        """Make :meth:`serve_forever` return (safe from other threads and signal handlers: the
        control thread does the rest, see :meth:`_on_wake`)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no client is connected; True if so."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Stop serving, close every socket and remove the socket file."""
        if self._closed:
            return
        if not self._loop_done.is_set():  # serve_forever runs on another thread: let it finish first
            self.stop()
            if not self._loop_done.wait(10):
                log.error("the server loop did not stop within 10 s; closing under it")
        self._closed = True
        self._end_session()
        for conn in list(self._waiting.conns):
            self._waiting.close(conn)
        for obj in (self._listener,):
            try:
                self._sel.unregister(obj)
            except (KeyError, ValueError):
                pass
            obj.close()
        self._sel.close()
        for fd in (self._wake_r, self._wake_w, self._reserve_fd):
            if fd < 0:
                continue
            os.close(fd)
        remove_socket_path(self.path)
        log.info("server on %s closed", self.path)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.close()

    # -- loop callbacks ----------------------------------------------------------

    def _on_wake(self, fileobj) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        if self._stopping:  # end the serving thread's wait: in recvmsg, or for a client
            session = self.session
            if session is not None:
                try:
                    session.transport.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._cond:
                self._cond.notify_all()

    def _on_accept(self, listener) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._shed(listener, exc)
            else:
                log.error("accept failed: %s", exc)
            return
        if not self._hand_over(conn, b""):
            log.warning("a second client connected while %s is served; answering EBUSY",
                        getattr(self.session, "name", "another"))
            self._waiting.add(conn)

    def _hand_over(self, conn, initial: bytes) -> bool:
        """Give ``conn`` to the serving thread if no client is served (control thread); a client
        whose peer has already hung up (served, or handed over and not taken yet) is waited for
        (up to a second) first, so one that reconnects right after an abrupt close is served,
        not told EBUSY."""
        session, pending = self.session, self._handoff
        if (session is not None and _hung_up(session.transport.sock)) or (pending is not None and _hung_up(pending[0])):
            self._idle.wait(1.0)  # the serving thread reads its end of stream and ends it
        with self._cond:
            if self.session is not None or self._handoff is not None or self._stopping:
                return False
            self._handoff = (conn, initial)
            self._idle.clear()
            self._cond.notify_all()
        return True

    def _take_client(self, timeout: float):
        """The next client the control thread handed over, ``(conn, initial bytes)``, or None."""
        with self._cond:
            if self._handoff is None and not self._stopping:
                self._cond.wait(timeout)
            handed, self._handoff = self._handoff, None
            return handed

    def _start_session(self, conn, initial: bytes = b"") -> None:
        self.sessions_served += 1
        name = f"client{self.sessions_served}"
        log.info("%s connected", name)
        self._idle.clear()
        self.session = Session(conn, self.port, regions=self.regions, name=name, caps=self.caps,
                               tracer=self.tracer, watch=self._watch, unwatch=self._unwatch, initial=initial)

    def _end_session(self) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        for fd in list(self._watched):
            self._unwatch(fd)
        try:
            session.close()
        finally:
            with self._cond:
                if self._handoff is None:
                    self._idle.set()
        log.info("%s gone; its fds and DMA mappings are released, waiting for the next client", session.name)

    def _shed(self, listener, exc: OSError) -> None:
        """No fd left to accept with: accept on the reserve fd and hang up at once, so the
        pending connection leaves the backlog and the loop does not spin on it."""
        now = time.monotonic()
        if now - self._last_shed >= 10.0:
            log.error("accept failed (%s): out of file descriptors; refusing connections until some are freed",
                      exc)
            self._last_shed = now
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
        try:
            listener.accept()[0].close()
        except OSError:
            pass
        try:
            self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._reserve_fd = -1

    # -- extra fds a session wants polled (INTx resample eventfd) ----------------

    def _watch(self, fd: int, callback) -> None:
        self._sel.register(fd, lambda _f: callback())  # raises for an fd epoll cannot watch
        self._watched[fd] = callback

    def _unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass


class serve_in_thread:
    """Run a server on a background thread (for tests and embedding).

    ``with serve_in_thread(device, path) as server:`` starts serving and, on
    exit, stops the server, joins the thread and removes the socket.
    ``backend`` picks the protocol engine (:mod:`vfiouser.backends`; default ours).
    """

    def __init__(self, device, path: str, *, backend: str | None = None, **kwargs) -> None:
        from .backends import make_server  # the backends module imports this one

        self.server = make_server(device, path, backend=backend, **kwargs)
        self.thread = threading.Thread(target=self.server.serve_forever, name="vfiouser-server", daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self.server

    def __exit__(self, *exc) -> None:
        self.server.stop()
        self.thread.join(10)
        self.server.close()
