"""The register layer: each datasheet rule does what it says, through the bus side."""

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiouser.devices.errors import DeviceUsageError
from vfiouser.devices.regs import (
    DECLINE,
    EXTEND,
    RCLR,
    RO,
    RSET,
    RSVD,
    W0C,
    W0S,
    W0T,
    W1C,
    W1S,
    W1T,
    WCLR,
    WO,
    WSET,
    AccessPolicy,
    Field,
    Register,
    RegisterDefinitionError,
    RegisterMap,
    after_read,
    group,
    on_read,
    on_write,
    when,
)


def rd(block, offset, size):
    buf = bytearray(size)
    block.read(0, offset, buf)
    return int.from_bytes(buf, "little")


def wr(block, offset, value, size):
    block.write(0, offset, value.to_bytes(size, "little"))


# -- field semantics against a per-bit reference -----------------------------------------------

KINDS = [(None, "rw"), (None, RO), (None, WO), (None, RSVD), (W1C, "rw"), (W1S, "rw"), (W1T, "rw"), (W0C, "rw"),
         (W0S, "rw"), (W0T, "rw"), (WCLR, "rw"), (WSET, "rw"), (W1C, WO)]


def reference_bit(kind, old, d):
    """What SystemRDL says one bit becomes after software writes ``d`` over ``old``."""
    onwrite, sw = kind
    if sw in (RO, RSVD):
        return old
    return {None: d, W1C: old & (1 - d), W1S: old | d, W1T: old ^ d, W0C: old & d, W0S: old | (1 - d),
            W0T: old ^ (1 - d), WCLR: 0, WSET: 1}[onwrite]


@settings(max_examples=300, deadline=None)
@given(kinds=st.lists(st.sampled_from(range(len(KINDS))), min_size=16, max_size=16),
       old=st.integers(0, 0xFFFF), data=st.integers(0, 0xFFFF), lane=st.sampled_from([None, 0, 1]))
def test_every_write_effect_matches_systemrdl_bit_by_bit(kinds, old, data, lane):
    fields = [Field(f"b{i}", i, sw=KINDS[k][1], onwrite=KINDS[k][0]) for i, k in enumerate(kinds)]
    block = RegisterMap([Register("r", 0, 16, fields)]).instantiate()
    block.reg("r").value = old
    if lane is None:
        wr(block, 0, data, 2)
    else:
        wr(block, lane, (data >> (8 * lane)) & 0xFF, 1)  # one byte lane: the other byte keeps its bits
    expected = 0
    for i, k in enumerate(kinds):
        o, d = (old >> i) & 1, (data >> i) & 1
        touched = lane is None or i // 8 == lane
        expected |= (reference_bit(KINDS[k], o, d) if touched else o) << i
    assert block.reg("r").value == expected
    readable = sum(1 << i for i, k in enumerate(kinds) if KINDS[k][1] not in (WO, RSVD))
    assert rd(block, 0, 2) == expected & readable


def test_read_effects_and_reserved_bits():
    block = RegisterMap([Register("s", 0, 32, [Field("clr", (7, 0), sw=RO, onread=RCLR),
                                               Field("set", 8, sw=RO, onread=RSET),
                                               Field("keep", (23, 16), sw=RO)])]).instantiate()
    block.reg("s").value = 0xFF_FF_00_5A | 0xFF000000  # bits 24-31 reserved: never read
    assert rd(block, 0, 4) == 0x00FF005A
    assert rd(block, 0, 4) == 0x00FF0100  # cleared and set by the first read
    block.reg("s").value = 0x5A
    assert rd(block, 2, 1) == 0  # a read of byte 2 leaves byte 0's clear-on-read bits alone
    assert block.reg("s").get("clr") == 0x5A


def test_field_definition_errors():
    with pytest.raises(RegisterDefinitionError, match="overlaps"):
        Register("r", 0, 8, [Field("a", (3, 0)), Field("b", (4, 3))])
    with pytest.raises(RegisterDefinitionError, match="does not fit"):
        Register("r", 0, 8, [Field("a", (8, 0))])
    with pytest.raises(RegisterDefinitionError, match="writable"):
        Field("a", 0, sw=RO, onwrite=W1C)
    with pytest.raises(RegisterDefinitionError, match="reset value"):
        Field("a", (1, 0), reset=4)
    with pytest.raises(RegisterDefinitionError, match="overlap"):
        RegisterMap([Register("a", 0, 32), Register("b", 2, 16)])
    with pytest.raises(RegisterDefinitionError, match="two registers named"):
        RegisterMap([Register("a", 0, 8), Register("a", 1, 8)])


# -- access policy -----------------------------------------------------------------------------

def edu_like():
    """edu's rule: 4 or 8 bytes, aligned; a narrow access at a 64-bit register is the whole
    register zero-extended; an 8-byte access to a 32-bit register reads all-ones."""
    policy = AccessPolicy(sizes=(4, 8), aligned=True, refused=0x00, unmapped=0xFF, narrow=EXTEND, wide=DECLINE)
    return RegisterMap([Register("id", 0x0, 32, sw=RO, reset=0x010000ED), Register("x", 0x4, 32),
                        Register("src", 0x80, 64)], policy=policy).instantiate()


def test_policy_sizes_alignment_narrow_and_wide():
    block = edu_like()
    assert rd(block, 0x0, 4) == 0x010000ED
    assert rd(block, 0x0, 2) == 0  # refused size reads the refused byte
    assert rd(block, 0x2, 4) == 0  # misaligned
    assert rd(block, 0x0, 8) == 0xFFFF_FFFF_FFFF_FFFF  # wider than its registers: declined
    wr(block, 0x4, 0x1234_5678_9ABC_DEF0, 8)
    assert block.reg("x").value == 0
    wr(block, 0x80, 0x1111_2222_3333_4444, 8)
    wr(block, 0x80, 0x5555_6666, 4)  # narrow write: zero-extended
    assert block.reg("src").value == 0x5555_6666
    assert rd(block, 0x80, 4) == 0x5555_6666
    assert rd(block, 0x84, 4) == 0xFFFF_FFFF  # not at the register's offset: declined
    wr(block, 0x84, 1, 4)
    assert block.reg("src").value == 0x5555_6666
    assert rd(block, 0x40, 4) == 0xFFFF_FFFF  # unmapped


def test_default_policy_lanes_and_split():
    block = RegisterMap([Register("a", 0, 16, reset=0x1122), Register("b", 2, 8, reset=0x33),
                         Register("c", 4, 32, reset=0x44556677)]).instantiate()
    assert rd(block, 0, 4) == 0x00331122  # byte 3: unmapped, reads 0
    assert rd(block, 1, 4) == 0x77003311
    wr(block, 1, 0xAABBCCDD, 4)  # split: a's high byte, b, nothing, c's low byte
    assert (block.reg("a").value, block.reg("b").value, block.reg("c").value) == (0xDD22, 0xCC, 0x445566AA)


# -- banks, aliases, arrays, frozen --------------------------------------------------------------

def test_banked_registers_and_direction_split():
    regs = RegisterMap([
        Register("rbr", 0, 8, sw=RO, bank=when("lcr.dlab", 0)),
        Register("thr", 0, 8, sw=WO, bank=when("lcr.dlab", 0)),
        Register("dll", 0, 8, bank=when("lcr.dlab", 1), reset=12),
        Register("iir", 2, 8, sw=RO, reset=1),
        Register("fcr", 2, 8, sw=WO),
        Register("lcr", 3, 8, [Field("wls", (1, 0)), Field("dlab", 7)]),
    ])
    block = regs.instantiate()
    block.reg("rbr").value = 0x41
    assert rd(block, 0, 1) == 0x41
    wr(block, 0, 0x42, 1)
    assert block.reg("thr").value == 0x42 and block.reg("dll").value == 12
    wr(block, 3, 0x80, 1)  # DLAB on: offset 0 is the divisor latch
    assert rd(block, 0, 1) == 12
    wr(block, 0, 1, 1)
    assert block.reg("dll").value == 1 and block.reg("thr").value == 0x42
    wr(block, 2, 0xC1, 1)
    assert block.reg("fcr").value == 0xC1 and rd(block, 2, 1) == 1
    assert block.describe(0, 1) == "dll" and block.describe(3, 1) == "lcr (wls, dlab)"
    with pytest.raises(RegisterDefinitionError, match="bank"):
        RegisterMap([Register("a", 0, 8), Register("b", 0, 8, bank=when("a"))])


def test_alias_shares_storage_with_its_own_access():
    block = RegisterMap([Register("status", 0x24, 32, sw=RO),
                         Register("raise", 0x60, 32, sw=WO, onwrite=W1S, alias_of="status"),
                         Register("ack", 0x64, 32, sw=WO, onwrite=W1C, alias_of="status")]).instantiate()
    wr(block, 0x60, 0b101, 4)
    wr(block, 0x60, 0b010, 4)
    assert rd(block, 0x24, 4) == 0b111
    wr(block, 0x64, 0b001, 4)
    assert rd(block, 0x24, 4) == 0b110
    wr(block, 0x24, 0, 4)  # read-only where it lives
    assert block.reg("status").value == 0b110


def test_arrays_with_hooks_by_template_and_index():
    seen = []
    queue = [Register("size", 0x0, 16, reset=256), Register("enable", 0x2, 16)]
    block = RegisterMap(group("q", 0x100, queue, count=3, stride=0x10)).instantiate()
    block.on_write("q.enable", lambda reg, value: seen.append((reg.index, value)))
    block.on_read("q[1].size", lambda reg: 128)
    wr(block, 0x122, 1, 2)
    wr(block, 0x102, 1, 2)
    assert seen == [((2,), 1), ((0,), 1)]
    assert [rd(block, 0x100 + 0x10 * i, 2) for i in range(3)] == [256, 128, 256]
    assert block.reg("q[2].enable").value == 1
    with pytest.raises(RegisterDefinitionError, match="no register or field"):
        block.on_write("q.nothing", print)


def test_frozen_while_a_field_is_set():
    regs = RegisterMap([Register("cmd", 0x98, 64, [Field("run", 0), Field("dir", 1)]),
                        Register("src", 0x80, 64, frozen_while=when("cmd.run"))])
    block = regs.instantiate()
    wr(block, 0x80, 0x1000, 8)
    wr(block, 0x98, 1, 8)
    wr(block, 0x80, 0x2000, 8)
    assert block.reg("src").value == 0x1000
    block.reg("cmd").set("run", 0)
    wr(block, 0x80, 0x2000, 8)
    assert block.reg("src").value == 0x2000


# -- hooks ---------------------------------------------------------------------------------------

class Owner:
    def __init__(self, regmap):
        self.log = []
        self.regs = regmap.instantiate(self)

    @on_write("ctrl")
    def _ctrl(self, reg, value):
        self.log.append(("ctrl", value, reg.value))

    @on_write("ctrl.go")
    def _go(self, reg, value):
        self.log.append(("go", value))

    @on_read("counter")
    def _counter(self, reg):
        return 41 + len(self.log)

    @after_read("status")
    def _status_read(self, reg, value):
        self.log.append(("status read", value, reg.value))


def test_decorated_hooks_run_in_order_with_the_values_written_and_read():
    regmap = RegisterMap([Register("ctrl", 0, 32, [Field("go", 0, onwrite=W1S), Field("mode", (5, 4))]),
                          Register("counter", 4, 32, sw=RO),
                          Register("status", 8, 32, [Field("err", 0, sw=RO, onread=RCLR)])])
    owner = Owner(regmap)
    wr(owner.regs, 0, 0x21, 4)
    assert owner.log == [("go", 1), ("ctrl", 0x21, 0x21)]
    wr(owner.regs, 1, 0xFF, 1)  # lanes outside go: go's hook does not run
    assert owner.log[-1] == ("ctrl", 0xFF21, 0x21)
    assert rd(owner.regs, 4, 4) == 41 + 3
    owner.regs.reg("status").set("err", 1)
    assert rd(owner.regs, 8, 4) == 1
    assert owner.log[-1] == ("status read", 1, 0)  # after the clear-on-read


# -- interrupts and the hardware side -------------------------------------------------------------

def test_interrupt_fields_with_enable_and_mask_drive_the_line():
    levels = []
    regmap = RegisterMap([
        Register("isr", 0, 32, [Field("rx", 0, onwrite=W1C, intr=True, enable="ier.rx"),
                                Field("tx", 1, onwrite=W1C, intr=True, mask="imr.tx")]),
        Register("ier", 4, 32, [Field("rx", 0)]),
        Register("imr", 8, 32, [Field("tx", 1)]),
    ])
    block = regmap.instantiate()
    block.on_interrupt = levels.append
    block.hw_write("isr.rx", 1)
    assert levels == []  # not enabled
    wr(block, 4, 1, 4)
    assert levels == [True]
    wr(block, 0, 1, 4)
    assert levels == [True, False]
    wr(block, 8, 2, 4)  # tx masked
    block.hw_write("isr.tx", 1)
    assert levels == [True, False]
    wr(block, 8, 0, 4)
    assert levels == [True, False, True]
    block.hw_write("isr", 0)  # sticky interrupt bits: a hardware write of 0 does not clear them
    assert block.reg("isr").value == 2
    block.reset()
    assert levels[-1] is False


def test_hw_access_is_checked():
    block = RegisterMap([Register("r", 0, 32, [Field("a", (7, 0), hw=RO), Field("b", (15, 8), hw=WO),
                                               Field("c", (23, 16))])]).instantiate()
    with pytest.raises(DeviceUsageError, match="not writable by hardware"):
        block.hw_write("r.a", 1)
    with pytest.raises(DeviceUsageError, match="not readable by hardware"):
        block.hw_read("r.b")
    with pytest.raises(DeviceUsageError, match="does not fit"):
        block.hw_write("r.c", 0x100)
    block.hw_write("r", 0xFFFFFF)  # the whole register: only hw-writable fields change
    assert block.reg("r").value == 0xFFFF00
    assert block.hw_read("r") == 0xFF0000


# -- description -----------------------------------------------------------------------------------

def test_markdown_table_and_lookup():
    regmap = RegisterMap([Register("status", 0x20, 32, [Field("busy", 0, sw=RO, doc="computing"),
                                                        Field("irq", 7, doc="interrupt when done")],
                                   doc="Status.")], name="demo")
    table = regmap.markdown().splitlines()
    assert table[0] == "| offset | register | bits | access | reset | description |"
    assert table[2] == "| 0x20 | status | 31:0 | mixed | 0x0 | Status. |"
    assert table[3] == "|  | .irq | 7 | RW | 0x0 | interrupt when done |"
    assert table[4] == "|  | .busy | 0 | RO | 0x0 | computing |"
    block = regmap.instantiate()
    assert block.describe(0x20, 1) == "status (busy, irq)"
    assert block.describe(0x21, 1) == "status"
    assert block.describe(0x40, 4) == ""


def test_refused_access_is_logged_at_debug(caplog):
    block = edu_like()
    with caplog.at_level(logging.DEBUG, logger="vfiouser.devices.regs.block"):
        rd(block, 0x0, 1)
    assert "refused by the access policy" in caplog.text


def test_before_write_changes_or_drops_a_write_and_hooks_are_checked():
    block = RegisterMap([Register("cmd", 0, 32, [Field("run", 0), Field("arg", (15, 8))]),
                         Register("vec", 4, 16, reset=0xFFFF)]).instantiate()
    seen = []
    block.before_write("cmd", lambda reg, value: value if value & 1 else None)  # only a start counts
    block.before_write("vec", lambda reg, value: value if value < 8 else 0xFFFF)  # no such vector
    block.on_write("cmd", lambda reg, value: seen.append(value))
    wr(block, 0, 0x0500, 4)
    assert block.reg("cmd").value == 0 and seen == []
    wr(block, 1, 0x07, 1)  # a narrow write: the hook sees the whole register, lanes merged
    assert seen == [] and block.reg("cmd").value == 0
    wr(block, 0, 0x0701, 4)
    assert block.reg("cmd").value == 0x0701 and seen == [0x0701]
    wr(block, 4, 3, 2)
    wr(block, 4, 9, 2)
    assert block.reg("vec").value == 0xFFFF
    with pytest.raises(RegisterDefinitionError, match="already has a before-write hook"):
        block.before_write("cmd", lambda reg, value: value)
    with pytest.raises(RegisterDefinitionError, match="belongs to a register"):
        block.before_write("cmd.run", lambda reg, value: value)


def test_registers_are_block_attributes_unless_the_name_is_taken():
    block = RegisterMap([Register("status", 0, 32), Register("reset", 4, 32), Register("q[0]", 8, 32)]).instantiate()
    assert block.status is block.reg("status")
    assert callable(block.reset) and block.reg("reset").offset == 4  # the method stays a method
    with pytest.raises(AttributeError):
        block.nothing


def test_frozen_while_a_function_says_so():
    busy = [False]
    block = RegisterMap([Register("a", 0, 32, frozen_while=lambda: busy[0])]).instantiate()
    wr(block, 0, 1, 4)
    busy[0] = True
    wr(block, 0, 2, 4)
    assert block.reg("a").value == 1
    assert "writes ignored while <lambda>" in RegisterMap([Register("a", 0, 32, frozen_while=lambda: 0)]).markdown()
