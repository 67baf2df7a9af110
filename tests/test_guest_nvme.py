"""A real Linux guest drives the Python NVMe controller with its own ``nvme`` driver.

The scenarios (:mod:`tests.storage_scenarios`): direct I/O both ways with
guest RAM shared (DMA in place) and not (DMA_READ/DMA_WRITE messages); a file
system made and filled in the guest that the host's ``e2fsck`` passes; and an
unclean power-off after ``sync`` that loses nothing synced. The driver binds
by class (01 08 02), sets the controller up through its registers and admin
queue, and moves every byte through I/O queues, PRPs and MSI-X.
"""

import pytest

from vfiouser.devices.nvme import NvmeController

from . import storage_scenarios as sc

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

DEV, BLOCK = "/dev/nvme0n1", "nvme0n1"


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd-ram", "default-ram"])
def test_nvme_moves_bytes_both_ways(linux_guest, tmp_path, memfd):
    image = str(tmp_path / "disk.img")
    host = sc.make_image(image)
    dev = NvmeController(file=image, serial="VFU-TEST-1")
    g = linux_guest(sc.bytes_script(DEV, BLOCK, "^nvme0q[1-9]$"), devices=[dev],
                    modules=["nvme"], memfd=memfd, files={"guestdata": sc.guest_data()})
    result = g.wait(180)
    assert result.exit_code == 0
    assert "driver nvme" in result.lines
    assert f"size {sc.IMAGE_SIZE // 512} ro 0" in result.lines
    sc.check_bytes(image, host, result.lines)
    assert not any("nvme" in line and ("timeout" in line or "I/O error" in line) for line in result.lines)


def test_nvme_filesystem_passes_fsck(linux_guest, tmp_path):
    image = str(tmp_path / "disk.img")
    sc.make_image(image)
    sc.fsck_tools()
    dev = NvmeController(file=image)
    g = linux_guest(sc.fs_script(DEV), devices=[dev],
                    modules=["nvme", *sc.FS_MODULES])
    result = g.wait(300)
    assert result.exit_code == 0 and "FS-DONE" in result.lines
    assert dev.disk.stats.flushes > 0, "sync sent no flush to the device"
    sc.check_fs(image, result.lines)


def test_nvme_unclean_poweroff_keeps_what_was_synced(linux_guest, tmp_path):
    image = str(tmp_path / "disk.img")
    sc.make_image(image)
    sc.fsck_tools()
    dev = NvmeController(file=image)
    g = linux_guest(sc.poweroff_script(DEV), devices=[dev],
                    modules=["nvme", *sc.FS_MODULES])
    kept, small, flushes = sc.power_off_after_sync(g, dev.disk)
    assert flushes > 0, "sync returned before a flush reached the image (fdatasync)"
    sc.check_poweroff(image, kept, small)
