"""PCI framework: config space semantics, BARs, ROM, capabilities, INTx, regions, reset."""

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
    ConfigSpaceError,
    IoBar,
    MemoryBar,
    PciDevice,
    RegionAccessError,
    RomBar,
)
from vfiouser.iomgr import DeviceIo

from .probe import ROM_DATA, ProbeDevice


def cfg_read(dev, offset, size=4):
    buf = bytearray(size)
    dev.region_read(7, offset, buf)
    return int.from_bytes(buf, "little")


def cfg_write(dev, offset, value, size=4):
    dev.region_write(7, offset, value.to_bytes(size, "little"))


class Plain(PciDevice):
    vendor_id, device_id = 0x1234, 0x0001
    interrupt_pin = INTA


class Sink:
    def __init__(self):
        self.levels = []

    def intx(self, asserted):
        self.levels.append(asserted)


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
    dev.region_read(6, 0, buf)
    assert buf[: len(ROM_DATA)] == ROM_DATA and set(buf[len(ROM_DATA) :]) == {0xFF}
    dev.region_write(6, 0, b"\0")  # the ROM is read-only
    dev.region_read(6, 0, buf)
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
    regions = {r.index: r for r in dev.regions()}
    assert [regions[i].size for i in range(9)] == [0x1000, 0, 16, 0, 0x4000, 0, 0x800, 256, 0]
    assert regions[2].kind == "io" and regions[4].kind == "memory" and regions[6].writable is False


def test_handlers_share_a_bar_and_serve_two_bars():
    dev = ProbeDevice()
    dev.region_write(2, 0, b"\xaa")  # the I/O BAR reaches the same RAM as BAR0 0x000-0x00f
    buf = bytearray(1)
    dev.region_read(0, 0, buf)
    assert buf[0] == 0xAA
    dev.region_write(0, 0x804, b"\0\0\0\0")  # second handler of BAR0: offsets relative to its block
    assert dev.regs.writes == 1
    # (kind, base, offset, size): the PIO window of BAR2 is port 0x200, BAR0's MMIO window is 0.
    # Scratch serves ports with the same methods as memory, so both record as read/write.
    assert dev.ram.calls == [("write", 2 * 0x100, 0, 1), ("read", 0, 0, 1)]


def test_unclaimed_reads_all_ones_and_writes_dropped(caplog):
    dev = ProbeDevice()
    buf = bytearray(4)
    dev.region_read(0, 0x900, buf)  # BAR0 0x810..0xfff has no handler
    assert buf == b"\xff" * 4
    dev.region_write(0, 0x900, b"\x01")
    assert "unclaimed" in caplog.text


def test_region_access_outside_a_region_is_refused():
    dev = ProbeDevice()
    with pytest.raises(RegionAccessError):
        dev.region_read(2, 15, bytearray(2))
    with pytest.raises(RegionAccessError):
        dev.region_read(1, 0, bytearray(1))


def test_bar_unmap_and_remap_at_runtime():
    dev = ProbeDevice()
    dev.bars[0].unmap(0x800)
    buf = bytearray(4)
    dev.region_read(0, 0x800, buf)
    assert buf == b"\xff" * 4
    dev.bars[0].map(dev.regs, 0x800, 0x10)
    dev.region_read(0, 0x800, buf)
    assert buf == b"\0" * 4


# ------------------------------------------------------------- INTx


def test_intx_level_status_bit_and_disable():
    dev = ProbeDevice()
    sink = Sink()
    dev.attach(sink)
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

    with pytest.raises(RuntimeError):
        NoPin().raise_intx()


def test_reset_restores_config_and_lowers_intx():
    dev = ProbeDevice()
    dev.realize()
    sink = Sink()
    dev.attach(sink)
    cfg_write(dev, 0x10, 0xE0000000)
    cfg_write(dev, PCI_COMMAND, 0x7, 2)
    dev.raise_intx()
    dev.device_reset()
    assert cfg_read(dev, 0x10) == 0 and cfg_read(dev, PCI_COMMAND, 2) == 0
    assert sink.levels[-1] is False and not dev.intx_level


def test_vendor_id_is_required():
    class Anonymous(PciDevice):
        pass

    with pytest.raises(ValueError, match="vendor_id"):
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
    dev.realize()
    ran = []
    dev.defer(ran.append, "late", delay=0.2)
    dev.device_reset()
    time.sleep(0.4)
    assert ran == []
    dev.defer(ran.append, "after reset")
    assert dev.worker.wait_idle(2) and ran == ["after reset"]


def test_reset_fences_a_running_task_that_resubmits_itself():
    """A periodic task running during a reset must not keep itself alive by re-deferring."""
    import threading
    import time

    dev = ProbeDevice()
    dev.realize()
    started, release, ticks = threading.Event(), threading.Event(), []

    def tick():
        ticks.append(time.monotonic())
        if len(ticks) == 1:
            started.set()
            release.wait(2)
        dev.defer(tick, delay=0.01)

    dev.defer(tick)
    assert started.wait(2)
    dev.device_reset()  # while tick is running
    release.set()
    time.sleep(0.3)
    assert len(ticks) == 1
    dev.defer(ticks.append, "after reset")
    assert dev.worker.wait_idle(2) and ticks[-1] == "after reset"


def test_a_model_may_keep_deferred_work_across_reset():
    import time

    from vfiouser.devices.edu import Edu

    dev = Edu(dma_delay_ms=0)
    dev.realize()
    ran = []
    dev.defer(ran.append, "survives", delay=0.1)
    dev.device_reset()
    time.sleep(0.3)
    assert ran == ["survives"]
