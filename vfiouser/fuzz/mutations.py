"""Mutations of one planned message: header fields, payload bytes and fields, the VERSION JSON,
the fds that travel with it, how it is split into sends, its declared size."""

from __future__ import annotations

import json
import random
import struct

from ..protocol import Command
from .fds import FdFactory
from .wire import ERROR, HDR, NO_REPLY, REPLY_TYPE, SERVER_MAX_MSG, TYPE_MASK, Msg, cmd_name

#: Boundary integers tried in argsz/offset/size/count/index fields (masked to the field's width).
BOUNDARY = (0, 1, 2, 3, 4, 7, 8, 15, 16, 20, 24, 31, 32, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0xFFFF,
            0x10000, 1 << 20, (1 << 20) + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**63 + 4096,
            2**64 - 4096, 2**64 - 1)

#: Fixed fields of each request payload: (offset, width in bytes, name).
FIELDS: dict[int, tuple[tuple[int, int, str], ...]] = {
    Command.VERSION: ((0, 2, "major"), (2, 2, "minor")),
    Command.DMA_MAP: ((0, 4, "argsz"), (4, 4, "flags"), (8, 8, "offset"), (16, 8, "addr"), (24, 8, "size")),
    Command.DMA_UNMAP: ((0, 4, "argsz"), (4, 4, "flags"), (8, 8, "addr"), (16, 8, "size")),
    Command.DEVICE_GET_INFO: ((0, 4, "argsz"), (4, 4, "flags"), (8, 4, "num_regions"), (12, 4, "num_irqs")),
    Command.DEVICE_GET_REGION_INFO: ((0, 4, "argsz"), (4, 4, "flags"), (8, 4, "index"), (12, 4, "cap_offset"),
                                     (16, 8, "size"), (24, 8, "offset")),
    Command.DEVICE_GET_REGION_IO_FDS: ((0, 4, "argsz"), (4, 4, "flags"), (8, 4, "index"), (12, 4, "count")),
    Command.DEVICE_GET_IRQ_INFO: ((0, 4, "argsz"), (4, 4, "flags"), (8, 4, "index"), (12, 4, "count")),
    Command.DEVICE_SET_IRQS: ((0, 4, "argsz"), (4, 4, "flags"), (8, 4, "index"), (12, 4, "start"),
                              (16, 4, "count")),
    Command.REGION_READ: ((0, 8, "offset"), (8, 4, "region"), (12, 4, "count")),
    Command.REGION_WRITE: ((0, 8, "offset"), (8, 4, "region"), (12, 4, "count")),
    Command.REGION_WRITE_MULTI: ((0, 8, "wr_cnt"), (8, 8, "wrs[0].offset"), (16, 4, "wrs[0].region"),
                                 (20, 4, "wrs[0].count")),
    Command.DEVICE_FEATURE: ((0, 4, "argsz"), (4, 4, "flags")),
    Command.MIG_DATA_READ: ((0, 4, "argsz"), (4, 4, "size")),
    Command.MIG_DATA_WRITE: ((0, 4, "argsz"), (4, 4, "size")),
}


def version_payload(rng: random.Random) -> tuple[bytes, str]:
    """A VERSION payload: a mutated capabilities JSON or a malformed one."""
    caps = {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, "max_data_xfer_size": 1 << 20,
            "migration": {"max_bitmap_size": 256 << 20, "pgsize": 4096}, "write_multiple": True}
    major, minor = 0, 0
    kinds = ["drop-keys", "wrong-type", "unknown-keys", "not-object", "caps-not-object", "long-json",
             "nesting", "bad-json", "bad-utf8", "no-nul", "inner-nul", "no-json", "short", "major", "minor",
             "deep-nesting"]
    kind = rng.choice(kinds)
    doc: object = {"capabilities": caps}
    text: str | None = None
    raw: bytes | None = None
    if kind == "drop-keys":
        for key in rng.sample(sorted(caps), rng.randrange(1, len(caps) + 1)):
            del caps[key]
    elif kind == "wrong-type":
        key = rng.choice(sorted(caps))
        caps[key] = rng.choice(["16", -1, 0, 1025, 2**64, 2**32 + 1, 1.5, True, False, None, [], {}, "x" * 300])
    elif kind == "unknown-keys":
        for _ in range(rng.randrange(1, 5)):
            caps[f"k{rng.randrange(1000)}"] = rng.choice([1, "twin", None, [1, 2], {"a": 1}])
    elif kind == "not-object":
        doc = rng.choice([[], [1, 2], "capabilities", 1, None, True])
    elif kind == "caps-not-object":
        doc = {"capabilities": rng.choice([[], "x", 1, None])}
    elif kind == "long-json":
        caps["padding"] = "p" * rng.choice([200, 4000, 70000, 500000])
    elif kind == "nesting":
        depth = rng.randrange(2, 60)
        text = '{"capabilities":' + '{"a":' * depth + "1" + "}" * depth + "}"
    elif kind == "deep-nesting":
        depth = rng.choice([1000, 100000, 300000])
        text = '{"capabilities":{"migration":' + "[" * depth + "]" * depth + "}}"
    elif kind == "bad-json":
        full = json.dumps(doc)
        text = full[: rng.randrange(len(full))]
    elif kind == "bad-utf8":
        raw = json.dumps(doc).encode()[:20] + b"\xff\xfe\xc3" + b'"}\0'
    elif kind == "no-nul":
        raw = json.dumps(doc).encode()
    elif kind == "inner-nul":
        enc = json.dumps(doc).encode()
        cut = rng.randrange(len(enc))
        raw = enc[:cut] + b"\0" + enc[cut:] + b"\0"
    elif kind == "no-json":
        raw = b""
    elif kind == "short":
        return rng.randbytes(rng.randrange(0, 4)), "VERSION payload shorter than 4 bytes"
    elif kind == "major":
        major = rng.choice([1, 2, 0xFFFF])
    elif kind == "minor":
        minor = rng.choice([1, 0xFFFF])
    if raw is None:
        raw = (json.dumps(doc) if text is None else text).encode() + b"\0"
    return struct.pack("<HH", major, minor) + raw, f"VERSION {kind}"
def _boundary_value(rng: random.Random, width: int, original: int) -> int:
    mask = (1 << (8 * width)) - 1
    value = rng.choice(BOUNDARY + (original + 1, original - 1, original ^ (1 << rng.randrange(8 * width))))
    return value & mask


def mutate(m: Msg, rng: random.Random, first: bool) -> tuple[str, str]:
    """Apply one mutation to ``m`` (in place); returns its family and what it did."""
    families = [("cmd", 5), ("flags", 9), ("error_no", 2), ("bitflip", 9), ("random-bytes", 7), ("truncate", 7),
                ("extend", 6), ("boundary", 16), ("fds", 12), ("split", 8), ("size-small", 2), ("oversized", 2),
                ("huge-size", 2), ("truncate-disconnect", 3), ("fragment-fds", 3)]
    if m.cmd == Command.VERSION:
        families.append(("json", 25 if first else 5))
    if m.fds:  # the fds of a message that takes some are where the trouble is
        families[families.index(("fds", 12))] = ("fds", 45)
    names, weights = zip(*families)
    family = rng.choices(names, weights)[0]
    return family, _mutate_as(m, family, rng)


def _mutate_as(m: Msg, family: str, rng: random.Random) -> str:
    p = m.payload
    if family == "cmd":
        old = m.cmd
        m.cmd = rng.choice([rng.randrange(0, 21), rng.choice(list(Command)).value, 14, 0, 0xFFFF,
                            rng.randrange(0x10000)])
        return f"cmd {cmd_name(old)} -> {cmd_name(m.cmd)}"
    if family == "flags":
        old = m.flags
        choice = rng.randrange(7)
        if choice == 0:
            m.flags ^= NO_REPLY
        elif choice == 1:
            m.flags = (m.flags & ~TYPE_MASK) | REPLY_TYPE
        elif choice == 2:
            m.flags = (m.flags & ~TYPE_MASK) | rng.randrange(2, 16)
        elif choice == 3:
            m.flags |= ERROR
        elif choice == 4:
            m.flags = rng.getrandbits(32)
        elif choice == 5:
            m.flags |= 1 << rng.randrange(6, 32)
        else:
            m.flags = NO_REPLY | rng.choice([0, REPLY_TYPE, ERROR])
        return f"flags {old:#x} -> {m.flags:#x}"
    if family == "error_no":
        m.error_no = rng.getrandbits(32)
        return f"error_no {m.error_no:#x}"
    if family == "bitflip" and p:
        b = bytearray(p)
        bits = [rng.randrange(len(b) * 8) for _ in range(rng.randrange(1, 5))]
        for bit in bits:
            b[bit // 8] ^= 1 << (bit % 8)
        m.payload = bytes(b)
        return f"bit flips at {bits}"
    if family == "random-bytes" and p:
        b = bytearray(p)
        start = rng.randrange(len(b))
        n = min(len(b) - start, rng.randrange(1, 17))
        b[start:start + n] = rng.randbytes(n)
        m.payload = bytes(b)
        return f"{n} random bytes at {start}"
    if family == "truncate" and p:
        n = rng.randrange(len(p))
        m.payload = p[:n]
        return f"payload truncated {len(p)} -> {n}"
    if family in ("extend", "bitflip", "random-bytes", "truncate"):
        room = SERVER_MAX_MSG - HDR.size - len(p)
        if room > 60000 and rng.random() < 0.08:  # up to the server's limit
            n = rng.randrange(60000, room + 1)
            m.payload = p + bytes(n)
        else:
            n = rng.randrange(1, 65)
            m.payload = p + rng.randbytes(n)
        return f"payload extended by {n}"
    if family == "boundary":
        fields = [f for f in FIELDS.get(m.cmd, ()) if f[0] + f[1] <= len(p)]
        if not fields and len(p) >= 4:
            at = rng.randrange(0, len(p) - 3, 4)
            fields = [(at, 8 if at + 8 <= len(p) and rng.random() < 0.5 else 4, f"bytes {at}")]
        if not fields:
            m.payload = p + rng.randbytes(rng.randrange(1, 33))
            return "payload extended (no field to set)"
        at, width, name = rng.choice(fields)
        original = int.from_bytes(p[at:at + width], "little")
        value = _boundary_value(rng, width, original)
        m.payload = p[:at] + value.to_bytes(width, "little") + p[at + width:]
        return f"{name} {original:#x} -> {value:#x}"
    if family == "fds":
        choice = rng.randrange(5)
        old = list(m.fds)
        if choice == 0 or (choice == 1 and not m.fds):
            m.fds = [] if m.fds else [rng.choice(FdFactory.KINDS)]
        elif choice == 1:
            m.fds = [rng.choice(FdFactory.KINDS) for _ in m.fds]
        elif choice == 2:
            m.fds = m.fds + [rng.choice(("eventfd",) * 4 + FdFactory.KINDS) for _ in range(rng.randrange(1, 4))]
        elif choice == 3:
            m.fds = ["eventfd"] * rng.randrange(17, 41)
        else:
            m.fds = [rng.choice(FdFactory.KINDS)]
        return f"fds {old} -> {m.fds}"
    if family == "split":
        length = HDR.size + len(p)
        if length < 2:
            return "split (too short, unchanged)"
        m.splits = sorted({rng.randrange(1, length) for _ in range(rng.randrange(1, 5))})
        if m.fds and rng.random() < 0.3:
            m.fd_frag = rng.randrange(len(m.splits) + 1)
        return f"split into {len(m.splits) + 1} sends"
    if family == "size-small":
        m.size = rng.randrange(0, HDR.size)
        m.size_extra = 0
        m.ends, m.close_ok = "framing", True
        return f"msg_size {m.size} (below the header)"
    if family == "oversized":
        target = SERVER_MAX_MSG + rng.choice([1, 2, 4096, rng.randrange(1, 200000)])
        m.payload = p + bytes(max(0, target - HDR.size - len(p)))
        m.close_ok = True
        return f"msg_size {m.declared:#x} over the server's limit, sent whole"
    if family == "huge-size":
        m.size = rng.choice([2**31, 2**32 - 1, 0xFFFFFFF0, rng.randrange(2**31, 2**32)])
        m.payload = p + rng.randbytes(rng.randrange(0, 4096))
        m.close_ok = True
        if rng.random() < 0.5:
            m.ends = "truncate"
            return f"msg_size {m.size:#x}, {len(m.payload)} payload bytes sent, then disconnect"
        m.ends = None  # a size set before (below 16) no longer applies
        return f"msg_size {m.size:#x}, {len(m.payload)} payload bytes sent, then the session goes on"
    if family == "truncate-disconnect":
        m.size_extra = rng.randrange(1, 8192)
        if m.size is not None and m.size < HDR.size:  # unframeable already: that decides the ending
            return f"msg_size {m.size} stays (unframeable), the {m.size_extra} missing bytes do not matter"
        m.ends = "truncate"
        return f"msg_size {m.declared:#x} but {m.size_extra} bytes fewer sent, then disconnect"
    if family == "fragment-fds":
        length = HDR.size + len(p)
        if length < 4:
            return "fragment fds (too short, unchanged)"
        m.splits = sorted(rng.sample(range(1, length), min(length - 1, rng.randrange(2, 5))))
        m.frag_fds = {k: ["eventfd"] * rng.randrange(1, 4) for k in range(1, len(m.splits) + 1)
                      if rng.random() < 0.8} or {len(m.splits): ["eventfd"]}
        m.fd_check = True
        return f"eventfds on fragments {sorted(m.frag_fds)} of {len(m.splits) + 1}"
    if family == "json":
        m.payload, what = version_payload(rng)
        return what
    raise AssertionError(family)
