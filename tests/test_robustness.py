"""Whatever a client does, the server keeps serving the next one; nothing leaks, nothing spins."""

import errno
import os
import socket
import time

import pytest

from vfiouser.devices.idio16 import Idio16
from vfiouser import server as server_module
from vfiouser.client import Client
from vfiouser.errors import ErrorReply
from vfiouser.protocol import HEADER, REGION_ACCESS, Command, MsgFlags, MsgType, Version

from .conftest import open_fds
from .probe import ProbeDevice


def next_client_works(server) -> None:
    assert server.wait_idle(5)
    with Client.connect(server.path) as c:
        assert c.config_read(0) in (0xBEEF1234, 0x0DC8494F)


def test_unframeable_header_from_a_client_already_gone(serve):
    """The error reply cannot be sent; the server thread must not die of it."""
    server = serve(ProbeDevice())
    c = Client.connect(server.path)
    c.send_raw(HEADER.pack(1, Command.REGION_READ, 8, 0, 0))
    c.transport.sock.close()
    next_client_works(server)


def test_large_reply_with_fd_numbers_above_1023(serve):
    """A 1 MiB reply fills the socket, so the server must wait for space; with the connection's
    fd number above FD_SETSIZE (1024) that wait must still work (poll, not select)."""
    from vfiouser.devices.pci import MemoryBar, PciDevice

    from .probe import Scratch

    class BigBar(PciDevice):
        vendor_id, device_id = 0x1234, 0xBEEF

        def __init__(self):
            super().__init__()
            self.big = Scratch(1 << 20)
            self.add_bar(0, MemoryBar(1 << 20)).map(self.big)

    dev = BigBar()
    dev.big.mem[-4:] = b"tail"
    server = serve(dev)
    filler = []
    try:
        while True:  # push the next fds (the accepted connection's too) above FD_SETSIZE
            fd = os.open("/dev/null", os.O_RDONLY)
            filler.append(fd)
            if fd > 1100:
                break
    except OSError:
        pytest.skip("cannot open 1100 fds here (ulimit -n too low)")
    try:
        with Client.connect(server.path) as c:
            assert c.transport.sock.fileno() > 1024
            c.bring_up()
            data = c.region_read(0, 0, 1 << 20)
            assert len(data) == 1 << 20 and data[-4:] == b"tail"
    finally:
        for fd in filler:
            os.close(fd)
    next_client_works(server)


def test_more_pipelined_replies_than_iov_max(serve):
    server = serve(ProbeDevice())
    with Client.connect(server.path) as c:
        burst = b"".join(HEADER.pack(i, Command.REGION_READ, 32, 0, 0) + REGION_ACCESS.pack(0, 7, 4)
                         for i in range(1, 1501))
        c.send_raw(burst)
        got = [c.receive(timeout=5) for _ in range(1500)]
        assert all(m is not None and not m.is_error for m in got)
        assert [m.msg_id for m in got] == list(range(1, 1501))


def test_tracer_failure_does_not_stop_the_device(sockdir):
    from vfiouser.server import serve_in_thread
    from vfiouser.trace import Tracer

    class Broken:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    with serve_in_thread(ProbeDevice(), os.path.join(sockdir, "t.sock"), tracer=Tracer(Broken())) as server:
        with Client.connect(server.path) as c:
            assert c.config_read(0) == 0xBEEF1234
            c.bring_up()
            c.region_write(0, 0, b"ok")
            assert c.region_read(0, 0, 2) == b"ok"
        next_client_works(server)


def test_nothing_runs_after_a_failed_version(serve):
    """A batch that starts without VERSION: every command is refused and the connection closes."""
    dev = Idio16()
    server = serve(dev)
    c = Client.connect(server.path, negotiate=False)
    write = lambda i, v: HEADER.pack(i, Command.REGION_WRITE, 33, 0, 0) + REGION_ACCESS.pack(0, 2, 1) + bytes([v])
    c.send_raw(write(1, 0x11) + write(2, 0x22))
    first = c.receive(timeout=2)
    assert first.is_error and first.error_no == errno.EINVAL
    assert dev.outputs == 0
    c.close()
    next_client_works(server)


def test_good_messages_before_an_unframeable_header_are_served(no_fd_leak, serve):
    class KeepingProbe(ProbeDevice):  # the RAM outlives the connection, so the test can look at it
        power_cycle_on_disconnect = False

    dev = KeepingProbe()
    server = serve(dev)
    c = Client.connect(server.path)
    c.bring_up()
    posted = HEADER.pack(9, Command.REGION_WRITE, 34, MsgFlags.NO_REPLY, 0) + REGION_ACCESS.pack(0, 0, 2) + b"hi"
    c.send_raw(posted + HEADER.pack(10, Command.REGION_READ, 8, 0, 0))
    reply = c.receive(timeout=2)
    assert reply.msg_id == 10 and reply.is_error
    assert server.wait_idle(5)
    assert bytes(dev.ram.mem[:2]) == b"hi"  # the posted write before the bad header was applied
    c.close()


def test_busy_client_with_a_partial_header_neither_spins_nor_leaks(serve, monkeypatch):
    monkeypatch.setattr(server_module, "BUSY_CLIENT_DEADLINE", 0.5)
    server = serve(ProbeDevice())
    with Client.connect(server.path) as c:
        before = open_fds()
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(server.path)
        second.send(b"\0" * 5)  # a third of a header, then nothing
        cpu = time.process_time()
        time.sleep(1.5)
        assert time.process_time() - cpu < 0.5, "the server loop spins"
        assert second.recv(16) == b""  # dropped after the deadline
        second.close()
        time.sleep(0.1)
        assert open_fds() - before == set()
        assert c.config_read(0) == 0xBEEF1234


def test_busy_client_that_vanishes_mid_header(serve):
    server = serve(ProbeDevice())
    with Client.connect(server.path) as c:
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(server.path)
        second.send(b"\0" * 7)
        second.close()
        cpu = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - cpu < 0.3
        assert c.config_read(0) == 0xBEEF1234


def test_second_client_gets_ebusy_with_its_message_id(serve):
    server = serve(ProbeDevice())
    with Client.connect(server.path):
        with Client.connect(server.path, negotiate=False) as second:
            msg_id = second.send(Command.VERSION, Version.build(dict(major=0, minor=0, json="{}")))
            reply = second.receive(timeout=2)
            assert (reply.msg_id, reply.error_no, reply.flags) == (msg_id, errno.EBUSY,
                                                                    MsgType.REPLY | MsgFlags.ERROR)


def test_unpollable_resample_fd_is_refused(no_fd_leak, serve, tmp_path):
    from vfiouser.protocol import IrqIndex, IrqSetFlags

    server = serve(ProbeDevice())
    path = tmp_path / "plain-file"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    with Client.connect(server.path) as c:
        with pytest.raises(ErrorReply) as exc:
            c.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_UNMASK, 0, 1, fds=[fd])
        assert exc.value.errno == errno.EINVAL
        assert c.config_read(0) == 0xBEEF1234
    os.close(fd)
    server.wait_idle(5)


def test_refused_then_accepted_resample_fd_leaves_nothing_polled_at_high_fd_numbers(no_fd_leak, serve, tmp_path):
    """The fds a client sends arrive above 256 (CPython caches smaller ints, so equal fd
    numbers are then distinct objects): the loop must still forget a resample eventfd when
    the session ends, or the client's copy keeps waking it and the number stays taken."""
    from vfiouser.protocol import IrqIndex, IrqSetFlags

    unmask = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_UNMASK
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(300)]
    path = tmp_path / "plain-file"
    path.write_bytes(b"")
    unpollable, resample = os.open(path, os.O_RDONLY), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        server = serve(ProbeDevice())
        with Client.connect(server.path) as c:
            with pytest.raises(ErrorReply):
                c.set_irqs(IrqIndex.INTX, unmask, 0, 1, fds=[unpollable])
            c.set_irqs(IrqIndex.INTX, unmask, 0, 1, fds=[resample])  # same number in the server
        assert server.wait_idle(5)
        os.eventfd_write(resample, 1)  # the client's copy is signalled after the session ended
        started = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - started < 0.2, "the server loop spins"
        next_client_works(server)
        next_client_works(server)
    finally:
        for fd in (*filler, unpollable, resample):
            os.close(fd)


def test_idle_busy_polling_server_sleeps(sockdir):
    """``--poll-us`` spins only after work: an idle server costs no CPU, even at its maximum."""
    import subprocess
    import sys

    sock = os.path.join(sockdir, "idle.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vfiouser", "serve", "idio16", "--socket", sock,
                             "--poll-us", "1000000"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        proc.stdout.readline()  # listening
        with Client.connect(sock) as c:  # some work first, then the client leaves
            c.config_read(0)
        time.sleep(1.5)  # the spin after the last message ends (1 s at most)

        def cpu_seconds() -> float:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = cpu_seconds()
        time.sleep(2.5)  # spans at least two of the loop's 1 s epoll timeouts
        assert cpu_seconds() - before < 0.25
    finally:
        proc.terminate()
        proc.wait(10)


def test_server_close_drops_waiting_second_clients(sockdir):
    from vfiouser.server import serve_in_thread

    with serve_in_thread(ProbeDevice(), os.path.join(sockdir, "c.sock")) as server:
        first = Client.connect(server.path)
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(server.path)
        time.sleep(0.1)
    assert second.recv(16) == b""  # closed by the server's shutdown
    second.close()
    first.close()


@pytest.mark.parametrize("where", ["Session.process", "Dispatcher.failed"])
def test_exception_in_a_connection_callback_ends_only_that_connection(serve, monkeypatch, where):
    """A bug in the serving code (not in a model) ends that connection, never the server: in the
    Python loop's processing, or in what the C loop calls (the dispatcher, to answer a model's
    exception)."""
    from vfiouser.dispatch import Dispatcher
    from vfiouser.errors import ErrorReply
    from vfiouser.session import Session

    owner, name = (Session, "process") if where == "Session.process" else (Dispatcher, "failed")
    server = serve(ProbeDevice(), fast_loop=owner is Dispatcher)
    original = getattr(owner, name)
    calls = {"n": 0}

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("bug in the serving code")
        return original(self, *args)

    monkeypatch.setattr(owner, name, flaky)
    c = Client.connect(server.path)
    if owner is Session:
        with pytest.raises(Exception):
            c.config_read(0)
    else:
        c.bring_up()
        with pytest.raises(ErrorReply):  # the probe's fault register: the model's exception, answered
            c.region_read(0, 0x808, 4)
        with pytest.raises(Exception) as info:  # answering it fails: the connection ends
            c.region_read(0, 0x808, 4)
        assert not isinstance(info.value, ErrorReply)
    c.close()
    monkeypatch.setattr(owner, name, original)
    next_client_works(server)
