"""The raw disk image behind the storage models: bounds, vectored I/O, zeroing, durability."""

import errno
import os

import pytest

from vfiouser.devices.disk import DiskImage, DiskImageError, DiskIoError, DiskRangeError
from vfiouser.iomgr.errors import VfioUserError


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "d.img"
    path.write_bytes(bytes(1 << 20))
    d = DiskImage(str(path))
    yield d
    d.close()


def test_size_and_plain_io(disk):
    assert disk.size == 1 << 20
    disk.write(4096, b"abc" * 171 + b"d")
    assert disk.read(4096, 515) == b"abc" * 171 + b"d" + bytes(1)
    assert (disk.stats.reads, disk.stats.writes, disk.stats.bytes_written) == (1, 1, 514)


def test_vectored_io_beyond_one_iovec_batch(disk):
    """More buffers than one preadv takes (1024): split, in order."""
    data = os.urandom(1500 * 64)
    disk.write_from(0, [memoryview(data)[i * 64 : (i + 1) * 64] for i in range(1500)])
    assert disk.read(0, len(data)) == data
    bufs = [bytearray(64) for _ in range(1500)]
    assert disk.readinto(0, bufs) == len(data)
    assert b"".join(bufs) == data


def test_accesses_outside_the_disk_are_refused(disk):
    with pytest.raises(DiskRangeError):
        disk.read((1 << 20) - 1, 2)
    with pytest.raises(DiskRangeError):
        disk.write(-512, b"x")
    with pytest.raises(DiskRangeError):
        disk.readinto(1 << 20, [bytearray(1)])
    assert isinstance(DiskRangeError("x", 0, 0), VfioUserError)


def test_flush_is_fdatasync(disk, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd))
    disk.flush()
    assert calls == [disk.fd] and disk.stats.flushes == 1


def test_write_zeroes_with_and_without_fallocate(disk):
    disk.write(0, b"\xff" * 8192)
    disk.write_zeroes(512, 1024)
    assert disk.read(0, 2048) == b"\xff" * 512 + bytes(1024) + b"\xff" * 512
    disk._zero_range = False  # a host file system without FALLOC_FL_ZERO_RANGE: zeros are written
    disk.write_zeroes(4096, 2048)
    assert disk.read(4096, 4096) == bytes(2048) + b"\xff" * 2048
    assert disk.stats.zeroed == 1024 + 2048


def test_discard_is_a_hint(disk):
    disk.write(0, b"\xee" * 65536)
    punched = disk.discard(0, 65536)
    assert disk.read(0, 65536) == (bytes(65536) if punched else b"\xee" * 65536)


def test_read_only_images(tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(b"z" * 4096)
    d = DiskImage(str(path), readonly=True)
    with pytest.raises(DiskIoError) as err:
        d.write(0, b"x")
    assert err.value.errno == errno.EROFS
    with pytest.raises(DiskIoError):
        d.write_zeroes(0, 512)
    d.flush()  # nothing to make durable: no error
    assert d.read(0, 1) == b"z"
    d.close()


@pytest.mark.parametrize("content", [b"", b"x" * 1000], ids=["empty", "not-whole-sectors"])
def test_images_that_cannot_be_disks(tmp_path, content):
    path = tmp_path / "bad.img"
    path.write_bytes(content)
    with pytest.raises(DiskImageError):
        DiskImage(str(path))
    with pytest.raises(DiskImageError):
        DiskImage(str(tmp_path / "absent.img"))
    with pytest.raises(DiskImageError):
        DiskImage(str(tmp_path))  # a directory


def test_the_image_can_grow_under_the_disk(disk):
    with open(disk.path, "r+b") as f:
        f.truncate(2 << 20)
    assert disk.refresh_size() == 2 << 20
    disk.write((2 << 20) - 512, b"end")
