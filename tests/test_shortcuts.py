"""Shortcuts (vfiouser/devices/shortcut.py): the C loop runs a BAR access itself, exactly as the port would.

A device with one register of every kind the register block's fast path knows (plain,
read hook, write hooks, write engine, read effects, after-read hook, a hook that fails),
a plain handler beside them, and a write that maps or unmaps that handler while the
session runs. Random streams, with config-space writes that switch decoding off and on
and move the BARs mixed in, must get the same replies and leave the same state through
the C loop (shortcuts) as through the traced full dispatcher (no shortcut anywhere).
"""

from __future__ import annotations

import logging
import random
import socket

import pytest

from vfiouser import fastpath
from vfiouser.devices.pci import INTA, IoBar, MemoryBar, PciDevice
from vfiouser.devices.pci.firmware import bring_up
from vfiouser.devices.regs import RCLR, RO, W1C, Field, Register, RegisterMap, after_read, on_read, on_write
from vfiouser.devices.shortcut import CALL, COMPOSE, HOOK, KINDS, SLOW, STORE, SW_READ, SW_WRITE, VALUE, holds
from vfiouser.protocol import HEADER, HEADER_SIZE

from .probe import Scratch
from .test_hot_path import (  # noqa: F401 (rigs: a fixture)
    INFO, READ, SENTINEL_ID, WRITE, _served_exchange, access, message, needs_c_loop, rigs)


#: each register's offset and size
NATURAL = {0x00: 4, 0x04: 4, 0x08: 2, 0x0C: 4, 0x10: 1, 0x14: 4, 0x18: 8, 0x20: 4}
REMAP = 0x28  # writing 1 maps the scratch handler at BAR0 0x800, 0 unmaps it

GADGET_REGS = RegisterMap([
    Register("plain", 0x00, 32, doc="storage only"),
    Register("hooked", 0x04, 32, sw=RO, doc="read: a counter (odd reads: the stored value)"),
    Register("watched", 0x08, 16, doc="writes are logged"),
    Register("status", 0x0C, 32, [
        Field("done", 0, onwrite=W1C, intr=True, doc="write 1 to clear"),
        Field("ready", 1, sw=RO),
    ]),
    Register("events", 0x10, 8, [Field("ev", (7, 0), sw=RO, onread=RCLR)], doc="clear on read"),
    Register("noted", 0x14, 32, doc="reads are logged"),
    Register("wide", 0x18, 64),
    Register("boom", 0x20, 32, doc="read: fails while armed"),
    Register("remap", REMAP, 32, doc="1: map the scratch handler at 0x800; 0: unmap it"),
], name="gadget", size=0x40)


class Gadget(PciDevice):
    vendor_id, device_id = 0x1234, 0x5C5C
    class_code = 0xFF0000
    interrupt_pin = INTA

    def __init__(self) -> None:
        super().__init__()
        self.regs = GADGET_REGS.instantiate(self)
        self.ram = Scratch(0x800)
        self.bar0 = self.add_bar(0, MemoryBar(0x1000))
        self.bar0.map(self.regs, 0, 0x40)
        self.bar0.map(self.ram, 0x800, 0x800)
        self.bar2 = self.add_bar(2, IoBar(0x40))
        self.bar2.map(self.regs, 0, 0x40)
        self.history: list = []
        self.reads = 0
        self.armed = False
        self.regs.on_interrupt = self.set_intx

    @on_read("hooked")
    def _hooked(self, reg):
        self.reads += 1
        return None if self.reads % 2 else self.reads * 0x01010101

    @on_write("watched")
    def _watched(self, reg, value):
        self.history.append(("watched", value))

    @after_read("noted")
    def _noted(self, reg, value):
        self.history.append(("noted", value))
        self.regs.hw_write("events.ev", (value & 0xFF) or 1)

    @on_read("boom")
    def _boom(self, reg):
        if self.armed:
            raise RuntimeError("the gadget's boom register failed, as asked")
        self.armed = True
        return 7

    @on_write("remap")
    def _remap(self, reg, value):
        mapped = any(handler is self.ram for _, _, handler in self.bar0.mappings)
        if value & 1 and not mapped:
            self.bar0.map(self.ram, 0x800, 0x800)
        elif not value & 1 and mapped:
            self.bar0.unmap(0x800)
        self.history.append(("remap", value & 1))

    def state(self) -> tuple:
        return (tuple(r.value for r in self.regs.registers), bytes(self.ram.mem), tuple(self.history), self.reads,
                self.armed, bytes(self.config.data), self.intx_level)


def _config_changes(dev: Gadget) -> list[tuple[tuple[int, bytes], tuple[int, bytes]]]:
    """Config-space writes that change where BAR accesses go, each with the write that undoes
    it: decoding off, I/O decoding off, BAR0 moved, BAR2 moved."""
    bar0 = int.from_bytes(dev.config.data[0x10:0x14], "little")
    bar2 = int.from_bytes(dev.config.data[0x18:0x1C], "little")
    command = int.from_bytes(dev.config.data[0x04:0x06], "little")
    on = (0x04, command.to_bytes(2, "little"))
    return [
        ((0x04, (command & ~0x3).to_bytes(2, "little")), on),
        ((0x04, (command & ~0x1).to_bytes(2, "little")), on),
        ((0x10, (bar0 + 0x10000).to_bytes(4, "little")), (0x10, bar0.to_bytes(4, "little"))),
        ((0x18, (bar2 + 0x100).to_bytes(4, "little")), (0x18, bar2.to_bytes(4, "little"))),
    ]


def gadget_stream(seed: int, n: int, changes) -> list[bytes]:
    """Mostly whole-register accesses, some odd ones, the scratch handler, remap writes, and
    now and then a config change undone 5-30 messages later."""
    rng = random.Random(seed)
    out = []
    offsets = [0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x02, 0x09, 0x3C]
    undo: dict[int, tuple[int, bytes]] = {}
    for i in range(1, n + 1):
        flags = 0x10 if rng.random() < 0.1 else 0
        kind = rng.random()
        if i in undo or (kind < 0.02 and not undo):
            if i in undo:
                offset, data = undo.pop(i)
            else:
                (offset, data), restore = rng.choice(changes)
                undo[i + rng.randrange(5, 30)] = restore
            out.append(message(WRITE, access(offset, 7, len(data)) + data, 0, i))
            continue
        if kind < 0.04:
            out.append(message(WRITE, access(REMAP, rng.choice([0, 2]), 4) + bytes([rng.randrange(2), 0, 0, 0]),
                               flags, i))
            continue
        region = rng.choice([0, 0, 0, 2])
        size = rng.choice([1, 2, 4, 4, 4, 8, 3])
        if region == 0 and rng.random() < 0.25:
            offset = 0x800 + rng.randrange(0, 0x7F8)
        elif rng.random() < 0.6:
            offset, size = rng.choice(list(NATURAL.items()))  # a whole register
        else:
            offset = rng.choice(offsets)
        if rng.random() < 0.5:
            out.append(message(READ, access(offset, region, size), flags, i))
        else:
            data = bytes(rng.randrange(256) for _ in range(size))
            out.append(message(WRITE, access(offset, region, size) + data, flags, i))
    return out


def _counting(dev: Gadget) -> dict:
    """Count what the C loop asks of the port: shortcuts made (by kind) and accesses it
    left to region_read/region_write (the session binds the port's methods when it starts,
    so instance attributes catch them)."""
    port = dev.port
    seen = {"kinds": {}, "shortcuts": 0, "slow": 0}
    real_shortcut, real_read, real_write = port.shortcut, port.region_read, port.region_write

    def shortcut(index, offset, size, write):
        cut = real_shortcut(index, offset, size, write)
        seen["shortcuts"] += 1
        if cut is not None:
            name = KINDS[cut[0]]
            seen["kinds"][name] = seen["kinds"].get(name, 0) + 1
        return cut

    def region_read(index, offset, data):
        if index != 7:
            seen["slow"] += 1
        real_read(index, offset, data)

    def region_write(index, offset, data):
        if index != 7:
            seen["slow"] += 1
        real_write(index, offset, data)

    port.shortcut, port.region_read, port.region_write = shortcut, region_read, region_write
    return seen


@pytest.mark.parametrize("seed", range(3))
def test_the_c_loop_with_shortcuts_answers_as_the_full_dispatcher(rigs, serve, seed, caplog):
    needs_c_loop()
    caplog.set_level(logging.ERROR)
    traced = rigs(True, Gadget())
    dev = Gadget()
    bring_up(dev.port)
    seen = _counting(dev)
    server = serve(dev)
    messages = gadget_stream(seed, 1500, _config_changes(dev))
    replies, sock = _served_exchange(server, messages)
    try:
        assert replies == traced.exchange(messages)
        assert dev.state() == traced.device.state()
    finally:
        sock.close()
    # Which messages the C loop meets depends on how the kernel splits the stream; those it
    # hands to Python (odd sizes, and the rest of their batch) go by the port. Here it is
    # enough that shortcuts were run; the next test counts them.
    assert seen["kinds"]
    assert "boom register failed" in caplog.text  # the model's exception: an error reply and a log line


def test_register_accesses_by_shortcut_skip_the_port_until_decoding_changes(serve):
    needs_c_loop()
    from vfiouser.client import Client

    dev = Gadget()
    seen = _counting(dev)
    server = serve(dev)
    with Client.connect(server.path) as c:
        c.bring_up()
        made = seen["shortcuts"]
        for i in range(100):
            c.region_write(0, 0x08, (i).to_bytes(2, "little"))
            assert c.region_read(0, 0x08, 2) == (i).to_bytes(2, "little")
            assert c.region_read(2, 0x04, 4) == (0 if i % 2 == 0 else dev.reads * 0x01010101).to_bytes(4, "little")
        assert seen["slow"] == 0 and seen["shortcuts"] == made + 3  # made once each, then kept
        # one of each kind, the port never asked
        c.region_write(0, 0x00, (0x5A5A).to_bytes(4, "little"))  # STORE
        assert c.region_read(0, 0x00, 4) == (0x5A5A).to_bytes(4, "little")  # VALUE
        assert c.region_read(0, 0x14, 4) == (0).to_bytes(4, "little")  # SW_READ (after-read hook)
        assert c.region_read(0, 0x10, 1) == b"\x01"  # SW_READ (clear on read), set by that hook
        assert c.region_read(0, 0x10, 1) == b"\x00"
        with dev.lock:
            dev.regs.hw_write("status.done", 1)
        c.region_write(0, 0x0C, (1).to_bytes(4, "little"))  # SW_WRITE: write 1 to clear
        assert c.region_read(0, 0x0C, 4) == (0).to_bytes(4, "little")
        c.region_write(0, 0x900, b"\x11\x22\x33\x44")  # CALL
        assert c.region_read(0, 0x900, 4) == b"\x11\x22\x33\x44" and dev.ram.mem[0x100:0x104] == b"\x11\x22\x33\x44"
        # COMPOSE: one access, several whole registers (watched at 0x08, status at 0x0C), a gap between
        c.region_write(0, 0x08, (0x0001_0000_BEEF).to_bytes(8, "little"))  # watched = 0xBEEF; status: done is 0
        assert dev.history[-1] == ("watched", 0xBEEF)
        assert c.region_read(0, 0x08, 8) == (0xBEEF).to_bytes(4, "little") + (0).to_bytes(4, "little")
        assert seen["slow"] == 0
        assert set(seen["kinds"]) == {"VALUE", "HOOK", "SW_READ", "STORE", "SW_WRITE", "CALL", "COMPOSE"}
        command = c.region_read(7, 0x04, 2)
        c.region_write(7, 0x04, b"\0\0")  # decoding off: all-ones, by the port
        assert c.region_read(0, 0x08, 2) == b"\xff\xff" and seen["slow"] == 1 and "SLOW" in seen["kinds"]
        c.region_write(7, 0x04, command)
        assert c.region_read(0, 0x08, 2) == (0xBEEF).to_bytes(2, "little")
    assert ("watched", 99) in dev.history and sum(1 for h in dev.history if h[0] == "watched") == 101


def test_a_shortcut_follows_a_hook_attached_while_the_session_runs(serve):
    needs_c_loop()
    from vfiouser.client import Client

    dev = Gadget()
    server = serve(dev)
    with Client.connect(server.path) as c:
        c.bring_up()
        c.region_write(0, 0x00, (0x1234).to_bytes(4, "little"))
        assert c.region_read(0, 0x00, 4) == (0x1234).to_bytes(4, "little")  # a VALUE shortcut, kept
        with dev.lock:
            dev.regs.on_read("plain", lambda reg: 0xABCD)
        assert c.region_read(0, 0x00, 4) == (0xABCD).to_bytes(4, "little")
        with dev.lock:
            dev.regs.on_write("wide", lambda reg, value: dev.history.append(("wide", value)))
        c.region_write(2, 0x18, (5).to_bytes(8, "little"))
        assert dev.history[-1] == ("wide", 5)


def test_shortcuts_kept_per_session_are_bounded(sockdir):
    """A client touching every offset cannot grow the loop's shortcuts without bound."""
    needs_c_loop()
    import json

    from vfiouser.client import DEFAULT_CLIENT_CAPS
    from vfiouser.protocol import Command, Version
    from vfiouser.session import Session
    from vfiouser.watchdog import LoopWatchdog

    dev = Gadget()
    bring_up(dev.port)
    sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    session = Session(sock, dev.port, name="bounded")
    try:
        peer.sendall(message(int(Command.VERSION), Version.build(dict(major=0, minor=0,
                                                                       json=json.dumps(DEFAULT_CLIENT_CAPS)))))
        assert session.on_readable()
        peer.recv(1 << 16)
        fast = fastpath.for_session(session, watchdog=LoopWatchdog(), spin=0.0)
        peer.setblocking(False)
        reads = [message(READ, access(0x800 + offset, 0, size), 0, 1) for offset in range(0, 0x7F8, 1)
                 for size in (1, 2, 4)]
        received = bytearray()
        for start in range(0, len(reads), 500):
            peer.sendall(b"".join(reads[start:start + 500]) + (message(INFO, b"\0" * 16, 0, SENTINEL_ID)
                                                                if start + 500 >= len(reads) else b""))
            while True:
                try:
                    received += peer.recv(1 << 20)
                except BlockingIOError:
                    break
            if start + 500 < len(reads):
                continue
            kind, data, _, _ = fast.run()  # serves the reads, hands the INFO over
            assert kind == "data" and HEADER.unpack_from(data)[1] == INFO
        assert len(reads) > 4096
        assert 0 < fast.cached <= 4096
    finally:
        session.close()
        peer.close()


def test_a_port_that_makes_bad_shortcuts_gets_error_replies_and_the_session_goes_on(serve, caplog):
    needs_c_loop()
    from vfiouser.client import Client
    from vfiouser.errors import ErrorReply

    dev = Gadget()
    dev.port.shortcut = lambda index, offset, size, write: None if index == 7 else (99, ())
    server = serve(dev)
    with Client.connect(server.path) as c:
        c.bring_up()
        with pytest.raises(ErrorReply) as info:
            c.region_read(0, 0x00, 4)
        assert info.value.errno == 5  # EIO
        assert c.region_read(7, 0, 2) == (0x1234).to_bytes(2, "little")  # config space: no shortcut
    assert "not a shortcut" in caplog.text


def test_a_port_subclass_that_changes_region_access_gets_no_shortcuts():
    from vfiouser.devices.pci.port import PciPort

    class Counting(PciPort):
        def region_read(self, index, offset, data):
            super().region_read(index, offset, data)

    class Counted(Gadget):
        port_class = Counting

    assert Gadget().port.shortcut_lock is not None
    port = Counted().port
    assert port.shortcut_lock is None and port.shortcut(0, 0, 4, False) is None


def test_a_shortcut_is_guarded_by_what_it_depends_on():
    dev = Gadget()
    port = dev.port
    assert port.shortcut(0, 0, 4, False)[0] == SLOW  # not programmed
    bring_up(port)
    plain = port.shortcut(0, 0, 4, False)
    assert plain[0] == VALUE and holds(plain)
    assert port.shortcut(0, 4, 4, False)[0] == HOOK
    assert port.shortcut(0, 0x10, 1, False)[0] == SW_READ
    assert port.shortcut(0, 0x0C, 4, True)[0] == SW_WRITE
    assert port.shortcut(0, 0x08, 2, True)[0] == STORE
    assert port.shortcut(0, 0x900, 4, False)[0] == CALL
    assert port.shortcut(0, 0x3E, 4, False)[0] == SLOW  # straddles the block's end
    composed = port.shortcut(0, 0x08, 8, False)  # watched, a gap, status
    assert composed[0] == COMPOSE and [(pos, n, KINDS[p[0]]) for pos, n, p in composed[3]] == \
        [(0, 2, "VALUE"), (4, 4, "VALUE")]
    assert port.shortcut(0, 0x09, 2, False)[0] == CALL  # half of watched: the general decoder
    from vfiouser.devices.idio16 import Idio16

    idio = Idio16()
    bring_up(idio.port)
    four = idio.port.shortcut(2, 4, 4, False)  # out8_15, in8_15 (hook), irq_status, port 7 (reads 0)
    assert four[0] == COMPOSE and four[2] == 0 and [KINDS[p[0]] for _, _, p in four[3]] == ["VALUE", "HOOK", "VALUE"]
    assert port.shortcut(7, 0, 4, False) is None  # config space
    assert port.shortcut(0, 0xFFE, 4, False) is None  # out of bounds
    assert port.shortcut(2, 0, 4, True) is not None
    dev.regs.on_read("plain", lambda reg: 1)  # the block's tables are rebuilt
    assert not holds(plain)
    hooked = port.shortcut(0, 0, 4, False)
    dev.bar0.unmap(0)  # a new IoManager snapshot
    assert not holds(hooked) and port.shortcut(0, 0, 4, False)[0] == SLOW


def test_a_shortcut_is_checked_with_the_device_lock_held(serve):
    """A thread holding the device lock may change where accesses go (here: unmap a handler); an
    access that waited for the lock meanwhile goes where the change sent it."""
    needs_c_loop()
    import threading
    import time

    from vfiouser.client import Client

    dev = Gadget()
    server = serve(dev)
    with Client.connect(server.path) as c:
        c.bring_up()
        c.region_write(0, 0x900, b"\x11\x22\x33\x44")
        assert c.region_read(0, 0x900, 4) == b"\x11\x22\x33\x44"  # a CALL shortcut, kept
        got = []
        with dev.lock:
            reader = threading.Thread(target=lambda: got.append(c.region_read(0, 0x900, 4)))
            reader.start()
            time.sleep(0.3)  # the C loop now waits for the lock
            dev.bar0.unmap(0x800)
        reader.join(5)
        assert got == [b"\xff" * 4]  # nothing there any more: all-ones, as region_read answers
