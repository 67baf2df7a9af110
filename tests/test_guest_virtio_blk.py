"""A real Linux guest drives the Python virtio-blk with its own ``virtio_blk`` driver.

The same scenarios as the NVMe controller's (:mod:`tests.storage_scenarios`):
direct I/O both ways with guest RAM shared and not, a file system the host's
``e2fsck`` passes (made with two vCPUs on two request queues, so multiqueue
and one MSI-X vector per queue carry real traffic), and an unclean power-off
after ``sync`` that loses nothing synced.
"""

import re

import pytest

from vfiouser.devices.virtio.blk import T_FLUSH, T_GET_ID, VirtioBlk

from . import storage_scenarios as sc

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

DEV, BLOCK = "/dev/vda", "vda"


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd-ram", "default-ram"])
def test_virtio_blk_moves_bytes_both_ways(linux_guest, tmp_path, memfd):
    image = str(tmp_path / "disk.img")
    host = sc.make_image(image)
    dev = VirtioBlk(file=image, serial="vfu-serial-1")
    script = sc.bytes_script(DEV, BLOCK, "^virtio0-req") + 'echo "serial $(cat /sys/block/vda/serial)"\n'
    g = linux_guest(script, devices=[dev], modules=["virtio_blk"], memfd=memfd,
                    files={"guestdata": sc.guest_data()})
    result = g.wait(180)
    assert result.exit_code == 0
    assert "driver virtio-pci" in result.lines
    assert f"size {sc.IMAGE_SIZE // 512} ro 0" in result.lines
    assert "serial vfu-serial-1" in result.lines and dev.requests.get(T_GET_ID)
    sc.check_bytes(image, host, result.lines)
    assert not any(re.search(r"vda.*(error|timeout)", line, re.I) for line in result.lines)


def test_virtio_blk_filesystem_on_two_queues_passes_fsck(linux_guest, tmp_path):
    image = str(tmp_path / "disk.img")
    sc.make_image(image)
    sc.fsck_tools()
    dev = VirtioBlk(file=image, num_queues=2)
    script = sc.fs_script(DEV) + "awk '$NF ~ /^virtio0-req/ {print \"IRQ\", $NF, $2 + $3}' /proc/interrupts\n"
    g = linux_guest(script, devices=[dev], modules=["virtio_blk", *sc.FS_MODULES],
                    cpus=2)
    result = g.wait(300)
    assert result.exit_code == 0 and "FS-DONE" in result.lines
    irqs = dict(line.split()[1:] for line in result.lines if line.startswith("IRQ "))
    assert sorted(irqs) == ["virtio0-req.0", "virtio0-req.1"], result.lines[-10:]  # one vector per queue
    assert sum(int(n) for n in irqs.values()) > 0
    assert dev.requests.get(T_FLUSH, 0) > 0 and dev.disk.stats.flushes > 0
    sc.check_fs(image, result.lines)


def test_virtio_blk_unclean_poweroff_keeps_what_was_synced(linux_guest, tmp_path):
    image = str(tmp_path / "disk.img")
    sc.make_image(image)
    sc.fsck_tools()
    dev = VirtioBlk(file=image)
    g = linux_guest(sc.poweroff_script(DEV), devices=[dev],
                    modules=["virtio_blk", *sc.FS_MODULES])
    kept, small, flushes = sc.power_off_after_sync(g, dev.disk)
    assert flushes > 0, "sync returned before a flush reached the image (fdatasync)"
    sc.check_poweroff(image, kept, small)
