"""Shared (mmap-able) BAR areas, and the ivshmem-plain device built on them.

With the Python client: the region info carries MMAP, the sparse-mmap
capability when only part of a BAR is shared, and the memory's fd, which maps
the model's bytes. With the real QEMU: the Python ivshmem-plain answers a qtest
script exactly as QEMU's own ivshmem-plain does, and guest accesses to BAR2
land in the host file without a single message reaching the server.
"""

import mmap
import os

import pytest

from vfiouser.devices.ivshmem import Ivshmem, parse_size
from vfiouser.devices.pci import BarError, MemoryBar, PciDevice
from vfiouser.iomgr import DeviceIo
from vfiouser.client import Client
from vfiouser.protocol import RegionCapId, RegionFlags
from vfiouser.testing.qemu import QtestMachine
from vfiouser.server import serve_in_thread

SLOT = 4
BAR0, BAR2 = 0xE000_0000, 0xE010_0000


class Sparse(PciDevice):
    """A 16 KiB BAR: registers in page 0 and 2, shared pages 1 and 3."""

    vendor_id, device_id = 0x1234, 0x5151

    def __init__(self):
        super().__init__()
        bar = self.add_bar(0, MemoryBar(0x4000))
        self.page1 = bar.share(0x1000, 0x1000)
        self.page3 = bar.share(0x3000, 0x1000)


def test_region_info_shares_the_memory_fd(serve, tmp_path):
    dev = Ivshmem(size="64K", file=str(tmp_path / "shm"))
    server = serve(dev)
    with Client.connect(server.path) as c:
        info = c.get_region_info(2)
        assert info.flags & RegionFlags.MMAP and info.size == 0x10000 and info.caps == []  # whole region
        assert info.fd is not None and info.offset == 0
        with mmap.mmap(info.fd, 0x10000) as m:
            dev.memory[0x100:0x105] = b"model"
            assert m[0x100:0x105] == b"model"
            m[0x200:0x206] = b"client"
            assert bytes(dev.memory[0x200:0x206]) == b"client"
        os.close(info.fd)
        assert not c.get_region_info(0).flags & RegionFlags.MMAP and c.get_region_info(0).fd is None
        # A client that does not map the area still reaches the same bytes through messages.
        c.bring_up()
        assert c.region_read(2, 0x200, 6) == b"client"
        c.region_write(2, 0x300, b"trapped")
        assert bytes(dev.memory[0x300:0x307]) == b"trapped"
    assert (tmp_path / "shm").read_bytes()[0x300:0x307] == b"trapped"  # the host file is the memory


def test_part_of_a_bar_shared_gives_sparse_areas(serve):
    dev = Sparse()
    server = serve(dev)
    with Client.connect(server.path) as c:
        info = c.get_region_info(0)
        assert info.flags & RegionFlags.MMAP and info.flags & RegionFlags.CAPS
        (cap,) = info.caps
        assert cap.id == RegionCapId.SPARSE_MMAP
        assert [(a.offset, a.size) for a in cap.body.areas] == [(0x1000, 0x1000), (0x3000, 0x1000)]
        with mmap.mmap(info.fd, 0x4000) as m:  # one fd; areas at their BAR offsets in it
            m[0x3000:0x3004] = b"abcd"
            assert bytes(dev.page3[:4]) == b"abcd"
        os.close(info.fd)
        assert c.region_read(0, 0x0, 4) == b"\xff" * 4  # page 0 stays trapped (unclaimed here)


def test_shared_area_declaration_errors():
    class Dev(PciDevice):
        vendor_id, device_id = 0x1234, 0x5152

    dev = Dev()
    bar = MemoryBar(0x4000)
    with pytest.raises(BarError, match="add the BAR"):
        bar.share()
    dev.add_bar(0, bar)
    with pytest.raises(BarError, match="whole"):
        bar.share(0x800, 0x1000)
    with pytest.raises(BarError, match="whole"):
        bar.share(0x1000, 0x100)
    small = dev.add_bar(1, MemoryBar(0x100))
    with pytest.raises(BarError, match="whole"):
        small.share()
    bar.share(0x1000, 0x1000)
    with pytest.raises(BarError, match="overlaps the shared area"):
        bar.share(0x0, 0x2000)
    with pytest.raises(BarError, match="overlaps the shared area"):
        bar.map(DeviceIo(), 0x1800, 0x10)
    bar.map(DeviceIo(), 0x2000, 0x10)
    with pytest.raises(BarError, match="overlaps the handler"):
        bar.share(0x2000, 0x1000)
    dev.realize()
    with pytest.raises(BarError, match="before the device is served"):
        bar.share(0x3000, 0x1000)


def test_ivshmem_parameters(tmp_path):
    assert parse_size("1M") == 1 << 20 and parse_size("64k") == 0x10000 and parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")
    path = tmp_path / "existing"
    path.write_bytes(b"x" * 0x20000)
    dev = Ivshmem(file=str(path))  # an existing file gives the size
    assert dev.bar2.size == 0x20000 and bytes(dev.memory[:1]) == b"x"
    with pytest.raises(BarError):
        Ivshmem(size="3000")  # not a power of two


def _ivshmem_script(vm, shm_path):
    """What a guest can observe of an ivshmem-plain; returns a transcript."""
    cfg = vm.pci_cfg_read
    t = {"config": [hex(cfg(SLOT, o)) for o in range(0, 0x40, 4)]}
    masks = {}
    for off, size in ((0x04, 2), (0x0C, 1), (0x0D, 1), (0x10, 4), (0x14, 4), (0x18, 4), (0x1C, 4), (0x3C, 1),
                      (0x3D, 1)):
        old = cfg(SLOT, off, size)
        vm.pci_cfg_write(SLOT, off, (1 << (8 * size)) - 1, size)
        masks[hex(off)] = hex(cfg(SLOT, off, size))
        vm.pci_cfg_write(SLOT, off, old, size)
    t["write masks"] = masks
    vm.pci_cfg_write(SLOT, 0x10, BAR0)
    vm.pci_cfg_write(SLOT, 0x18, BAR2)
    vm.pci_cfg_write(SLOT, 0x1C, 0)
    vm.pci_cfg_write(SLOT, 0x04, 0x0002, 2)
    t["registers"] = [hex(vm.readl(BAR0 + o)) for o in range(0, 0x14, 4)]
    vm.writel(BAR0 + 0x00, 0xFFFFFFFF)
    vm.writel(BAR0 + 0x04, 0x80000001)
    vm.writel(BAR0 + 0x08, 0x1234)  # IVPosition is read-only
    vm.writel(BAR0 + 0x0C, 0x00010002)  # the doorbell rings nobody
    t["after writes"] = [hex(vm.readl(BAR0 + o)) for o in range(0, 0x14, 4)]
    t["status read clears"] = hex(vm.readl(BAR0 + 0x04))
    vm.writel(BAR0 + 0x04, 0x12345678)
    t["narrow and wide"] = [hex(vm.readw(BAR0)), hex(vm.readb(BAR0 + 1)), hex(vm.readb(BAR0)), hex(vm.readq(BAR0)),
                            hex(vm.readw(BAR0 + 2))]
    vm.writel(BAR0 + 0x04, 0xA1B2C3D4)
    t["unaligned reads"] = [hex(vm.readb(BAR0 + 5)), hex(vm.readw(BAR0 + 6)), hex(vm.readl(BAR0 + 1))]
    t["status after unaligned reads"] = hex(vm.readl(BAR0 + 0x04))
    writes = {}
    for width, off, value in ((1, 0, 0x5A), (1, 1, 0x77), (2, 2, 0x1234), (2, 1, 0xABCD), (4, 1, 0xDEADBEEF),
                              (4, 2, 0xCAFE0000), (8, 4, 0x3333333344444444), (1, 5, 0x11)):
        vm.writel(BAR0, 0)
        vm.readl(BAR0 + 4)
        {1: vm.writeb, 2: vm.writew, 4: vm.writel, 8: vm.writeq}[width](BAR0 + off, value)
        writes[f"{width}@{off}"] = (hex(vm.readl(BAR0)), hex(vm.readl(BAR0 + 4)))
    t["narrow and unaligned writes"] = writes
    # BAR2 is the host file, both ways.
    vm.writel(BAR2 + 0x40, 0xC0FFEE11)
    vm.memwrite(BAR2 + 0x1000, b"guest wrote this")
    with open(shm_path, "r+b") as f:
        t["file after guest writes"] = (f.read(0x44)[0x40:].hex(), os.pread(f.fileno(), 16, 0x1000))
        os.pwrite(f.fileno(), b"host wrote this!", 0x2000)
    t["guest reads host write"] = vm.memread(BAR2 + 0x2000, 16)
    vm.pci_cfg_write(SLOT, 0x04, 0x0000, 2)  # memory decoding off: the BAR is gone
    t["bar2 disabled"] = hex(vm.readl(BAR2 + 0x40))
    vm.pci_cfg_write(SLOT, 0x04, 0x0002, 2)
    vm.system_reset()
    vm.pci_cfg_write(SLOT, 0x10, BAR0)
    vm.pci_cfg_write(SLOT, 0x18, BAR2)
    vm.pci_cfg_write(SLOT, 0x04, 0x0002, 2)
    t["after reset"] = ([hex(vm.readl(BAR0 + o)) for o in range(0, 0x10, 4)], vm.memread(BAR2 + 0x1000, 16))
    return t


@pytest.mark.qemu
def test_python_ivshmem_matches_qemus_ivshmem_plain(qemu_binary, sockdir, tmp_path, backend):
    """The same script against QEMU's ivshmem-plain and the Python one (over vfio-user)."""
    theirs_path, ours_path = str(tmp_path / "theirs"), str(tmp_path / "ours")
    with open(theirs_path, "wb") as f:
        f.truncate(1 << 20)
    memdev = ["-object", f"memory-backend-file,id=hm,size=1M,share=on,mem-path={theirs_path}"]
    with QtestMachine([f"ivshmem-plain,memdev=hm,addr={SLOT:02x}.0"], memdev, qemu=qemu_binary) as vm:
        theirs = _ivshmem_script(vm, theirs_path)

    dev = Ivshmem(size="1M", file=ours_path)
    (shared_io,) = [h for off, size, h in dev.bar2.mappings]
    trapped = []
    shared_io.read = lambda base, offset, data: trapped.append(("read", offset))
    shared_io.write = lambda base, offset, data: trapped.append(("write", offset))
    with serve_in_thread(dev, os.path.join(sockdir, "iv.sock"), backend=backend) as server:
        with QtestMachine([server.qemu_device_json(addr=f"{SLOT:02x}.0")], qemu=qemu_binary) as vm:
            ours = _ivshmem_script(vm, ours_path)

    assert theirs["config"][0] == "0x11101af4" and theirs["registers"] == ["0x0"] * 5  # the oracle itself
    assert theirs["file after guest writes"] == ("11eeffc0", b"guest wrote this")
    assert theirs["guest reads host write"] == b"host wrote this!"
    different = {k: (theirs[k], ours[k]) for k in theirs if theirs[k] != ours[k]}
    assert not different, "steps where the Python ivshmem differs (qemu, python): " + repr(different)
    assert trapped == [], "BAR2 accesses reached the server; they must go to the mapped memory"
