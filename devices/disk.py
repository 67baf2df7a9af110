"""A raw disk image: the medium behind the storage models (NVMe, virtio-blk).

:class:`DiskImage` is a host file used as an array of bytes, the way QEMU's
``format=raw`` drive uses one: byte *n* of the disk is byte *n* of the file.
It reads and writes with ``pread``/``pwrite`` (the host's page cache is the
disk's volatile write cache) and makes writes durable with ``fdatasync``::

    disk = DiskImage("/var/tmp/disk.img")        # an existing file; its size is the disk's
    disk.write(0, b"x" * 512)
    disk.flush()                                  # fdatasync: now it survives a host crash
    assert disk.read(0, 512) == b"x" * 512

**Durability.** What a device model writes is in the page cache at once, so it
outlives the server process (stopping the server loses nothing). It reaches
stable storage on :meth:`DiskImage.flush`, which the models call for the
guest's flush commands (NVMe Flush, virtio ``VIRTIO_BLK_T_FLUSH``) and for a
write the guest marked Force Unit Access, *before* they report the command
complete. :attr:`DiskImage.stats` counts what happened, flushes included.

Zeroing and discarding use ``fallocate`` (``FALLOC_FL_ZERO_RANGE``,
``FALLOC_FL_PUNCH_HOLE``) where the host file system has them; zeroing falls
back to writing zeros, discarding to doing nothing (a discard is a hint).

Errors: a file that cannot be opened, is not a regular file or block device,
or whose size is not a whole number of sectors raises :class:`DiskImageError`
(a :class:`~vfiouser.devices.errors.DefinitionError`: the model cannot be
built); an access outside the disk raises :class:`DiskRangeError`; a failed
host I/O raises :class:`DiskIoError`, which the models turn into the guest's
media-error status.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from dataclasses import dataclass

from vfiouser.devices.errors import DefinitionError, DeviceError

__all__ = ["DiskImage", "DiskStats", "DiskImageError", "DiskRangeError", "DiskIoError", "SECTOR"]

log = logging.getLogger(__name__)

#: The unit of a disk's size: 512 bytes.
SECTOR = 512

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20
#: Most buffers one preadv/pwritev takes (Linux's IOV_MAX).
_IOV_MAX = 1024


class DiskImageError(DefinitionError):
    """The image cannot back a disk (missing, not a file or block device, size not in sectors)."""


class DiskRangeError(DeviceError):
    """An access outside the disk (``offset``, ``size``), or of a negative size."""

    def __init__(self, message: str, offset: int, size: int) -> None:
        super().__init__(message)
        self.offset, self.size = offset, size


class DiskIoError(DeviceError):
    """The host could not read, write or flush the image (``errno`` of the failed call)."""


@dataclass
class DiskStats:
    """What a disk has done since it was opened."""

    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    #: ``fdatasync`` calls made (guest flushes, FUA writes, shutdowns)
    flushes: int = 0
    zeroed: int = 0
    discarded: int = 0


def _fallocate():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate_fn = _fallocate()


class DiskImage:
    """A raw image file as a disk (see the module docstring).

    ``readonly`` opens the file read-only, and the models report the disk
    read-only to the guest. The file must exist; its size, a whole number of
    512-byte sectors, is the disk's capacity.
    """

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        if not path:
            raise DiskImageError("a disk needs an image: file=PATH (a raw image; create one with truncate -s 64M PATH)")
        self.path = path
        self.readonly = readonly
        try:
            self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskImageError(f"cannot open the disk image {path!r}: {exc.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                size = os.lseek(self.fd, 0, os.SEEK_END)
            else:
                raise DiskImageError(f"{path!r} is neither a regular file nor a block device")
            if size == 0 or size % SECTOR:
                raise DiskImageError(f"{path!r} has {size} bytes: a disk image is a non-zero whole number of "
                                     f"{SECTOR}-byte sectors")
        except BaseException:
            os.close(self.fd)
            raise
        #: The disk's size in bytes.
        self.size = size
        self.stats = DiskStats()
        self._zero_range = _fallocate_fn is not None
        self._punch_hole = _fallocate_fn is not None
        self._lock = threading.Lock()  # stats and the fallocate fallbacks; I/O itself needs none

    def __repr__(self) -> str:
        return f"<DiskImage {self.path!r} {self.size} bytes{' read-only' if self.readonly else ''}>"

    def refresh_size(self) -> int:
        """Read the image's size again (the host grew or shrank it); returns the new size in bytes."""
        size = os.lseek(self.fd, 0, os.SEEK_END)
        self.size = size - size % SECTOR
        return self.size

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise DiskRangeError(f"access [{offset:#x}, +{size:#x}) outside the {self.size:#x}-byte disk", offset, size)

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``."""
        self._check(offset, size)
        try:
            data = os.pread(self.fd, size, offset)
            if len(data) < size:  # a short read only happens at the end of a file that shrank
                data += bytes(size - len(data))
        except OSError as exc:
            raise DiskIoError(f"read of {size} bytes at {offset:#x} failed: {exc.strerror}", errno=exc.errno) from None
        self.stats.reads += 1
        self.stats.bytes_read += size
        return data

    def readinto(self, offset: int, buffers: list) -> int:
        """Fill ``buffers`` (writable buffers, in order) from ``offset`` with one ``preadv`` per
        1024 of them: a device model passes guest memory itself (``Dma.write_with``). Returns
        the bytes read (their total size: past the end of a file that shrank, zeros)."""
        size = sum(len(b) for b in buffers)
        self._check(offset, size)
        pos = offset
        try:
            for first in range(0, len(buffers), _IOV_MAX):
                chunk = buffers[first : first + _IOV_MAX]
                want = sum(len(b) for b in chunk)
                got = os.preadv(self.fd, chunk, pos)
                if got < want:  # short: finish buffer by buffer
                    self._finish_read(chunk, got, pos)
                pos += want
        except OSError as exc:
            raise DiskIoError(f"read of {size} bytes at {offset:#x} failed: {exc.strerror}", errno=exc.errno) from None
        self.stats.reads += 1
        self.stats.bytes_read += size
        return size

    def _finish_read(self, chunk: list, got: int, pos: int) -> None:
        for buf in chunk:
            view = memoryview(buf).cast("B")
            if got >= len(view):
                got -= len(view)
                pos += len(view)
                continue
            done = got
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], pos + done)
                if n == 0:
                    view[done:] = bytes(len(view) - done)  # end of file: reads as zeros
                    break
                done += n
            got = 0
            pos += len(view)

    def write_from(self, offset: int, buffers: list) -> None:
        """Store ``buffers`` (in order) at ``offset`` with ``pwritev``: a device model passes
        guest memory itself (``Dma.read_with``)."""
        self._check_writable()
        size = sum(len(b) for b in buffers)
        self._check(offset, size)
        try:
            pos = offset
            for first in range(0, len(buffers), _IOV_MAX):
                chunk = buffers[first : first + _IOV_MAX]
                want = sum(len(b) for b in chunk)
                done = os.pwritev(self.fd, chunk, pos)
                while done < want:  # short write: the rest, buffer by buffer
                    skip = done
                    for buf in chunk:
                        view = memoryview(buf).cast("B")
                        if skip >= len(view):
                            skip -= len(view)
                            continue
                        done += os.pwrite(self.fd, view[skip:], pos + done)
                        break
                pos += want
        except OSError as exc:
            raise DiskIoError(f"write of {size} bytes at {offset:#x} failed: {exc.strerror}", errno=exc.errno) from None
        self.stats.writes += 1
        self.stats.bytes_written += size

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset`` (in the page cache: durable after :meth:`flush`)."""
        self._check_writable()
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as exc:
            raise DiskIoError(f"write of {len(view)} bytes at {offset:#x} failed: {exc.strerror}",
                              errno=exc.errno) from None
        self.stats.writes += 1
        self.stats.bytes_written += len(view)

    def flush(self) -> None:
        """Make everything written so far durable (``fdatasync``)."""
        if self.readonly:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise DiskIoError(f"fdatasync failed: {exc.strerror}", errno=exc.errno) from None
        self.stats.flushes += 1

    def write_zeroes(self, offset: int, size: int) -> None:
        """Make ``[offset, offset+size)`` read as zeros."""
        self._check_writable()
        self._check(offset, size)
        if size == 0:
            return
        if self._zero_range and self._falloc(_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, size):
            self.stats.zeroed += size
            return
        self._zero_range = False
        chunk = bytes(min(size, _ZERO_CHUNK))
        pos = offset
        while pos < offset + size:
            n = min(len(chunk), offset + size - pos)
            self.write(pos, memoryview(chunk)[:n])
            pos += n
        self.stats.zeroed += size

    def discard(self, offset: int, size: int) -> bool:
        """Tell the host ``[offset, offset+size)`` is unused (a hole, reads as zeros); False when the
        host file system cannot punch holes (then nothing changed: a discard is only a hint)."""
        self._check_writable()
        self._check(offset, size)
        if size == 0 or not self._punch_hole:
            return False
        if self._falloc(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, size):
            self.stats.discarded += size
            return True
        self._punch_hole = False
        return False

    def _check_writable(self) -> None:
        if self.readonly:
            raise DiskIoError(f"the disk image {self.path!r} is read-only", errno=errno.EROFS)

    def _falloc(self, mode: int, offset: int, size: int) -> bool:
        """``fallocate``; False if the host does not support ``mode`` here, raises on real failures."""
        if _fallocate_fn(self.fd, mode, offset, size) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            log.debug("fallocate mode %#x not supported for %s (%s)", mode, self.path, os.strerror(err))
            return False
        raise DiskIoError(f"fallocate of {size} bytes at {offset:#x} failed: {os.strerror(err)}", errno=err)

    def close(self) -> None:
        """Close the file (written data stays in the page cache, and in the file)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
