"""What the storage guest tests do, once for both devices (NVMe and virtio-blk).

Each scenario is a guest script (busybox ``sh`` with the kernel's own driver
bound to the device) and the host-side checks on the image file:

* **bytes**: bytes the host put in the image are read in the guest with
  direct I/O, and bytes the guest writes with direct I/O land in the image;
* **filesystem**: a file system made, mounted, filled, synced and unmounted in
  the guest passes the host's ``e2fsck -fn`` and holds the files the guest
  wrote (read back with ``debugfs``);
* **power-off**: after ``sync`` the guest keeps writing and QEMU is killed (an
  unclean power-off); then the server is stopped, and everything synced is in
  the image. The flush that ``sync`` sends reached the image (``fdatasync``)
  before ``sync`` returned.

The guest's file system is ext2 made by busybox's ``mke2fs`` and mounted by
the kernel's ext4 driver, which sends a flush to the device on ``sync``.

With guest RAM shared (DMA in place) the three run in one boot, one after the
other (:func:`all_in_one_script`, driven by :func:`run_all_in_one`): the guest
waits on its serial line while the host checks the image, so each check sees
exactly what its scenario left. With RAM not shared (DMA by messages) the
bytes scenario runs alone. A boot under TCG costs about ten seconds; one
boot instead of three per device keeps the suite inside its time budget.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess

import pytest

from .conftest import real_parts_required

IMAGE_SIZE = 64 << 20
HOST_AT, GUEST_AT, CHUNK = 8 << 20, 16 << 20, 1 << 20
#: Modules the file-system scenarios load besides the device's driver (ext4 needs crc32c).
FS_MODULES = ["crc32c_generic", "ext4"]


def make_image(path: str, seed: int = 7) -> bytes:
    """A 64 MiB image, zero but for 1 MiB of seeded random bytes at 8 MiB; returns those bytes."""
    data = random.Random(seed).randbytes(CHUNK)
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.seek(HOST_AT)
        f.write(data)
    return data


def guest_data(seed: int = 11) -> bytes:
    """The 1 MiB the guest writes (a file in its initramfs)."""
    return random.Random(seed).randbytes(CHUNK)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bytes_script(dev: str, block: str, irq_names: str) -> str:
    """Direct I/O both ways, 4 KiB blocks, plus a 512-byte write at an odd sector; then the
    interrupts counted on the I/O queues' vectors (``irq_names``: an awk regex of their names)."""
    return "\nset -e\n" + _bytes_part(dev, block, irq_names)


def _bytes_part(dev: str, block: str, irq_names: str) -> str:
    return rf"""
echo "driver $(basename "$(readlink /sys/bus/pci/devices/0000:00:04.0/driver)")"
echo "size $(cat /sys/block/{block}/size) ro $(cat /sys/block/{block}/ro)"
echo "HOST $(dd if={dev} bs=4096 skip={HOST_AT // 4096} count={CHUNK // 4096} iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
dd if=/guestdata of={dev} bs=4096 seek={GUEST_AT // 4096} oflag=direct 2>/dev/null
head -c 512 /guestdata | dd of={dev} bs=512 seek={GUEST_AT // 512 + 2 * CHUNK // 512 + 3} oflag=direct 2>/dev/null
echo "BACK $(dd if={dev} bs=4096 skip={GUEST_AT // 4096} count={CHUNK // 4096} iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "irqs $(awk '$NF ~ /{irq_names}/ {{s += $2}} END {{print s + 0}}' /proc/interrupts)"
"""


def check_bytes(image: str, host: bytes, console: list[str]) -> None:
    """The host's bytes were read in the guest; the guest's bytes are in the image."""
    text = "\n".join(console)
    assert f"HOST {sha(host)}" in text, "the guest did not read the bytes the host put in the image"
    assert f"BACK {sha(guest_data())}" in text, "the guest did not read back what it wrote"
    with open(image, "rb") as f:
        data = f.read()
    assert data[GUEST_AT : GUEST_AT + CHUNK] == guest_data(), "the guest's direct writes are not in the image"
    odd = GUEST_AT + 2 * CHUNK + 3 * 512
    assert data[odd : odd + 512] == guest_data()[:512] and data[odd - 512 : odd] == bytes(512)
    assert data[HOST_AT : HOST_AT + CHUNK] == host, "the guest changed bytes it only read"
    irqs = int(re.search(r"^irqs (\d+)$", text, re.M).group(1))
    assert irqs > 0, "no interrupt on the I/O queue's MSI-X vector"


def _fs_part(dev: str) -> str:
    """mke2fs, mount, fill (files of several sizes, a directory tree, busybox itself), sync, umount."""
    return rf"""
mke2fs {dev} > /dev/null
mkdir -p /mnt
mount -t ext4 {dev} /mnt
mkdir -p /mnt/tree/a/b
i=1
while [ $i -le 24 ]; do dd if=/dev/urandom of=/mnt/tree/a/f$i bs=4k count=$((i * 5)) 2>/dev/null; i=$((i + 1)); done
cp /bin/busybox /mnt/tree/a/b/busybox
dd if=/dev/urandom of=/mnt/big bs=1M count=8 2>/dev/null
(cd /mnt && sha256sum big tree/a/b/busybox tree/a/f1 tree/a/f24) > /tmp/sums
cp /tmp/sums /mnt/SUMS
sync
umount /mnt
echo "FS-DONE"
cat /tmp/sums
"""


def fsck_tools() -> tuple[str, str]:
    """The host's e2fsck and debugfs (e2fsprogs); a missing one fails the run in CI."""
    found = []
    for tool in ("e2fsck", "debugfs"):
        path = shutil.which(tool) or next((p for p in (f"/sbin/{tool}", f"/usr/sbin/{tool}") if os.access(p, os.X_OK)),
                                          None)
        if path is None:
            message = f"{tool} (Debian's e2fsprogs) is needed to check the guest's file system on the host"
            if real_parts_required():
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        found.append(path)
    return found[0], found[1]


def debugfs_cat(debugfs: str, image: str, path: str) -> bytes:
    out = subprocess.run([debugfs, "-R", f"cat {path}", image], capture_output=True, check=True)
    return out.stdout


def check_fs(image: str, console: list[str]) -> None:
    """``e2fsck -fn`` passes and the files hold what the guest wrote."""
    e2fsck, debugfs = fsck_tools()
    fsck = subprocess.run([e2fsck, "-fn", image], capture_output=True, text=True)
    assert fsck.returncode == 0, f"e2fsck found problems:\n{fsck.stdout}\n{fsck.stderr}"
    sums = [line.split() for line in console if re.match(r"^[0-9a-f]{64}  \S+$", line)]
    assert [name for _, name in sums] == ["big", "tree/a/b/busybox", "tree/a/f1", "tree/a/f24"], console[-20:]
    for digest, name in sums:
        assert sha(debugfs_cat(debugfs, image, "/" + name)) == digest, f"{name} differs in the image"
    assert debugfs_cat(debugfs, image, "/SUMS").decode().split() == [x for pair in sums for x in pair]


def _poweroff_part(dev: str) -> str:
    """Files written; the host's go; ``sync``; then writes that never are, until QEMU is killed."""
    return rf"""
mke2fs {dev} > /dev/null
mkdir -p /mnt
mount -t ext4 {dev} /mnt
dd if=/dev/urandom of=/mnt/kept bs=64k count=40 2>/dev/null
mkdir /mnt/dir
dd if=/dev/urandom of=/mnt/dir/small bs=1k count=3 2>/dev/null
echo WRITTEN
read _ <&3
sync
echo "SYNCED $(sha256sum /mnt/kept | cut -d' ' -f1) $(sha256sum /mnt/dir/small | cut -d' ' -f1)"
dd if=/dev/urandom of=/mnt/unsynced bs=64k count=32 2>/dev/null
echo UNSYNCED-WRITES
while true; do dd if=/dev/urandom of=/mnt/unsynced bs=64k count=32 2>/dev/null; done
"""


def power_off_after_sync(g, disk) -> tuple[str, str, int]:
    """Drive the power-off part of :func:`all_in_one_script`: the flushes ``sync`` sent (counted between the host's go and
    the guest's report), then kill QEMU while the guest writes. ``(kept, small)`` digests."""
    g.expect(r"^WRITTEN$", timeout=180)
    before = disk.stats.flushes
    g.send("\n")
    synced = g.expect(r"^SYNCED (\w+) (\w+)$", timeout=120)
    flushes = disk.stats.flushes - before
    g.expect(r"^UNSYNCED-WRITES$", timeout=60)
    g.close()  # QEMU killed while the guest writes: an unclean power-off
    return synced.group(1), synced.group(2), flushes


def check_poweroff(image: str, kept: str, small: str) -> None:
    """What was synced before the power-off is in the image."""
    _, debugfs = fsck_tools()
    assert sha(debugfs_cat(debugfs, image, "/kept")) == kept, "a synced file was lost"
    assert sha(debugfs_cat(debugfs, image, "/dir/small")) == small, "a synced file was lost"


def all_in_one_script(dev: str, block: str, irq_names: str, after_fs: str = "") -> str:
    """The three scenarios in one boot; the guest waits for the host's go after each check point
    (``after_fs``: more script lines run once the file system is unmounted)."""
    return ("\nset -e\nexec 3< /dev/ttyS0\n" + _bytes_part(dev, block, irq_names) + "echo BYTES-DONE\nread _ <&3\n"
            + _fs_part(dev) + after_fs + "echo FS-CHECKED?\nread _ <&3\n" + _poweroff_part(dev))


def run_all_in_one(g, image: str, host: bytes, disk) -> list[str]:
    """Drive :func:`all_in_one_script`: check the bytes, then the file system (``e2fsck`` on the
    image while the guest waits, unmounted), then the power-off. Returns the console up to the
    power-off, for the device's own checks."""
    fsck_tools()
    g.expect(r"^BYTES-DONE$", timeout=180)
    check_bytes(image, host, g.console.splitlines())
    flushes = disk.stats.flushes
    g.send("\n")
    g.expect(r"^FS-CHECKED\?$", timeout=300)
    console = g.console.splitlines()
    assert disk.stats.flushes > flushes, "sync sent no flush to the device"
    check_fs(image, console[console.index("BYTES-DONE"):])
    g.send("\n")
    kept, small, synced_flushes = power_off_after_sync(g, disk)
    assert synced_flushes > 0, "sync returned before a flush reached the image (fdatasync)"
    check_poweroff(image, kept, small)
    return console
