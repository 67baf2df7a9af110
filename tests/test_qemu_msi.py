"""MSI and MSI-X through the real QEMU, with the plugin's ``qemu_qtest``: messages land in guest RAM.

The device is tests/vector_probe.py: MSI with 4 vectors and per-vector masking,
MSI-X with 8 vectors (table at BAR0+0, PBA at BAR0+0x800), doorbells in BAR2.
QEMU emulates both capabilities and the MSI-X table; the server sees config
writes, SET_IRQS and PBA reads. ``enable_msi``/``enable_msix`` point every
vector at guest RAM, and ``irqs.wait`` watches it there.
"""

import pytest

from vfiouser.testing import InterruptNotRaised

from .vector_probe import VectorProbe

pytestmark = pytest.mark.qemu

MSI_CAP, MSIX_CAP = 0x40, 0x58
SHORT = 0.3  # how long "nothing arrives" is watched: a message that is sent arrives in microseconds


@pytest.fixture
def probe(qemu_qtest, backend):
    return qemu_qtest(VectorProbe, backend=backend).device


def no_message(dev, kind, vector):
    with pytest.raises(InterruptNotRaised):
        dev.irqs.wait(kind, vector, timeout=SHORT)
    return True


def test_msix_through_qemu(probe):
    dev = probe
    assert dev.enable_msix(masked=range(4, 8)) == 8  # entries 4-7 masked: QEMU gives them no eventfd
    table, doorbells = dev.bar(0), dev.bar(2)
    doorbells.write(0x00, 4, 2)
    assert dev.irqs.wait("msix", 2)

    doorbells.write(0x00, 4, 5)  # entry 5 is masked and has no eventfd: the device holds it
    assert no_message(dev, "msix", 5)
    assert table.read(0x800, 8) == 1 << 5  # the PBA, read from the device
    table.write(16 * 5 + 12, 4, 0)  # unmask: QEMU installs an eventfd, the device sends
    assert dev.irqs.wait("msix", 5)
    assert table.read(0x800, 8) == 0

    table.write(16 * 1 + 12, 4, 1)  # mask a vector in use: QEMU holds it
    doorbells.write(0x00, 4, 1)
    assert no_message(dev, "msix", 1)
    table.write(16 * 1 + 12, 4, 0)
    assert dev.irqs.wait("msix", 1)

    dev.config.write(MSIX_CAP + 2, 2, 0xC000)  # function mask: the device holds vectors
    doorbells.write(0x00, 4, 3)
    assert no_message(dev, "msix", 3)
    assert table.read(0x800, 8) == 1 << 3
    dev.config.write(MSIX_CAP + 2, 2, 0x8000)
    assert dev.irqs.wait("msix", 3)

    dev.config.write(MSIX_CAP + 2, 2, 0x0000)  # disabled: nothing is sent
    doorbells.write(0x00, 4, 0)
    assert no_message(dev, "msix", 0)


def test_msi_multiple_vectors_and_masking_through_qemu(probe):
    """What a guest sees, end to end: vector numbers in the data, a masked vector held and sent
    on unmask, nothing without bus mastering. Under qtest QEMU routes MSI through its own
    emulation, which also latches masked vectors and drops messages without bus mastering, so
    the masking and bus-master assertions here check the whole chain, not the server alone; the
    server's own masking (what matters when KVM irqfds bypass that emulation) is tested with
    the in-process handle in tests/test_msi.py."""
    dev = probe
    assert dev.enable_msi() == 4
    doorbells = dev.bar(2)
    for v in (0, 3):
        doorbells.write(0x04, 4, v)
        assert dev.irqs.wait("msi", v)
    dev.config.write(MSI_CAP + 0x10, 4, 0b0010)  # mask vector 1
    doorbells.write(0x04, 4, 1)
    assert no_message(dev, "msi", 1)
    dev.config.write(MSI_CAP + 0x10, 4, 0)  # unmask: the held message is sent
    assert dev.irqs.wait("msi", 1)
    dev.config.write(0x04, 2, 0x0002)  # no bus mastering: no message
    doorbells.write(0x04, 4, 2)
    assert no_message(dev, "msi", 2)


def test_intx_arrives_on_the_line_q35_routes_the_slot_to(qemu_qtest):
    """Two devices in slots 4 and 5: their INTA pins reach different IOAPIC inputs, and the
    fixture names each (no GSI numbers in the test)."""
    vm = qemu_qtest(VectorProbe, VectorProbe)
    first, second = vm.devices
    assert (first.slot, second.slot) == (4, 5) and first.intx_line != second.intx_line
    second.bar(2).write(0x08, 4, 1)
    assert second.irqs.wait("intx")
    assert not vm.machine.wait_irq("raise", first.intx_line, timeout=SHORT)
    second.bar(2).write(0x08, 4, 0)
    assert vm.machine.wait_irq("lower", second.intx_line)
    first.bar(2).write(0x08, 4, 1)
    assert first.irqs.wait("intx")
