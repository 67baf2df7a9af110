"""Session shapes: the client side of the QEMU sessions recorded in ``tests/vectors``, made to
fit the device under test (:func:`adapt`), and the additions a plan may splice in (KVM's INTx
resample set-up, MSI/MSI-X set-ups, vectors fired by SET_IRQS, register pokes,
REGION_WRITE_MULTI made of posted writes)."""

from __future__ import annotations

import glob
import os
import random
import struct
from dataclasses import dataclass, replace

from ..devices import make_device
from ..devices.pci.firmware import assign_bars
from ..protocol import Command, IrqSetFlags
from ..trace import load
from .wire import ACCESS, CONFIG_REGION, IRQ_SET, MULTI_ENTRY, NO_REPLY, ROM_REGION, Msg


@dataclass
class DeviceProfile:
    """What a device looks like to a client: its BARs, interrupt counts and firmware set-up."""

    name: str
    #: present BARs: (region index, size, kind) with kind "io" or "memory"
    bars: list[tuple[int, int, str]]
    irq_counts: list[int]
    #: config writes firmware makes to place the BARs: (offset, value), 4 bytes each
    bar_program: list[tuple[int, int]]


def device_profile(name: str) -> DeviceProfile:
    """Build ``name`` in this process and read its regions; place its BARs as firmware does."""
    port = make_device(name).port
    written: dict[int, int] = {}

    def read(offset: int, size: int) -> int:
        buf = bytearray(size)
        port.region_read(CONFIG_REGION, offset, buf)
        return int.from_bytes(buf, "little")

    def write(offset: int, value: int, size: int) -> None:
        port.region_write(CONFIG_REGION, offset, value.to_bytes(size, "little"))
        if 0x10 <= offset < 0x28 and size == 4:
            written[offset] = value

    assign_bars(read, write)
    program = [(off, 0 if value == 0xFFFFFFFF else value) for off, value in sorted(written.items())]
    bars = [(r.index, r.size, r.kind.value if hasattr(r.kind, "value") else str(r.kind))
            for r in port.regions if r.index < 6 and r.size]
    if not bars:
        raise ValueError(f"device {name} has no BAR to fuzz")
    return DeviceProfile(name, bars, list(port.irq_counts), program)


def default_vector_dir() -> str:
    """``tests/vectors`` of the source tree this package lives in (a checkout: the recordings are
    not installed with the package; ``--vectors`` names another directory)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(os.path.dirname(here)), "tests", "vectors")


def load_shapes(vector_dir: str) -> dict[str, list[Msg]]:
    """The client-to-server messages of every recorded session (``qemu-*.jsonl``), by file stem."""
    shapes = {}
    for path in sorted(glob.glob(os.path.join(vector_dir, "qemu-*.jsonl"))):
        stem = os.path.basename(path)[: -len(".jsonl")]
        short = stem.replace("qemu-11.1.3-", "")
        msgs = []
        for traced in load(path):
            if traced.dir != "in":
                continue
            msg_id, cmd, _, flags, _ = traced.header
            kind = "memfd" if cmd == Command.DMA_MAP else "eventfd"
            msgs.append(Msg(cmd, flags, bytes(traced.payload), [kind] * traced.nfds, origin=f"{short}#{msg_id}"))
        if not msgs or msgs[0].cmd != Command.VERSION:
            raise ValueError(f"{path}: a recorded session must start with VERSION")
        shapes[short] = msgs
    if not shapes:
        raise FileNotFoundError(f"no recorded sessions (qemu-*.jsonl) in {vector_dir}")
    return shapes


def _is_bar_register_write(m: Msg) -> bool:
    if m.cmd != Command.REGION_WRITE or len(m.payload) != ACCESS.size + 4:
        return False
    offset, region, count = ACCESS.unpack_from(m.payload)
    return region == CONFIG_REGION and count == 4 and 0x10 <= offset < 0x28


def _config_write(offset: int, value: int, size: int, origin: str) -> Msg:
    return Msg(Command.REGION_WRITE, 0, ACCESS.pack(offset, CONFIG_REGION, size) + value.to_bytes(size, "little"),
               origin=origin)


def adapt(shape: list[Msg], prof: DeviceProfile) -> list[Msg]:
    """The recorded session made to fit ``prof``: a run of BAR-register writes that programs
    addresses becomes the device's own firmware programming (runs of zeros, QEMU's reset,
    stay), and each access to a recorded BAR moves onto one of the device's BARs (offset
    wrapped into it, aligned to the access size)."""
    recorded_bars = sorted({ACCESS.unpack_from(m.payload)[1] for m in shape
                            if m.cmd in (Command.REGION_READ, Command.REGION_WRITE) and len(m.payload) >= 16
                            and ACCESS.unpack_from(m.payload)[1] < ROM_REGION})
    out: list[Msg] = []
    i = 0
    while i < len(shape):
        m = shape[i]
        if _is_bar_register_write(m):
            j = i
            while j < len(shape) and _is_bar_register_write(shape[j]):
                j += 1
            run = shape[i:j]
            if any(int.from_bytes(r.payload[16:], "little") for r in run):
                origin = f"{run[0].origin}..{run[-1].origin.split('#')[-1]} (BARs placed for {prof.name})"
                out.extend(_config_write(off, value, 4, origin) for off, value in prof.bar_program)
            else:
                out.extend(replace(r, fds=list(r.fds), notes=[]) for r in run)
            i = j
            continue
        m = replace(m, fds=list(m.fds), notes=[])
        if m.cmd in (Command.REGION_READ, Command.REGION_WRITE) and len(m.payload) >= 16:
            offset, region, count = ACCESS.unpack_from(m.payload)
            if region in recorded_bars:
                index, size, _ = prof.bars[recorded_bars.index(region) % len(prof.bars)]
                count = min(count, size)
                offset = (offset % size) & ~(max(1, count) - 1) if count & (count - 1) == 0 else 0
                data = m.payload[16:][:count] if m.cmd == Command.REGION_WRITE else b""
                m.payload = ACCESS.pack(offset, index, count) + data
                m.origin += f" (BAR{region} -> BAR{index})"
        out.append(m)
        i += 1
    return out


def _set_irqs(flags: int, index: int, start: int, count: int, fds: list[str], origin: str) -> Msg:
    return Msg(Command.DEVICE_SET_IRQS, 0, IRQ_SET.pack(IRQ_SET.size, flags, index, start, count), fds, origin)


def kvm_intx(origin: str) -> list[Msg]:
    """KVM's INTx set-up after the trigger eventfd (reference §4.1): mask, resample fd, unmask."""
    n, u, e, m = (int(IrqSetFlags.DATA_NONE), int(IrqSetFlags.ACTION_UNMASK), int(IrqSetFlags.DATA_EVENTFD),
                  int(IrqSetFlags.ACTION_MASK))
    return [_set_irqs(n | m, 0, 0, 1, [], origin), _set_irqs(e | u, 0, 0, 1, ["eventfd"], origin),
            _set_irqs(n | u, 0, 0, 1, [], origin)]


def msi_setup(rng: random.Random) -> list[Msg]:
    """MSI or MSI-X enable and disable as QEMU does it (reference §4.5)."""
    t, e, n = int(IrqSetFlags.ACTION_TRIGGER), int(IrqSetFlags.DATA_EVENTFD), int(IrqSetFlags.DATA_NONE)
    if rng.random() < 0.5:
        o = "reference §4.5 (MSI-X on/off)"
        return [_set_irqs(n | t, 0, 0, 0, [], o), _set_irqs(e | t, 2, 0, 1, [], o),
                _set_irqs(e | t, 2, 0, 1, ["eventfd"], o), _set_irqs(e | t, 2, 1, 1, ["eventfd"], o),
                _set_irqs(n | t, 2, 0, 0, [], o), _set_irqs(e | t, 0, 0, 1, ["eventfd"], o)]
    o = "reference §4.5 (MSI on/off)"
    return [_set_irqs(n | t, 0, 0, 0, [], o), _set_irqs(e | t, 1, 0, 1, ["eventfd"], o),
            _set_irqs(n | t, 1, 0, 0, [], o), _set_irqs(e | t, 0, 0, 1, ["eventfd"], o)]


def fire_vectors(rng: random.Random, prof: DeviceProfile) -> list[Msg]:
    """SET_IRQS that fire vectors (NONE|TRIGGER, BOOL|TRIGGER): never sent by QEMU, implemented for
    robustness (reference §6)."""
    t, n, b = int(IrqSetFlags.ACTION_TRIGGER), int(IrqSetFlags.DATA_NONE), int(IrqSetFlags.DATA_BOOL)
    out = []
    for _ in range(rng.randrange(1, 4)):
        index = rng.choice([0, 3] + [k for k in (1, 2) if prof.irq_counts[k]])
        if rng.random() < 0.5:
            out.append(_set_irqs(n | t, index, 0, 1, [], "reference §6 (NONE|TRIGGER fires a vector)"))
        else:
            m = _set_irqs(b | t, index, 0, 1, [], "reference §6 (BOOL|TRIGGER fires a vector)")
            m.payload = IRQ_SET.pack(IRQ_SET.size + 1, b | t, index, 0, 1) + b"\1"
            out.append(m)
    return out


def poke(rng: random.Random, prof: DeviceProfile) -> Msg:
    """A valid access to one of the device's BARs, mostly near its start (where registers are)."""
    index, size, kind = rng.choice(prof.bars)
    width = min(size, rng.choice((1, 2, 4) if kind == "io" else (1, 2, 4, 8)))
    span = min(size, 0x100) if rng.random() < 0.7 else size
    offset = rng.randrange(0, span, width) if span >= width else 0
    if rng.random() < 0.4:
        return Msg(Command.REGION_READ, 0, ACCESS.pack(offset, index, width), origin="poke")
    posted = kind == "memory" and rng.random() < 0.5
    return Msg(Command.REGION_WRITE, NO_REPLY if posted else 0,
               ACCESS.pack(offset, index, width) + rng.randbytes(width), origin="poke")


def _to_write_multi(run: list[Msg], no_reply: bool) -> Msg:
    entries = []
    for m in run:
        offset, region, count = ACCESS.unpack_from(m.payload)
        entries.append(MULTI_ENTRY.pack(offset, region, count, m.payload[16:16 + count].ljust(8, b"\0")))
    origin = f"{run[0].origin}..{run[-1].origin.split('#')[-1].split(' ')[0]} as REGION_WRITE_MULTI"
    return Msg(Command.REGION_WRITE_MULTI, NO_REPLY if no_reply else 0,
               struct.pack("<Q", len(run)) + b"".join(entries), origin=origin)


def with_write_multi(msgs: list[Msg], rng: random.Random) -> list[Msg]:
    """Runs of posted writes of at most 8 bytes become REGION_WRITE_MULTI, as QEMU coalesces them."""
    out: list[Msg] = []
    i = 0
    while i < len(msgs):
        m = msgs[i]
        if m.cmd == Command.REGION_WRITE and m.flags == NO_REPLY and len(m.payload) <= 24:
            j = i
            while (j < len(msgs) and msgs[j].cmd == Command.REGION_WRITE and msgs[j].flags == NO_REPLY
                   and len(msgs[j].payload) <= 24):
                j += 1
            if rng.random() < 0.7:
                out.append(_to_write_multi(msgs[i:j], no_reply=rng.random() < 0.85))
            else:
                out.extend(msgs[i:j])
            i = j
            continue
        out.append(m)
        i += 1
    return out
