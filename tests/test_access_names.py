"""The device port names what an access reaches: config registers, capability fields, MSI-X, the model's own."""

from vfiouser.devices.edu import Edu
from vfiouser.devices.pci import MemoryBar, PciDevice
from vfiouser.devices.port import DevicePort
from vfiouser.devices.virtio.rng import VirtioRng

CONFIG = 7


class Named(PciDevice):
    """A 64-bit BAR0, MSI-X in BAR2, and register names of its own in BAR0."""

    vendor_id, device_id = 0x1234, 0x4321

    def __init__(self):
        super().__init__()
        self.add_bar(0, MemoryBar(0x1000, bits=64)).map(self)
        self.add_bar(2, MemoryBar(0x1000))
        self.add_msi(vectors=4, addr64=False, per_vector_mask=True)
        self.add_msix(vectors=4, table_bar=2)

    def read(self, base, offset, data):
        data[:] = bytes(len(data))

    def write(self, base, offset, data):
        pass

    def register_names(self, index, offset, size, *, write=False):
        return {0x10: "doorbell"}.get(offset, "") if index == 0 and write else ""


def test_config_header_registers_and_capability_fields_by_name():
    port = Named().port
    assert port.describe_access(CONFIG, 0x00, 4) == "vendor_id, device_id"
    assert port.describe_access(CONFIG, 0x04, 2) == "command"
    assert port.describe_access(CONFIG, 0x10, 4) == "BAR0" and port.describe_access(CONFIG, 0x14, 4) == "BAR0.high"
    assert port.describe_access(CONFIG, 0x18, 4) == "BAR2"
    assert port.describe_access(CONFIG, 0x3C, 2) == "interrupt_line, interrupt_pin"
    msi = port.device.msi.offset
    assert port.describe_access(CONFIG, msi + 2, 2) == "MSI.control"
    assert port.describe_access(CONFIG, msi + 4, 4) == "MSI.address"
    assert port.describe_access(CONFIG, msi + 8, 2) == "MSI.data"  # 32-bit: data follows the address
    assert port.describe_access(CONFIG, msi + 12, 4) == "MSI.mask" and port.describe_access(CONFIG, msi + 16, 4) \
        == "MSI.pending"
    msix = port.device.msix.offset
    assert port.describe_access(CONFIG, msix, 4) == "MSI-X.header, MSI-X.control"
    assert port.describe_access(CONFIG, msix + 4, 4) == "MSI-X.table"
    assert port.describe_access(CONFIG, 0xF0, 4) == ""  # device-specific: nothing to say


def test_msix_table_and_pba_in_their_bar_and_the_models_own_names_elsewhere():
    port = Named().port
    assert port.describe_access(2, 3 * 16 + 8, 4) == "MSI-X table[3].data"
    assert port.describe_access(2, 16, 8) == "MSI-X table[1].address/address_hi"
    assert port.describe_access(2, port.device.msix.pba_offset, 8) == "MSI-X PBA"
    assert port.describe_access(0, 0x10, 4, write=True) == "doorbell"  # the model's hook
    assert port.describe_access(0, 0x10, 4) == ""
    assert port.describe_access(0, 0x14, 4, write=True) == ""


def test_models_without_names_and_broken_hooks_log_nothing_rather_than_fail():
    class Broken(Named):
        def register_names(self, index, offset, size, *, write=False):
            raise RuntimeError("a bug in a log helper")

    assert Broken().port.describe_access(0, 0x10, 4, write=True) == ""
    assert Named().port.describe_access(0, 0x20, 4) == ""
    assert Edu().port.describe_access(0, 0x20, 4) == "edu.status (computing, irq_fact)"  # its register map
    assert Edu().port.describe_access(0, 0x40, 4) == ""  # a hole in the map: nothing
    assert Edu().port.describe_access(99, 0, 4) == ""  # no such region: nothing, not an error
    assert DevicePort.describe_access(Edu().port, CONFIG, 0, 4) == ""  # the port's default


def test_virtio_capabilities_are_named_as_vendor_capabilities():
    port = VirtioRng().port
    first = min(off for off, _ in port.device.config.capabilities())
    assert port.describe_access(CONFIG, first, 4) == "vendor.header, vendor.length, vendor+0x3"
