"""virtio-blk and the virtqueue features it brings (indirect descriptors, event index), driven by
a small virtio driver over the Python client (no QEMU).

Guest RAM is a memfd the client maps (in-place DMA), or a bytearray it serves
with DMA messages (``message=True``). The driver lays out descriptor tables,
available and used rings by hand, as ``virtio_blk`` does, and reads what the
device wrote. The guest tests run Linux's own driver on the same model.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from vfiouser.client import Client
from vfiouser.devices.disk import DiskImageError
from vfiouser.devices.errors import DefinitionError
from vfiouser.devices.virtio.blk import S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, \
    T_WRITE_ZEROES, VirtioBlk
from vfiouser.devices.virtio.pci import STATUS_FEATURES_OK, STATUS_NEEDS_RESET
from vfiouser.protocol import Command as Msg, IrqIndex, IrqSetFlags

from .conftest import eventfd, fired

RAM, RAM_SIZE = 0x4000_0000, 0x20_0000
COMMON, NOTIFY, DEVCFG = 0x0000, 0x3000, 0x2000
DESC, AVAIL, USED, TABLES, BUFS = 0x0000, 0x4000, 0x5000, 0x8000, 0x2_0000
INDIRECT, EVENT_IDX, VERSION_1 = 1 << 28, 1 << 29, 1 << 32
QSIZE = 16
IMAGE = 4 << 20


class BlkDriver:
    """Just enough of virtio_blk: one queue, requests as descriptor chains (or indirect tables)."""

    def __init__(self, client: Client, *, message: bool) -> None:
        self.c = client
        if message:
            self.ram = bytearray(RAM_SIZE)
            client.dma_handler = self._serve
            client.dma_map(RAM, RAM_SIZE, 3)
        else:
            fd = os.memfd_create("ram", os.MFD_CLOEXEC)
            os.ftruncate(fd, RAM_SIZE)
            import mmap

            self.ram = mmap.mmap(fd, RAM_SIZE)
            client.dma_map(RAM, RAM_SIZE, 3, fd=fd)
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0
        self.vector_fd = None

    def _serve(self, cmd, addr, count, data):
        off = addr - RAM
        if cmd == Msg.DMA_READ:
            return bytes(self.ram[off : off + count])
        self.ram[off : off + count] = data
        return None

    def r(self, off, size):
        return int.from_bytes(self.c.region_read(4, off, size), "little")

    def w(self, off, value, size):
        self.c.region_write(4, off, value.to_bytes(size, "little"))

    def offered(self) -> int:
        out = 0
        for sel in (0, 1):
            self.w(COMMON + 0x00, sel, 4)
            out |= self.r(COMMON + 0x04, 4) << (32 * sel)
        return out

    def start(self, features: int, msix: bool = True) -> int:
        self.w(COMMON + 0x14, 0, 1)
        self.w(COMMON + 0x14, 3, 1)
        for sel in (0, 1):
            self.w(COMMON + 0x08, sel, 4)
            self.w(COMMON + 0x0C, features >> (32 * sel) & 0xFFFF_FFFF, 4)
        self.w(COMMON + 0x14, 3 | STATUS_FEATURES_OK, 1)
        if msix:
            pos = self.c.config_read(0x34, 1)
            while self.c.config_read(pos, 1) != 0x11:
                pos = self.c.config_read(pos + 1, 1)
            self.c.config_write(pos + 2, 0x8000, 2)
            self.vector_fd = eventfd()
            self.c.set_irqs(IrqIndex.MSIX, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 1, 1,
                            fds=[self.vector_fd])
        self.w(COMMON + 0x16, 0, 2)
        self.w(COMMON + 0x18, QSIZE, 2)
        for off, addr in ((0x20, DESC), (0x28, AVAIL), (0x30, USED)):
            self.w(COMMON + off, RAM + addr, 8)
        self.w(COMMON + 0x1A, 1 if msix else 0xFFFF, 2)
        self.w(COMMON + 0x1C, 1, 2)
        self.w(COMMON + 0x14, 3 | STATUS_FEATURES_OK | 4, 1)
        return self.r(COMMON + 0x14, 1)

    def status(self) -> int:
        return self.r(COMMON + 0x14, 1)

    def config(self, off: int, size: int) -> int:
        return self.r(DEVCFG + off, size)

    # -- requests ----------------------------------------------------------------------------

    def request(self, kind: int, sector: int, *, data: bytes = b"", read: int = 0, indirect: bool = False,
                one_buffer: bool = False, kick: bool = True) -> int:
        """Queue a request (header, data out or ``read`` bytes in, status) and kick; returns its
        buffer offset. ``one_buffer`` puts header and data in one descriptor (any layout)."""
        buf = BUFS + 0x4000 * (self.avail_idx % 32)
        header = struct.pack("<IIQ", kind, 0, sector)
        self.ram[buf : buf + 16] = header
        self.ram[buf + 16 : buf + 16 + len(data)] = data
        parts = []
        if one_buffer:
            parts.append((buf, 16 + len(data), 0))
        else:
            parts.append((buf, 16, 0))
            if data:
                parts.append((buf + 16, len(data), 0))
        if read:
            parts.append((buf + 0x1000, read, 2))
        self.ram[buf + 0x3FFF] = 0xAA
        parts.append((buf + 0x3FFF, 1, 2))
        if indirect:
            table = TABLES + 0x200 * (self.avail_idx % 16)
            for i, (addr, length, flags) in enumerate(parts):
                more = i + 1 < len(parts)
                struct.pack_into("<QIHH", self.ram, table + 16 * i, RAM + addr, length, flags | (1 if more else 0),
                                 i + 1 if more else 0)
            head = self.next_desc
            struct.pack_into("<QIHH", self.ram, DESC + 16 * head, RAM + table, 16 * len(parts), 4, 0)
            self.next_desc = (self.next_desc + 1) % QSIZE
        else:
            head = self.next_desc
            for i, (addr, length, flags) in enumerate(parts):
                index = (head + i) % QSIZE
                more = i + 1 < len(parts)
                struct.pack_into("<QIHH", self.ram, DESC + 16 * index, RAM + addr, length, flags | (1 if more else 0),
                                 (index + 1) % QSIZE if more else 0)
            self.next_desc = (head + len(parts)) % QSIZE
        struct.pack_into("<H", self.ram, AVAIL + 4 + 2 * (self.avail_idx % QSIZE), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.ram, AVAIL + 2, self.avail_idx)
        if kick:
            self.kick()
        return buf

    def kick(self) -> None:
        self.c.region_write(4, NOTIFY, (0).to_bytes(2, "little"), posted=True)

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.ram, USED + 2)[0]

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while (self.used_idx() - self.used_seen) & 0xFFFF < count:
            assert time.monotonic() < deadline, f"used index stuck at {self.used_idx()}"
            time.sleep(0.002)
        out = [struct.unpack_from("<II", self.ram, USED + 4 + 8 * ((self.used_seen + i) % QSIZE)) for i in range(count)]
        self.used_seen = (self.used_seen + count) & 0xFFFF
        return out

    def status_of(self, buf: int) -> int:
        return self.ram[buf + 0x3FFF]

    def run(self, kind: int, sector: int, **kw) -> tuple[int, int, bytes]:
        """A request, waited for: ``(status, used length, the bytes read)``."""
        buf = self.request(kind, sector, **kw)
        [(_, length)] = self.wait_used()
        read = kw.get("read", 0)
        return self.status_of(buf), length, bytes(self.ram[buf + 0x1000 : buf + 0x1000 + read])


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE)
    return str(path)


def _driver(serve, image, message=False, name="blk.sock", **kw):
    dev = VirtioBlk(file=image, **kw)
    server = serve(dev, name)
    client = Client.connect(server.path)
    client.bring_up()
    drv = BlkDriver(client, message=message)
    if message:
        drv._serving = client.serving()
        drv._serving.__enter__()
    return dev, drv


@pytest.fixture(params=[(False, True), (False, False), (True, True)], ids=["in-place", "worker", "messages"])
def blk(serve, image, request):
    message, inline = request.param
    dev, drv = _driver(serve, image, message=message, serial="SERIAL-42", inline_io=inline)
    assert drv.start(VERSION_1 | INDIRECT | EVENT_IDX | 1 << 9 | 1 << 13 | 1 << 14) & 4
    yield dev, drv
    if message:
        drv._serving.__exit__(None, None, None)
    drv.c.close()


def test_identity_features_and_configuration(serve, image):
    dev, drv = _driver(serve, image, num_queues=3)
    assert drv.c.config_read(0x00) == 0x10421AF4
    features = drv.offered()
    for bit in (1, 2, 6, 9, 10, 12, 13, 14, 28, 29, 32):  # SIZE_MAX ... MQ, DISCARD, WRITE_ZEROES, ring, 1.0
        assert features >> bit & 1, f"feature bit {bit} not offered"
    assert not features >> 5 & 1  # not read-only
    assert drv.config(0, 8) == IMAGE // 512  # capacity in sectors
    assert drv.config(12, 4) == 254 and drv.config(20, 4) == 512  # seg_max, blk_size
    assert drv.config(34, 2) == 3  # num_queues
    assert drv.r(COMMON + 0x12, 2) == 3 and drv.c.get_irq_info(IrqIndex.MSIX)[1] == 4  # a vector per queue + config
    drv.c.close()
    _, ro = _driver(serve, image, readonly=True, name="ro.sock")
    assert ro.offered() >> 5 & 1
    ro.c.close()


@pytest.mark.parametrize("indirect", [False, True], ids=["chain", "indirect"])
def test_reads_and_writes(blk, image, indirect):
    dev, drv = blk
    payload = os.urandom(8192)
    status, length, _ = drv.run(T_OUT, 10, data=payload, indirect=indirect)
    assert (status, length) == (S_OK, 1)
    with open(image, "rb") as f:
        f.seek(10 * 512)
        assert f.read(8192) == payload
    status, length, got = drv.run(T_IN, 10, read=8192, indirect=indirect)
    assert (status, length, got) == (S_OK, 8193, payload)  # the data and the status byte


def test_header_and_data_in_one_buffer(blk, image):
    dev, drv = blk
    assert drv.run(T_OUT, 3, data=b"any layout" * 52, one_buffer=True)[0] == S_IOERR  # 520 bytes: not whole sectors
    assert drv.run(T_OUT, 3, data=b"L" * 512, one_buffer=True)[0] == S_OK
    with open(image, "rb") as f:
        f.seek(3 * 512)
        assert f.read(512) == b"L" * 512


def test_flush_reaches_the_image_before_its_status(blk, monkeypatch):
    dev, drv = blk
    seen = []
    real = os.fdatasync

    def fdatasync(fd):
        seen.append(drv.used_idx())  # the request is not used yet while the image is synced
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    before = drv.used_idx()
    assert drv.run(T_FLUSH, 0)[:2] == (S_OK, 1)
    assert seen == [before] and dev.disk.stats.flushes == 1


def test_get_id_discard_and_write_zeroes(blk, image):
    dev, drv = blk
    assert drv.run(T_GET_ID, 0, read=20)[2] == b"SERIAL-42".ljust(20, b"\0")
    with open(image, "r+b") as f:
        f.write(b"\xff" * (1 << 20))
    ranges = struct.pack("<QII", 8, 16, 0) + struct.pack("<QII", 100, 4, 0)
    assert drv.run(T_WRITE_ZEROES, 0, data=ranges)[0] == S_OK
    with open(image, "rb") as f:
        data = f.read(1 << 20)
    assert data[8 * 512 : 24 * 512] == bytes(8192) and data[100 * 512 : 104 * 512] == bytes(2048)
    assert data[24 * 512 : 25 * 512] == b"\xff" * 512
    assert drv.run(T_DISCARD, 0, data=struct.pack("<QII", 256, 256, 0))[0] == S_OK


def test_bad_requests_get_an_error_status(blk):
    dev, drv = blk
    last = IMAGE // 512
    assert drv.run(T_IN, last - 1, read=1024)[0] == S_IOERR  # past the end
    assert drv.run(T_WRITE_ZEROES, 0, data=struct.pack("<QII", last, 1, 0))[0] == S_IOERR
    assert drv.run(99, 0)[0] == S_UNSUPP
    assert drv.run(T_IN, 0, read=512)[0] == S_OK  # and the device goes on


def test_read_only_disk_refuses_writes(serve, image):
    dev, drv = _driver(serve, image, readonly=True)
    drv.start(VERSION_1 | 1 << 5)
    assert drv.run(T_OUT, 0, data=b"x" * 512)[0] == S_IOERR
    assert drv.run(T_IN, 0, read=512)[0] == S_OK
    drv.c.close()


def test_a_chain_without_a_status_byte_needs_a_reset(blk):
    dev, drv = blk
    struct.pack_into("<QIHH", drv.ram, DESC, RAM + BUFS, 16, 0, 0)  # a header and nothing else
    struct.pack_into("<H", drv.ram, AVAIL + 4 + 2 * (drv.avail_idx % QSIZE), 0)
    drv.avail_idx += 1
    struct.pack_into("<H", drv.ram, AVAIL + 2, drv.avail_idx)
    drv.kick()
    deadline = time.monotonic() + 5
    while not drv.status() & STATUS_NEEDS_RESET:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_indirect_descriptors_need_the_feature(serve, image):
    dev, drv = _driver(serve, image)
    drv.start(VERSION_1)  # no INDIRECT_DESC
    drv.request(T_IN, 0, read=512, indirect=True)
    deadline = time.monotonic() + 5
    while not drv.status() & STATUS_NEEDS_RESET:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert drv.used_idx() == 0
    drv.c.close()


def test_event_index_suppresses_interrupts_and_asks_for_kicks(blk):
    dev, drv = blk
    used_event = AVAIL + 4 + 2 * QSIZE
    avail_event = USED + 4 + 8 * QSIZE
    fired(drv.vector_fd, 0.2)
    struct.pack_into("<H", drv.ram, used_event, 0xFFFF)  # "interrupt me only at used index 0xFFFF + 1"
    drv.run(T_IN, 0, read=512)
    assert fired(drv.vector_fd, 0.3) == 0
    assert struct.unpack_from("<H", drv.ram, avail_event)[0] == drv.avail_idx  # kick for the next one
    struct.pack_into("<H", drv.ram, used_event, drv.used_idx())  # interrupt for the next buffer used
    drv.run(T_IN, 0, read=512)
    assert fired(drv.vector_fd) == 1


def test_definition_errors(tmp_path, image):
    with pytest.raises(DiskImageError):
        VirtioBlk(file=str(tmp_path / "missing"))
    with pytest.raises(DefinitionError):
        VirtioBlk(file=image, num_queues=0)
    with pytest.raises(DefinitionError):
        VirtioBlk(file=image, queue_size=100)


def test_an_indirect_table_inside_another_needs_a_reset(blk):
    dev, drv = blk
    table = TABLES + 0x1000
    struct.pack_into("<QIHH", drv.ram, table, RAM + table + 0x100, 32, 4, 0)  # INDIRECT inside the table
    struct.pack_into("<QIHH", drv.ram, DESC, RAM + table, 16, 4, 0)
    struct.pack_into("<H", drv.ram, AVAIL + 4 + 2 * (drv.avail_idx % QSIZE), 0)
    drv.avail_idx += 1
    struct.pack_into("<H", drv.ram, AVAIL + 2, drv.avail_idx)
    drv.kick()
    deadline = time.monotonic() + 5
    while not drv.status() & STATUS_NEEDS_RESET:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert drv.used_idx() == 0


def test_a_large_request_and_those_after_it_go_to_the_worker_in_order(serve, image, monkeypatch):
    """A request over INLINE_LIMIT taken in the notification's handler is handed to the worker
    with its queue; until the worker is done with the queue, later kicks are not served beside it
    (two threads never serve one queue), and the requests complete in the order offered."""
    import threading

    from vfiouser.devices.virtio import blk as blk_module

    monkeypatch.setattr(blk_module, "INLINE_LIMIT", 4096)
    dev, drv = _driver(serve, image, inline_io=True)
    assert drv.start(VERSION_1 | INDIRECT | EVENT_IDX) & 4
    # Enabling the queue defers a kick of its own; on a loaded machine it may not have run yet, and
    # it would then take the requests below on the worker first. Let it finish.
    assert dev.worker.wait_idle(10) and dev._on_worker == {}
    gate = threading.Event()
    dev.defer(gate.wait, 10)  # the worker is busy until the gate opens
    payload = os.urandom(8192)
    big = drv.request(T_OUT, 40, data=payload)
    small = drv.request(T_IN, 40, read=512)
    time.sleep(0.2)
    assert drv.used_idx() == 0, "a request was served while the worker had its queue"
    gate.set()
    first, second = drv.wait_used(2)
    assert drv.status_of(big) == S_OK and drv.status_of(small) == S_OK
    assert (first[1], second[1]) == (1, 513)  # the write, then the read: offered order
    assert bytes(drv.ram[small + 0x1000 : small + 0x1000 + 512]) == payload[:512]
    assert dev.requests[T_OUT] == 1 and dev.requests[T_IN] == 1
    small_again = drv.request(T_IN, 41, read=512)  # the worker is done: served inline again
    drv.wait_used(1)
    assert drv.status_of(small_again) == S_OK and dev._on_worker == {}
    drv.c.close()
