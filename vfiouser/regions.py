"""The device's regions as vfio-user describes them (DEVICE_GET_REGION_INFO).

Built once per server from the device port's region table: each region's
flags (READ, WRITE, MMAP), its capabilities (the sparse-mmap areas when only
part of it may be mapped) and the fd that goes with its info when the client
may map it (offset 0 of the fd is offset 0 of the region: one fd per region,
as QEMU 11.1.3 expects).
"""

from __future__ import annotations

from dataclasses import dataclass

from vfiouser.devices.port import RegionInfo, RegionKind

from .protocol import REGION_INFO_SIZE, Layout, RegionCapId, RegionFlags, build_region_caps

__all__ = ["RegionTable", "ProtocolRegion"]


@dataclass(frozen=True)
class ProtocolRegion:
    """One region's GET_REGION_INFO answer, precomputed."""

    index: int
    size: int
    flags: int
    caps: bytes
    cap_offset: int
    fd: int | None


class RegionTable:
    """Every region of a device port, ready to be described to a client."""

    def __init__(self, regions: tuple[RegionInfo, ...]) -> None:
        self.info = regions
        self.entries = tuple(self._entry(r) for r in regions)

    @staticmethod
    def _entry(region: RegionInfo) -> ProtocolRegion:
        flags = 0
        caps: list[dict] = []
        if region.size:
            if region.readable:
                flags |= RegionFlags.READ
            if region.writable:
                flags |= RegionFlags.WRITE
            if region.mmap_areas:
                flags |= RegionFlags.MMAP
                if list(region.mmap_areas) != [(0, region.size)]:  # no cap: the whole region
                    areas = [dict(offset=o, size=n) for o, n in region.mmap_areas]
                    caps.append(dict(id=RegionCapId.SPARSE_MMAP, version=1,
                                     body=dict(nr_areas=len(areas), reserved=0, areas=areas)))
        blob, cap_offset = build_region_caps(caps)
        fd = region.mmap_fd if region.mmap_areas else None
        return ProtocolRegion(region.index, region.size, int(flags), blob, cap_offset, fd)

    def __len__(self) -> int:
        return len(self.entries)

    def reply(self, index: int, argsz: int) -> tuple[bytes, int | None]:
        """The GET_REGION_INFO reply payload for ``index`` and the fd to send with it (or None).

        When ``argsz`` is too small for the capabilities, the reply says how much is
        needed and carries neither capabilities nor fd (the client asks again)."""
        region = self.entries[index]
        needed = REGION_INFO_SIZE + len(region.caps)
        if argsz < needed:
            return Layout.REGION_INFO.pack(needed, region.flags & ~RegionFlags.MMAP, index, 0, region.size, 0), None
        flags = region.flags | (RegionFlags.CAPS if region.caps else 0)
        return Layout.REGION_INFO.pack(needed, flags, index, region.cap_offset, region.size, 0) + region.caps, region.fd

    def describe(self) -> str:
        """One line per present BAR or ROM, for the server's start-up log."""
        lines = []
        for r in self.info:
            if r.size and r.kind != RegionKind.CONFIG:
                shared = sum(n for _, n in r.mmap_areas)
                mapped = f", {shared:#x} mmap-able" if shared else ""
                lines.append(f"region {r.index}: {r.kind} {r.size:#x} bytes{mapped}")
        return "; ".join(lines) or "no BARs"
