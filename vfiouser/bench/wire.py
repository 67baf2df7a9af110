"""Raw protocol cost, without QEMU: the server's own processing, ping-pong and pipelining.

* **Server processing**, in process, no socket in the timed path: frames are
  handed straight to :class:`vfiouser.session.Session`'s dispatcher (the seam
  between the transport and the session; replies pile up in the session's
  outbox, which is cleared untimed). The device port alone
  (``port.region_read``) is timed too, to split the cost between the
  protocol layer and the PCI framework. A second figure goes through
  ``Session.on_readable`` with a burst of requests already waiting on the
  socket: framing, dispatch and the batched reply ``sendmsg`` together.
* **Ping-pong**: one small REGION_READ at a time against a server in its own
  process, with :class:`vfiouser.client.Client` and with a raw blocking socket
  (a prebuilt message), so the client's own cost shows.
* **Pipelined**: the Python client waits for each reply in ``request()``; its
  ``send``/``receive`` could pipeline but parse every reply into objects. The
  bench builds messages with :mod:`vfiouser.protocol` and keeps two batches of
  requests in flight on a raw socket, so the server is never idle waiting for
  the client. Posted writes (NO_REPLY) are streamed, then one read waits for
  the server to finish them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time

from vfiouser.devices.pci.firmware import bring_up

from ..client import DEFAULT_CLIENT_CAPS, Client
from ..protocol import HEADER, HEADER_SIZE, REGION_ACCESS, Command, Layout, MsgFlags, MsgType, Version
from ..session import Session
from ..transport import Frame
from .child import ChildServer, ServeSpec
from .device import BLOCK_BAR, REGS_STATUS, BenchDevice
from .stats import Summary

__all__ = ["SeamMissing", "ping_pong", "pipelined", "region_read_msg", "region_write_msg", "server_processing"]

log = logging.getLogger(__name__)

OFFSET = 0x10


def region_read_msg(msg_id: int, region: int = 0, offset: int = OFFSET, count: int = 4) -> bytes:
    """A whole REGION_READ message."""
    return HEADER.pack(msg_id, Command.REGION_READ, HEADER_SIZE + REGION_ACCESS.size, 0, 0) + \
        REGION_ACCESS.pack(offset, region, count)


def region_write_msg(msg_id: int, data: bytes, *, posted: bool, region: int = 0, offset: int = OFFSET) -> bytes:
    """A whole REGION_WRITE message (NO_REPLY if ``posted``)."""
    flags = MsgFlags.NO_REPLY if posted else 0
    return HEADER.pack(msg_id, Command.REGION_WRITE, HEADER_SIZE + REGION_ACCESS.size + len(data), flags, 0) + \
        REGION_ACCESS.pack(offset, region, len(data)) + data


def write_multi_msg(msg_id: int, writes: int, region: int = 0) -> bytes:
    """A REGION_WRITE_MULTI of ``writes`` 4-byte writes (posted, as QEMU sends it)."""
    body = Layout.WRITE_MULTI_COUNT.pack(writes) + b"".join(
        Layout.WRITE_MULTI_ENTRY.pack(OFFSET + 4 * (i % 64), region, 4, bytes(8)) for i in range(writes))
    return HEADER.pack(msg_id, Command.REGION_WRITE_MULTI, HEADER_SIZE + len(body), MsgFlags.NO_REPLY, 0) + body


def _frame(msg: bytes) -> Frame:
    msg_id, cmd, size, flags, error_no = HEADER.unpack_from(msg)
    return Frame(msg_id, cmd, size, flags, error_no, memoryview(msg)[HEADER_SIZE:], [])


class SeamMissing(RuntimeError):
    """The session no longer has the dispatcher this bench times (see the module docstring)."""


class _InProcessSession:
    """A session on one end of a socketpair, negotiated, for timing its dispatcher."""

    def __init__(self) -> None:
        self.device = BenchDevice()
        self.port = self.device.port
        bring_up(self.port)
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.session = Session(self.sock, self.port, name="bench")
        dispatcher = getattr(self.session, "dispatcher", None)
        if not callable(getattr(dispatcher, "dispatch", None)):
            raise SeamMissing("Session.dispatcher.dispatch(frame) is gone; the in-process timing needs a "
                              "way to hand the session one frame")
        version = Version.build(dict(major=0, minor=0, json=json.dumps(DEFAULT_CLIENT_CAPS)))
        dispatcher.dispatch(_frame(HEADER.pack(0, Command.VERSION, HEADER_SIZE + len(version), 0, 0) + version))
        self.session.outbox.queue.clear()

    def time_dispatch(self, msg: bytes, count: int) -> float:
        """Mean µs per dispatch of ``msg`` over ``count`` dispatches (replies dropped untimed)."""
        frame = _frame(msg)
        dispatch, out = self.session.dispatcher.dispatch, self.session.outbox.queue
        clock = time.perf_counter_ns
        total = 0
        done = 0
        while done < count:
            n = min(256, count - done)
            t0 = clock()
            for _ in range(n):
                dispatch(frame)
            total += clock() - t0
            out.clear()
            done += n
        return total / count / 1000.0

    def time_on_readable(self, msg: bytes, batch: int, batches: int, reply_size: int) -> float:
        """Mean µs per message through ``Session.on_readable`` with ``batch`` messages waiting."""
        burst = msg * batch
        clock = time.perf_counter_ns
        total = 0
        self.peer.settimeout(5.0)
        for _ in range(batches):
            self.peer.sendall(burst)
            t0 = clock()
            if not self.session.on_readable():
                raise RuntimeError("the in-process session closed")
            total += clock() - t0
            _recv_exact(self.peer, reply_size * batch)
        return total / (batch * batches) / 1000.0

    def time_model(self, count: int, region: int = 0) -> float:
        """Mean µs per ``port.region_read`` of 4 bytes (the device port: no protocol at all)."""
        buf = bytearray(4)
        read = self.port.region_read
        t0 = time.perf_counter_ns()
        for _ in range(count):
            read(region, OFFSET, buf)
        return (time.perf_counter_ns() - t0) / count / 1000.0

    def close(self) -> None:
        self.session.close()
        self.peer.close()


def _recv_exact(sock: socket.socket, size: int, buf: bytearray | None = None) -> bytearray:
    buf = buf if buf is not None else bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:size])
        if not n:
            raise ConnectionError("the server closed the connection")
        got += n
    return buf


def server_processing(iterations: int, repeats: int = 5) -> dict:
    """µs per message of the server's own work, in process (see the module docstring).

    Each figure is the median of ``repeats`` runs of ``iterations`` dispatches.
    """
    rig = _InProcessSession()
    try:
        def median_of(fn) -> float:
            values = sorted(fn() for _ in range(repeats))
            return values[len(values) // 2]

        data = b"\x01\x02\x03\x04"
        multi = write_multi_msg(1, 200)
        results = {
            "region_read_4": median_of(lambda: rig.time_dispatch(region_read_msg(1), iterations)),
            "region_write_4": median_of(lambda: rig.time_dispatch(region_write_msg(1, data, posted=False), iterations)),
            "region_write_4_posted": median_of(
                lambda: rig.time_dispatch(region_write_msg(1, data, posted=True), iterations)),
            "config_read_4": median_of(lambda: rig.time_dispatch(region_read_msg(1, region=7, offset=0), iterations)),
            "write_multi_200_per_write": median_of(
                lambda: rig.time_dispatch(multi, max(1, iterations // 200))) / 200.0,
            "model_region_read_4": median_of(lambda: rig.time_model(iterations)),
            # The same messages to BAR4, the register file declared on the register layer.
            "regs_region_read_4": median_of(
                lambda: rig.time_dispatch(region_read_msg(1, region=BLOCK_BAR), iterations)),
            "regs_region_write_4": median_of(
                lambda: rig.time_dispatch(region_write_msg(1, data, posted=False, region=BLOCK_BAR), iterations)),
            "regs_region_write_4_posted": median_of(
                lambda: rig.time_dispatch(region_write_msg(1, data, posted=True, region=BLOCK_BAR), iterations)),
            "regs_region_write_4_w1c": median_of(lambda: rig.time_dispatch(
                region_write_msg(1, data, posted=False, region=BLOCK_BAR, offset=REGS_STATUS), iterations)),
            "regs_model_region_read_4": median_of(lambda: rig.time_model(iterations, BLOCK_BAR)),
            "on_readable_read_4_batch256": median_of(
                lambda: rig.time_on_readable(region_read_msg(1), 256, max(1, iterations // 256), 36)),
        }
    finally:
        rig.close()
    for key, value in results.items():
        log.info("server processing %-28s %6.2f us", key, value)
    return results


def _connect_raw(path: str) -> tuple[Client, socket.socket]:
    """A negotiated connection whose socket is then used raw and blocking."""
    client = Client.connect(path)
    client.bring_up()
    sock = client.transport.sock
    sock.setblocking(True)
    sock.settimeout(10.0)
    return client, sock


def ping_pong(server: ChildServer, iterations: int, warmup: int) -> dict:
    """Round trip of a 4-byte REGION_READ, with the Python client and with a raw socket."""
    out = {}
    with Client.connect(server.spec.path) as client:
        client.bring_up()
        for _ in range(warmup):
            client.region_read(0, OFFSET, 4)
        samples = []
        clock = time.perf_counter_ns
        for _ in range(iterations):
            t0 = clock()
            client.region_read(0, OFFSET, 4)
            samples.append(clock() - t0)
        out["client"] = Summary.of_ns(samples).as_dict()
    client, sock = _connect_raw(server.spec.path)
    try:
        msg = region_read_msg(7)
        buf = bytearray(36)
        for _ in range(warmup):
            sock.sendall(msg)
            _recv_exact(sock, 36, buf)
        samples = []
        clock = time.perf_counter_ns
        for _ in range(iterations):
            t0 = clock()
            sock.sendall(msg)
            _recv_exact(sock, 36, buf)
            samples.append(clock() - t0)
        _check_reply(buf, Command.REGION_READ)
        out["raw"] = Summary.of_ns(samples).as_dict()
    finally:
        client.close()
    return out


def _check_reply(buf, cmd: int) -> None:
    _, got_cmd, _, flags, error_no = HEADER.unpack_from(buf)
    if got_cmd != cmd or flags != MsgType.REPLY:
        raise RuntimeError(f"unexpected reply: cmd {got_cmd} flags {flags:#x} errno {error_no}")


def pipelined(server: ChildServer, requests: int, batch: int = 256) -> dict:
    """Requests per second with two batches of ``batch`` REGION_READs in flight, and posted
    REGION_WRITEs per second streamed then synchronised by one read."""
    client, sock = _connect_raw(server.spec.path)
    try:
        burst = b"".join(region_read_msg(i) for i in range(batch))
        reply_bytes = 36 * batch
        buf = bytearray(reply_bytes)
        batches = max(2, requests // batch)
        sock.sendall(burst)  # warm-up batch
        _recv_exact(sock, reply_bytes, buf)
        t0 = time.perf_counter()
        sock.sendall(burst)
        for i in range(batches):
            if i + 1 < batches:
                sock.sendall(burst)
            _recv_exact(sock, reply_bytes, buf)
        elapsed = time.perf_counter() - t0
        _check_reply(buf[-36:], Command.REGION_READ)
        reads_per_s = batches * batch / elapsed

        wburst = b"".join(region_write_msg(i, b"\x11\x22\x33\x44", posted=True) for i in range(batch))
        t0 = time.perf_counter()
        for _ in range(batches):
            sock.sendall(wburst)
        sock.sendall(region_read_msg(1))
        _recv_exact(sock, 36, buf)
        elapsed_w = time.perf_counter() - t0
        _check_reply(buf, Command.REGION_READ)
        writes_per_s = batches * batch / elapsed_w
    finally:
        client.close()
    log.info("pipelined: %.0f REGION_READ/s, %.0f posted REGION_WRITE/s", reads_per_s, writes_per_s)
    return {"reads_per_s": reads_per_s, "posted_writes_per_s": writes_per_s, "requests": batches * batch,
            "batch": batch}


def run(*, iterations: int, pingpong_iterations: int, pipelined_requests: int,
        placements: list[tuple[str, tuple[int, ...] | None]]) -> dict:
    """The whole section. ``placements``: ``(label, server CPUs)`` to measure the socket figures under."""
    result = {"processing": server_processing(iterations)}
    result["socket"] = []
    directory = tempfile.mkdtemp(prefix="vfu-wire-")
    path = os.path.join(directory, "wire.sock")
    try:
        with ChildServer(ServeSpec(path)) as server:
            for label, cpus in placements:
                if cpus is not None:
                    server.pin(cpus)
                entry = {"placement": label, "ping_pong": ping_pong(server, pingpong_iterations,
                                                                    max(50, pingpong_iterations // 10))}
                entry["pipelined"] = pipelined(server, pipelined_requests)
                log.info("ping-pong (%s): client %.1f us, raw %.1f us", label,
                         entry["ping_pong"]["client"]["median"], entry["ping_pong"]["raw"]["median"])
                result["socket"].append(entry)
    finally:
        try:
            os.rmdir(directory)
        except OSError:
            pass
    return result
