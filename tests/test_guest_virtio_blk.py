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

DEV, BLOCK, IRQS = "/dev/vda", "vda", "^virtio0-req"


def _no_driver_errors(lines: list[str]) -> None:
    assert "driver virtio-pci" in lines
    assert f"size {sc.IMAGE_SIZE // 512} ro 0" in lines
    assert not any(re.search(r"vda.*(error|timeout)", line, re.I) for line in lines)


def test_virtio_blk_moves_bytes_both_ways_by_dma_messages(linux_guest, tmp_path):
    image = str(tmp_path / "disk.img")
    host = sc.make_image(image)
    dev = VirtioBlk(file=image, serial="vfu-serial-1")
    script = sc.bytes_script(DEV, BLOCK, IRQS) + 'echo "serial $(cat /sys/block/vda/serial)"\n'
    g = linux_guest(script, devices=[dev], modules=["virtio_blk"], memfd=False,
                    files={"guestdata": sc.guest_data()})
    result = g.wait(180)
    assert result.exit_code == 0
    assert "serial vfu-serial-1" in result.lines and dev.requests.get(T_GET_ID)
    sc.check_bytes(image, host, result.lines)
    _no_driver_errors(result.lines)


def test_virtio_blk_in_place_on_two_queues_moves_bytes_keeps_a_filesystem_and_loses_nothing_synced(
        linux_guest, tmp_path):
    """Guest RAM shared, two vCPUs on two request queues: bytes both ways, then a file system
    ``e2fsck`` passes, then an unclean power-off after ``sync`` (one boot, the host checking the
    image between the steps)."""
    image = str(tmp_path / "disk.img")
    host = sc.make_image(image)
    sc.fsck_tools()
    dev = VirtioBlk(file=image, num_queues=2)
    irq_lines = "awk '$NF ~ /^virtio0-req/ {print \"IRQ\", $NF, $2 + $3}' /proc/interrupts\n"
    g = linux_guest(sc.all_in_one_script(DEV, BLOCK, IRQS, after_fs=irq_lines), devices=[dev], memfd=True,
                    modules=["virtio_blk", *sc.FS_MODULES], cpus=2, files={"guestdata": sc.guest_data()})
    lines = sc.run_all_in_one(g, image, host, dev.disk)
    _no_driver_errors(lines)
    irqs = dict(line.split()[1:] for line in lines if line.startswith("IRQ "))
    assert sorted(irqs) == ["virtio0-req.0", "virtio0-req.1"], lines[-10:]  # one vector per queue
    assert sum(int(n) for n in irqs.values()) > 0
    assert dev.requests.get(T_FLUSH, 0) > 0
