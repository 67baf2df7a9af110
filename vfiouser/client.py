"""A vfio-user client in Python, for tests and tools that talk to a server without QEMU.

>>> import os, tempfile
>>> from vfiouser.devices.idio16 import Idio16
>>> from vfiouser.server import serve_in_thread
>>> path = os.path.join(tempfile.mkdtemp(), "s.sock")
>>> with serve_in_thread(Idio16(), path):
...     with Client.connect(path) as c:
...         print(hex(c.config_read(0, 4)), c.bring_up())   # IDs; BAR2 placed and decoded
...         c.region_write(2, 0, b"\x5a")                    # GPIO outputs 0-7
...         c.region_read(2, 0, 1)
0xdc8494f {2: 49152}
b'Z'

A BAR answers once it is decoded, as on a real bus: :meth:`Client.bring_up`
does what firmware does at boot (addresses, decoding, bus mastering).

Every request waits for its reply (or, with ``no_reply=True``, does not ask
for one). An error reply raises :class:`~vfiouser.errors.ErrorReply` with the
server's errno. :meth:`Client.send_raw` puts arbitrary bytes on the wire and
:meth:`Client.receive` reads whatever comes back, for tests of malformed input.

Server-to-client requests (DMA_READ/DMA_WRITE) that arrive while the client
waits are passed to ``dma_handler(cmd, addr, count, data)``, which returns the
bytes read (DMA_READ) or ``None`` (DMA_WRITE), or raises :class:`OSError` to
answer with its errno.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vfiouser.devices.pci.firmware import assign_bars

from .errors import ClientStateError, ConnectionClosed, ErrorReply, ReplyTimeout, UnsupportedCommand, VfioUserError
from .protocol import (
    DMA_ACCESS,
    HEADER,
    HEADER_SIZE,
    Layout,
    REGION_ACCESS,
    Command,
    MsgFlags,
    MsgType,
    RegionInfoReply,
    Version,
    command_name,
    describe,
    parse_region_caps,
)
from .transport import Transport, close_fds as _close_fds, wait_readable

__all__ = ["Client", "Message", "RegionInfoResult", "DEFAULT_CLIENT_CAPS"]

#: What the client announces, modelled on QEMU 11.1.3's VERSION request.
DEFAULT_CLIENT_CAPS = {
    "capabilities": {
        "pgsizes": 4096,
        "max_msg_fds": 16,
        "max_dma_maps": 65535,
        "max_data_xfer_size": 1 << 20,
        "migration": {"max_bitmap_size": 256 << 20, "pgsize": 4096},
        "write_multiple": True,
    }
}



@dataclass
class Message:
    """A received message: header fields, payload bytes and the fds that came with it."""

    msg_id: int
    cmd: int
    flags: int
    error_no: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return self.flags & MsgFlags.TYPE_MASK == MsgType.REPLY

    @property
    def is_error(self) -> bool:
        return bool(self.flags & MsgFlags.ERROR)

    def __repr__(self) -> str:
        text = describe(self.cmd, self.flags, self.payload, msg_id=self.msg_id, nfds=len(self.fds))
        if self.is_error:
            text += f" {errno.errorcode.get(self.error_no, self.error_no)}"
        return f"<{text}>"


@dataclass
class RegionInfoResult:
    """A DEVICE_GET_REGION_INFO answer, capabilities decoded."""

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    caps: list
    fd: int | None


class Client:
    """A connection to a vfio-user server (see the module docstring)."""

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0, dma_handler: Callable | None = None) -> None:
        self.transport = Transport(sock, max_msg_size=64 << 20, log=logging.getLogger("vfiouser.client"))
        self.timeout = timeout
        self.dma_handler = dma_handler
        self._next_id = 0
        self._stash: dict[int, Message] = {}
        self._pending: list[Message] = []
        # One thread reads the socket at a time; replies it reads for others go to the stash.
        self._cond = threading.Condition()
        self._reading = False
        self.server_caps: dict = {}
        self.negotiated = False

    @classmethod
    def connect(cls, path: str, *, negotiate: bool = True, caps: dict | None = None, **kwargs) -> Client:
        """Connect to the server at ``path`` and (by default) negotiate the version."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        client = cls(sock, **kwargs)
        if negotiate:
            client.negotiate(caps)
        return client

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the server releases everything it got from us)."""
        for msg in self._stash.values():
            _close_fds(msg.fds)
        self._stash.clear()
        self.transport.close()

    # -- raw messages ------------------------------------------------------------

    def next_id(self) -> int:
        """A fresh message id (16-bit, wrapping)."""
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        return msg_id

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Put ``data`` on the wire as is (it need not be a valid message)."""
        self.transport.send(data, list(fds))

    def send(self, cmd: int, payload: bytes = b"", *, fds: Sequence[int] = (), flags: int = 0,
             msg_id: int | None = None) -> int:
        """Send a command; returns its message id."""
        if msg_id is None:
            msg_id = self.next_id()
        header = HEADER.pack(msg_id, cmd, HEADER_SIZE + len(payload), flags, 0)
        self.transport.send([header, payload], list(fds))
        return msg_id

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message from the server, or ``None`` after ``timeout`` seconds.

        Raw: nothing is routed, a reply another thread waits for included; use it from
        one thread, for tests of what exactly the server sends."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if self._pending:
                return self._pending.pop(0)
            frames = self.transport.receive()
            if frames:
                self._pending = [
                    Message(f.msg_id, f.cmd, f.flags, f.error_no, bytes(f.payload) if f.payload is not None else b"",
                            f.fds)
                    for f in frames
                ]
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not wait_readable(self.transport.sock, left):
                return None

    def wait_reply(self, msg_id: int, cmd: int, timeout: float | None = None) -> Message:
        """Wait for the reply to ``msg_id``, serving server requests meanwhile.

        Raises :class:`ErrorReply` for an error reply and :class:`ReplyTimeout`.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                reply = self._stash.pop(msg_id, None)
            if reply is not None:
                break
            if time.monotonic() >= deadline:
                raise ReplyTimeout(f"no reply to {command_name(cmd)} #{msg_id} within {timeout}s")
            self._pump(deadline)
        if reply.cmd != cmd:
            _close_fds(reply.fds)
            raise ClientStateError(f"reply #{msg_id} is for {command_name(reply.cmd)}, expected {command_name(cmd)}")
        if reply.is_error:
            _close_fds(reply.fds)
            raise ErrorReply(command_name(cmd), reply.error_no)
        return reply

    def request(self, cmd: int, payload: bytes = b"", *, fds: Sequence[int] = (), no_reply: bool = False,
                timeout: float | None = None) -> Message | None:
        """Send a command and wait for its reply (unless ``no_reply``)."""
        if not self.negotiated and cmd != Command.VERSION:
            raise ClientStateError("negotiate the version first")
        msg_id = self.send(cmd, payload, fds=fds, flags=MsgFlags.NO_REPLY if no_reply else 0)
        if no_reply:
            return None
        return self.wait_reply(msg_id, cmd, timeout)

    def _pump(self, deadline: float) -> None:
        """Read one message, as the only reader, and route it: a reply to the stash (where its
        waiter, on any thread, finds it), a server request to :meth:`serve_request`. If another
        thread is reading, wait for it instead."""
        with self._cond:
            if self._reading:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
                return
            self._reading = True
        msg = None
        try:
            msg = self.receive(max(0.0, deadline - time.monotonic()))
        finally:
            with self._cond:
                self._reading = False
                if msg is not None and msg.is_reply:
                    self._stash[msg.msg_id] = msg
                self._cond.notify_all()
        if msg is not None and not msg.is_reply:
            self.serve_request(msg)

    @contextlib.contextmanager
    def serving(self):
        """``with client.serving():`` answers the server's DMA requests on a thread of its own
        while the block runs, so a device may do DMA while this thread does something else
        (QEMU's client answers them from its main loop the same way). Requests made from the
        block still get their replies."""
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                try:
                    self._pump(time.monotonic() + 0.05)
                except (ConnectionClosed, OSError, ValueError):  # closed under us: nothing left to serve
                    return

        thread = threading.Thread(target=loop, name="vfiouser-client-dma", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(5)

    def serve_request(self, msg: Message) -> None:
        """Answer a server-to-client command (DMA_READ / DMA_WRITE)."""
        _close_fds(msg.fds)
        reply_payload = b""
        err = 0
        try:
            if msg.cmd not in (Command.DMA_READ, Command.DMA_WRITE) or self.dma_handler is None:
                raise UnsupportedCommand(f"{command_name(msg.cmd)} is not served by this client")
            addr, count = DMA_ACCESS.unpack_from(msg.payload)
            data = msg.payload[DMA_ACCESS.size :]
            result = self.dma_handler(msg.cmd, addr, count, data)
            reply_payload = DMA_ACCESS.pack(addr, count) + (result or b"")
        except (OSError, VfioUserError) as exc:  # a dma_handler may raise either
            err = exc.errno or errno.EIO
        except Exception:
            err = errno.EIO
        if msg.flags & MsgFlags.NO_REPLY:
            return
        if err:
            self.transport.send(HEADER.pack(msg.msg_id, msg.cmd, HEADER_SIZE, MsgType.REPLY | MsgFlags.ERROR, err))
        else:
            header = HEADER.pack(msg.msg_id, msg.cmd, HEADER_SIZE + len(reply_payload), MsgType.REPLY, 0)
            self.transport.send([header, reply_payload])

    # -- commands ----------------------------------------------------------------

    def negotiate(self, caps: dict | None = None, major: int = 0, minor: int = 0) -> dict:
        """VERSION: announce ``caps`` (default: like QEMU) and return the server's capabilities."""
        text = json.dumps(DEFAULT_CLIENT_CAPS if caps is None else caps)
        reply = self.request(Command.VERSION, Version.build(dict(major=major, minor=minor, json=text)))
        got = Version.parse(reply.payload)
        self.server_version = (got.major, got.minor)
        self.server_caps = json.loads(got.json).get("capabilities", {}) if got.json else {}
        self.negotiated = True
        return self.server_caps

    def get_info(self):
        """DEVICE_GET_INFO: ``(flags, num_regions, num_irqs)``."""
        reply = self.request(Command.DEVICE_GET_INFO, Layout.DEVICE_INFO.pack(Layout.DEVICE_INFO.size, 0, 0, 0))
        _, flags, num_regions, num_irqs = Layout.DEVICE_INFO.unpack_from(reply.payload)
        return flags, num_regions, num_irqs

    def get_region_info(self, index: int, argsz: int = 32) -> RegionInfoResult:
        """DEVICE_GET_REGION_INFO; re-asks with a bigger ``argsz`` if capabilities did not fit."""
        reply = self.request(Command.DEVICE_GET_REGION_INFO, Layout.REGION_INFO.pack(argsz, 0, index, 0, 0, 0))
        info = RegionInfoReply.parse(reply.payload)
        if info.argsz > argsz and argsz == 32:
            _close_fds(reply.fds)
            return self.get_region_info(index, info.argsz)
        caps = parse_region_caps(reply.payload, info.cap_offset) if info.cap_offset else []
        fd = reply.fds[0] if reply.fds else None
        _close_fds(reply.fds[1:])
        return RegionInfoResult(info.argsz, info.flags, info.index, info.cap_offset, info.size, info.offset, caps, fd)

    def get_irq_info(self, index: int) -> tuple[int, int]:
        """DEVICE_GET_IRQ_INFO: ``(flags, count)``."""
        reply = self.request(Command.DEVICE_GET_IRQ_INFO, Layout.IRQ_INFO.pack(Layout.IRQ_INFO.size, 0, index, 0))
        _, flags, _, count = Layout.IRQ_INFO.unpack_from(reply.payload)
        return flags, count

    def set_irqs(self, index: int, flags: int, start: int = 0, count: int = 1, *, fds: Sequence[int] = (),
                 data: bytes = b"") -> None:
        """DEVICE_SET_IRQS."""
        payload = Layout.IRQ_SET.pack(Layout.IRQ_SET.size + len(data), flags, index, start, count) + data
        self.request(Command.DEVICE_SET_IRQS, payload, fds=fds)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        """REGION_READ: ``count`` bytes at ``offset`` of ``region``."""
        reply = self.request(Command.REGION_READ, REGION_ACCESS.pack(offset, region, count))
        got_offset, got_region, got_count = REGION_ACCESS.unpack_from(reply.payload)
        data = reply.payload[REGION_ACCESS.size :]
        if (got_offset, got_region, got_count) != (offset, region, count) or len(data) != count:
            raise ClientStateError(f"REGION_READ reply does not match the request: {reply!r}")
        return data

    def region_write(self, region: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        """REGION_WRITE; ``posted`` sets NO_REPLY, like QEMU for memory BAR writes."""
        self.request(Command.REGION_WRITE, REGION_ACCESS.pack(offset, region, len(data)) + data, no_reply=posted)

    def region_write_multi(self, writes: Sequence[tuple[int, int, bytes]], *, posted: bool = True) -> None:
        """REGION_WRITE_MULTI of ``(region, offset, data)`` writes (data <= 8 bytes each)."""
        payload = Layout.WRITE_MULTI_COUNT.pack(len(writes)) + b"".join(
            Layout.WRITE_MULTI_ENTRY.pack(offset, region, len(data), data.ljust(8, b"\0")) for region, offset, data in writes
        )
        self.request(Command.REGION_WRITE_MULTI, payload, no_reply=posted)

    def bring_up(self, **kwargs) -> dict[int, int]:
        """Do what firmware does at boot (:func:`vfiouser.devices.pci.firmware.assign_bars`):
        give every BAR an address and turn decoding and bus mastering on, so the BARs answer.
        Returns ``{bar index: address}``."""
        return assign_bars(self.config_read, self.config_write, **kwargs)

    def config_read(self, offset: int, size: int = 4) -> int:
        """Read a config-space register (region 7) as a little-endian integer."""
        return int.from_bytes(self.region_read(7, offset, size), "little")

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        """Write a config-space register (region 7)."""
        self.region_write(7, offset, value.to_bytes(size, "little"))

    def dma_map(self, addr: int, size: int, flags: int = 3, *, fd: int | None = None, offset: int = 0,
                no_reply: bool = False) -> None:
        """DMA_MAP ``[addr, addr+size)``; with ``fd`` the server may mmap it."""
        payload = Layout.DMA_MAP.pack(Layout.DMA_MAP.size, flags, offset, addr, size)
        self.request(Command.DMA_MAP, payload, fds=[fd] if fd is not None else [], no_reply=no_reply)

    def dma_unmap(self, addr: int, size: int, flags: int = 0) -> None:
        """DMA_UNMAP ``[addr, addr+size)``."""
        self.request(Command.DMA_UNMAP, Layout.DMA_UNMAP.pack(Layout.DMA_UNMAP.size, flags, addr, size))

    def reset(self) -> None:
        """DEVICE_RESET."""
        self.request(Command.DEVICE_RESET)
