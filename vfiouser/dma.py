"""DMA map bookkeeping: which client (guest) addresses the device may access, and how.

DMA_MAP adds ``[addr, addr+size)`` with read/write permission. With an fd
(guest RAM shared through ``memory-backend-memfd,share=on``) the range is
mmapped ``MAP_SHARED`` with the map's protection and accessed in place; without
one (QEMU's default RAM, ROM, the device's own mmap-able BAR areas) it is only
recorded, and data moves through DMA_READ/DMA_WRITE messages. DMA_UNMAP removes
exactly one mapped range (or all of them with the ALL flag).

Rules (errno of the error reply in brackets): a range must be non-empty, not
wrap around 2**64 and not overlap another map (EEXIST), unless it is the very
same range with the same rights and kind (with or without an fd), which then
replaces the old map (QEMU maps a range again as memory regions change); with
an fd, the fd's range must fit in a file offset and, for a file with a size
(a memfd, a regular file), lie inside it (EINVAL). Unmapping a range that was
not mapped is ENOENT. Mapping with an fd that cannot be mmapped keeps the
range as a message-only map and logs a warning.

What a map costs in fds: the server closes the client's fd once it has mapped
it, but CPython's ``mmap`` keeps a duplicate of its own for as long as the
mapping lives, so each fd-backed map holds one fd (QEMU makes a handful; the
command line raises the process's soft fd limit to the hard one); a session
keeps at most ``MAX_FD_MAPS`` of them (ENOSPC beyond).

Device DMA *pins* the maps it uses (:meth:`DmaMappings.acquire`); a transfer
may span adjacent maps (QEMU splits RAM around the legacy VGA/BIOS hole).
Unmapping an mmapped map waits for the in-place copies pinning it to finish,
so a mapping never disappears under a copy. Unmapping a map reached by
messages waits for nothing: the server holds no memory of it, and a
DMA_READ/DMA_WRITE already sent is the client's to answer (QEMU answers from
its own view of guest memory; it unmaps and maps RAM again whenever its
memory layout changes, as while firmware runs, and failing the transfer then
would break a device the firmware is using). New transfers on the unmapped
range are refused.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass

from vfiouser.devices.pci.dma import DmaPermissionError, DmaUnmapped

from .errors import BadDmaRequest
from .protocol import DmaMapFlags

__all__ = ["DmaRegion", "DmaMappings"]

log = logging.getLogger(__name__)

# Plain ints: an IntFlag operation costs microseconds, and device DMA asks for every transfer.
_READ, _WRITE = int(DmaMapFlags.READ), int(DmaMapFlags.WRITE)

#: Most maps with an fd a session keeps (each holds one fd; QEMU makes a handful).
MAX_FD_MAPS = 1024
#: The largest offset a file may have (off_t is signed 64-bit).
MAX_FILE_OFFSET = (1 << 63) - 1
#: How long an unmap waits for in-place copies on its range (they take microseconds;
#: the bound keeps a stuck worker from holding the server loop near QEMU's 5 s timeout).
UNMAP_WAIT = 1.0


@dataclass(eq=False)
class DmaRegion:
    """One mapped range. ``mem`` is a memoryview of the mapping, or ``None`` for message-only DMA."""

    addr: int
    size: int
    flags: int
    #: whether the client gave an fd with it (``mem`` is None anyway if it could not be mapped)
    has_fd: bool = False
    mem: memoryview | None = None
    _map: mmap.mmap | None = None
    _whole: memoryview | None = None
    #: transfers in progress on this map
    users: int = 0
    #: unmapped: no new transfer may start
    dead: bool = False

    @property
    def end(self) -> int:
        return self.addr + self.size

    @property
    def readable(self) -> bool:
        return bool(self.flags & _READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & _WRITE)

    def release(self) -> None:
        """Drop the mapping (the views first, then the mmap)."""
        for view in (self.mem, self._whole):
            if view is not None:
                view.release()
        self.mem = self._whole = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                log.warning("DMA map [%#x, +%#x) still in use; it is freed when its last user lets go",
                            self.addr, self.size)
            self._map = None

    def __repr__(self) -> str:
        mode = "mmap" if self.mem is not None else "msg"
        return f"DmaRegion({self.addr:#x}, +{self.size:#x}, flags={self.flags:#x}, {mode})"


class DmaMappings:
    """The DMA maps of one session, sorted by address. Thread-safe."""

    def __init__(self, max_maps: int = 65535) -> None:
        self.max_maps = max_maps
        self._addrs: list[int] = []
        self._regions: list[DmaRegion] = []
        self._lock = threading.Lock()  # never taken twice by one thread
        self._cond = threading.Condition(self._lock)

    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self):
        with self._cond:
            return iter(list(self._regions))

    # -- DMA_MAP / DMA_UNMAP (server thread) ------------------------------------

    def add(self, addr: int, size: int, flags: int, fd: int | None = None, offset: int = 0) -> DmaRegion:
        """Map ``[addr, addr+size)``. Takes ownership of ``fd`` (it is closed here)."""
        try:
            if flags & ~int(DmaMapFlags.READ | DmaMapFlags.WRITE):
                raise BadDmaRequest(f"unknown DMA_MAP flag bits {flags:#x}")
            if size == 0 or addr + size > 1 << 64:
                raise BadDmaRequest(f"invalid DMA range [{addr:#x}, +{size:#x})")
            if fd is not None:
                self._check_file(fd, offset, size)
            with self._cond:
                replace = self._check_free(addr, size, flags, fd is not None)
            region = DmaRegion(addr, size, flags, has_fd=fd is not None)
            if fd is not None:
                self._mmap(region, fd, offset)
        finally:
            if fd is not None:
                os.close(fd)
        with self._cond:
            if replace is not None:
                i = self._regions.index(replace)
                del self._regions[i]
                del self._addrs[i]
            pos = bisect.bisect_right(self._addrs, addr)
            self._addrs.insert(pos, addr)
            self._regions.insert(pos, region)
        if replace is not None:
            self._retire(replace)
        log.debug("DMA map %r", region)
        return region

    @staticmethod
    def _check_file(fd: int, offset: int, size: int) -> None:
        """The fd's range must be one the kernel can map, and inside the file where it has a
        size (a regular file, a memfd): beyond its end an access would fault (SIGBUS)."""
        if offset + size > MAX_FILE_OFFSET:
            raise BadDmaRequest(f"DMA_MAP fd range [{offset:#x}, +{size:#x}) exceeds the largest file offset")
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise BadDmaRequest(f"DMA_MAP fd cannot be examined: {exc}", errno=errno.EBADF) from None
        if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
            raise BadDmaRequest(f"DMA_MAP fd range [{offset:#x}, +{size:#x}) runs past the end of its "
                                f"{st.st_size:#x}-byte file")

    def _check_free(self, addr: int, size: int, flags: int, has_fd: bool) -> DmaRegion | None:
        """The region this map may replace (exactly the same range, rights and kind: QEMU maps
        the same range again), or None; raises EEXIST on any other overlap."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        replace = None
        for j in (i, i + 1):
            if 0 <= j < len(self._regions):
                other = self._regions[j]
                if other.addr == addr and other.size == size and other.flags == flags and other.has_fd == has_fd:
                    replace = other
                elif other.addr < addr + size and addr < other.end:
                    raise BadDmaRequest(
                        f"DMA range [{addr:#x}, +{size:#x}) overlaps [{other.addr:#x}, +{other.size:#x})",
                        errno=errno.EEXIST,
                    )
        if replace is None and len(self._regions) >= self.max_maps:
            raise BadDmaRequest(f"too many DMA maps (max {self.max_maps})", errno=errno.ENOSPC)
        if replace is None and has_fd and sum(r.has_fd for r in self._regions) >= MAX_FD_MAPS:
            raise BadDmaRequest(f"too many DMA maps with an fd (max {MAX_FD_MAPS}: each holds one)",
                                errno=errno.ENOSPC)
        return replace

    @staticmethod
    def _mmap(region: DmaRegion, fd: int, offset: int) -> None:
        prot = 0
        if region.flags & DmaMapFlags.READ:
            prot |= mmap.PROT_READ
        if region.flags & DmaMapFlags.WRITE:
            prot |= mmap.PROT_WRITE
        if not prot:
            return
        # mmap needs an offset aligned to the file's page size (4 KiB, or the huge page size on
        # hugetlbfs): map from the page start, skip the slack, round the length up.
        align = mmap.ALLOCATIONGRANULARITY
        try:
            blksize = os.fstat(fd).st_blksize
            if blksize > align and blksize & (blksize - 1) == 0:
                align = blksize
        except OSError:
            pass
        slack = offset % align
        length = -(-(region.size + slack) // align) * align
        try:
            m = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=offset - slack)
        except (OSError, ValueError, OverflowError) as exc:
            log.warning("cannot mmap DMA range [%#x, +%#x) (fd offset %#x): %s; using DMA messages",
                        region.addr, region.size, offset, exc)
            return
        region._map = m
        region._whole = memoryview(m)
        region.mem = region._whole[slack : slack + region.size]

    def remove(self, addr: int, size: int) -> DmaRegion:
        """Unmap exactly ``[addr, addr+size)``; :class:`BadDmaRequest` (ENOENT) if it is not mapped."""
        with self._cond:
            i = bisect.bisect_right(self._addrs, addr) - 1
            if i < 0 or self._regions[i].addr != addr or self._regions[i].size != size:
                raise BadDmaRequest(f"DMA range [{addr:#x}, +{size:#x}) is not mapped", errno=errno.ENOENT)
            region = self._regions.pop(i)
            del self._addrs[i]
        self._retire(region)
        log.debug("DMA unmap %r", region)
        return region

    def remove_all(self) -> None:
        """Unmap everything."""
        with self._cond:
            regions, self._regions, self._addrs = self._regions, [], []
        for region in regions:
            self._retire(region)

    close = remove_all

    def _retire(self, region: DmaRegion) -> None:
        """Stop new transfers; if it is mmapped, wait for the copies in it; release the mapping.
        Messages waiting on a map without memory are left to the client's answer (module
        docstring)."""
        with self._cond:
            region.dead = True
            if region.mem is not None and not self._cond.wait_for(lambda: region.users == 0, UNMAP_WAIT):
                log.error("DMA range %r still in use after %.0fs; releasing it anyway", region, UNMAP_WAIT)
            region.release()

    # -- device DMA (worker threads) --------------------------------------------

    def find(self, addr: int, size: int) -> DmaRegion | None:
        """The map that contains all of ``[addr, addr+size)``, or ``None``."""
        with self._cond:
            i = bisect.bisect_right(self._addrs, addr) - 1
            if i >= 0:
                region = self._regions[i]
                if addr + size <= region.end:
                    return region
        return None

    def acquire(self, addr: int, size: int, write: bool) -> list[tuple[DmaRegion, int, int]]:
        """Pin the maps covering ``[addr, addr+size)`` as ``(region, offset, length)`` pieces.

        Raises :class:`~vfiouser.devices.pci.dma.DmaUnmapped` for a gap and
        :class:`~vfiouser.devices.pci.dma.DmaPermissionError` for a direction the map forbids.
        """
        end = addr + size
        pieces = []
        with self._cond:
            i = bisect.bisect_right(self._addrs, addr) - 1
            pos = addr
            while pos < end:
                region = self._regions[i] if 0 <= i < len(self._regions) else None
                if region is None or not region.addr <= pos < region.end:
                    raise DmaUnmapped(f"DMA range [{addr:#x}, +{size:#x}) is not mapped at {pos:#x}", addr, size)
                if write and not region.writable:
                    raise DmaPermissionError(f"DMA write to read-only guest memory at {pos:#x}", addr, size)
                if not write and not region.readable:
                    raise DmaPermissionError(f"DMA read of write-only guest memory at {pos:#x}", addr, size)
                n = min(end, region.end) - pos
                pieces.append((region, pos - region.addr, n))
                pos += n
                i += 1
            for region, _, _ in pieces:
                region.users += 1
        return pieces

    def pin(self, addr: int, size: int, write: bool) -> DmaRegion | None:
        """The one mmapped map that holds all of ``[addr, addr+size)`` for this direction, pinned
        (:meth:`unpin` it), or None with nothing pinned: the fast path of a device's DMA."""
        with self._lock:
            i = bisect.bisect_right(self._addrs, addr) - 1
            if i < 0:
                return None
            region = self._regions[i]
            if (addr + size > region.addr + region.size or region.mem is None
                    or not region.flags & (_WRITE if write else _READ)):
                return None
            region.users += 1
            return region

    def unpin(self, region: DmaRegion) -> None:
        with self._lock:
            region.users -= 1
            if region.dead:
                self._cond.notify_all()

    def acquire_in_place(self, segments, write: bool) -> list[tuple[DmaRegion, int, int]] | None:
        """Pin the maps of a scatter-gather list when every segment lies inside one mmapped map
        that allows ``write`` (or read): ``(region, offset, length)`` per segment. None (nothing
        pinned) otherwise: the caller takes the piece-by-piece path, which reports what is wrong."""
        pieces = []
        with self._cond:
            addrs, regions = self._addrs, self._regions
            region = None
            for addr, size in segments:
                if region is None or not (region.addr <= addr and addr + size <= region.addr + region.size):
                    i = bisect.bisect_right(addrs, addr) - 1
                    region = regions[i] if i >= 0 else None
                    if (region is None or addr + size > region.addr + region.size or region.mem is None
                            or not region.flags & (_WRITE if write else _READ)):
                        return None
                pieces.append((region, addr - region.addr, size))
            for region, _, _ in pieces:
                region.users += 1
        return pieces

    def reachable(self, addr: int, size: int, write: bool) -> list[tuple[int, int]]:
        """The parts of ``[addr, addr+size)`` that are mapped and allow ``write`` (or read), in order."""
        end = addr + size
        out: list[tuple[int, int]] = []
        with self._cond:
            i = max(0, bisect.bisect_right(self._addrs, addr) - 1)
            for region in self._regions[i:]:
                if region.addr >= end:
                    break
                lo, hi = max(addr, region.addr), min(end, region.end)
                if lo < hi and (region.writable if write else region.readable):
                    if out and out[-1][0] + out[-1][1] == lo:
                        out[-1] = (out[-1][0], out[-1][1] + hi - lo)
                    else:
                        out.append((lo, hi - lo))
        return out

    def in_place(self, addr: int, size: int, write: bool) -> bool:
        """Whether all of ``[addr, addr+size)`` is mapped for this direction and mmapped (no
        message needed to reach it)."""
        end = addr + size
        with self._cond:
            i = bisect.bisect_right(self._addrs, addr) - 1
            pos = addr
            while pos < end:
                region = self._regions[i] if 0 <= i < len(self._regions) else None
                if (region is None or not region.addr <= pos < region.end or region.mem is None
                        or not (region.writable if write else region.readable)):
                    return False
                pos = region.end
                i += 1
        return True

    def release(self, pieces: list[tuple[DmaRegion, int, int]]) -> None:
        """Unpin what :meth:`acquire` pinned."""
        with self._cond:
            for region, _, _ in pieces:
                region.users -= 1
                if region.dead:  # an unmap waits for its last user
                    self._cond.notify_all()
