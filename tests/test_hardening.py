"""Hardening: nothing a client sends or leaves behind, and nothing a model does, can stall, spin,
leak or kill the server. One test per defect found by probing the server as an attacker and as a
careless device author would; each failed before its fix."""

import errno
import os
import resource
import socket
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
