"""The virtio-pci transport and virtio-rng, with the Python client playing QEMU and the driver.

Guest memory is a memfd the client maps for DMA; the test lays out split
virtqueues in it by hand, the way a driver does, and checks what the device
writes back.
"""

import mmap
import os
import struct
import time

import pytest

from vfiouser.devices.virtio import VirtioRng, entropy_stream
from vfiouser.devices.virtio.pci import STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET
from vfiouser.client import Client
from vfiouser.protocol import IrqIndex, IrqSetFlags

from .conftest import eventfd, fired

SEED = 99
RAM, RAM_SIZE = 0x100000, 0x100000
DESC, AVAIL, USED, BUFS = 0x0000, 0x1000, 0x2000, 0x4000  # offsets in guest RAM
COMMON, ISR, NOTIFY = 0x0000, 0x1000, 0x3000
EVENTFD_TRIGGER = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER



class Driver:
    """Just enough of a virtio driver, over the vfio-user client."""

    def __init__(self, client: Client, ram: mmap.mmap) -> None:
        self.c, self.ram = client, ram

    def r(self, off, size):
        return int.from_bytes(self.c.region_read(4, off, size), "little")

    def w(self, off, value, size):
        self.c.region_write(4, off, value.to_bytes(size, "little"))

    def status(self) -> int:
        return self.r(COMMON + 0x14, 1)

    def negotiate(self, features: int) -> int:
        self.w(COMMON + 0x14, 0, 1)
        self.w(COMMON + 0x14, 1 | 2, 1)
        for sel in (0, 1):
            self.w(COMMON + 0x08, sel, 4)
            self.w(COMMON + 0x0C, (features >> (32 * sel)) & 0xFFFFFFFF, 4)
        self.w(COMMON + 0x14, 1 | 2 | STATUS_FEATURES_OK, 1)
        return self.status()

    def setup_queue(self, size=8, vector=1):
        self.w(COMMON + 0x16, 0, 2)
        self.w(COMMON + 0x18, size, 2)
        for off, addr in ((0x20, DESC), (0x28, AVAIL), (0x30, USED)):
            self.w(COMMON + off, RAM + addr, 4)
            self.w(COMMON + off + 4, 0, 4)
        self.w(COMMON + 0x1A, vector, 2)
        got = self.r(COMMON + 0x1A, 2)
        self.w(COMMON + 0x1C, 1, 2)
        self.w(COMMON + 0x14, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK, 1)
        self.size = size
        self.avail_idx = 0
        return got

    def offer(self, head: int, buf: int, length: int, flags=2, nxt=0):
        struct.pack_into("<QIHH", self.ram, DESC + 16 * head, RAM + buf, length, flags, nxt)
        struct.pack_into("<H", self.ram, AVAIL + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx += 1
        struct.pack_into("<H", self.ram, AVAIL + 2, self.avail_idx)

    def kick(self):
        self.c.region_write(4, NOTIFY, (0).to_bytes(2, "little"), posted=True)

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.ram, USED + 2)[0]

    def used(self, slot):
        return struct.unpack_from("<II", self.ram, USED + 4 + 8 * slot)


@pytest.fixture
def virtio(serve):
    dev = VirtioRng(seed=SEED)
    server = serve(dev)
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM_SIZE)
    ram = mmap.mmap(fd, RAM_SIZE)
    with Client.connect(server.path) as c:
        c.bring_up()
        c.dma_map(RAM, RAM_SIZE, 3, fd=os.dup(fd))
        yield dev, c, Driver(c, ram)
    ram.close()
    os.close(fd)


def capabilities(c):
    caps = []
    pos = c.config_read(0x34, 1)
    while pos:
        cap_id, nxt = c.config_read(pos, 1), c.config_read(pos + 1, 1)
        if cap_id == 0x09:
            cfg_type, bar = c.config_read(pos + 3, 1), c.config_read(pos + 4, 1)
            off, length = c.config_read(pos + 8), c.config_read(pos + 12)
            caps.append((cfg_type, bar, off, length, pos))
        caps.append(("id", cap_id))
        pos = nxt
    return caps


def test_identity_and_capabilities(virtio):
    dev, c, _ = virtio
    assert c.config_read(0x00) == 0x10441AF4 and c.config_read(0x08, 1) == 1  # modern, revision 1
    caps = [cap for cap in capabilities(c) if cap[0] != "id"]
    assert [cap[:4] for cap in caps] == [(1, 4, 0x0000, 0x1000), (2, 4, 0x3000, 0x1000), (3, 4, 0x1000, 0x1000),
                                         (5, 0, 0, 0)]
    notify_cap = caps[1][4]
    assert c.config_read(notify_cap + 16) == 4  # notify_off_multiplier
    assert ("id", 0x11) in capabilities(c)  # MSI-X
    assert c.get_irq_info(IrqIndex.MSIX)[1] == 2


def test_feature_negotiation_needs_version_1(virtio):
    _, c, drv = virtio
    drv.w(COMMON + 0x00, 1, 4)
    assert drv.r(COMMON + 0x04, 4) == 1  # VERSION_1 (bit 32)
    assert not drv.negotiate(0) & STATUS_FEATURES_OK  # refused
    assert drv.negotiate(1 << 32) & STATUS_FEATURES_OK
    assert not drv.negotiate((1 << 32) | (1 << 28)) & STATUS_FEATURES_OK  # indirect: not offered


def test_queue_registers(virtio):
    _, c, drv = virtio
    assert drv.r(COMMON + 0x12, 2) == 1  # num_queues
    drv.w(COMMON + 0x16, 0, 2)
    assert drv.r(COMMON + 0x18, 2) == 64 and drv.r(COMMON + 0x1E, 2) == 0
    drv.w(COMMON + 0x16, 1, 2)
    assert drv.r(COMMON + 0x18, 2) == 0  # no such queue
    drv.w(COMMON + 0x10, 5, 2)
    assert drv.r(COMMON + 0x10, 2) == 0xFFFF  # vector 5 does not exist
    drv.w(COMMON + 0x10, 0, 2)
    assert drv.r(COMMON + 0x10, 2) == 0


def test_buffers_are_filled_and_signalled_on_msix(virtio):
    dev, c, drv = virtio
    drv.negotiate(1 << 32)
    msix_cap = next(p for p in _cap_offsets(c) if c.config_read(p, 1) == 0x11)
    c.config_write(msix_cap + 2, 0x8000, 2)  # MSI-X on
    fd = eventfd()
    c.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 1, 1, fds=[fd])
    assert drv.setup_queue(vector=1) == 1
    drv.offer(0, BUFS, 32)
    drv.offer(1, BUFS + 0x100, 48)
    drv.kick()
    assert fired(fd) >= 1
    assert drv.used_idx() == 2 and [drv.used(0), drv.used(1)] == [(0, 32), (1, 48)]
    stream = entropy_stream(SEED, 80)
    assert drv.ram[BUFS : BUFS + 32] == stream[:32] and drv.ram[BUFS + 0x100 : BUFS + 0x130] == stream[32:]
    assert dev.produced == 80
    struct.pack_into("<H", drv.ram, AVAIL, 1)  # VRING_AVAIL_F_NO_INTERRUPT
    drv.offer(2, BUFS + 0x200, 8)
    drv.kick()
    deadline = time.monotonic() + 2
    while drv.used_idx() != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert drv.used_idx() == 3 and fired(fd, 0.2) == 0
    os.close(fd)


def _cap_offsets(c):
    pos = c.config_read(0x34, 1)
    while pos:
        yield pos
        pos = c.config_read(pos + 1, 1)


def test_intx_and_isr_without_msix(virtio):
    dev, c, drv = virtio
    intx = eventfd()
    c.set_irqs(IrqIndex.INTX, EVENTFD_TRIGGER, 0, 1, fds=[intx])
    drv.negotiate(1 << 32)
    assert drv.setup_queue(vector=0xFFFF) == 0xFFFF
    drv.offer(0, BUFS, 16)
    drv.kick()
    assert fired(intx) == 1
    assert drv.r(ISR, 1) == 1 and drv.r(ISR, 1) == 0  # read-to-clear
    assert not dev.intx_level
    os.close(intx)


def test_reset_by_status_zero(virtio):
    dev, c, drv = virtio
    drv.negotiate(1 << 32)
    drv.setup_queue()
    drv.w(COMMON + 0x14, 0, 1)
    assert drv.status() == 0
    drv.w(COMMON + 0x16, 0, 2)
    assert drv.r(COMMON + 0x1C, 2) == 0 and drv.r(COMMON + 0x20, 4) == 0


def test_a_looping_chain_marks_the_device_broken(virtio):
    dev, c, drv = virtio
    drv.negotiate(1 << 32)
    drv.setup_queue(vector=0xFFFF)
    drv.offer(0, BUFS, 16, flags=2 | 1, nxt=0)  # points at itself
    drv.kick()
    deadline = time.monotonic() + 2
    while not drv.status() & STATUS_NEEDS_RESET and time.monotonic() < deadline:
        time.sleep(0.01)
    assert drv.status() & STATUS_NEEDS_RESET and drv.used_idx() == 0


def test_pci_configuration_access_window(virtio):
    _, c, _ = virtio
    window = [cap for cap in capabilities(c) if cap[0] == 5][0][4]
    c.config_write(window + 4, 4, 1)  # BAR4
    c.config_write(window + 8, COMMON + 0x12)  # num_queues
    c.config_write(window + 12, 2)  # two bytes
    assert c.config_read(window + 16, 2) == 1
    c.config_write(window + 8, COMMON + 0x16)
    c.config_write(window + 16, 0, 2)  # a write through the window selects queue 0
    c.config_write(window + 8, COMMON + 0x18)
    assert c.config_read(window + 16, 2) == 64
