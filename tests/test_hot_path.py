"""The REGION_READ/REGION_WRITE fast path answers exactly as the full dispatcher does.

A session that neither traces nor logs messages serves well-formed, in-bounds 1/2/4/8-byte
region accesses inline (see ``Dispatcher.dispatch``); a traced session sends every message
through the full handlers. The same message stream, valid and invalid, must produce the
same reply bytes and leave the device in the same state either way, and deferred work must
still wait for the reply of the batch that deferred it.
"""

import io
import json
import random
import socket
import time

import pytest

from vfiouser.client import DEFAULT_CLIENT_CAPS
from vfiouser.devices.pci.firmware import bring_up
from vfiouser.dispatch import Dispatcher
from vfiouser.protocol import HEADER, HEADER_SIZE, REGION_ACCESS, Command, MsgFlags, Version
from vfiouser.session import Session
from vfiouser.trace import Tracer

from .probe import ProbeDevice

READ, WRITE, INFO = int(Command.REGION_READ), int(Command.REGION_WRITE), int(Command.DEVICE_GET_INFO)
NO_REPLY = int(MsgFlags.NO_REPLY)
SENTINEL_ID = 0xFFFF


def message(cmd: int, payload: bytes = b"", flags: int = 0, msg_id: int = 0) -> bytes:
    return HEADER.pack(msg_id, cmd, HEADER_SIZE + len(payload), flags, 0) + payload


def access(offset: int, region: int, count: int) -> bytes:
    return REGION_ACCESS.pack(offset, region, count)


def stream(seed: int, n: int) -> list[bytes]:
    """``n`` region accesses, mostly valid, with every kind of invalid one mixed in."""
    rng = random.Random(seed)
    out = []
    for i in range(1, n + 1):
        flags = NO_REPLY if rng.random() < 0.2 else 0
        size = rng.choice([1, 2, 4, 8, 8, 4, 3, 16])
        region = rng.choice([0, 0, 0, 2, 4, 6, 7, 7, 9, 100])
        limit = {0: 0x800, 2: 16, 4: 0x4000, 6: 8, 7: 256}.get(region, 16)
        offset = rng.randrange(0, max(1, limit - size + 1))
        kind = rng.random()
        if kind < 0.05:
            size = 0  # zero-byte access
        elif kind < 0.10:
            offset = 0x10000  # out of bounds
        elif kind < 0.13:
            size = (1 << 20) + 1  # above max_data_xfer_size
        elif kind < 0.20:
            region, offset = 0, rng.choice([0x800, 0x804, 0x808])  # registers: counter, fault
            size = 4
        elif kind < 0.23:
            flags = rng.choice([0x1, 0x2, 0x20])  # a reply, an error, odd type bits
        if rng.random() < 0.5:
            payload = access(offset, region, size)
            if rng.random() < 0.03:
                payload = payload[:12]  # short
            out.append(message(READ, payload, flags, i))
        else:
            data = bytes(rng.randrange(256) for _ in range(min(size, 64)))
            count = size if rng.random() > 0.05 else size + 1  # count must match the data
            out.append(message(WRITE, access(offset, region, count) + data, flags, i))
    return out


class Rig:
    """A negotiated session on one end of a socketpair; the test holds the other end."""

    def __init__(self, traced: bool, device=None) -> None:
        self.device = ProbeDevice() if device is None else device
        bring_up(self.device.port)
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.trace = io.StringIO()
        self.session = Session(self.sock, self.device.port, name="rig",
                               tracer=Tracer(self.trace) if traced else None)
        version = Version.build(dict(major=0, minor=0, json=json.dumps(DEFAULT_CLIENT_CAPS)))
        self.exchange([message(int(Command.VERSION), version)])

    def exchange(self, messages: list[bytes], chunk: int = 7) -> bytes:
        """Send ``messages`` in chunks of ``chunk`` (each chunk is one batch for the
        session), then a DEVICE_GET_INFO; return every reply up to its answer."""
        messages = messages + [message(INFO, b"\0" * 16, 0, SENTINEL_ID)]
        replies = bytearray()
        self.peer.setblocking(False)
        for start in range(0, len(messages), chunk):
            self.peer.sendall(b"".join(messages[start : start + chunk]))
            assert self.session.on_readable()
            while True:
                try:
                    replies += self.peer.recv(1 << 20)
                except BlockingIOError:
                    break
        ends_with_sentinel = False
        pos = 0
        while pos + HEADER_SIZE <= len(replies):
            msg_id, _, size, _, _ = HEADER.unpack_from(replies, pos)
            pos += size
            ends_with_sentinel = msg_id == SENTINEL_ID and pos == len(replies)
        assert ends_with_sentinel, "the session did not answer everything"
        return bytes(replies)

    def state(self) -> tuple:
        dev = self.device
        return bytes(dev.ram.mem), bytes(dev.ram64.mem), dev.regs.writes, bytes(dev.config.data)

    def close(self) -> None:
        self.session.close()
        self.peer.close()


@pytest.fixture
def rigs():
    made = []

    def make(traced: bool, device=None) -> Rig:
        made.append(Rig(traced, device))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


@pytest.mark.parametrize("seed", range(4))
def test_fast_path_replies_and_state_match_the_full_dispatcher(rigs, seed, monkeypatch, caplog):
    full_path_accesses = []
    real_full = Dispatcher.full

    def counted_full(self, frame):
        if self.outbox.tracer is None and frame.cmd in (READ, WRITE):
            full_path_accesses.append(frame.msg_id)
        return real_full(self, frame)

    monkeypatch.setattr(Dispatcher, "full", counted_full)
    traced, fast = rigs(True), rigs(False)
    messages = stream(seed, 600)

    assert fast.exchange(messages) == traced.exchange(messages)
    assert fast.state() == traced.state()
    # The fast path really served the plain accesses: the untraced session sent only the
    # odd ones (invalid, odd flags) to the full handlers.
    plain = sum(1 for m in messages if HEADER.unpack_from(m)[3] in (0, NO_REPLY))
    assert 0 < len(full_path_accesses) < plain / 2
    assert traced.trace.getvalue().count("\n") > len(messages)  # traced: every message in and out


def needs_c_loop() -> None:
    """Skip where the C loop could not be built (no compiler); a failure where the suite
    requires every real part (scripts/test)."""
    from vfiouser import fastpath

    from .conftest import real_parts_required

    if not fastpath.AVAILABLE:
        if real_parts_required():
            pytest.fail("vfiouser._fastloop was not built (pip install needs a C compiler and Python's headers)")
        pytest.skip("vfiouser._fastloop was not built (no C compiler here)")


def _served_exchange(server, messages: list[bytes], chunk: int = 7) -> tuple[bytes, socket.socket]:
    """What Rig.exchange does, through a real server's socket (so its serving loop answers);
    the replies, and the socket, still open (the device is power-cycled once it closes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(server.path)
    sock.settimeout(10)
    version = Version.build(dict(major=0, minor=0, json=json.dumps(DEFAULT_CLIENT_CAPS)))
    sock.sendall(message(int(Command.VERSION), version))
    size = HEADER.unpack(sock.recv(HEADER_SIZE, socket.MSG_PEEK | socket.MSG_WAITALL))[2]
    sock.recv(size, socket.MSG_WAITALL)
    messages = messages + [message(INFO, b"\0" * 16, 0, SENTINEL_ID)]
    for start in range(0, len(messages), chunk):
        sock.sendall(b"".join(messages[start : start + chunk]))
    replies = bytearray()
    while True:
        head = sock.recv(HEADER_SIZE, socket.MSG_WAITALL)
        msg_id, _, size, _, _ = HEADER.unpack(head)
        replies += head + (sock.recv(size - HEADER_SIZE, socket.MSG_WAITALL) if size > HEADER_SIZE else b"")
        if msg_id == SENTINEL_ID:
            return bytes(replies), sock


@pytest.mark.parametrize("seed", range(4))
def test_the_c_loop_answers_as_the_full_dispatcher(rigs, serve, seed):
    """The same streams through a server whose serving thread runs the C loop
    (vfiouser._fastloop): the same replies, the same device state."""
    needs_c_loop()
    traced = rigs(True)
    dev = ProbeDevice()
    bring_up(dev.port)
    server = serve(dev)
    assert server.fast_loop
    messages = stream(seed, 600)
    replies, sock = _served_exchange(server, messages)
    try:
        assert replies == traced.exchange(messages)
        state = bytes(dev.ram.mem), bytes(dev.ram64.mem), dev.regs.writes, bytes(dev.config.data)
        assert state == traced.state()
    finally:
        sock.close()


def test_deferred_work_waits_for_the_reply_of_its_batch(rigs):
    rig = rigs(False)
    dev = rig.device
    started_before_reply = []
    replied = {"batch": 0}

    def task(batch):
        if replied["batch"] < batch:
            started_before_reply.append(batch)

    real_flush = rig.session.outbox.flush

    def flush():
        real_flush()
        replied["batch"] = current

    rig.session.outbox.flush = flush
    dev.regs.write = lambda base, offset, data: dev.defer(task, current)
    for current in range(1, 201):
        rig.exchange([message(WRITE, access(0x804, 0, 4) + b"\1\0\0\0", 0, 1),
                      message(READ, access(0, 0, 4), 0, 2)])
        time.sleep(0)  # let the worker run what it may
    assert dev.worker.wait_idle(5)
    assert started_before_reply == []


def test_deferred_work_waits_for_the_reply_of_its_batch_in_the_c_loop(serve):
    """The C loop holds the worker (DeviceWorker's common case done in C): a task deferred by a
    handler runs only once the reply is in the client's socket, and a held worker is let go."""
    needs_c_loop()
    dev = ProbeDevice()
    bring_up(dev.port)
    server = serve(dev)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(server.path)
    sock.settimeout(10)
    outcomes = []

    def task():
        try:  # the reply of the write that deferred us must already be there
            outcomes.append(("task", len(sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT))))
        except BlockingIOError:
            outcomes.append(("task", 0))

    def write(base, offset, data):
        outcomes.append(("held", dev.worker.held_here()))
        dev.defer(task)

    dev.regs.write = write
    try:
        version = Version.build(dict(major=0, minor=0, json=json.dumps(DEFAULT_CLIENT_CAPS)))
        sock.sendall(message(int(Command.VERSION), version))
        size = HEADER.unpack(sock.recv(HEADER_SIZE, socket.MSG_PEEK | socket.MSG_WAITALL))[2]
        sock.recv(size, socket.MSG_WAITALL)
        for i in range(1, 101):
            sock.sendall(message(WRITE, access(0x804, 0, 4) + b"\1\0\0\0", 0, i))
            sock.recv(HEADER_SIZE + 16, socket.MSG_PEEK | socket.MSG_WAITALL)  # the reply, left there
            deadline = time.monotonic() + 5
            while len(outcomes) < 2 * i and time.monotonic() < deadline:  # the task has run
                time.sleep(0.001)
            assert len(sock.recv(HEADER_SIZE + 16, socket.MSG_WAITALL)) == HEADER_SIZE + 16
        assert outcomes == [("held", True), ("task", HEADER_SIZE + 16)] * 100
        assert dev.worker._gate == 0 and not dev.worker.held_here()
    finally:
        sock.close()


def test_busy_polling_server_serves_in_order_and_stops_promptly(no_fd_leak, serve):
    from vfiouser.client import Client

    dev = ProbeDevice()
    server = serve(dev, poll_us=200)
    with Client.connect(server.path) as c:
        c.bring_up()
        for i in range(50):
            c.region_write(0, 4 * i, i.to_bytes(4, "little"))
            assert c.region_read(0, 4 * i, 4) == i.to_bytes(4, "little")
        c.region_write(0, 0x804, b"\0\0\0\0", posted=True)
        assert c.region_read(0, 0x804, 4) == (1).to_bytes(4, "little")  # the posted write arrived first
    assert server.wait_idle(5)  # the session ended: the loop went back to sleeping in epoll
    started = time.monotonic()
    server.stop()
    assert server._loop_done.wait(2)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("value", [-1, 2e6])
def test_poll_us_outside_its_range_is_refused(sockdir, value):
    import os

    from vfiouser.server import Server

    with pytest.raises(ValueError, match="poll_us"):
        Server(ProbeDevice(), os.path.join(sockdir, "p.sock"), poll_us=value)
    assert not os.path.exists(os.path.join(sockdir, "p.sock"))
