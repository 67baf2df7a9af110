"""Hardening: nothing a client sends or leaves behind, and nothing a model does, can stall, spin,
leak or kill the server. One test per defect found by probing the server as an attacker and as a
careless device author would; each failed before its fix."""

import errno
import fcntl
import os
import resource
import socket
import struct
import termios
import time

import pytest

from vfiouser.client import Client
from vfiouser.protocol import Command, IrqIndex, IrqSetFlags, Layout, MsgFlags

from .conftest import eventfd
from .probe import ProbeDevice

F = IrqSetFlags
EVENTFD_TRIGGER = F.DATA_EVENTFD | F.ACTION_TRIGGER
NONE_TRIGGER = F.DATA_NONE | F.ACTION_TRIGGER


@pytest.fixture
def client(serve):
    server = serve(ProbeDevice())
    with Client.connect(server.path) as c:
        c.server = server
        yield c


def alive(c: Client, timeout: float = 5.0) -> None:
    assert c.request(Command.REGION_READ, Layout.REGION_ACCESS.pack(0, 7, 4), timeout=timeout).payload[16:] == \
        (0xBEEF1234).to_bytes(4, "little")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def trigger_err(c: Client, times: int) -> None:
    msg = Layout.IRQ_SET.pack(20, NONE_TRIGGER, IrqIndex.ERR, 0, 1)
    for _ in range(times):
        c.send(Command.DEVICE_SET_IRQS, msg, flags=MsgFlags.NO_REPLY)


# 1. A client-supplied interrupt fd can block the server forever.

def test_an_interrupt_fd_that_is_a_full_blocking_pipe_never_blocks_the_server(client, caplog):
    r, w = os.pipe()  # blocking, and nobody reads it: the 8,193rd write would block
    client.set_irqs(IrqIndex.ERR, EVENTFD_TRIGGER, 0, 1, fds=[w])
    os.close(w)
    trigger_err(client, 9000)
    alive(client)
    assert "cannot be signalled" in caplog.text and caplog.text.count("cannot be signalled") == 1
    os.close(r)


def test_an_eventfd_at_its_maximum_never_blocks_the_server(client):
    fd = eventfd()
    os.set_blocking(fd, True)  # as the client made it: blocking
    os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)
    client.set_irqs(IrqIndex.ERR, EVENTFD_TRIGGER, 0, 1, fds=[fd])
    trigger_err(client, 3)
    alive(client)
    assert os.eventfd_read(fd) == 0xFFFF_FFFF_FFFF_FFFE
    os.close(fd)


# 4. A dead INTx resample fd makes the server spin.

@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_dead_resample_fd_is_dropped_not_spun_on(client, caplog, kind):
    if kind == "pipe":
        fd, other = os.pipe()
        os.close(other)  # the writer is gone: the read end is readable (EOF) for ever
    else:
        a, b = socket.socketpair()
        b.close()
        fd = a.detach()
    trigger = eventfd()
    client.set_irqs(IrqIndex.INTX, EVENTFD_TRIGGER, 0, 1, fds=[trigger])
    os.close(trigger)
    client.set_irqs(IrqIndex.INTX, F.DATA_EVENTFD | F.ACTION_UNMASK, 0, 1, fds=[fd])
    os.close(fd)
    alive(client)
    before = cpu_seconds()
    time.sleep(0.5)
    assert cpu_seconds() - before < 0.2, "the server spins on a dead fd"
    assert "resample fd" in caplog.text and "dead" in caplog.text
    alive(client)


# 7. DMA_MAP with an fd and a size or offset of 2**63 or more got EIO from an OverflowError.

def memfd(size: int) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize("offset, size", [(0, 1 << 63), (1 << 63, 0x1000), (0, 0xFFFF_FFFF_FFFF_F000),
                                          (0x1000, 0x1000)])  # the last: past the end of the 4 KiB file
def test_a_dma_map_whose_fd_range_cannot_be_mapped_is_einval(client, offset, size):
    fd = memfd(0x1000)
    payload = Layout.DMA_MAP.pack(32, 3, offset, 0, size)
    if (offset, size) == (0, 1 << 63):  # exactly the bytes the probe sent
        assert payload.hex() == "2000000003000000" + "00" * 16 + "0000000000000080"
    msg_id = client.send(Command.DMA_MAP, payload, fds=[fd])
    os.close(fd)
    reply = client.receive(timeout=5)
    assert reply.msg_id == msg_id and reply.is_error and reply.error_no == errno.EINVAL
    alive(client)


# 8. A deeply nested VERSION JSON got EIO from a RecursionError and left the session half-negotiated.

@pytest.mark.parametrize("text", ['{"a":' * 2000 + "1" + "}" * 2000, "[" * 100000])
def test_deeply_nested_version_json_is_einval_and_closes(serve, text):
    server = serve(ProbeDevice())
    c = Client.connect(server.path, negotiate=False)
    payload = (0).to_bytes(2, "little") * 2 + text.encode() + b"\0"
    msg_id = c.send(Command.VERSION, payload)
    reply = c.receive(timeout=5)
    assert reply.msg_id == msg_id and reply.is_error and reply.error_no == errno.EINVAL
    assert server.wait_idle(5)  # the connection was closed
    c.close()
    with Client.connect(server.path) as again:
        alive(again)


# 15. A VERSION reply shortened for QEMU dropped the capabilities other clients need first.

def test_a_short_version_request_still_gets_max_msg_fds(serve, caplog):
    import json

    server = serve(ProbeDevice())
    c = Client.connect(server.path, negotiate=False)
    text = json.dumps({"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": 1048576}})
    assert len(text) < 70  # about what libvfio-user's own client sends (62 characters)
    reply = c.request(Command.VERSION, (0).to_bytes(4, "little") + text.encode() + b"\0")
    caps = json.loads(reply.payload[4:-1])["capabilities"]
    assert caps["max_msg_fds"] == 16 and "max_data_xfer_size" not in caps  # 1 MiB is what absence means
    assert "VERSION reply leaves out" in caplog.text
    c.close()


# 2. fds attached to fragments of an unfinished message piled up until accept() spun.

def test_fds_sent_with_fragments_of_a_message_are_closed_at_once(client):
    from .conftest import open_fds

    before = open_fds()
    header = Layout.HEADER.pack(client.next_id(), Command.REGION_WRITE, 16 + (512 << 10), 0, 0)
    client.send_raw(header)
    for _ in range(60):  # 1-byte fragments of its body, each carrying 16 fds
        fds = [eventfd() for _ in range(16)]
        client.send_raw(b"\0", fds)
        for fd in fds:
            os.close(fd)
    # The first fragment's fds may arrive in the same read as the header, and then belong to the
    # message (fds travel with a message's first bytes); no other fragment's may stay.
    def held_eventfds() -> int:
        kinds = []
        for fd in open_fds() - before:
            try:
                kinds.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # closed meanwhile
                pass
        return kinds.count("anon_inode:[eventfd]")

    def unread() -> int:
        """Bytes the server has not read yet (an AF_UNIX socket's send queue holds them, fds
        included, until the peer reads them)."""
        return struct.unpack("i", fcntl.ioctl(client.transport.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]

    # Only once every fragment is read can no new fd arrive: until then the count may dip to 16
    # between two fragments and rise again.
    deadline = time.monotonic() + 15
    while (unread() or held_eventfds() > 16) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert unread() == 0, "the server stopped reading the fragments"
    assert held_eventfds() <= 16, "the server holds fds sent with message fragments"


def child_server(tmp_path, nofile: int):
    """``vfiouser serve idio16`` in a child process whose fd limit is ``nofile``."""
    import subprocess
    import sys

    sock = str(tmp_path / "s.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vfiouser", "serve", "idio16", "--socket", sock],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
    assert proc.stdout.readline().startswith("-device")
    return proc, sock


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_child(proc) -> str:
    import signal

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    return err


def test_out_of_fds_the_server_neither_spins_nor_floods_its_log(tmp_path):
    proc, sock = child_server(tmp_path, nofile=48)
    conns = []
    try:
        for _ in range(80):  # far more connections than the server has fds for
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock)
            conns.append(s)
        time.sleep(0.3)
        before = proc_cpu_seconds(proc.pid)
        time.sleep(1.0)
        assert proc_cpu_seconds(proc.pid) - before < 0.3, "the server spins on accept()"
        for s in conns:
            s.close()
        conns.clear()
        time.sleep(0.3)
        with Client.connect(sock) as c:  # fds came back: served again
            assert c.config_read(0) == 0x0DC8494F
    finally:
        for s in conns:
            s.close()
        err = stop_child(proc)
    assert 1 <= err.count("out of file descriptors") <= 2


# 3. Interrupts were silently lost when fds ran out: the message now gets an error reply.

def test_a_message_whose_fds_could_not_arrive_gets_an_error_reply(tmp_path):
    from vfiouser.errors import ErrorReply

    proc, sock = child_server(tmp_path, nofile=40)
    flood = []
    try:
        with Client.connect(sock) as c:
            for _ in range(60):  # second clients, each holding one of the server's fds for a while
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock)
                flood.append(s)
            time.sleep(0.3)
            fd = eventfd()
            with pytest.raises(ErrorReply) as exc:  # never a success reply that loses the interrupt
                c.set_irqs(IrqIndex.INTX, EVENTFD_TRIGGER, 0, 1, fds=[fd])
            assert exc.value.errno == errno.EMFILE
            os.close(fd)
            for s in flood:
                s.close()
            flood.clear()
            assert c.config_read(0) == 0x0DC8494F
    finally:
        for s in flood:
            s.close()
        err = stop_child(proc)
    assert "control data truncated" in err


# 11. A client reconnecting right after an abrupt close got EBUSY.

def test_a_client_reconnecting_right_after_an_abrupt_close_is_served(serve):
    server = serve(ProbeDevice())
    for _ in range(100):
        c = Client.connect(server.path)
        c.transport.sock.close()  # gone without a word
        with Client.connect(server.path) as again:  # at once: no EBUSY
            alive(again)


def test_a_client_right_after_one_that_connected_and_left_without_a_word_is_served(serve):
    """Found by the fuzzer (a session cut before its first byte): the silent client's connection
    was handed to the serving thread but not taken yet when the next client came, and that one
    got EBUSY although nobody else was there."""
    server = serve(ProbeDevice())
    for _ in range(300):
        gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        gone.connect(server.path)
        gone.close()  # not a byte sent
        with Client.connect(server.path) as again:  # at once: no EBUSY
            alive(again)


# 12. virtio-rng trusted descriptor lengths: a 256 MiB writable descriptor (32 KiB mapped) took
#     RSS from 23 MB to 536 MB before failing.

def test_virtio_rng_never_produces_more_than_a_bounded_request_nor_for_unmapped_memory(serve):
    import mmap
    import struct

    from vfiouser.devices.virtio.rng import MAX_REQUEST, VirtioRng, entropy_stream

    from .test_virtio import BUFS, RAM, RAM_SIZE, Driver

    dev = VirtioRng(seed=7)
    server = serve(dev)
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM_SIZE)
    ram = mmap.mmap(fd, RAM_SIZE)
    with Client.connect(server.path) as c:
        c.bring_up()
        c.dma_map(RAM, RAM_SIZE, 3, fd=os.dup(fd))
        drv = Driver(c, ram)
        drv.negotiate(1 << 32)
        drv.setup_queue(vector=0xFFFF)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        drv.offer(0, BUFS, 256 << 20)  # claims 256 MiB, of which ~1 MiB is guest RAM
        drv.kick()
        deadline = time.monotonic() + 5
        while drv.used_idx() != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert drv.used(0) == (0, MAX_REQUEST) and dev.produced == MAX_REQUEST
        assert ram[BUFS : BUFS + 64] == entropy_stream(7, 64)
        struct.pack_into("<QIHH", ram, 16, 0x4000_0000, 4096, 2, 0)  # a buffer outside guest RAM
        struct.pack_into("<H", ram, 0x1000 + 4 + 2, 1)
        struct.pack_into("<H", ram, 0x1000 + 2, 2)
        drv.kick()
        deadline = time.monotonic() + 5
        while drv.used_idx() != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert drv.used(1) == (1, 0) and dev.produced == MAX_REQUEST  # returned empty
        growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        assert growth_kib < 32 * 1024
    ram.close()
    os.close(fd)


# 6. A deferred task that never returned silently stopped all later deferred work of its device.

def test_a_deferred_task_that_does_not_return_is_reported(caplog):
    import threading

    dev = ProbeDevice()
    dev.worker.stall_after = 0.2
    release, ran = threading.Event(), []
    dev.defer(release.wait, 10)
    dev.defer(ran.append, "later")
    deadline = time.monotonic() + 5
    while dev.worker.stalled is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dev.worker.stalled is not None and dev.worker.stalled[1] >= 0.2
    assert "has run for" in caplog.text and ran == []  # the later task waits behind it
    release.set()
    assert dev.worker.wait_idle(5) and ran == ["later"]
    deadline = time.monotonic() + 2
    while dev.worker.stalled is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dev.worker.stalled is None and dev.worker.stalls == 1 and "finished after" in caplog.text
    dev.worker.stop()


# 5. A model raising SystemExit, KeyboardInterrupt, GeneratorExit (any BaseException) ended the server.

@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_any_exception_in_a_model_becomes_an_error_reply(serve, caplog, exc):
    from vfiouser.iomgr import DeviceIo

    class Raises(DeviceIo):
        def read(self, base, offset, data):
            raise exc("from the model")

    dev = ProbeDevice()
    dev.bars[0].unmap(0x800)
    dev.bars[0].map(Raises(), 0x800, 0x10)
    server = serve(dev)
    with Client.connect(server.path) as c:
        c.bring_up()
        msg_id = c.send(Command.REGION_READ, Layout.REGION_ACCESS.pack(0x800, 0, 4))
        reply = c.receive(timeout=5)
        assert reply.msg_id == msg_id and reply.is_error and reply.error_no == errno.EIO
        alive(c)
        ran = []
        dev.defer(lambda: (_ for _ in ()).throw(exc("from a task")))  # and in deferred work
        dev.defer(ran.append, "next")
        assert dev.worker.wait_idle(5) and ran == ["next"]
    assert exc.__name__ in caplog.text


# 9. Memory grew by about 1.1 KB per session: two logging.Logger objects per client were never freed.
#    (tests/test_soak.py pins the server's RSS over 2,000 clients.)

def test_clients_leave_no_logger_behind(serve):
    import logging

    server = serve(ProbeDevice())
    with Client.connect(server.path) as c:  # the loggers made once (the test client's own among them)
        alive(c)
    assert server.wait_idle(5)
    before = set(logging.Logger.manager.loggerDict)
    for _ in range(30):
        with Client.connect(server.path) as c:
            alive(c)
    assert server.wait_idle(5)
    assert set(logging.Logger.manager.loggerDict) == before, "a logger per client is never freed"


# 10. Memory grew with distinct unclaimed accesses (the set of offsets already warned about).

def test_unclaimed_accesses_are_remembered_in_bounded_memory(caplog):
    import logging

    from vfiouser.devices.pci import MemoryBar, PciDevice
    from vfiouser.devices.pci.device import _UNCLAIMED_MEMORY

    from .conftest import served

    class Hollow(PciDevice):  # a 1 MiB BAR and no handler at all
        vendor_id, device_id = 0x1234, 0x0005

        def __init__(self):
            super().__init__()
            self.add_bar(0, MemoryBar(1 << 20))

    dev = Hollow()
    port = served(dev)
    caplog.set_level(logging.WARNING)
    buf = bytearray(4)
    for offset in range(0, 4 * 5000, 4):  # 5,000 distinct unclaimed offsets
        port.region_read(0, offset, buf)
    assert len(dev._unclaimed_seen) <= _UNCLAIMED_MEMORY
    assert caplog.text.count("unclaimed") == _UNCLAIMED_MEMORY  # a warning each, up to the bound


# 16. A handler stuck in a loop could not be stopped: SIGINT and SIGTERM only logged again.
# 17. A handler slower than QEMU's 5 s timeout broke the device silently.

@pytest.mark.parametrize("second_signal", [True, False], ids=["second-signal", "grace-period"])
def test_a_server_stuck_in_a_handler_still_stops_and_says_why(tmp_path, second_signal):
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sock = str(tmp_path / "stuck.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vfiouser", "serve", "tests.stuck_device:StuckDevice",
                             "--socket", sock], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("-device")
        c = Client.connect(sock)
        c.send(Command.REGION_READ, Layout.REGION_ACCESS.pack(0xFC, 7, 4))  # never answered
        time.sleep(2.6)  # past the watchdog's 2 s
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        if second_signal:
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.communicate(timeout=10)[1]
    assert took < (2 if second_signal else 7) and not os.path.exists(sock)
    assert "x-msg-timeout" in err and "exiting now" in err
    c.close()


# 12. A command the server refuses (a server-to-client command, an unsupported one) was raised
# from one stored exception, and every raise chained a new traceback onto it: each refused message
# kept its frames (and the payload they hold, which can pin a receive buffer) until the client left.

def test_refused_commands_are_forgotten_once_answered():
    import gc
    import json
    import logging
    import select
    import types

    from vfiouser.client import DEFAULT_CLIENT_CAPS
    from vfiouser.devices.pci.firmware import bring_up
    from vfiouser.protocol import HEADER, HEADER_SIZE, Version
    from vfiouser.session import Session

    def send(peer, cmd, payload, msg_id):
        peer.sendall(HEADER.pack(msg_id, int(cmd), HEADER_SIZE + len(payload), 0, 0) + payload)

    def live(kind) -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))

    dev = ProbeDevice()
    bring_up(dev.port)
    sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    session = Session(sock, dev.port, name="refused")

    def answer():
        """Serve until the reply is there (a large message may take more than one read)."""
        for _ in range(100):
            assert session.on_readable()
            if select.select([peer], [], [], 0)[0]:
                return peer.recv(4096)
        raise AssertionError("no reply")

    def refuse(n):
        for i in range(n):
            for cmd in (Command.DMA_WRITE, 0x7F):  # a server-to-client command, an unknown one
                send(peer, cmd, b"\0" * 4096, i)
                reply = answer()
                assert HEADER.unpack_from(reply)[1:3] == (int(cmd), HEADER_SIZE)
                assert HEADER.unpack_from(reply)[3] & MsgFlags.ERROR

    try:
        send(peer, Command.VERSION, Version.build(dict(major=0, minor=0, json=json.dumps(DEFAULT_CLIENT_CAPS))), 0)
        answer()
        refuse(5)
        logging.disable(logging.CRITICAL)  # pytest keeps every record, and a record holds its error
        frames, tracebacks = live(types.FrameType), live(types.TracebackType)
        refuse(100)
        assert live(types.FrameType) - frames < 20, "refused messages keep their frames alive"
        assert live(types.TracebackType) - tracebacks < 20, "refused messages keep their tracebacks alive"
    finally:
        logging.disable(logging.NOTSET)
        session.close()
        peer.close()
