"""Wire format: every declaration round-trips, on hand-made vectors and on what QEMU 11.1.3 sent."""

import glob
import json
import os

import pytest
from construct import ConstructError, SizeofError

from vfiouser import protocol as p
from vfiouser.errors import MalformedMessage
from vfiouser.trace import load

VECTORS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "vectors", "qemu-*.jsonl")))


def common(fmt, data: bytes, obj: dict, size: int | None):
    """construct-style check: parse(data) == obj, build(obj) == data, sizeof, and the same compiled."""
    for f in (fmt, fmt.compile()):
        parsed = f.parse(data)
        for key, value in obj.items():
            assert parsed[key] == value, key
        assert f.build(obj) == data
        if size is None:
            with pytest.raises(SizeofError):
                f.sizeof()
        else:
            assert f.sizeof() == size == len(data)


def le(*fields):
    """Little-endian packing helper: le((value, width), ...)."""
    return b"".join(v.to_bytes(w, "little") for v, w in fields)


def test_header():
    data = le((7, 2), (9, 2), (32, 4), (0x10, 4), (0, 4))
    common(p.Header, data, dict(msg_id=7, cmd=9, msg_size=32, flags=0x10, error_no=0), 16)
    assert p.HEADER.unpack(data) == (7, 9, 32, 0x10, 0)


def test_version_with_and_without_json():
    text = '{"capabilities":{"max_msg_fds":16}}'
    common(p.Version, le((0, 2), (0, 2)) + text.encode() + b"\0", dict(major=0, minor=0, json=text), None)
    common(p.Version, le((1, 2), (2, 2)), dict(major=1, minor=2, json=None), None)


@pytest.mark.parametrize("bad", [b"\0\0\0\0{}", b"\0\0\0\0{\0}\0", b"\0\0\0\0\xff\0"])
def test_version_json_must_be_one_nul_terminated_utf8_text(bad):
    with pytest.raises(ConstructError):
        p.Version.parse(bad)


def test_dma_map_and_unmap():
    data = le((32, 4), (3, 4), (0x100000, 8), (0x100000, 8), (0x7F00000, 8))
    common(p.DmaMap, data, dict(argsz=32, flags=3, offset=0x100000, addr=0x100000, size=0x7F00000), 32)
    data = le((24, 4), (2, 4), (0, 8), (0, 8))
    common(p.DmaUnmap, data, dict(argsz=24, flags=p.DmaUnmapFlags.ALL, addr=0, size=0), 24)


def test_device_info_region_info_irq_info():
    common(p.DeviceInfo, le((16, 4), (3, 4), (9, 4), (5, 4)), dict(argsz=16, flags=3, num_regions=9, num_irqs=5), 16)
    data = le((32, 4), (3, 4), (2, 4), (0, 4), (0x100, 8), (0, 8))
    common(p.RegionInfo, data, dict(argsz=32, flags=3, index=2, cap_offset=0, size=0x100, offset=0), 32)
    common(p.IrqInfo, le((16, 4), (9, 4), (3, 4), (1, 4)), dict(argsz=16, flags=9, index=3, count=1), 16)


def test_region_info_with_sparse_mmap_chain():
    """The observed 16 KiB BAR with areas (0x1000,0x1000),(0x3000,0x1000): argsz 80, caps at 32."""
    areas = [dict(offset=0x1000, size=0x1000), dict(offset=0x3000, size=0x1000)]
    caps, cap_offset = p.build_region_caps(
        [dict(id=p.RegionCapId.SPARSE_MMAP, version=1, body=dict(nr_areas=2, reserved=0, areas=areas))]
    )
    assert cap_offset == 32 and len(caps) == 48
    info = p.RegionInfo.build(dict(argsz=80, flags=0xF, index=2, cap_offset=32, size=0x4000, offset=0)) + caps
    parsed = p.RegionInfoReply.parse(info)
    assert parsed.argsz == 80 and parsed.caps == caps
    (cap,) = p.parse_region_caps(info, parsed.cap_offset)
    assert cap.id == 1 and cap.next == 0
    assert [(a.offset, a.size) for a in cap.body.areas] == [(0x1000, 0x1000), (0x3000, 0x1000)]


def test_region_caps_chain_links_and_rejects_loops():
    caps, off = p.build_region_caps(
        [
            dict(id=p.RegionCapId.TYPE, version=1, body=dict(type=1, subtype=2)),
            dict(id=p.RegionCapId.SPARSE_MMAP, version=1, body=dict(nr_areas=0, reserved=0, areas=[])),
        ]
    )
    info = bytes(32) + caps
    first, second = p.parse_region_caps(info, off)
    assert first.next == 32 + 16 and second.next == 0 and first.body.subtype == 2
    looped = bytearray(info)
    looped[32 + 4 : 32 + 8] = (32).to_bytes(4, "little")  # first.next -> itself
    with pytest.raises(MalformedMessage):
        p.parse_region_caps(bytes(looped), 32)


def test_set_irqs_and_region_access_and_dma_access():
    data = le((20, 4), (0x24, 4), (0, 4), (0, 4), (1, 4))
    common(p.IrqSet, data, dict(argsz=20, flags=0x24, index=0, start=0, count=1, data=b""), None)
    data = le((0x10, 8), (7, 4), (4, 4)) + b"\x01\x02\x03\x04"
    common(p.RegionAccess, data, dict(offset=0x10, region=7, count=4, data=b"\x01\x02\x03\x04"), None)
    data = le((0x1000, 8), (2, 8)) + b"hi"
    common(p.DmaAccess, data, dict(addr=0x1000, count=2, data=b"hi"), None)


def test_write_multi():
    entry = le((0x10, 8), (0, 4), (4, 4)) + b"\xaa\xbb\xcc\xdd\0\0\0\0"
    data = le((2, 8)) + entry + entry
    obj = dict(wr_cnt=2, wrs=[dict(offset=0x10, region=0, count=4, data=b"\xaa\xbb\xcc\xdd\0\0\0\0")] * 2)
    common(p.WriteMulti, data, obj, None)
    common(p.WriteMultiReply, le((2, 8)), dict(wr_cnt=2), 8)


def test_io_fds_feature_and_migration():
    sub = le((0, 8), (4, 8), (0, 4), (p.IoFdType.IOEVENTFD, 4), (0, 4), (0, 4), (0xAB, 8))
    data = le((56, 4), (0, 4), (0, 4), (1, 4)) + sub
    sub_obj = dict(offset=0, size=4, fd_index=0, type=p.IoFdType.IOEVENTFD, flags=0, padding=0, data=0xAB)
    common(p.IoFdsReply, data, dict(argsz=56, flags=0, index=0, count=1, sub_regions=[sub_obj]), None)
    assert p.IoRegionFd.sizeof() == 40
    flags = p.FeatureFlags.GET | 1
    common(p.DeviceFeature, le((16, 4), (flags, 4)) + bytes(8), dict(argsz=16, flags=flags, data=bytes(8)), None)
    common(p.MigData, le((12, 4), (4, 4)) + b"abcd", dict(argsz=12, size=4, data=b"abcd"), None)
    common(p.MigDataReadRequest, le((8, 4), (4096, 4)), dict(argsz=8, size=4096), 8)


def test_registry_covers_every_command():
    assert sorted(p.MESSAGES) == sorted(p.Command)
    assert [c.value for c in p.Command] == list(range(1, 14)) + [15, 16, 17, 18]
    assert p.MESSAGES[p.Command.DMA_READ].direction == "s2c"


def test_fixed_layouts_are_derived_from_the_declarations():
    assert p.HEADER.format == "<HHLLL" and p.HEADER.size == p.Header.sizeof()
    assert p.REGION_ACCESS.size == 16 and p.DMA_ACCESS.size == 16
    assert p.fixed_layout(p.DmaMap).size == p.DmaMap.sizeof()
    assert p.fixed_layout(p.WriteMultiEntry).size == p.WriteMultiEntry.sizeof() == 24


def test_describe_is_readable_and_never_fails():
    payload = p.RegionAccess.build(dict(offset=0x10, region=7, count=1, data=b"\x01"))
    assert p.describe(10, 0x10, payload, msg_id=3) == "REGION_WRITE #3 command no-reply offset=0x10 region=7 count=1 data=01(1)"
    assert p.describe(99, 0, b"\x01\x02", msg_id=1) == "CMD_99 #1 command payload=0102(2)"
    assert "undecodable" in p.describe(9, 0, b"\x01", msg_id=1)
    assert p.describe(9, 0x21, b"", msg_id=4) == "REGION_READ #4 reply ERROR"


# ---------------------------------------------------------------- QEMU vectors


def test_vectors_exist():
    """Recorded by scripts/capture-vectors from QEMU 11.1.3, default and memfd RAM."""
    names = [os.path.basename(v) for v in VECTORS]
    assert "qemu-11.1.3-probe-default.jsonl" in names and "qemu-11.1.3-probe-memfd.jsonl" in names


@pytest.mark.parametrize("path", VECTORS, ids=os.path.basename)
def test_qemu_vectors_round_trip(path):
    """Every message QEMU sent or received parses with its declaration and builds back to the same bytes."""
    seen = set()
    for m in load(path):
        msg_id, cmd, size, flags, error_no = m.header
        assert size == len(m.msg)
        spec = p.MESSAGES[p.Command(cmd)]
        fmt = spec.reply if flags & p.MsgFlags.TYPE_MASK == p.MsgType.REPLY else spec.request
        obj = fmt.parse(m.payload)
        assert fmt.build(obj) == m.payload
        assert p.Header.build(p.Header.parse(m.msg)) == m.msg[:16]
        seen.add((m.dir, p.Command(cmd).name))
    expected_in = {"VERSION", "DMA_MAP", "DMA_UNMAP", "DEVICE_GET_INFO", "DEVICE_GET_REGION_INFO",
                   "DEVICE_GET_IRQ_INFO", "DEVICE_SET_IRQS", "REGION_READ", "REGION_WRITE", "DEVICE_RESET"}
    assert expected_in <= {name for d, name in seen if d == "in"}


def test_qemu_vector_facts():
    """What QEMU 11.1.3 really sends, pinned: VERSION caps, memfd fds, posted writes, ROM read."""
    memfd = [m for m in load(next(v for v in VECTORS if v.endswith("memfd.jsonl")))]
    version = p.Version.parse(memfd[0].payload)
    caps = json.loads(version.json)["capabilities"]
    assert len(memfd[0].msg) == 214 and caps["write_multiple"] is True and caps["max_msg_fds"] == 16
    reply = memfd[1]
    assert reply.dir == "out" and len(reply.msg) <= len(memfd[0].msg)
    maps = [m for m in memfd if m.dir == "in" and m.header[1] == p.Command.DMA_MAP]
    assert any(m.nfds == 1 and p.DmaMap.parse(m.payload).flags == 3 for m in maps)
    assert all(m.nfds == 0 for m in maps if p.DmaMap.parse(m.payload).flags == 1)  # ROM/BIOS never has an fd
    posted = [m for m in memfd if m.header[1] == p.Command.REGION_WRITE and m.header[3] & p.MsgFlags.NO_REPLY]
    assert posted and all(p.RegionAccess.parse(m.payload).region in (0, 4) for m in posted)
    ids = {m.header[0] for m in posted}
    assert not [m for m in memfd if m.dir == "out" and m.header[0] in ids and m.header[1] == p.Command.REGION_WRITE]
    rom = [m for m in memfd if m.dir == "in" and m.header[1] == p.Command.REGION_READ
           and p.RegionAccess.parse(m.payload).region == 6]
    assert rom and p.RegionAccess.parse(rom[0].payload).count == 2048
    default = list(load(next(v for v in VECTORS if v.endswith("default.jsonl"))))
    assert all(m.nfds == 0 for m in default if m.header[1] == p.Command.DMA_MAP)
