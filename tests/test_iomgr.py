"""IoManager: dbs-device's own unit tests that still apply, and each strict divergence.

Tests named ``test_dbs_*`` mirror a test of the dbs-device 0.2.0 crate (its name
follows); ``test_strict_*`` pin a place where we are deliberately stricter.
"""

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiouser.iomgr import (
    CowIoManager,
    DeviceIo,
    DeviceIoMut,
    DeviceOverlap,
    DeviceResources,
    InvalidRange,
    IoAddress,
    IoManager,
    IoSize,
    KvmMemSlot,
    LegacyIrq,
    LockedDevice,
    MacAddress,
    MemAddressRange,
    MmioAddressRange,
    MsiIrq,
    MsiIrqType,
    NoDevice,
    PioAddress,
    PioAddressRange,
    PioSize,
    ResourceConstraint,
    StraddlingAccess,
    TransactionError,
)

PIO_BASE, PIO_SIZE = 0x40, 4
MMIO_BASE, MMIO_SIZE = 0x1234_5678, 0x8765_4321
CONFIG_DATA = 0x1234


class DummyDevice(DeviceIo):
    """The crate's fixture: a 32-bit config value, read little-endian, written bytewise."""

    def __init__(self):
        self.config = CONFIG_DATA
        self.lock = threading.Lock()

    def _read(self, data):
        if len(data) > 4:
            return
        with self.lock:
            for i in range(len(data)):
                data[i] = (self.config >> (8 * i)) & 0xFF

    def _write(self, data):
        with self.lock:
            self.config = data[0]

    def read(self, base, offset, data):
        self._read(data)

    def pio_read(self, base, offset, data):
        self._read(data)

    def write(self, base, offset, data):
        self._write(data)

    def pio_write(self, base, offset, data):
        self._write(data)

    def get_trapped_io_resources(self):
        return DeviceResources([MmioAddressRange(MMIO_BASE, MMIO_SIZE), PioAddressRange(PIO_BASE, PIO_SIZE)])


class Recorder(DeviceIo):
    """Records every call as (kind, base, offset, bytes)."""

    def __init__(self):
        self.calls = []

    def read(self, base, offset, data):
        self.calls.append(("read", base, offset, len(data)))
        data[:] = b"\xaa" * len(data)

    def write(self, base, offset, data):
        self.calls.append(("write", base, offset, bytes(data)))

    def pio_read(self, base, offset, data):
        self.calls.append(("pio_read", base, offset, len(data)))
        data[:] = b"\x55" * len(data)

    def pio_write(self, base, offset, data):
        self.calls.append(("pio_write", base, offset, bytes(data)))


def resources():
    return [MmioAddressRange(MMIO_BASE, MMIO_SIZE), LegacyIrq(4), PioAddressRange(PIO_BASE, PIO_SIZE)]


# ---------------------------------------------------------------- lib.rs tests


def test_dbs_device_io_adapter():
    """test_device_io_adapter: a DeviceIo with interior state, default resources empty."""

    class MockDevice(DeviceIo):
        def __init__(self):
            self.data = 0

        def read(self, base, offset, data):
            data[0] = self.data

        def write(self, base, offset, data):
            self.data = data[0]

        pio_read, pio_write = read, write

    dev = MockDevice()
    buf = bytearray(1)
    dev.write(IoAddress(0), IoAddress(0), b"\x10")
    dev.read(IoAddress(0), IoAddress(0), buf)
    assert buf[0] == 0x10
    dev.pio_write(PioAddress(0), PioAddress(0), b"\x10")
    dev.pio_read(PioAddress(0), PioAddress(0), buf)
    assert buf[0] == 0x10
    assert dev.get_assigned_resources() == DeviceResources()
    assert dev.get_trapped_io_resources() == DeviceResources()
    assert dev.data == 0x10


def test_dbs_device_io_mut_adapter():
    """test_device_io_mut_adapter: a DeviceIoMut behind the locking adapter, through the manager."""

    class MockDeviceMut(DeviceIoMut):
        def __init__(self):
            self.data = 0

        def write(self, base, offset, data):
            self.data = data[0]

        def read(self, base, offset, data):
            data[0] = self.data

    inner = MockDeviceMut()
    dev = LockedDevice(inner)
    mgr = IoManager()
    mgr.register_device_io(dev, [MmioAddressRange(0x1000, 0x10)])
    mgr.mmio_write(0x1000, b"\x10")
    buf = bytearray(1)
    mgr.mmio_read(0x1000, buf)
    assert buf[0] == 0x10 and inner.data == 0x10
    assert dev.get_trapped_io_resources() == DeviceResources()


def test_locked_device_serialises_calls():
    """The adapter holds its lock during the inner call, so two threads never interleave."""
    inside = []

    class Slow(DeviceIoMut):
        def write(self, base, offset, data):
            inside.append(1)
            assert len(inside) == 1, "two writers inside at once"
            threading.Event().wait(0.001)
            inside.pop()

    dev = LockedDevice(Slow())
    threads = [threading.Thread(target=lambda: [dev.write(0, 0, b"x") for _ in range(50)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_dbs_io_data_struct():
    """test_io_data_struct: IoSize / IoAddress conversions and ordering."""
    size = IoSize(0x1111)
    assert size.raw_value() == 0x1111 and int(size) == 0x1111
    assert size == IoSize(size) and size < IoSize(0x1112)
    addr = IoAddress(0x1234)
    assert addr.raw_value() == 0x1234 and addr < IoAddress(0x1235)
    with pytest.raises(ValueError):
        IoAddress(1 << 64)
    with pytest.raises(ValueError):
        IoSize(-1)


def test_dbs_pio_data_struct():
    """test_pio_data_struct: PIO types, fallible narrowing, infallible widening."""
    size = PioSize(0x1111)
    assert size.raw_value() == 0x1111 and size < PioSize(0x1112)
    assert PioSize.try_from(IoSize(0x1111)) == 0x1111
    with pytest.raises(ValueError):
        PioSize.try_from(IoSize(0x10000))
    assert IoSize(PioSize(0x1111)) == 0x1111
    assert PioAddress(0x1234) < PioAddress(0x1235)
    with pytest.raises(ValueError):
        PioAddress.try_from(IoAddress(0x12_3456))
    assert PioAddress.try_from(IoAddress(0x1234)) == 0x1234
    assert IoAddress(PioAddress(0x1234)) == 0x1234


# ------------------------------------------------------- device_manager.rs tests


def test_dbs_clone_io_manager():
    """test_clone_io_manager: non-I/O resources ignored; a clone is independent but shares devices."""
    mgr = IoManager()
    dev = DummyDevice()
    mgr.register_device_io(dev, resources())
    clone = mgr.clone()
    assert len(clone.mmio_ranges()) == 1 and len(clone.pio_ranges()) == 1
    assert clone.get_mmio_device(MMIO_BASE + 1) == (dev, MMIO_BASE)
    clone.unregister_device_io([PioAddressRange(PIO_BASE, PIO_SIZE)])
    assert mgr.get_pio_device(PIO_BASE) == (dev, PIO_BASE)
    assert clone.get_pio_device(PIO_BASE) is None
    del mgr
    buf = bytearray(4)
    clone.mmio_read(MMIO_BASE, buf)
    assert bytes(buf) == b"\x34\x12\x00\x00"


def test_dbs_register_unregister_device_io():
    """test_register_unregister_device_io: a second identical registration is a DeviceOverlap."""
    mgr = IoManager()
    dev = DummyDevice()
    mgr.register_device_io(dev, resources())
    with pytest.raises(DeviceOverlap):
        mgr.register_device_io(dev, resources())
    mgr.unregister_device_io(resources())
    assert mgr.mmio_ranges() == [] and mgr.pio_ranges() == []


def test_dbs_mmio_read_write():
    """test_mmio_read_write: little-endian read at the base; one past the end is NoDevice."""
    mgr = IoManager()
    dev = DummyDevice()
    mgr.register_device_io(dev, resources())
    buf = bytearray(4)
    mgr.mmio_read(MMIO_BASE, buf)
    assert bytes(buf) == b"\x34\x12\x00\x00"
    with pytest.raises(NoDevice):
        mgr.mmio_read(MMIO_BASE + MMIO_SIZE, bytearray(4))
    mgr.mmio_write(MMIO_BASE, bytes(4))
    assert dev.config == 0
    with pytest.raises(NoDevice):
        mgr.mmio_write(MMIO_BASE + MMIO_SIZE, bytes(4))


def test_dbs_pio_read_write():
    """test_pio_read_write: the same on the PIO bus."""
    mgr = IoManager()
    dev = DummyDevice()
    mgr.register_device_io(dev, resources())
    buf = bytearray(4)
    mgr.pio_read(PIO_BASE, buf)
    assert bytes(buf) == b"\x34\x12\x00\x00"
    with pytest.raises(NoDevice):
        mgr.pio_read(PIO_BASE + PIO_SIZE, bytearray(1))
    mgr.pio_write(PIO_BASE, bytes(4))
    assert dev.config == 0
    with pytest.raises(NoDevice):
        mgr.pio_write(PIO_BASE + PIO_SIZE, bytes(1))


def test_dbs_error_code():
    """test_error_code: errors are typed and say what went wrong."""
    mgr = IoManager()
    mgr.register_device_io(DeviceIo(), [MmioAddressRange(0x1000, 0x100)])
    with pytest.raises(DeviceOverlap, match="device address conflicts with existing devices") as exc:
        mgr.register_device_io(DeviceIo(), [MmioAddressRange(0x1000, 0x100)])
    assert exc.value.existing == (0x1000, 0x100) and exc.value.space == "mmio"
    with pytest.raises(NoDevice, match="no such device: pio") as exc2:
        mgr.pio_read(0x10, bytearray(1))
    assert (exc2.value.addr, exc2.value.size) == (0x10, 1)


def test_dbs_io_manager_partial_eq():
    """test_io_manager_partial_eq / _neq: equal ranges and trapped resources compare equal."""
    a, b = IoManager(), IoManager()
    a.register_device_io(DummyDevice(), resources())
    b.register_device_io(DummyDevice(), resources())
    assert a == b
    c = IoManager()
    c.register_device_io(DummyDevice(), [MmioAddressRange(MMIO_BASE, MMIO_SIZE)])
    assert a != c


def test_dispatch_passes_base_and_offset():
    """Devices get (range base, offset from it, buffer); PIO and MMIO use their own methods."""
    mgr = IoManager()
    rec = Recorder()
    mgr.register_device_io(rec, [MmioAddressRange(0x1000, 0x100), PioAddressRange(0x1000, 0x10)])
    buf = bytearray(2)
    mgr.mmio_read(0x1010, buf)
    mgr.mmio_write(0x1020, b"\x01\x02")
    mgr.pio_read(0x1004, bytearray(1))
    mgr.pio_write(0x100F, b"\x07")
    assert rec.calls == [
        ("read", 0x1000, 0x10, 2),
        ("write", 0x1000, 0x20, b"\x01\x02"),
        ("pio_read", 0x1000, 4, 1),
        ("pio_write", 0x1000, 0xF, b"\x07"),
    ]
    assert isinstance(rec.calls[0][1], IoAddress) and isinstance(rec.calls[2][1], PioAddress)
    assert bytes(buf) == b"\xaa\xaa"


# ---------------------------------------------------------- resources.rs tests


def device_resources():
    entries = [
        PioAddressRange(0, 5),
        MmioAddressRange(0x1234_5678, 0x8765_4321),
        MemAddressRange(0x1234_5678, 0x8765_4321),
        LegacyIrq(0x168),
        MsiIrq(MsiIrqType.PCI_MSI, 0x6666, 0x8888),
        MsiIrq(MsiIrqType.PCI_MSIX, 0x8888, 0x16666),
        MsiIrq(MsiIrqType.GENERIC_MSI, 0x16688, 0x16888),
        MacAddress("00:08:63:66:86:88"),
        KvmMemSlot(0x100),
    ]
    res = DeviceResources()
    for i, entry in enumerate(entries):
        res.append(entry)
        assert res[i] == entry
    return res


def test_dbs_resources_getters():
    """get_pio/mmio/mem_address_ranges, legacy irq, msi/msix/generic, mac, kvm slots, all."""
    res = device_resources()
    assert res.get_pio_address_ranges()[0] == (0, 5)
    assert res[0] != res[1]
    clone = DeviceResources(res)
    assert len(clone) == len(res) and clone == res
    assert res.get_mmio_address_ranges()[0] == (0x1234_5678, 0x8765_4321)
    assert res.get_mem_address_ranges()[0] == (0x1234_5678, 0x8765_4321)
    assert res.get_legacy_irq() == 0x168
    assert res.get_pci_msi_irqs() == (0x6666, 0x8888)
    assert res.get_pci_msix_irqs() == (0x8888, 0x16666)
    assert res.get_generic_msi_irqs() == (0x16688, 0x16888)
    assert res.get_mac_address() == "00:08:63:66:86:88"
    assert res.get_kvm_mem_slots() == [0x100]
    assert len(res.get_all_resources()) == 9
    assert sum(1 for _ in res) == 9
    empty = DeviceResources()
    assert empty.get_legacy_irq() is None
    assert empty.get_pci_msi_irqs() is None
    assert empty.get_pci_msix_irqs() is None
    assert empty.get_generic_msi_irqs() is None
    assert empty.get_mac_address() is None


def test_dbs_resource_constraint():
    """test_resource_constraint: constructors fill in the documented defaults."""
    pio = ResourceConstraint.new_pio(2)
    assert (pio.range, pio.align, pio.size) == (None, 1, 2)
    assert pio != ResourceConstraint.new_mmio(0x1000)
    pio2 = ResourceConstraint.pio_with_constraints(2, (15, 16), 2)
    assert (pio2.range, pio2.align, pio2.size) == ((15, 16), 2, 2)
    mmio = ResourceConstraint.new_mmio(0x2000)
    assert (mmio.range, mmio.align, mmio.size) == (None, 0x1000, 0x2000)
    mmio2 = ResourceConstraint.mmio_with_constraints(0x2000, (0, 0x2000), 0x2000)
    assert (mmio2.range, mmio2.align) == ((0, 0x2000), 0x2000)
    mem = ResourceConstraint.new_mem(0x2000)
    assert (mem.range, mem.align, mem.size) == (None, 0x1000, 0x2000)
    mem2 = ResourceConstraint.mem_with_constraints(0x2000, (0, 0x2000), 0x2000)
    assert (mem2.range, mem2.align) == ((0, 0x2000), 0x2000)
    assert ResourceConstraint.new_legacy_irq(0x123).irq == 0x123
    assert ResourceConstraint.new_pci_msi_irq(0x123).size == 0x123
    assert ResourceConstraint.new_pci_msix_irq(0x123).size == 0x123
    assert ResourceConstraint.new_generic_irq(0x123).size == 0x123
    slot = ResourceConstraint.new_kvm_mem_slot(0x1000, 0x2000)
    assert (slot.slot, slot.size) == (0x2000, 0x1000)


def test_resources_reject_non_resources():
    with pytest.raises(TypeError):
        DeviceResources([("not", "a resource")])


# ------------------------------------------------------ strict divergences


@pytest.mark.parametrize(
    "second",
    [
        MmioAddressRange(0x1800, 0x10),  # inside
        MmioAddressRange(0x800, 0x1000),  # from below
        MmioAddressRange(0x1FFF, 0x10),  # tail
        MmioAddressRange(0x0, 0x10000),  # covering
    ],
)
def test_strict_any_overlap_is_rejected(second):
    """dbs-device only rejects an identical base; we reject every overlap."""
    mgr = IoManager()
    first = DeviceIo()
    mgr.register_device_io(first, [MmioAddressRange(0x1000, 0x1000)])
    with pytest.raises(DeviceOverlap):
        mgr.register_device_io(DeviceIo(), [second])
    assert mgr.get_mmio_device(0x1000) == (first, 0x1000)
    assert len(mgr.mmio_ranges()) == 1


def test_strict_adjacent_ranges_are_fine():
    mgr = IoManager()
    a, b = DeviceIo(), DeviceIo()
    mgr.register_device_io(a, [MmioAddressRange(0x1000, 0x1000)])
    mgr.register_device_io(b, [MmioAddressRange(0x2000, 0x1000), MmioAddressRange(0x0, 0x1000)])
    assert [d for _, _, d in mgr.mmio_ranges()] == [b, a, b]


def test_strict_registration_is_atomic():
    """A clash on the third range leaves nothing of the list behind, and the old owner intact."""
    mgr = IoManager()
    owner = DeviceIo()
    mgr.register_device_io(owner, [PioAddressRange(0x100, 0x10)])
    new = DeviceIo()
    with pytest.raises(DeviceOverlap):
        mgr.register_device_io(
            new, [MmioAddressRange(0x1000, 0x10), PioAddressRange(0x200, 4), PioAddressRange(0x108, 4)]
        )
    assert mgr.mmio_ranges() == [] and mgr.pio_ranges() == [(0x100, 0x10, owner)]


def test_strict_overlap_inside_one_list():
    mgr = IoManager()
    with pytest.raises(DeviceOverlap):
        mgr.register_device_io(DeviceIo(), [PioAddressRange(0x10, 4), PioAddressRange(0x12, 4)])
    with pytest.raises(DeviceOverlap):
        mgr.register_device_io(DeviceIo(), [PioAddressRange(0x10, 4), PioAddressRange(0x10, 4)])
    assert mgr.pio_ranges() == []


def test_pio_and_mmio_are_separate_spaces():
    mgr = IoManager()
    a, b = Recorder(), Recorder()
    mgr.register_device_io(a, [PioAddressRange(0x10, 4)])
    mgr.register_device_io(b, [MmioAddressRange(0x10, 4)])
    mgr.pio_read(0x10, bytearray(1))
    mgr.mmio_read(0x10, bytearray(1))
    assert [c[0] for c in a.calls] == ["pio_read"] and [c[0] for c in b.calls] == ["read"]


@pytest.mark.parametrize(
    "res",
    [
        MmioAddressRange(0x1000, 0),
        PioAddressRange(0x10, 0),
        MmioAddressRange((1 << 64) - 1, 2),
        PioAddressRange(0xFFF0, 0x20),
        PioAddressRange(-1, 2),
        PioAddressRange(0, 0x10000),  # PioSize is 16 bits
    ],
)
def test_strict_empty_and_overflowing_ranges_rejected(res):
    mgr = IoManager()
    with pytest.raises(InvalidRange):
        mgr.register_device_io(DeviceIo(), [res])
    assert mgr.pio_ranges() == [] and mgr.mmio_ranges() == []


def test_top_of_each_space_is_usable():
    mgr = IoManager()
    rec = Recorder()
    mgr.register_device_io(rec, [MmioAddressRange((1 << 64) - 1, 1), PioAddressRange(0xFFF0, 0x10)])
    mgr.mmio_read((1 << 64) - 1, bytearray(1))
    mgr.pio_read(0xFFFF, bytearray(1))
    assert len(rec.calls) == 2


def test_strict_straddling_access_rejected():
    """An access that starts in a range and ends past it is not handed to the device."""
    mgr = IoManager()
    rec = Recorder()
    mgr.register_device_io(rec, [MmioAddressRange(0x1000, 0x10), MmioAddressRange(0x1010, 0x10)])
    with pytest.raises(StraddlingAccess) as exc:
        mgr.mmio_read(0x100E, bytearray(4))
    assert exc.value.range == (0x1000, 0x10)
    with pytest.raises(NoDevice):  # StraddlingAccess is a NoDevice
        mgr.mmio_write(0x101F, b"\x00\x00")
    mgr.register_device_io(rec, [PioAddressRange(0xFFF0, 0x10)])
    with pytest.raises(StraddlingAccess):
        mgr.pio_read(0xFFFE, bytearray(4))
    assert rec.calls == []


def test_strict_empty_access_rejected():
    mgr = IoManager()
    rec = Recorder()
    mgr.register_device_io(rec, [PioAddressRange(0x10, 4)])
    with pytest.raises(NoDevice, match="empty access"):
        mgr.pio_read(0x10, bytearray(0))
    assert rec.calls == []


def test_strict_unregister_unknown_range_is_error():
    """dbs-device removes by base and always succeeds; we need the exact range."""
    mgr = IoManager()
    dev = DeviceIo()
    mgr.register_device_io(dev, [MmioAddressRange(0x1000, 0x100), PioAddressRange(0x10, 4)])
    with pytest.raises(NoDevice):
        mgr.unregister_device_io([MmioAddressRange(0x1000, 0x200)])  # wrong size
    with pytest.raises(NoDevice):
        mgr.unregister_device_io([PioAddressRange(0x10, 4), PioAddressRange(0x20, 4)])  # one unknown
    with pytest.raises(NoDevice):
        mgr.unregister_device_io([PioAddressRange(0x10, 4), PioAddressRange(0x10, 4)])  # twice
    assert len(mgr.pio_ranges()) == 1 and len(mgr.mmio_ranges()) == 1  # atomic: nothing removed
    mgr.unregister_device_io([PioAddressRange(0x10, 4), LegacyIrq(3)])
    assert mgr.pio_ranges() == []


def test_strict_equality_compares_sizes():
    """dbs-device's IoRange equality ignores sizes (test_device_manager_data_structs); ours does not."""
    a, b = IoManager(), IoManager()
    dev = DeviceIo()
    a.register_device_io(dev, [MmioAddressRange(0x1000, 0x1000)])
    b.register_device_io(dev, [MmioAddressRange(0x1000, 0x2000)])
    assert a != b


def test_register_rejects_non_device():
    class NotADevice:
        pass

    with pytest.raises(TypeError, match="LockedDevice"):
        IoManager().register_device_io(NotADevice(), [PioAddressRange(0, 1)])


# -------------------------------------------------------------- transactions


def test_transaction_commit_and_cancel():
    cow = CowIoManager()
    dev = DeviceIo()
    tx = cow.begin_tx()
    cow.register_device_io(tx, dev, [MmioAddressRange(0x1000, 0x10)])
    assert cow.current.mmio_ranges() == []  # not visible before commit
    cow.commit_tx(tx)
    assert cow.current.mmio_ranges() == [(0x1000, 0x10, dev)]
    tx = cow.begin_tx()
    cow.unregister_device_io(tx, [MmioAddressRange(0x1000, 0x10)])
    cow.cancel_tx(tx)
    assert cow.current.mmio_ranges() == [(0x1000, 0x10, dev)]
    with pytest.raises(TransactionError):
        cow.commit_tx(tx)


def test_transaction_context_manager_cancels_on_error():
    cow = CowIoManager()
    with pytest.raises(DeviceOverlap):
        with cow.transaction() as tx:
            cow.register_device_io(tx, DeviceIo(), [PioAddressRange(0x10, 4)])
            cow.register_device_io(tx, DeviceIo(), [PioAddressRange(0x12, 4)])
    assert cow.current.pio_ranges() == []
    with cow.transaction() as tx:  # the lock was released
        cow.register_device_io(tx, DeviceIo(), [PioAddressRange(0x10, 4)])
    assert len(cow.current.pio_ranges()) == 1


def test_transaction_nested_in_same_thread_is_an_error():
    cow = CowIoManager()
    with cow.transaction():
        with pytest.raises(TransactionError):
            cow.begin_tx()


def test_transaction_readers_never_see_half_a_change():
    """A transaction moves a two-range device; a concurrent reader sees both old or both new."""
    cow = CowIoManager()
    dev = DeviceIo()
    layout_a = [MmioAddressRange(0x1000, 0x10), MmioAddressRange(0x3000, 0x10)]
    layout_b = [MmioAddressRange(0x2000, 0x10), MmioAddressRange(0x4000, 0x10)]
    with cow.transaction() as tx:
        cow.register_device_io(tx, dev, layout_a)
    stop = threading.Event()
    torn = []

    def reader():
        while not stop.is_set():
            snap = cow.current
            seen = tuple(snap.get_mmio_device(a) is not None for a in (0x1000, 0x3000, 0x2000, 0x4000))
            if seen not in ((True, True, False, False), (False, False, True, True)):
                torn.append(seen)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        old, new = (layout_a, layout_b) if i % 2 == 0 else (layout_b, layout_a)
        with cow.transaction() as tx:
            cow.unregister_device_io(tx, old)
            cow.register_device_io(tx, dev, new)
    stop.set()
    t.join()
    assert torn == []


# ------------------------------------------------------------ model check


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 0x200), st.integers(0, 0x40)), max_size=12),
    st.lists(st.tuples(st.integers(0, 0x260), st.integers(1, 8)), max_size=20),
)
def test_model_matches_interval_semantics(ranges, accesses):
    """Against a naive model: registration succeeds iff valid and disjoint, dispatch iff contained."""
    mgr = IoManager()
    owned = {}  # address -> (device, base)
    for base, size in ranges:
        dev = Recorder()
        addrs = set(range(base, base + size))
        ok = size > 0 and not (addrs & owned.keys())
        try:
            mgr.register_device_io(dev, [MmioAddressRange(base, size)])
            assert ok
            for a in addrs:
                owned[a] = (dev, base)
        except (DeviceOverlap, InvalidRange):
            assert not ok
    for addr, width in accesses:
        owners = {owned.get(a, (None, None))[0] for a in range(addr, addr + width)}
        expected = owned[addr] if len(owners) == 1 and None not in owners else None
        if expected is None:
            with pytest.raises(NoDevice):
                mgr.mmio_read(addr, bytearray(width))
        else:
            dev, base = expected
            mgr.mmio_read(addr, bytearray(width))
            assert dev.calls[-1] == ("read", base, addr - base, width)
