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

DEV, BLOCK, IRQS = "/dev/nvme0n1", "nvme0n1", "^nvme0q[1-9]$"


def _no_driver_errors(lines: list[str]) -> None:
    assert "driver nvme" in lines
    assert f"size {sc.IMAGE_SIZE // 512} ro 0" in lines
    assert not any("nvme" in line and ("timeout" in line or "I/O error" in line) for line in lines)


def test_nvme_moves_bytes_both_ways_by_dma_messages(linux_guest, tmp_path):
    image = str(tmp_path / "disk.img")
    host = sc.make_image(image)
    dev = NvmeController(file=image, serial="VFU-TEST-1")
    g = linux_guest(sc.bytes_script(DEV, BLOCK, IRQS), devices=[dev],
                    modules=["nvme"], memfd=False, files={"guestdata": sc.guest_data()})
    result = g.wait(180)
    assert result.exit_code == 0
    sc.check_bytes(image, host, result.lines)
    _no_driver_errors(result.lines)


def test_nvme_in_place_moves_bytes_keeps_a_filesystem_and_loses_nothing_synced(linux_guest, tmp_path):
    """Guest RAM shared: bytes both ways, then a file system ``e2fsck`` passes, then an unclean
    power-off after ``sync`` (one boot, the host checking the image between the steps)."""
    image = str(tmp_path / "disk.img")
    host = sc.make_image(image)
    sc.fsck_tools()
    dev = NvmeController(file=image, serial="VFU-TEST-1")
    g = linux_guest(sc.all_in_one_script(DEV, BLOCK, IRQS), devices=[dev], memfd=True,
                    modules=["nvme", *sc.FS_MODULES], files={"guestdata": sc.guest_data()})
    _no_driver_errors(sc.run_all_in_one(g, image, host, dev.disk))
