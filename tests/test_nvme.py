"""The NVMe controller, driven by a small host driver over the Python client (no QEMU).

:mod:`tests.nvme_host` plays Linux's driver: it enables the controller through
its registers, creates queues in guest memory, submits commands and reads
their completions. Guest RAM is shared (in-place DMA) unless a test says
``message=True``. The guest tests (``test_guest_nvme.py``) run Linux's own
driver against the same model.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time

import pytest

from vfiouser.devices import DeviceLoadError, make_device
from vfiouser.devices.disk import DiskImageError, DiskIoError
from vfiouser.devices.errors import DefinitionError
from vfiouser.devices.nvme import NvmeController
from vfiouser.devices.nvme.queues import PrpError, prp_segments
from vfiouser.devices.nvme.spec import AdminOpcode, Command, NvmOpcode, Status

from .nvme_host import CC, CSTS, DATA, INTMC, INTMS, RAM, nvme_host

IMAGE_MB = 8


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_MB << 20)
    return str(path)


@pytest.fixture(params=[True, False], ids=["inline", "worker"])
def host(serve, image, request):
    """A controller with two I/O queue pairs, brought up; I/O queues run in their doorbell's
    handler (``inline``) or on the device's worker: the host must see no difference."""
    dev = NvmeController(file=image, serial="SN-1", queues=2, inline_io=request.param)
    server = serve(dev)
    with nvme_host(server) as h:
        h.bring_up(queues=2)
        h.dev = dev
        yield h


def test_identity_registers_and_msix(serve, image):
    dev = NvmeController(file=image, queues=3)
    server = serve(dev)
    with nvme_host(server) as h:
        assert h.c.config_read(0x08) >> 8 == 0x010802  # class: NVM Express I/O controller
        assert h.reg(0x00, 8) & 0xFFFF == 1023 and h.reg(0x00, 8) >> 16 & 1  # MQES, CQR
        assert h.reg(0x04) == 1 << 5  # CAP's upper half alone (Linux reads it so): NVM command set, 4 KiB pages
        assert h.reg(0x08) == 0x00010400  # version 1.4
        assert len(h.vector_fds) == 4  # one MSI-X vector per queue, admin included
        assert h.reg(CSTS) & 1 == 0
        h.enable()
        assert h.reg(CSTS) & 1 == 1
        h.set_reg(CC, 0)
        assert h.reg(CSTS) & 1 == 0


def test_enable_without_admin_queues_is_refused(serve, image):
    dev = NvmeController(file=image)
    server = serve(dev)
    with nvme_host(server) as h:
        h.set_reg(CC, 0x460001)
        assert h.reg(CSTS) & 1 == 0  # not ready: ASQ and ACQ are 0


def test_identify_controller_and_namespace(host, image):
    status, ctrl = host.identify(1)
    assert status == 0
    vid, = struct.unpack_from("<H", ctrl, 0)
    assert vid == 0x1234 and ctrl[4:24].rstrip() == b"SN-1"
    assert ctrl[24:64].rstrip() == b"vfiouser NVMe (Python)"
    assert ctrl[77] == 8  # MDTS: 1 MiB
    assert struct.unpack_from("<I", ctrl, 516)[0] == 1  # one namespace
    oncs, = struct.unpack_from("<H", ctrl, 520)
    assert oncs & 0x8 and oncs & 0x4  # Write Zeroes, Dataset Management
    assert ctrl[525] & 1  # a volatile write cache: flushes matter
    assert ctrl[512] == 0x66 and ctrl[513] == 0x44
    assert ctrl[768:800].startswith(b"nqn.")
    status, ns = host.identify(0, nsid=1)
    nsze, ncap = struct.unpack_from("<QQ", ns, 0)
    assert status == 0 and nsze == ncap == (IMAGE_MB << 20) // 512
    assert struct.unpack_from("<I", ns, 128)[0] >> 16 & 0xFF == 9  # 512-byte blocks
    assert ns[99] == 0  # not write protected
    status, listing = host.identify(2)
    assert status == 0 and struct.unpack_from("<II", listing, 0) == (1, 0)
    status, descs = host.identify(3, nsid=1)
    assert status == 0 and descs[0] == 2 and descs[1] == 16 and descs[20] == 3 and descs[21] == 16
    assert descs[4:20] == ns[104:120]  # the same NGUID both ways
    assert host.identify(0, nsid=2)[0] == Status.INVALID_NAMESPACE
    assert host.identify(0x1F)[0] == Status.INVALID_FIELD


def test_host_bytes_read_and_guest_bytes_written(host, image):
    payload = os.urandom(8192)
    with open(image, "r+b") as f:
        f.seek(4096)
        f.write(payload)
    assert host.read(8, 16) == (0, 0)
    assert host.peek(DATA, 8192) == payload
    mine = os.urandom(4096)
    host.poke(DATA, mine)
    assert host.write(100, 8) == (0, 0)
    with open(image, "rb") as f:
        f.seek(100 * 512)
        assert f.read(4096) == mine


@pytest.mark.parametrize("message", [False, True], ids=["in-place", "messages"])
def test_a_megabyte_through_a_scattered_prp_list(serve, image, message):
    dev = NvmeController(file=image)
    server = serve(dev)
    with nvme_host(server, message=message) as h:
        h.bring_up()
        data = os.urandom(1 << 20)
        for i in range(256):  # every other page: 256 segments, a PRP list
            h.poke(DATA + 8192 * i, data[4096 * i : 4096 * (i + 1)])
        assert h.write(2048, 2048, scatter=True) == (0, 0)
        with open(image, "rb") as f:
            f.seek(2048 * 512)
            assert f.read(1 << 20) == data
        h.poke(DATA, bytes(1 << 21))
        assert h.read(2048, 2048, scatter=True) == (0, 0)
        assert b"".join(h.peek(DATA + 8192 * i, 4096) for i in range(256)) == data
        assert h.peek(DATA + 4096, 4096) == bytes(4096)  # the pages between were not touched


def test_prp1_with_an_offset_and_a_second_page(host, image):
    with open(image, "r+b") as f:
        f.write(bytes(range(256)) * 32)
    cmd = Command(NvmOpcode.READ, 0, 0, 1, RAM + DATA + 0x100, RAM + DATA + 0x3000, 0, 0, 7, 0, 0, 0)
    assert host.run(1, cmd) == (0, 0)  # 4 KiB: 3840 bytes in PRP1's page, the rest in PRP2's
    expected = bytes(range(256)) * 16
    assert host.peek(DATA + 0x100, 0xF00) == expected[:0xF00]
    assert host.peek(DATA + 0x3000, 0x100) == expected[0xF00:]
    bad = Command(NvmOpcode.READ, 0, 0, 1, RAM + DATA, RAM + DATA + 0x3010, 0, 0, 15, 0, 0, 0)
    assert host.run(1, bad)[0] == Status.PRP_OFFSET_INVALID


def test_io_errors_are_reported_in_the_status(host):
    blocks = (IMAGE_MB << 20) // 512
    assert host.read(blocks - 1, 2)[0] == Status.LBA_OUT_OF_RANGE
    assert host.read(0, 4096)[0] == Status.INVALID_FIELD  # 2 MiB: more than MDTS
    assert host.read(0, 1, nsid=2)[0] == Status.INVALID_NAMESPACE
    assert host.run(1, Command(0x7F, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0))[0] == Status.INVALID_OPCODE
    assert host.run(0, Command(0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))[0] == Status.INVALID_OPCODE
    assert host.read(0, 1, buf=0x3F_F000)[0] == 0  # the last page of guest RAM
    outside = Command(NvmOpcode.READ, 0, 0, 1, 0x8000_0000, 0, 0, 0, 0, 0, 0, 0)
    assert host.run(1, outside)[0] == Status.DATA_TRANSFER_ERROR  # memory QEMU did not map
    assert host.read(0, 1) == (0, 0)  # and the controller goes on


def test_flush_reaches_the_image_before_the_command_completes(host, monkeypatch):
    disk = host.dev.disk
    seen = []
    real = os.fdatasync

    def fdatasync(fd):
        # When the image is synced, the flush's completion must not be visible yet.
        seen.append((fd, host.nothing_posted(1, wait=0)))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    host.poke(DATA, b"x" * 512)
    assert host.write(7, 1) == (0, 0)
    assert seen == []  # a write alone is not synced: the page cache is the volatile cache
    assert host.run(1, Command(NvmOpcode.FLUSH, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0)) == (0, 0)
    assert seen == [(disk.fd, True)] and disk.stats.flushes == 1
    assert host.write(8, 1, fua=True) == (0, 0)  # Force Unit Access: synced before completing
    assert len(seen) == 2 and seen[1][1]


def test_write_zeroes_and_deallocate(host, image):
    with open(image, "r+b") as f:
        f.write(b"\xff" * (1 << 20))
    zeroes = Command(NvmOpcode.WRITE_ZEROES, 0, 0, 1, 0, 0, 16, 0, 15, 0, 0, 0)
    assert host.run(1, zeroes) == (0, 0)
    host.poke(DATA, struct.pack("<IIQ", 0, 64, 512))  # one range: 64 blocks at LBA 512
    dsm = Command(NvmOpcode.DATASET_MANAGEMENT, 0, 0, 1, RAM + DATA, 0, 0, 1 << 2, 0, 0, 0, 0)
    assert host.run(1, dsm) == (0, 0)
    with open(image, "rb") as f:
        data = f.read(1 << 20)
    assert data[16 * 512 : 32 * 512] == bytes(8192) and data[15 * 512 : 16 * 512] == b"\xff" * 512
    assert data[32 * 512 : 33 * 512] == b"\xff" * 512
    if host.dev.disk.stats.discarded:  # punched where the host file system can
        assert data[512 * 512 : 576 * 512] == bytes(64 * 512)


def test_read_only_namespace(serve, image):
    dev = NvmeController(file=image, readonly=True)
    server = serve(dev)
    with nvme_host(server) as h:
        h.bring_up()
        assert h.identify(0, nsid=1)[1][99] & 1  # NSATTR: write protected
        assert h.read(0, 1) == (0, 0)
        assert h.write(0, 1)[0] == Status.NAMESPACE_WRITE_PROTECTED
        assert h.run(1, Command(NvmOpcode.WRITE_ZEROES, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0))[0] == \
            Status.NAMESPACE_WRITE_PROTECTED


def test_queue_creation_and_deletion_rules(host):
    admin = host.admin
    assert admin(AdminOpcode.CREATE_IO_CQ, prp1=RAM + 0x3_0000, cdw10=1 | 7 << 16, cdw11=3)[0] == \
        Status.INVALID_QUEUE_IDENTIFIER  # CQ 1 exists
    assert admin(AdminOpcode.CREATE_IO_CQ, prp1=RAM + 0x3_0000, cdw10=3 | 7 << 16, cdw11=3)[0] == \
        Status.INVALID_QUEUE_IDENTIFIER  # beyond what Number of Queues allocated (2)
    assert admin(AdminOpcode.CREATE_IO_SQ, prp1=RAM + 0x3_0000, cdw10=2 | 7 << 16, cdw11=1 | 2 << 16)[0] == \
        Status.INVALID_QUEUE_IDENTIFIER  # SQ 2 exists (bring_up made two pairs)
    assert admin(AdminOpcode.DELETE_IO_CQ, cdw10=2)[0] == Status.INVALID_QUEUE_DELETION  # SQ 2 uses it
    assert admin(AdminOpcode.DELETE_IO_SQ, cdw10=2) == (0, 0)
    assert admin(AdminOpcode.CREATE_IO_SQ, prp1=RAM + 0x3_0000, cdw10=2 | 7 << 16, cdw11=1 | 9 << 16)[0] == \
        Status.COMPLETION_QUEUE_INVALID
    assert admin(AdminOpcode.DELETE_IO_CQ, cdw10=2) == (0, 0)
    assert admin(AdminOpcode.CREATE_IO_CQ, prp1=RAM + 0x3_0000, cdw10=2 | 7 << 16, cdw11=3 | 40 << 16)[0] == \
        Status.INVALID_INTERRUPT_VECTOR
    assert admin(AdminOpcode.CREATE_IO_CQ, prp1=RAM + 0x3_0000, cdw10=2 | 4095 << 16, cdw11=3)[0] == \
        Status.INVALID_QUEUE_SIZE
    assert admin(AdminOpcode.CREATE_IO_CQ, prp1=RAM + 0x3_0000, cdw10=2 | 7 << 16, cdw11=2)[0] == \
        Status.INVALID_FIELD  # not physically contiguous
    assert admin(AdminOpcode.DELETE_IO_SQ, cdw10=0)[0] == Status.INVALID_QUEUE_IDENTIFIER  # the admin SQ
    host.queues.pop(2)
    host.create_io_queues(2, entries=8, vector=2)
    assert host.read(0, 1, qid=2) == (0, 0)
    assert host.interrupts(2) >= 1


def test_features(host):
    admin = host.admin
    assert admin(AdminOpcode.GET_FEATURES, cdw10=0x07) == (0, 1 | 1 << 16)  # two queue pairs allocated
    assert admin(AdminOpcode.SET_FEATURES, cdw10=0x07, cdw11=63 | 63 << 16) == (0, 1 | 1 << 16)  # once per reset
    assert admin(AdminOpcode.GET_FEATURES, cdw10=0x06) == (0, 1)  # volatile write cache enabled
    assert admin(AdminOpcode.SET_FEATURES, cdw10=0x04, cdw11=350) == (0, 0)
    assert admin(AdminOpcode.GET_FEATURES, cdw10=0x04) == (0, 350)
    assert admin(AdminOpcode.GET_FEATURES, cdw10=0x04 | 1 << 8) == (0, 343)  # the default
    assert admin(AdminOpcode.GET_FEATURES, cdw10=0x06 | 3 << 8) == (0, 0x4)  # changeable, not saveable
    assert admin(AdminOpcode.SET_FEATURES, cdw10=0x06 | 1 << 31, cdw11=0)[0] == Status.FEATURE_NOT_SAVEABLE
    assert admin(AdminOpcode.GET_FEATURES, cdw10=0x7E)[0] == Status.INVALID_FIELD


def test_without_a_volatile_write_cache_every_write_is_synced(host):
    assert host.admin(AdminOpcode.SET_FEATURES, cdw10=0x06, cdw11=0) == (0, 0)
    assert host.write(0, 1) == (0, 0)
    assert host.dev.disk.stats.flushes == 1


def test_log_pages(host):
    host.poke(DATA, b"y" * 4096)
    for _ in range(3):
        assert host.write(0, 8) == (0, 0)
    assert host.read(0, 8) == (0, 0)
    buf = RAM + 0x2000
    assert host.admin(AdminOpcode.GET_LOG_PAGE, nsid=0xFFFF_FFFF, prp1=buf, cdw10=0x02 | 127 << 16) == (0, 0)
    smart = host.peek(0x2000, 512)
    temperature, spare = struct.unpack_from("<HB", smart, 1)
    assert 273 < temperature < 373 and spare == 100
    units_read, units_written = (int.from_bytes(smart[o : o + 16], "little") for o in (32, 48))
    reads, writes = (int.from_bytes(smart[o : o + 16], "little") for o in (64, 80))
    assert (units_read, units_written, reads, writes) == (1, 1, 1, 3)  # thousands of 512 bytes, rounded up
    assert host.admin(AdminOpcode.GET_LOG_PAGE, prp1=buf, cdw10=0x03 | 127 << 16) == (0, 0)
    assert host.peek(0x2000, 1) == b"\x01" and host.peek(0x2008, 8).rstrip() == b"1.0"
    assert host.admin(AdminOpcode.GET_LOG_PAGE, prp1=buf, cdw10=0x01 | 15 << 16) == (0, 0)
    assert host.admin(AdminOpcode.GET_LOG_PAGE, prp1=buf, cdw10=0x7F | 15 << 16)[0] == Status.INVALID_LOG_PAGE
    # an offset into the page (LPOL): the second 16 bytes of the SMART log
    assert host.admin(AdminOpcode.GET_LOG_PAGE, prp1=buf, cdw10=0x02 | 3 << 16, cdw12=32) == (0, 0)
    assert host.peek(0x2000, 16) == smart[32:48]


def test_async_event_is_held_until_the_namespace_changes(host, image):
    assert host.admin(AdminOpcode.SET_FEATURES, cdw10=0x0B, cdw11=1 << 8) == (0, 0)
    aer = host.submit(0, Command(AdminOpcode.ASYNC_EVENT_REQUEST, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    assert host.nothing_posted(0), "an Asynchronous Event Request completed with no event"
    assert host.read(0, 1) == (0, 0)  # I/O goes on meanwhile
    with open(image, "r+b") as f:
        f.truncate((IMAGE_MB + 4) << 20)  # the host grows the image...
    host.dev.namespace_changed()  # ...and says so
    cid, status, dw0, _ = host.reap(0)
    assert (cid, status) == (aer, 0)
    assert dw0 & 0x7 == 2 and dw0 >> 8 & 0xFF == 0 and dw0 >> 16 & 0xFF == 0x04  # notice, NS attribute, log 4
    assert host.admin(AdminOpcode.GET_LOG_PAGE, prp1=RAM + 0x2000, cdw10=0x04 | 1023 << 16) == (0, 0)
    assert struct.unpack_from("<II", host.peek(0x2000, 8)) == (1, 0)  # namespace 1 changed
    assert host.admin(AdminOpcode.GET_LOG_PAGE, prp1=RAM + 0x2000, cdw10=0x04 | 1023 << 16) == (0, 0)
    assert host.peek(0x2000, 4) == bytes(4)  # reading the log cleared it
    nsze, = struct.unpack_from("<Q", host.identify(0, nsid=1)[1], 0)
    assert nsze == ((IMAGE_MB + 4) << 20) // 512


def test_abort_a_held_event_request_and_the_limit(host):
    aers = [host.submit(0, Command(AdminOpcode.ASYNC_EVENT_REQUEST, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
            for _ in range(4)]
    assert host.admin(AdminOpcode.ASYNC_EVENT_REQUEST)[0] == Status.ASYNC_EVENT_LIMIT_EXCEEDED
    abort = host.submit(0, Command(AdminOpcode.ABORT, 0, 0, 0, 0, 0, aers[1] << 16, 0, 0, 0, 0, 0))
    got = {host.reap(0)[:3] for _ in range(2)}
    assert got == {(aers[1], Status.ABORT_REQUESTED, 0), (abort, 0, 0)}
    # A command that already completed cannot be aborted: dword 0 bit 0 says so.
    assert host.admin(AdminOpcode.ABORT, cdw10=1 | 0x7777 << 16) == (0, 1)


def test_completion_queue_full_holds_completions_until_the_host_frees_entries(host):
    host.queues.pop(2)
    host.admin(AdminOpcode.DELETE_IO_SQ, cdw10=2)
    host.admin(AdminOpcode.DELETE_IO_CQ, cdw10=2)
    base = 0x3_0000
    host.poke(base, bytes(0x2000))
    assert host.admin(AdminOpcode.CREATE_IO_CQ, prp1=RAM + base + 0x1000, cdw10=2 | 1 << 16, cdw11=3 | 2 << 16)[0] == 0
    assert host.admin(AdminOpcode.CREATE_IO_SQ, prp1=RAM + base, cdw10=2 | 7 << 16, cdw11=1 | 2 << 16)[0] == 0
    host.queues[2] = dict(sq=base, cq=base + 0x1000, sq_size=8, cq_size=2, tail=0, head=0, phase=1)
    cids = [host.submit(2, Command(NvmOpcode.READ, 0, 0, 1, RAM + DATA, 0, i, 0, 0, 0, 0, 0)) for i in range(3)]
    assert host.reap(2, ring=False)[0] == cids[0]
    assert host.nothing_posted(2), "a completion was posted into a full CQ"  # one 2-entry CQ holds one
    host.ring_cq(2)
    got = [host.reap(2)[0] for _ in range(2)]  # each head doorbell lets the next one in
    assert got == cids[1:]


def test_controller_reset_and_shutdown(host):
    host.poke(DATA, b"z" * 512)
    assert host.write(1, 1) == (0, 0)
    cc = host.reg(CC)
    host.set_reg(CC, cc | 1 << 14)  # normal shutdown
    host.wait_csts(0xC, 0x8)  # SHST: shutdown complete
    assert host.dev.disk.stats.flushes >= 1  # what was written is durable
    host.set_reg(CC, 0)
    host.wait_csts(1, 0)
    assert host.dev.queues.sqs == {} and host.dev.queues.cqs == {}
    host.queues.clear()
    host.bring_up()  # Linux's reset: enable again, queues again
    assert host.reg(CSTS) & 0xC == 0
    assert host.read(1, 1) == (0, 0) and host.peek(DATA, 512) == b"z" * 512


def test_pci_reset_restores_the_registers(host):
    host.c.reset()
    host.c.bring_up()  # a reset leaves the BARs unprogrammed: firmware places them again
    assert host.reg(CSTS) == 0 and host.reg(CC) == 0 and host.reg(0x24) == 0
    assert host.reg(0x08) == 0x00010400


def test_intx_when_msix_is_off_and_intms_masks_it(serve, image):
    dev = NvmeController(file=image)
    server = serve(dev)
    with nvme_host(server, msix=False) as h:
        h.bring_up()
        h.submit(1, Command(NvmOpcode.READ, 0, 0, 1, RAM + DATA, 0, 0, 0, 0, 0, 0, 0))
        h.reap(1, ring=False)
        assert dev.intx_pending()  # an entry the host has not consumed
        h.set_reg(INTMS, 1)
        assert not dev.intx_pending()
        h.set_reg(INTMC, 1)
        assert dev.intx_pending() and h.reg(INTMS) == 0
        h.ring_cq(1)
        h.reg(CSTS)  # a read after the posted doorbell write: it has been handled
        assert not dev.intx_pending()


def _dbbuf(host, base=0x5_0000):
    host.poke(base, bytes(0x2000))
    status, _ = host.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=RAM + base, prp2=RAM + base + 0x1000)
    assert status == 0
    return base, base + 0x1000


def test_shadow_doorbells_take_the_tail_from_memory_and_ask_only_when_idle(host):
    shadow, events = _dbbuf(host)
    q = host.queues[1]
    assert struct.unpack_from("<II", host.peek(events + 8, 8)) == (0, 0xFFFF)  # SQ 1: tail 0; CQ 1: parked
    for lba in range(3):  # three commands queued with only their shadow tail written...
        host.submit(1, Command(NvmOpcode.READ, 0, 0, 1, RAM + DATA, 0, lba, 0, 0, 0, 0, 0), ring=False)
    host.poke(shadow + 8, struct.pack("<I", q["tail"]))
    assert host.nothing_posted(1)
    host.ring_sq(1)  # ...and one ring: all three run
    assert [host.reap(1, ring=False)[1] for _ in range(3)] == [0, 0, 0]
    host.poke(shadow + 12, struct.pack("<I", q["head"]))  # the CQ head, in memory only
    deadline = time.monotonic() + 5
    while struct.unpack_from("<I", host.peek(events + 8, 4))[0] != 3:
        assert time.monotonic() < deadline, "the SQ's event index never reached its tail"
        time.sleep(0.01)


@pytest.mark.parametrize("message", [False, True], ids=["in-place", "messages"])
def test_shadow_doorbells_with_a_busy_queue(serve, image, message):
    dev = NvmeController(file=image)
    server = serve(dev)
    with nvme_host(server, message=message) as h:
        h.bring_up()
        shadow, _ = _dbbuf(h)
        q = h.queues[1]
        with open(image, "r+b") as f:
            f.write(os.urandom(64 * 512))
        for round_ in range(3):
            for lba in range(16):  # more than fits between two rings: a CQ that wraps, head in memory
                h.submit(1, Command(NvmOpcode.READ, 0, 0, 1, RAM + DATA + 512 * lba, 0, lba, 0, 0, 0, 0, 0),
                         ring=False)
                h.poke(shadow + 8, struct.pack("<I", q["tail"]))
            h.ring_sq(1)
            for _ in range(16):
                assert h.reap(1, ring=False)[1] == 0
            h.poke(shadow + 12, struct.pack("<I", q["head"]))
        with open(image, "rb") as f:
            assert h.peek(DATA, 16 * 512) == f.read(16 * 512)


def test_disk_errors_become_media_errors(host, monkeypatch):
    def broken(*args, **kwargs):
        raise DiskIoError("injected", errno=5)

    monkeypatch.setattr(host.dev.disk, "readinto", broken)
    monkeypatch.setattr(host.dev.disk, "flush", broken)
    assert host.read(0, 1)[0] == Status.UNRECOVERED_READ_ERROR
    assert host.run(1, Command(NvmOpcode.FLUSH, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0))[0] == Status.WRITE_FAULT


def test_definition_errors(tmp_path, image):
    with pytest.raises(DiskImageError):
        NvmeController(file=str(tmp_path / "missing.img"))
    with pytest.raises(DiskImageError):
        NvmeController()
    with pytest.raises(DefinitionError):
        NvmeController(file=image, queues=0)
    with pytest.raises(DefinitionError):
        NvmeController(file=image, block_size=1024)
    with pytest.raises(DefinitionError):
        NvmeController(file=image, serial="x" * 21)
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"1" * 1000)
    with pytest.raises(DiskImageError):
        NvmeController(file=str(odd))
    with pytest.raises(DeviceLoadError):
        make_device("nvme", {"file": image, "queues": "many"})
    dev = make_device("nvme", {"file": image, "queues": "2", "readonly": "on", "serial": "ABC"})
    assert dev.max_queues == 2 and dev.disk.readonly and dev.serial == "ABC"


def test_prp_lists_name_exactly_the_pages_a_walk_does():
    """PRP1 with an offset, list pages chained through their last slot, contiguous pages merged,
    the last page cut to the length: the segments cover the same bytes, in the same order, as a
    walk of the entries one page at a time."""
    page = 4096
    rng = random.Random(20261201)
    for _ in range(300):
        length = rng.randrange(1, 600 * page)
        prp1 = rng.randrange(1, 1 << 20) * page + rng.choice([0, 0, 512, rng.randrange(0, page, 4)])
        first = min(length, page - prp1 % page)
        count = -(-(length - first) // page)
        pages, addr = [], prp1 - prp1 % page
        for _ in range(count):  # runs of contiguous pages and jumps, as a guest's buffers have
            addr = addr + page if rng.random() < 0.6 else rng.randrange(1, 1 << 20) * page
            pages.append(addr)
        memory: dict[int, int] = {}
        prp2 = pages[0] if count == 1 else rng.randrange(1 << 21, 1 << 22) * page + rng.randrange(0, page, 8)
        if count > 1:  # lay the list out, chaining full list pages
            at, rest = prp2, list(pages)
            while rest:
                room = (page - at % page) // 8
                take = rest[:room] if len(rest) <= room else rest[: room - 1]
                del rest[: len(take)]
                for i, entry in enumerate(take):
                    memory[at + 8 * i] = entry
                if rest:
                    nxt = rng.randrange(1 << 22, 1 << 23) * page
                    memory[at + 8 * len(take)] = nxt
                    at = nxt
        segments = prp_segments(prp1, prp2, length, lambda a, n: [memory[a + 8 * i] for i in range(n)])
        walk, left = [(prp1, first)], length - first
        for entry in pages:
            walk.append((entry, min(page, left)))
            left -= page
        merged: list[tuple[int, int]] = []
        for a, n in walk:
            if merged and merged[-1][0] + merged[-1][1] == a:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((a, n))
        assert segments == merged
    with pytest.raises(PrpError):
        prp_segments(0x1000, 0x2000, 3 * page, lambda a, n: [0x5000, 0x6001][:n])


def _large(host, opcode: int, slba: int, blocks: int, buf: int, prp_list: int) -> Command:
    """A command for ``blocks`` sectors of contiguous pages at RAM offset ``buf``, its PRP list
    at RAM offset ``prp_list`` (so several can be in flight)."""
    pages = [RAM + buf + 4096 * i for i in range(blocks * 512 // 4096)]
    host.poke(prp_list, struct.pack(f"<{len(pages) - 1}Q", *pages[1:]))
    return Command(opcode, 0, 0, 1, pages[0], RAM + prp_list, slba, 0, blocks - 1, 0, 0, 0)


def test_large_transfers_queued_together_run_at_once_and_all_complete(host, image, monkeypatch):
    """Linux splits a 1 MiB request into commands of 128 pages and queues them together: they run
    side by side on the controller's I/O threads (as QEMU's own devices hand them to a thread
    pool), each completes with its data in place, and the host hears of them."""
    disk, both, names = host.dev.disk, threading.Barrier(2, timeout=5), set()
    real = disk.write_from

    def write_from(offset, views):
        names.add(threading.current_thread().name)
        both.wait()  # returns only when both transfers are inside at the same time
        real(offset, views)

    monkeypatch.setattr(disk, "write_from", write_from)
    a, b = os.urandom(256 << 10), os.urandom(256 << 10)
    host.poke(DATA, a)
    host.poke(DATA + (256 << 10), b)
    first = host.submit(1, _large(host, NvmOpcode.WRITE, 0, 512, DATA, 0x8_0000), ring=False)
    second = host.submit(1, _large(host, NvmOpcode.WRITE, 4096, 512, DATA + (256 << 10), 0x8_1000))
    done = {host.reap(1)[:2] for _ in range(2)}
    assert done == {(first, 0), (second, 0)}
    assert len(names) == 2 and all(name.startswith("NvmeController-io") for name in names), names
    with open(image, "rb") as f:
        assert f.read(256 << 10) == a
        f.seek(4096 * 512)
        assert f.read(256 << 10) == b
    monkeypatch.undo()
    host.poke(DATA, bytes(512 << 10))
    host.submit(1, _large(host, NvmOpcode.READ, 4096, 512, DATA, 0x8_0000), ring=False)
    host.submit(1, _large(host, NvmOpcode.READ, 0, 512, DATA + (256 << 10), 0x8_1000))
    assert {host.reap(1)[1] for _ in range(2)} == {0}
    assert host.peek(DATA, 256 << 10) == b and host.peek(DATA + (256 << 10), 256 << 10) == a


def test_a_shutdown_flushes_after_the_large_transfers_still_running(host, monkeypatch):
    disk, go, order = host.dev.disk, threading.Event(), []
    real_write, real_flush = disk.write_from, disk.flush

    def write_from(offset, views):
        go.wait(5)
        order.append("write")
        real_write(offset, views)

    def flush():
        order.append("flush")
        real_flush()

    monkeypatch.setattr(disk, "write_from", write_from)
    monkeypatch.setattr(disk, "flush", flush)
    cid = host.submit(1, _large(host, NvmOpcode.WRITE, 0, 512, DATA, 0x8_0000))
    host.set_reg(CC, host.reg(CC) | 1 << 14)  # normal shutdown, the write still running
    time.sleep(0.3)
    assert host.reg(CSTS) & 0xC != 0x8 and order == [], "shutdown completed before the write ended"
    go.set()
    host.wait_csts(0xC, 0x8)
    assert order[:2] == ["write", "flush"]
    assert host.reap(1)[:2] == (cid, 0)
