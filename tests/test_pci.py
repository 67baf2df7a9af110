"""PCI framework: config space semantics, BARs, ROM, capabilities, INTx, regions, reset."""

import errno

import pytest

from vfiouser.devices import DeviceLoadError, load_device_class, make_device
from vfiouser.devices.pci import (
    INTA,
    PCI_CAP_ID_VNDR,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_INTERRUPT,
    BarError,
    ConfigSpace,
    DefinitionError,
    DeviceUsageError,
    ConfigSpaceError,
    IoBar,
    MemoryBar,
    PciDevice,
    RegionAccessError,
    RomBar,
)
from vfiouser.devices.port import ResetReason
from vfiouser.iomgr import DeviceIo

from .conftest import RecordingSink, served
from .probe import ROM_DATA, ProbeDevice, Scratch


def cfg_read(dev, offset, size=4):
    buf = bytearray(size)
    dev.port.region_read(7, offset, buf)
    return int.from_bytes(buf, "little")


def cfg_write(dev, offset, value, size=4):
    dev.port.region_write(7, offset, value.to_bytes(size, "little"))


class Plain(PciDevice):
    vendor_id, device_id = 0x1234, 0x0001
    interrupt_pin = INTA


# ------------------------------------------------------------- config space


def test_read_only_read_write_and_write_one_to_clear_bits():
    cs = ConfigSpace()
    cs.set_word(0x40, 0xAAAA)
    cs.set_wmask_word(0x40, 0x00FF)  # low byte RW, high byte RO
    cs.set_word(0x42, 0x8101)
    cs.set_w1cmask_word(0x42, 0x8100)  # bits 15 and 8 W1C, rest RO
    cs.write(0x40, b"\x55\x55")
    assert cs.get_word(0x40) == 0xAA55
    cs.write(0x42, (0x0100).to_bytes(2, "little"))  # clear bit 8 only
    assert cs.get_word(0x42) == 0x8001
    cs.write(0x42, (0x0000).to_bytes(2, "little"))  # writing 0 clears nothing
    assert cs.get_word(0x42) == 0x8001
    cs.write(0x42, (0xFFFF).to_bytes(2, "little"))
    assert cs.get_word(0x42) == 0x0001  # RO bit 0 survives


def test_sticky_bits_survive_reset():
    cs = ConfigSpace()
    cs.set_wmask(0x50, b"\xff\xff")
    cs.set_stickymask(0x50, b"\xf0\x00")
    cs.freeze_defaults()
    cs.write(0x50, b"\xab\xcd")
    cs.reset()
    assert cs.data[0x50:0x52] == b"\xa0\x00"


def test_config_space_bounds_and_size():
    with pytest.raises(ConfigSpaceError):
        ConfigSpace(512)
    cs = ConfigSpace()
    with pytest.raises(ConfigSpaceError):
        cs.write(0xFF, b"\0\0")
    assert ConfigSpace(4096).size == 4096


def test_type0_header_fields():
    dev = ProbeDevice()
    assert cfg_read(dev, 0x00) == 0xBEEF1234
    assert cfg_read(dev, 0x08) == 0xFF000002  # class ff0000, revision 2
    assert cfg_read(dev, 0x2C) == 0x00011234
    assert cfg_read(dev, 0x3D, 1) == INTA
    assert cfg_read(dev, 0x0E, 1) == 0
    cfg_write(dev, 0x00, 0xFFFFFFFF)  # IDs are read-only
    assert cfg_read(dev, 0x00) == 0xBEEF1234
    cfg_write(dev, 0x3C, 0x0B, 1)  # interrupt line is RW, pin RO
    cfg_write(dev, 0x3D, 0x04, 1)
    assert cfg_read(dev, 0x3C, 2) == 0x010B


def test_command_and_status_registers():
    dev = ProbeDevice()
    cfg_write(dev, PCI_COMMAND, 0xFFFF, 2)
    assert cfg_read(dev, PCI_COMMAND, 2) == 0x0507  # IO MEM MASTER SERR INTX_DISABLE, as QEMU's PCI core
    cfg_write(dev, 0x0D, 0xFF, 1)
    assert cfg_read(dev, 0x0D, 1) == 0  # latency timer reads 0
    cfg_write(dev, 0x0C, 0x10, 1)
    assert cfg_read(dev, 0x0C, 1) == 0x10  # cache line size is RW
    dev.config.set_word(PCI_STATUS, 0xF900 | PCI_STATUS_CAP_LIST)
    cfg_write(dev, PCI_STATUS, 0x2000, 2)  # W1C one error bit
    assert cfg_read(dev, PCI_STATUS, 2) == 0xD900 | PCI_STATUS_CAP_LIST
    cfg_write(dev, PCI_STATUS, 0xFFFF, 2)
    assert cfg_read(dev, PCI_STATUS, 2) == PCI_STATUS_CAP_LIST  # RO bits kept


@pytest.mark.parametrize(
    "bar, reg, expect",
    [
        (IoBar(16), 0x10, [0xFFFFFFF1]),
        (IoBar(256), 0x10, [0xFFFFFF01]),
        (MemoryBar(0x1000), 0x10, [0xFFFFF000]),
        (MemoryBar(0x1000, prefetchable=True), 0x10, [0xFFFFF008]),
        (MemoryBar(0x4000, bits=64), 0x10, [0xFFFFC004, 0xFFFFFFFF]),
        (MemoryBar(1 << 33, bits=64, prefetchable=True), 0x10, [0x0000000C, 0xFFFFFFFE]),
    ],
)
def test_bar_sizing(bar, reg, expect):
    """Writing all-ones and reading back gives the size mask with the type bits."""
    dev = Plain()
    dev.add_bar(0, bar)
    for i, value in enumerate(expect):
        cfg_write(dev, reg + 4 * i, 0xFFFFFFFF)
        assert cfg_read(dev, reg + 4 * i) == value
    cfg_write(dev, reg, 0xE0000000 if not bar.is_io else 0xC000)
    assert cfg_read(dev, reg) & 0xF == expect[0] & 0xF


def test_rom_bar_sizing_and_contents():
    dev = ProbeDevice()
    cfg_write(dev, 0x30, 0xFFFFF800)
    assert cfg_read(dev, 0x30) == 0xFFFFF800  # 2 KiB, enable bit clear
    cfg_write(dev, 0x30, 0xFFFFFFFF)
    assert cfg_read(dev, 0x30) == 0xFFFFF801
    buf = bytearray(2048)
    dev.port.region_read(6, 0, buf)
    assert buf[: len(ROM_DATA)] == ROM_DATA and set(buf[len(ROM_DATA) :]) == {0xFF}
    with pytest.raises(RegionAccessError) as refused:  # the ROM is read-only
        dev.port.region_write(6, 0, b"\0")
    assert refused.value.errno == errno.EACCES
    dev.port.region_read(6, 0, buf)
    assert buf[0] == 0x55


def test_no_rom_sizes_to_zero():
    dev = Plain()
    cfg_write(dev, 0x30, 0xFFFFF800)
    assert cfg_read(dev, 0x30) == 0


def test_bar_declaration_errors():
    dev = Plain()
    with pytest.raises(BarError, match="ROM"):
        RomBar(b"", size=2 << 20)  # QEMU reads a ROM in one message of at most 1 MiB
    with pytest.raises(BarError):
        IoBar(512)  # PCI caps I/O BARs at 256 bytes
    with pytest.raises(BarError):
        MemoryBar(0x1800)
    with pytest.raises(BarError):
        dev.add_bar(5, MemoryBar(0x1000, bits=64))  # needs BAR5 and BAR6
    dev.add_bar(0, MemoryBar(0x1000, bits=64))
    with pytest.raises(BarError):
        dev.add_bar(1, IoBar(16))  # BAR1 is the upper half of BAR0
    with pytest.raises(BarError):
        dev.add_bar(2, RomBar(b"x"))
    with pytest.raises(BarError):
        dev.bars[0].map(DeviceIo(), 0xF00, 0x200)  # outside the BAR


def test_capability_list_builder():
    cs = ConfigSpace()
    a = cs.add_capability(PCI_CAP_ID_VNDR, b"\x04\x11")
    b = cs.add_capability(0x05, bytes(8), wmask=b"\x00\x00\xff\xff" + bytes(4))
    assert (a, b) == (0x40, 0x44)
    assert cs.get_byte(0x34) == 0x40 and cs.get_byte(0x41) == 0x44 and cs.get_byte(0x45) == 0
    assert cs.get_word(PCI_STATUS) & PCI_STATUS_CAP_LIST
    assert list(cs.capabilities()) == [(0x40, PCI_CAP_ID_VNDR), (0x44, 0x05)]
    assert cs.find_capability(0x05) == 0x44 and cs.find_capability(0x11) is None
    cs.write(0x46, b"\xff\xff\xff\xff")
    assert cs.get_dword(0x46) == 0xFFFF0000  # only the masked bytes (0x48, 0x49) changed
    with pytest.raises(ConfigSpaceError):
        cs.add_capability(0x09, bytes(6), offset=0x44)  # overlaps
    with pytest.raises(ConfigSpaceError):
        cs.add_capability(0x09, bytes(300))


# ------------------------------------------------------------- regions and dispatch


def test_region_table():
    dev = ProbeDevice()
    regions = {r.index: r for r in dev.port.regions}
    assert [regions[i].size for i in range(9)] == [0x1000, 0, 16, 0, 0x4000, 0, 0x800, 256, 0]
    assert regions[2].kind == "io" and regions[4].kind == "memory" and regions[6].writable is False


def test_handlers_share_a_bar_and_serve_two_bars():
    dev = ProbeDevice()
    port = served(dev)
    port.region_write(2, 0, b"\xaa")  # the I/O BAR reaches the same RAM as BAR0 0x000-0x00f
    buf = bytearray(1)
    port.region_read(0, 0, buf)
    assert buf[0] == 0xAA
    port.region_write(0, 0x804, b"\0\0\0\0")  # second handler of BAR0: offsets relative to its block
    assert dev.regs.writes == 1
    # (kind, base, offset, size): base is the guest address of the handler's block, where the
    # firmware put the BAR (I/O BAR2 at port 0xc000, BAR0 at 0xe0000000). Scratch serves ports
    # with the same methods as memory, so both record as read/write.
    assert dev.ram.calls == [("write", 0xC000, 0, 1), ("read", 0xE000_0000, 0, 1)]
    assert dev.bars[0].address == 0xE000_0000 and dev.bars[2].address == 0xC000


def test_unclaimed_reads_all_ones_and_writes_dropped(caplog):
    port = served(ProbeDevice())
    buf = bytearray(4)
    port.region_read(0, 0x900, buf)  # BAR0 0x810..0xfff has no handler
    assert buf == b"\xff" * 4
    port.region_write(0, 0x900, b"\x01")
    assert "unclaimed" in caplog.text


def test_region_access_outside_a_region_is_refused():
    port = ProbeDevice().port
    for index, offset, size in [(2, 15, 2), (1, 0, 1), (7, 0, 0), (9, 0, 1), (-1, 0, 1), (0, -1, 1)]:
        with pytest.raises(RegionAccessError) as refused:
            port.region_read(index, offset, bytearray(size))
        assert refused.value.errno == errno.EINVAL
        assert (refused.value.index, refused.value.offset, refused.value.size) == (index, offset, size)


def test_bar_unmap_and_remap_at_runtime():
    dev = ProbeDevice()
    port = served(dev)
    dev.bars[0].unmap(0x800)
    buf = bytearray(4)
    port.region_read(0, 0x800, buf)
    assert buf == b"\xff" * 4
    dev.bars[0].map(dev.regs, 0x800, 0x10)
    port.region_read(0, 0x800, buf)
    assert buf == b"\0" * 4


# ------------------------------------------------------------- decoding: BARs where the guest put them


def test_a_bar_answers_only_where_and_while_the_guest_decodes_it(caplog):
    dev = ProbeDevice()
    port = served(dev, decode=False)
    buf = bytearray(4)
    port.region_read(0, 0x20, buf)  # never programmed: a master abort
    assert buf == b"\xff" * 4 and "not programmed" in caplog.text
    port.region_write(0, 0x20, b"lost")
    cfg_write(dev, 0x10, 0xE000_0000)
    port.region_read(0, 0x20, buf)  # programmed, but memory decoding is off
    assert buf == b"\xff" * 4 and "memory decoding is off" in caplog.text
    cfg_write(dev, PCI_COMMAND, 0x2, 2)
    port.region_write(0, 0x20, b"kept")
    port.region_read(0, 0x20, buf)
    assert buf == b"kept" and dev.ram.mem[0x20:0x24] == b"kept"  # the write before decoding was dropped
    assert ("write", 0xE000_0000, 0x20, 4) in dev.ram.calls
    assert [(b, s) for b, s, _ in dev.io.current.mmio_ranges()] == [(0xE000_0000, 0x800), (0xE000_0800, 0x10)]
    assert dev.io.current.pio_ranges() == []  # I/O decoding is still off: BAR2 is not on the PIO bus


def test_moving_a_bar_moves_its_handlers_in_one_transaction():
    dev = ProbeDevice()
    port = served(dev)
    assert dev.bars[0].address == 0xE000_0000
    snapshot = dev.io.current
    cfg_write(dev, 0x10, 0xD000_0000)  # a driver moving the BAR with decoding on
    assert dev.bars[0].address == 0xD000_0000 and dev.io.current is not snapshot
    assert [b for b, _, _ in dev.io.current.mmio_ranges()][:2] == [0xD000_0000, 0xD000_0800]
    assert [b for b, _, _ in snapshot.mmio_ranges()][:2] == [0xE000_0000, 0xE000_0800]  # readers' view intact
    dev.ram.calls.clear()
    port.region_read(0, 0x10, bytearray(1))
    assert dev.ram.calls == [("read", 0xD000_0000, 0x10, 1)]


@pytest.mark.parametrize("reg, value, why", [
    (0x10, 0x0, "address 0 is never decoded"),
    (0x10, 0xFFFF_F000, "a 32-bit BAR must end below 4 GiB (the sizing value left behind)"),
])
def test_addresses_qemu_does_not_decode(reg, value, why):
    dev = ProbeDevice()
    served(dev)
    cfg_write(dev, reg, value)
    assert dev.bars[0].address is None, why


def test_an_io_bar_must_fit_the_port_space_and_a_64_bit_bar_takes_both_halves():
    dev = ProbeDevice()
    served(dev)
    cfg_write(dev, 0x18, 0x1_0000)  # BAR2 (16 ports) above 64 KiB
    assert dev.bars[2].address is None
    cfg_write(dev, 0x18, 0xFFF0)  # the last 16 ports
    assert dev.bars[2].address == 0xFFF0
    cfg_write(dev, 0x20, 0xC000_0000)  # BAR4, 64-bit: low then high dword
    cfg_write(dev, 0x24, 0x1)
    assert dev.bars[4].address == 0x1_C000_0000
    assert dev.io.current.get_mmio_device(0x1_C000_0010)[1] == 0x1_C000_0000


def test_two_bars_programmed_over_each_other_leave_the_later_undecoded(caplog):
    dev = ProbeDevice()
    served(dev)
    cfg_write(dev, 0x20, 0xE000_0000)  # BAR4 onto BAR0
    cfg_write(dev, 0x24, 0)
    assert dev.bars[0].address == 0xE000_0000 and dev.bars[4].address is None
    assert "overlaps another BAR" in caplog.text
    cfg_write(dev, 0x10, 0xD000_0000)  # BAR0 moves away: BAR4 can decode now...
    assert dev.bars[0].address == 0xD000_0000
    cfg_write(dev, 0x20, 0xE000_0000)  # ...once it is written again
    assert dev.bars[4].address == 0xE000_0000


def test_the_rom_and_config_space_never_depend_on_decoding():
    dev = ProbeDevice()
    port = served(dev, decode=False)
    buf = bytearray(2)
    port.region_read(6, 0, buf)  # QEMU copies the ROM by region index, whatever its BAR says
    assert bytes(buf) == ROM_DATA[:2]
    port.region_read(7, 0, buf)
    assert bytes(buf) == b"\x34\x12"


def test_a_cold_reset_clears_sticky_bits_and_a_warm_one_keeps_them():
    from vfiouser.devices.edu import Edu

    dev = Edu()
    served(dev)
    cfg_write(dev, 0x80, 0x5A, 1)  # edu's scratch bytes are sticky, as QEMU's PCI core has them
    dev.port.reset(ResetReason.CLIENT_REQUEST)
    assert cfg_read(dev, 0x80, 1) == 0x5A
    dev.port.reset(ResetReason.POWER_ON)
    assert cfg_read(dev, 0x80, 1) == 0


def test_a_model_reset_hook_without_a_parameter_still_works():
    calls = []

    class Old(Plain):
        def reset(self):
            calls.append("reset")

    dev = Old()
    dev.port.reset(ResetReason.CLIENT_LOST)
    assert calls == ["reset"]


# ------------------------------------------------------------- INTx


def test_intx_level_status_bit_and_disable():
    dev = ProbeDevice()
    sink = RecordingSink()
    served(dev, sink, decode=False)
    dev.raise_intx()
    assert cfg_read(dev, PCI_STATUS, 2) & PCI_STATUS_INTERRUPT and sink.levels == [True]
    cfg_write(dev, PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, 2)
    assert sink.levels == [True, False]
    assert cfg_read(dev, PCI_STATUS, 2) & PCI_STATUS_INTERRUPT  # status shows the pin, disabled or not
    cfg_write(dev, PCI_COMMAND, 0, 2)
    assert sink.levels == [True, False, True]
    dev.lower_intx()
    assert sink.levels[-1] is False and not cfg_read(dev, PCI_STATUS, 2) & PCI_STATUS_INTERRUPT


def test_intx_needs_a_pin():
    class NoPin(PciDevice):
        vendor_id, device_id = 0x1234, 2

    with pytest.raises(DeviceUsageError, match="no interrupt pin"):
        NoPin().raise_intx()


def test_reset_restores_config_and_lowers_intx():
    dev = ProbeDevice()
    sink = RecordingSink()
    served(dev, sink, decode=False)
    cfg_write(dev, 0x10, 0xE0000000)
    cfg_write(dev, PCI_COMMAND, 0x7, 2)
    assert dev.bars[0].address == 0xE0000000
    dev.raise_intx()
    dev.port.reset(ResetReason.CLIENT_REQUEST)
    assert cfg_read(dev, 0x10) == 0 and cfg_read(dev, PCI_COMMAND, 2) == 0
    assert sink.levels[-1] is False and not dev.intx_level
    assert dev.bars[0].address is None  # nothing decodes after a reset


def test_vendor_id_is_required():
    class Anonymous(PciDevice):
        pass

    with pytest.raises(DefinitionError, match="vendor_id"):
        Anonymous()


# ------------------------------------------------------------- loading devices by name


def test_make_device_converts_parameters():
    dev = make_device("idio16", {"loopback": "on"})
    assert dev.loopback is True
    assert make_device("idio16", {"loopback": "off"}).loopback is False
    assert load_device_class("tests.probe:ProbeDevice") is ProbeDevice


@pytest.mark.parametrize(
    "spec, params, message",
    [
        ("nosuch", {}, "unknown device"),
        ("nosuch.module:Thing", {}, "cannot import"),
        ("tests.probe:Scratch", {}, "not a PciDevice"),
        ("idio16", {"speed": "1"}, "no parameter 'speed'"),
        ("idio16", {"loopback": "maybe"}, "not on/off"),
    ],
)
def test_make_device_errors(spec, params, message):
    with pytest.raises(DeviceLoadError, match=message):
        make_device(spec, params)


def test_reset_drops_deferred_work_not_yet_started():
    import time

    dev = ProbeDevice()
    ran = []
    dev.defer(ran.append, "late", delay=0.2)
    dev.port.reset(ResetReason.CLIENT_REQUEST)
    time.sleep(0.4)
    assert ran == []
    dev.defer(ran.append, "after reset")
    assert dev.worker.wait_idle(2) and ran == ["after reset"]


def test_reset_fences_a_running_task_that_resubmits_itself():
    """A periodic task running during a reset must not keep itself alive by re-deferring."""
    import threading
    import time

    dev = ProbeDevice()
    started, release, ticks = threading.Event(), threading.Event(), []

    def tick():
        ticks.append(time.monotonic())
        if len(ticks) == 1:
            started.set()
            release.wait(2)
        dev.defer(tick, delay=0.01)

    dev.defer(tick)
    assert started.wait(2)
    dev.port.reset(ResetReason.CLIENT_REQUEST)  # while tick is running
    release.set()
    time.sleep(0.3)
    assert len(ticks) == 1
    dev.defer(ticks.append, "after reset")
    assert dev.worker.wait_idle(2) and ticks[-1] == "after reset"


def test_a_model_may_keep_deferred_work_across_reset():
    import time

    from vfiouser.devices.edu import Edu

    dev = Edu(dma_delay_ms=0)
    ran = []
    dev.defer(ran.append, "survives", delay=0.1)
    dev.port.reset(ResetReason.CLIENT_REQUEST)
    time.sleep(0.3)
    assert ran == ["survives"]


def test_a_bar_programmed_inside_another_never_answers_for_it(caplog):
    class Two(PciDevice):
        vendor_id, device_id = 0x1234, 0x0003

        def __init__(self):
            super().__init__()
            self.regs = Scratch(0x100)
            self.other = Scratch(0x100)
            self.add_bar(0, MemoryBar(0x1000)).map(self.regs, 0, 0x100)  # 0x100-0xfff has no handler
            self.add_bar(1, MemoryBar(0x100)).map(self.other)

    dev = Two()
    port = served(dev)
    assert dev.bars[0].address == 0xE000_0000
    cfg_write(dev, 0x14, 0xE000_0800)  # BAR1 moved inside BAR0's window
    assert dev.bars[1].address is None and "overlaps another BAR" in caplog.text
    dev.other.mem[0] = 0x42
    buf = bytearray(1)
    port.region_read(0, 0x800, buf)  # BAR0's unclaimed bytes, not BAR1's register
    assert buf[0] == 0xFF and dev.other.calls == []
    dev.bars[0].map(Scratch(0x100), 0x800, 0x100)  # and BAR0 may still map its own blocks there
    caplog.clear()
    cfg_write(dev, 0x04, 0x2, 2)  # more writes do not warn again
    assert "overlaps" not in caplog.text


def test_firmware_refuses_a_32_bit_bar_it_cannot_place_below_4_gib():
    from vfiouser.devices.pci.firmware import bring_up

    class Big(PciDevice):
        vendor_id, device_id = 0x1234, 0x0004

        def __init__(self):
            super().__init__()
            self.add_bar(0, MemoryBar(1 << 29))

    with pytest.raises(DeviceUsageError, match="below 4 GiB"):
        bring_up(Big().port)
    assert bring_up(Big().port, mem32_base=0x8000_0000) == {0: 0x8000_0000}


def test_a_model_calling_the_base_reset_without_a_type_still_works():
    class Old(Plain):
        def reset(self):
            super().reset()
            self.was_reset = True

    dev = Old()
    dev.port.reset(ResetReason.CLIENT_REQUEST)
    assert dev.was_reset
