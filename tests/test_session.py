"""The server session, driven with the Python client: behaviour, validation and error replies.

Every malformed-input test checks two things: the error reply (or, with
NO_REPLY, the absence of any reply) and that the session still works after it.
"""

import dataclasses
import errno
import json
import mmap
import os
import time

import pytest

from vfiouser.devices.idio16 import Idio16
from vfiouser.client import Client
from vfiouser.errors import ConnectionClosed, ErrorReply
from vfiouser.protocol import (
    HEADER,
    REGION_ACCESS,
    Layout,
    RegionCapId,
    Command,
    DeviceFlags,
    IrqIndex,
    IrqInfoFlags,
    IrqSetFlags,
    MsgFlags,
    MsgType,
    RegionFlags,
    Version,
    build_region_caps,
)

from .conftest import eventfd, fired, open_fds
from .probe import ProbeDevice

F = IrqSetFlags
EVENTFD_TRIGGER = F.DATA_EVENTFD | F.ACTION_TRIGGER
NONE_TRIGGER = F.DATA_NONE | F.ACTION_TRIGGER


@pytest.fixture
def probe(serve):
    dev = ProbeDevice()
    server = serve(dev)
    return dev, server


@pytest.fixture
def client(probe):
    _, server = probe
    with Client.connect(server.path) as c:
        c.bring_up()
        yield c


def alive(c: Client) -> None:
    """The session still answers."""
    assert c.config_read(0) == 0xBEEF1234


def expect_error(c: Client, err: int, cmd: int, payload: bytes = b"", *, fds=(), flags: int = 0):
    msg_id = c.send(cmd, payload, fds=fds, flags=flags)
    with pytest.raises(ErrorReply) as exc:
        c.wait_reply(msg_id, cmd)
    assert exc.value.errno == err, errno.errorcode.get(exc.value.errno)



def set_irq_payload(flags, index, start, count, data=b"", argsz=None):
    layout = Layout.IRQ_SET
    return layout.pack(argsz if argsz is not None else 20 + len(data), flags, index, start, count) + data


# ------------------------------------------------------------------ negotiation


def test_version_reply_fits_qemus_request_and_advertises_caps(probe):
    _, server = probe
    with Client.connect(server.path, negotiate=False) as c:
        caps = {"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535,
                                 "max_data_xfer_size": 1048576,
                                 "migration": {"max_bitmap_size": 268435456, "pgsize": 4096},
                                 "write_multiple": True}}
        payload = Version.build(dict(major=0, minor=0, json=json.dumps(caps)))
        assert 16 + len(payload) == 214  # byte for byte what QEMU 11.1.3 sends
        msg_id = c.send(Command.VERSION, payload)
        reply = c.wait_reply(msg_id, Command.VERSION)
        assert 16 + len(reply.payload) <= 214
        got = Version.parse(reply.payload)
        assert (got.major, got.minor) == (0, 0)
        assert json.loads(got.json)["capabilities"] == {
            "max_msg_fds": 16, "max_data_xfer_size": 1 << 20, "pgsizes": 4096, "max_dma_maps": 65535,
            "write_multiple": True,
        }


def test_version_reply_shrinks_to_fit_a_small_request(probe):
    _, server = probe
    with Client.connect(server.path, negotiate=False) as c:
        msg_id = c.send(Command.VERSION, Version.build(dict(major=0, minor=0, json='{"capabilities":{}}')))
        reply = c.wait_reply(msg_id, Command.VERSION)
        assert len(reply.payload) <= 4 + len('{"capabilities":{}}') + 1
        c.negotiated = True
        alive(c)


@pytest.mark.parametrize(
    "payload",
    [
        Version.build(dict(major=1, minor=0, json="{}")),
        Version.build(dict(major=0, minor=0, json="[1, 2]")),
        Version.build(dict(major=0, minor=0, json="{not json")),
        Version.build(dict(major=0, minor=0, json='{"capabilities": {"max_msg_fds": "16"}}')),
        Version.build(dict(major=0, minor=0, json='{"capabilities": {"max_msg_fds": 5000}}')),
        Version.build(dict(major=0, minor=0, json='{"capabilities": {"write_multiple": 1}}')),
        Version.build(dict(major=0, minor=0, json='{"capabilities": []}')),
        b"\0\0\0\0{}",  # JSON without its NUL
        b"\0\0",  # too short
    ],
    ids=["major1", "not-object", "bad-json", "string-fds", "too-many-fds", "int-bool", "caps-list", "no-nul",
         "short"],
)
def test_bad_version_is_refused_and_closes(probe, payload):
    _, server = probe
    with Client.connect(server.path, negotiate=False) as c:
        expect_error(c, errno.EINVAL, Command.VERSION, payload)
        with pytest.raises(ConnectionClosed):  # then the server hangs up
            c.receive(timeout=2)
    with Client.connect(server.path) as again:  # the server goes on
        alive(again)


def test_first_message_must_be_version(probe):
    _, server = probe
    with Client.connect(server.path, negotiate=False) as c:
        expect_error(c, errno.EINVAL, Command.DEVICE_GET_INFO, bytes(16))
    with Client.connect(server.path) as c:
        alive(c)


def test_version_with_fds_is_refused(probe, no_fd_leak):
    _, server = probe
    fd = eventfd()
    with Client.connect(server.path, negotiate=False) as c:
        expect_error(c, errno.EINVAL, Command.VERSION, Version.build(dict(major=0, minor=0, json="{}")), fds=[fd])
    os.close(fd)
    server.wait_idle(2)


def test_second_version_is_an_error_but_not_fatal(client):
    expect_error(client, errno.EINVAL, Command.VERSION, Version.build(dict(major=0, minor=0, json="{}")))
    alive(client)


# ------------------------------------------------------------------ device information


def test_get_info(client):
    flags, num_regions, num_irqs = client.get_info()
    assert flags == DeviceFlags.PCI | DeviceFlags.RESET and num_regions == 9 and num_irqs == 5


def test_get_region_info(client):
    sizes = [client.get_region_info(i).size for i in range(9)]
    assert sizes == [0x1000, 0, 16, 0, 0x4000, 0, 0x800, 256, 0]
    assert client.get_region_info(0).flags == RegionFlags.READ | RegionFlags.WRITE
    assert client.get_region_info(6).flags == RegionFlags.READ
    assert client.get_region_info(1).flags == 0


def test_region_info_argsz_too_small_and_bad_index(client):
    layout = Layout.REGION_INFO
    expect_error(client, errno.EINVAL, Command.DEVICE_GET_REGION_INFO, layout.pack(16, 0, 0, 0, 0, 0))
    expect_error(client, errno.EINVAL, Command.DEVICE_GET_REGION_INFO, layout.pack(32, 0, 9, 0, 0, 0))
    expect_error(client, errno.EINVAL, Command.DEVICE_GET_REGION_INFO, layout.pack(32, 0, 0, 0, 0, 0)[:20])
    alive(client)


def test_region_info_too_small_for_its_capabilities(probe, client):
    """QEMU asks with argsz 32; a region with capabilities answers with the size it needs, no caps
    and no CAPS flag; asked again with that size, it sends them."""
    _, server = probe
    caps, cap_offset = build_region_caps([dict(id=RegionCapId.TYPE, version=1, body=dict(type=0x8086, subtype=7))])
    entries = list(server.regions.entries)
    entries[0] = dataclasses.replace(entries[0], caps=caps, cap_offset=cap_offset)
    server.regions.entries = tuple(entries)
    layout = Layout.REGION_INFO
    reply = client.request(Command.DEVICE_GET_REGION_INFO, layout.pack(32, 0, 0, 0, 0, 0))
    assert len(reply.payload) == 32
    argsz, flags, index, cap_offset, size, _ = layout.unpack_from(reply.payload)
    assert (argsz, flags & RegionFlags.CAPS, cap_offset, size) == (48, 0, 0, 0x1000)
    info = client.get_region_info(0)  # the client re-asks with argsz 48
    assert info.argsz == 48 and info.flags & RegionFlags.CAPS and info.cap_offset == 32
    assert [(c.id, c.body.type, c.body.subtype) for c in info.caps] == [(RegionCapId.TYPE, 0x8086, 7)]


def test_get_irq_info(client):
    assert client.get_irq_info(IrqIndex.INTX) == (
        IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED, 1)
    assert client.get_irq_info(IrqIndex.MSI)[1] == 0
    assert client.get_irq_info(IrqIndex.ERR) == (IrqInfoFlags.EVENTFD | IrqInfoFlags.NORESIZE, 1)
    with pytest.raises(ErrorReply) as exc:
        client.get_irq_info(5)
    assert exc.value.errno == errno.EINVAL
    alive(client)


def test_get_region_io_fds_offers_none(client):
    layout = Layout.IO_FDS
    reply = client.request(Command.DEVICE_GET_REGION_IO_FDS, layout.pack(16, 0, 0, 0))
    assert layout.unpack_from(reply.payload) == (16, 0, 0, 0)


# ------------------------------------------------------------------ region access


def test_config_and_bar_access(probe, client):
    dev, _ = probe
    client.region_write(0, 0x20, b"\x01\x02\x03\x04")
    assert client.region_read(0, 0x20, 4) == b"\x01\x02\x03\x04"
    assert dev.ram.mem[0x20:0x24] == b"\x01\x02\x03\x04"
    client.config_write(0x10, 0xFFFFFFFF)
    assert client.config_read(0x10) == 0xFFFFF000


def test_posted_write_then_read_sees_it(probe, client):
    """Pipelined without waiting: the read after a NO_REPLY write observes the write."""
    client.send(Command.REGION_WRITE, REGION_ACCESS.pack(0x40, 0, 4) + b"\xde\xad\xbe\xef", flags=MsgFlags.NO_REPLY)
    msg_id = client.send(Command.REGION_READ, REGION_ACCESS.pack(0x40, 0, 4))
    reply = client.wait_reply(msg_id, Command.REGION_READ)
    assert reply.payload[16:] == b"\xde\xad\xbe\xef"
    assert not client._stash  # no reply came for the posted write


def test_pipelined_requests_are_answered_in_order(client):
    ids = [client.send(Command.REGION_READ, REGION_ACCESS.pack(0, 7, 4)) for _ in range(200)]
    got = []
    while len(got) < len(ids):
        got.append(client.receive().msg_id)
    assert got == ids


@pytest.mark.parametrize(
    "offset, region, count, err",
    [
        (0, 9, 4, errno.EINVAL),  # no such region
        (0, 1, 4, errno.EINVAL),  # absent BAR
        (0xFFE, 0, 4, errno.EINVAL),  # past the end
        (0, 0, 0, errno.EINVAL),  # zero bytes
        (0, 4, (1 << 20) + 1, errno.E2BIG),  # larger than max_data_xfer_size
    ],
)
def test_out_of_range_region_read(client, offset, region, count, err):
    expect_error(client, err, Command.REGION_READ, REGION_ACCESS.pack(offset, region, count))
    alive(client)


def test_region_write_count_must_match_data(client):
    expect_error(client, errno.EINVAL, Command.REGION_WRITE, REGION_ACCESS.pack(0, 0, 4) + b"\x01\x02")
    expect_error(client, errno.EINVAL, Command.REGION_READ, REGION_ACCESS.pack(0, 0, 4) + b"extra")
    expect_error(client, errno.EACCES, Command.REGION_WRITE, REGION_ACCESS.pack(0, 6, 1) + b"\x00")
    alive(client)


def test_posted_bad_write_gets_no_reply_and_session_goes_on(client):
    client.send(Command.REGION_WRITE, REGION_ACCESS.pack(0, 9, 1) + b"\x00", flags=MsgFlags.NO_REPLY)
    client.send(99, b"", flags=MsgFlags.NO_REPLY)  # unknown command, NO_REPLY
    alive(client)
    assert client.receive(timeout=0.2) is None  # nothing else arrived


def test_device_model_exception_becomes_eio(client, caplog):
    expect_error(client, errno.EIO, Command.REGION_READ, REGION_ACCESS.pack(0x808, 0, 4))
    expect_error(client, errno.EIO, Command.REGION_WRITE, REGION_ACCESS.pack(0x808, 0, 1) + b"\x01")
    assert "probe fault register" in caplog.text
    alive(client)


def test_region_write_multi(probe, client):
    dev, _ = probe
    client.region_write_multi([(0, 0x100, b"\x01"), (0, 0x101, b"\x02\x03"), (4, 0x10, b"\xff" * 8)], posted=False)
    assert dev.ram.mem[0x100:0x103] == b"\x01\x02\x03" and dev.ram64.mem[0x10:0x18] == b"\xff" * 8
    client.region_write_multi([(0, 0x200, b"\x09")])  # posted: no reply
    assert client.region_read(0, 0x200, 1) == b"\x09"


def test_region_write_multi_drops_only_the_refused_writes(probe, client):
    """Each write of a REGION_WRITE_MULTI is a posted bus write of its own: a refused one is
    dropped and reported, the others land in order; a malformed message changes nothing."""
    dev, _ = probe
    count, entry = Layout.WRITE_MULTI_COUNT, Layout.WRITE_MULTI_ENTRY
    good = entry.pack(0x300, 0, 1, b"\x07".ljust(8, b"\0"))
    later = entry.pack(0x301, 0, 1, b"\x08".ljust(8, b"\0"))
    bad = entry.pack(0, 9, 1, bytes(8))
    expect_error(client, errno.EINVAL, Command.REGION_WRITE_MULTI, count.pack(3) + good + bad + later)
    assert dev.ram.mem[0x300:0x302] == b"\x07\x08"
    dev.ram.mem[0x300:0x302] = b"\0\0"
    expect_error(client, errno.EINVAL, Command.REGION_WRITE_MULTI, count.pack(0))
    expect_error(client, errno.EINVAL, Command.REGION_WRITE_MULTI, count.pack(201) + good * 201)
    expect_error(client, errno.EINVAL, Command.REGION_WRITE_MULTI, count.pack(2) + good)
    expect_error(client, errno.EINVAL, Command.REGION_WRITE_MULTI, count.pack(2) + good + entry.pack(0, 0, 9, bytes(8)))
    assert dev.ram.mem[0x300] == 0  # malformed: nothing was written
    alive(client)


# ------------------------------------------------------------------ malformed messages


def test_short_payloads(client):
    expect_error(client, errno.EINVAL, Command.REGION_READ, b"\x00" * 4)
    expect_error(client, errno.EINVAL, Command.DMA_MAP, b"\x00" * 20)
    expect_error(client, errno.EINVAL, Command.DEVICE_GET_INFO, b"")
    expect_error(client, errno.EINVAL, Command.DEVICE_SET_IRQS, b"\x00" * 19)
    alive(client)


def test_bad_argsz(client):
    expect_error(client, errno.EINVAL, Command.DEVICE_GET_INFO, Layout.DEVICE_INFO.pack(8, 0, 0, 0))
    expect_error(client, errno.EINVAL, Command.DEVICE_GET_IRQ_INFO, Layout.IRQ_INFO.pack(4, 0, 0, 0))
    expect_error(client, errno.EINVAL, Command.DMA_MAP, Layout.DMA_MAP.pack(16, 3, 0, 0, 0x1000))
    expect_error(client, errno.EINVAL, Command.DEVICE_SET_IRQS, set_irq_payload(NONE_TRIGGER, 0, 0, 1, argsz=40))
    alive(client)


def test_unknown_and_unsupported_commands(client):
    expect_error(client, errno.ENOSYS, 99)
    expect_error(client, errno.ENOSYS, 14)  # DIRTY_PAGES, removed from the spec
    expect_error(client, errno.EINVAL, Command.DMA_READ, bytes(16))  # a server-to-client command
    expect_error(client, errno.EOPNOTSUPP, Command.DEVICE_FEATURE, (16).to_bytes(4, "little")
                 + ((1 << 16) | 1).to_bytes(4, "little"))
    expect_error(client, errno.EINVAL, Command.DEVICE_FEATURE, (8).to_bytes(4, "little") + bytes(4))
    expect_error(client, errno.EOPNOTSUPP, Command.MIG_DATA_READ, bytes(8))
    alive(client)


@pytest.mark.parametrize("announced", [(1 << 20) + 8192, 0xFFFF_FFFF - 16])
def test_an_oversized_message_is_refused_and_ends_the_connection(probe, announced):
    """Its size cannot be trusted (4 GiB announced, nothing sent): EMSGSIZE, then the connection
    closes, and the next client is served at once."""
    _, server = probe
    c = Client.connect(server.path)
    msg_id = c.next_id()
    c.send_raw(HEADER.pack(msg_id, Command.REGION_WRITE, 16 + announced, 0, 0) + bytes(64))
    reply = c.receive(timeout=5)
    assert reply.msg_id == msg_id and reply.is_error and reply.error_no == errno.EMSGSIZE
    with pytest.raises(ConnectionClosed):  # then end of stream
        assert c.receive(timeout=5) is None, "the server kept the connection open"
    c.close()
    assert server.wait_idle(5)
    with Client.connect(server.path) as again:
        alive(again)


def test_unknown_message_type(client):
    expect_error(client, errno.EINVAL, Command.REGION_READ, REGION_ACCESS.pack(0, 7, 4), flags=0x2)
    alive(client)


def test_unexpected_reply_from_client_is_dropped(client):
    client.send_raw(HEADER.pack(777, Command.DMA_READ, 16, MsgType.REPLY, 0))
    alive(client)


def test_unframeable_header_drops_only_that_connection(probe):
    _, server = probe
    c = Client.connect(server.path)
    c.send_raw(HEADER.pack(5, Command.REGION_READ, 8, 0, 0))
    reply = c.receive(timeout=2)
    assert reply is not None and reply.is_error and reply.error_no == errno.EINVAL
    assert server.wait_idle(2)
    c.close()
    with Client.connect(server.path) as again:
        alive(again)


# ------------------------------------------------------------------ interrupts


def test_intx_eventfd_fires_and_is_automasked(probe, client, no_fd_leak):
    dev, _ = probe
    fd = eventfd()
    client.set_irqs(IrqIndex.INTX, EVENTFD_TRIGGER, 0, 1, fds=[fd])
    client.region_write(0, 0x800, b"\x01")  # device asserts INTx
    assert fired(fd) == 1
    client.region_write(0, 0x800, b"\x00")
    client.region_write(0, 0x800, b"\x01")  # asserted again, but still masked
    assert fired(fd, 0.1) == 0
    client.set_irqs(IrqIndex.INTX, F.DATA_NONE | F.ACTION_UNMASK, 0, 1)  # guest EOI
    assert fired(fd) == 1  # still asserted: signalled again
    client.region_write(0, 0x800, b"\x00")
    client.set_irqs(IrqIndex.INTX, F.DATA_NONE | F.ACTION_UNMASK, 0, 1)
    assert fired(fd, 0.1) == 0
    client.set_irqs(IrqIndex.INTX, NONE_TRIGGER, 0, 0)  # disable
    dev.raise_intx()
    assert fired(fd, 0.1) == 0
    os.close(fd)


def test_intx_disable_bit_gates_the_eventfd(probe, client):
    dev, _ = probe
    fd = eventfd()
    client.set_irqs(IrqIndex.INTX, EVENTFD_TRIGGER, 0, 1, fds=[fd])
    client.config_write(0x04, 0x0400, 2)  # INTx disable
    dev.raise_intx()
    assert fired(fd, 0.1) == 0
    client.config_write(0x04, 0x0000, 2)  # enable: the pending level is signalled
    assert fired(fd) == 1
    os.close(fd)


def test_intx_resample_eventfd_unmasks(probe, client):
    dev, _ = probe
    trigger, resample = eventfd(), eventfd()
    client.set_irqs(IrqIndex.INTX, EVENTFD_TRIGGER, 0, 1, fds=[trigger])
    client.set_irqs(IrqIndex.INTX, F.DATA_NONE | F.ACTION_MASK, 0, 1)
    client.set_irqs(IrqIndex.INTX, F.DATA_EVENTFD | F.ACTION_UNMASK, 0, 1, fds=[resample])
    client.set_irqs(IrqIndex.INTX, F.DATA_NONE | F.ACTION_UNMASK, 0, 1)
    dev.raise_intx()
    assert fired(trigger) == 1
    os.eventfd_write(resample, 1)  # what KVM does on EOI
    assert fired(trigger) == 1  # still asserted: signalled again
    os.close(trigger)
    os.close(resample)


def test_trigger_by_none_and_bool(probe, client):
    fd = eventfd()
    client.set_irqs(IrqIndex.ERR, EVENTFD_TRIGGER, 0, 1, fds=[fd])
    client.set_irqs(IrqIndex.ERR, NONE_TRIGGER, 0, 1)
    assert fired(fd) == 1
    client.set_irqs(IrqIndex.ERR, F.DATA_BOOL | F.ACTION_TRIGGER, 0, 1, data=b"\x00")
    assert fired(fd, 0.1) == 0
    client.set_irqs(IrqIndex.ERR, F.DATA_BOOL | F.ACTION_TRIGGER, 0, 1, data=b"\x01")
    assert fired(fd) == 1
    client.set_irqs(IrqIndex.ERR, EVENTFD_TRIGGER, 0, 1)  # no fd: vector without eventfd
    client.set_irqs(IrqIndex.ERR, NONE_TRIGGER, 0, 1)
    assert fired(fd, 0.1) == 0
    os.close(fd)


@pytest.mark.parametrize(
    "flags, index, start, count, nfds, data",
    [
        (F.DATA_NONE | F.DATA_BOOL | F.ACTION_TRIGGER, 0, 0, 1, 0, b"\x01"),  # two data types
        (F.DATA_NONE, 0, 0, 1, 0, b""),  # no action
        (F.DATA_NONE | F.ACTION_MASK | F.ACTION_UNMASK, 0, 0, 1, 0, b""),  # two actions
        (NONE_TRIGGER | 0x40, 0, 0, 1, 0, b""),  # unknown flag bit
        (NONE_TRIGGER, 5, 0, 1, 0, b""),  # index out of range
        (NONE_TRIGGER, 0, 1, 1, 0, b""),  # start beyond the vectors
        (NONE_TRIGGER, 0, 0, 2, 0, b""),  # start+count beyond
        (F.DATA_NONE | F.ACTION_MASK, 0, 0, 0, 0, b""),  # count 0 without NONE|TRIGGER
        (NONE_TRIGGER, 3, 1, 0, 0, b""),  # count 0 with start != 0
        (F.DATA_NONE | F.ACTION_MASK, 3, 0, 1, 0, b""),  # ERR takes TRIGGER only
        (NONE_TRIGGER, 1, 0, 1, 0, b""),  # MSI has no vectors on this device
        (NONE_TRIGGER, 0, 0, 1, 1, b""),  # fds without DATA_EVENTFD
        (EVENTFD_TRIGGER, 0, 0, 1, 2, b""),  # fd count != vector count
        (F.DATA_BOOL | F.ACTION_TRIGGER, 0, 0, 1, 0, b""),  # BOOL without its byte
        (NONE_TRIGGER, 0, 0, 1, 0, b"\x01"),  # data without BOOL
        (F.DATA_EVENTFD | F.ACTION_MASK, 0, 0, 1, 1, b""),  # MASK takes no eventfd
        (F.DATA_EVENTFD | F.ACTION_UNMASK, 3, 0, 1, 1, b""),  # unmask eventfd only for INTx
    ],
)
def test_set_irqs_validation(client, no_fd_leak, flags, index, start, count, nfds, data):
    fds = [eventfd() for _ in range(nfds)]
    expect_error(client, errno.EINVAL, Command.DEVICE_SET_IRQS, set_irq_payload(flags, index, start, count, data),
                 fds=fds)
    for fd in fds:
        os.close(fd)
    alive(client)


# ------------------------------------------------------------------ DMA


def memfd(size):
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def test_dma_map_with_fd_is_mmapped_shared(probe, client):
    _, server = probe
    fd = memfd(0x20000)
    client.dma_map(0x100000, 0x10000, 3, fd=fd, offset=0x10000)
    region = server.session.dma_maps.find(0x100000, 0x10000)
    assert region is not None and region.mem is not None and len(region.mem) == 0x10000
    with mmap.mmap(fd, 0x20000) as guest:
        guest[0x10010:0x10014] = b"ping"
        assert bytes(region.mem[0x10:0x14]) == b"ping"  # same memory, no copy
        region.mem[0x20:0x24] = b"pong"
        assert guest[0x10020:0x10024] == b"pong"
    os.close(fd)


def test_dma_map_without_fd_and_read_only(probe, client):
    _, server = probe
    client.dma_map(0xFFFC0000, 0x40000, 1)
    region = server.session.dma_maps.find(0xFFFC0000, 0x1000)
    assert region.mem is None and region.readable and not region.writable
    fd = memfd(0x1000)
    client.dma_map(0x0, 0x1000, 1, fd=fd)
    os.close(fd)
    assert server.session.dma_maps.find(0, 0x1000).mem.readonly


def test_dma_map_rules(probe, client, no_fd_leak):
    _, server = probe
    client.dma_map(0x10000, 0x10000)
    expect_error(client, errno.EEXIST, Command.DMA_MAP, _dma_map(0x18000, 0x10000))
    before = server.session.dma_maps.find(0x10000, 1)
    client.dma_map(0x10000, 0x10000)  # the very same map again (QEMU does it): replaced
    assert server.session.dma_maps.find(0x10000, 1) is not before
    expect_error(client, errno.EEXIST, Command.DMA_MAP, _dma_map(0x10000, 0x10000, flags=1))  # other rights
    assert server.session.dma_maps.find(0x10000, 1).flags == 3
    expect_error(client, errno.EINVAL, Command.DMA_MAP, _dma_map(0x40000, 0, ))
    expect_error(client, errno.EINVAL, Command.DMA_MAP, _dma_map(0x40000, 0x1000, flags=0x10))
    expect_error(client, errno.EINVAL, Command.DMA_MAP, _dma_map(2**64 - 0x1000, 0x2000))
    a, b = memfd(0x1000), memfd(0x1000)
    expect_error(client, errno.EINVAL, Command.DMA_MAP, _dma_map(0x40000, 0x1000), fds=[a, b])
    os.close(a)
    os.close(b)
    expect_error(client, errno.ENOENT, Command.DMA_UNMAP, _dma_unmap(0x10000, 0x8000))
    reply = client.request(Command.DMA_UNMAP, _dma_unmap(0x10000, 0x10000))
    assert reply.payload == _dma_unmap(0x10000, 0x10000)  # the request, echoed
    assert len(server.session.dma_maps) == 0
    alive(client)


def test_dma_unmap_all(probe, client):
    _, server = probe
    for i in range(4):
        client.dma_map(i * 0x10000, 0x1000)
    expect_error(client, errno.EINVAL, Command.DMA_UNMAP, _dma_unmap(0x1000, 0, flags=2))
    expect_error(client, errno.EOPNOTSUPP, Command.DMA_UNMAP, _dma_unmap(0, 0x1000, flags=1))
    client.dma_unmap(0, 0, flags=2)
    assert len(server.session.dma_maps) == 0


def _dma_map(addr, size, flags=3, offset=0):
    return Layout.DMA_MAP.pack(32, flags, offset, addr, size)


def _dma_unmap(addr, size, flags=0):
    return Layout.DMA_UNMAP.pack(24, flags, addr, size)


# ------------------------------------------------------------------ reset and life cycle


def test_device_reset(serve, backend):
    dev = Idio16()
    server = serve(dev, backend=backend)
    with Client.connect(server.path) as c:
        c.bring_up()
        c.region_write(2, 0, b"\xff")
        assert dev.outputs == 0xFF
        c.config_write(0x04, 0x1, 2)
        c.reset()
        assert dev.outputs == 0 and c.config_read(0x04, 2) == 0


def test_vanished_client_leaves_nothing_and_the_next_meets_a_powered_on_device(serve, backend):
    dev = ProbeDevice()
    server = serve(dev, backend=backend)
    before = open_fds()
    c = Client.connect(server.path)
    c.bring_up()
    fds = [eventfd(), eventfd()]
    c.set_irqs(IrqIndex.INTX, EVENTFD_TRIGGER, 0, 1, fds=[fds[0]])
    c.set_irqs(IrqIndex.ERR, EVENTFD_TRIGGER, 0, 1, fds=[fds[1]])
    ram = memfd(0x100000)
    c.dma_map(0, 0x100000, fd=ram)
    c.region_write(0, 0, b"kept")
    for fd in fds + [ram]:
        os.close(fd)
    c.transport.sock.close()  # vanish without a word, like QEMU at exit
    assert server.wait_idle(5)
    time.sleep(0.05)
    assert open_fds() - before == set()  # eventfds, memfd mapping and socket all released
    with open("/proc/self/maps") as f:
        assert "guest-ram" not in f.read()
    with Client.connect(server.path) as again:  # a new machine: the device as it was built
        assert again.config_read(0x10) == 0 and again.config_read(0x04, 2) == 0
        again.bring_up()
        assert again.region_read(0, 0, 4) == b"\0\0\0\0"
    assert server.sessions_served == 2


def test_a_model_may_keep_its_state_for_the_next_client(serve, backend):
    class KeepingProbe(ProbeDevice):
        power_cycle_on_disconnect = False

    server = serve(KeepingProbe(), backend=backend)
    with Client.connect(server.path) as c:
        c.bring_up()
        c.region_write(0, 0, b"kept")
    assert server.wait_idle(5)
    with Client.connect(server.path) as again:  # a warm reset only: BARs unprogrammed, data kept
        assert again.config_read(0x04, 2) == 0
        again.bring_up()
        assert again.region_read(0, 0, 4) == b"kept"


def test_second_client_while_busy_gets_ebusy(probe, client):
    _, server = probe
    with Client.connect(server.path, negotiate=False) as second:
        expect_error(second, errno.EBUSY, Command.VERSION, Version.build(dict(major=0, minor=0, json="{}")))
    alive(client)


def test_a_model_that_fails_to_reset_when_its_client_leaves_does_not_hurt_the_server(serve, caplog, backend):
    class Brittle(ProbeDevice):
        def reset(self, kind):
            raise SystemExit("broken reset")

    server = serve(Brittle(), backend=backend)
    with Client.connect(server.path) as c:
        alive(c)
    assert server.wait_idle(5)
    assert "failed to reset after its client left" in caplog.text
    with Client.connect(server.path) as again:
        alive(again)
    assert server.wait_idle(5)


def test_region_write_multi_with_an_empty_write_is_malformed(probe, client):
    dev, _ = probe
    count, entry = Layout.WRITE_MULTI_COUNT, Layout.WRITE_MULTI_ENTRY
    good = entry.pack(0x300, 0, 1, b"\x07".ljust(8, b"\0"))
    expect_error(client, errno.EINVAL, Command.REGION_WRITE_MULTI, count.pack(2) + good + entry.pack(0, 0, 0, bytes(8)))
    assert dev.ram.mem[0x300] == 0
    alive(client)
