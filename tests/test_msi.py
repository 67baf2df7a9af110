"""MSI and MSI-X: the framework's capabilities, driven through the plugin's ``vfiouser_device``.

QEMU's sequences (see the reference, §6): enabling writes the capability, disables
INTx, then installs eventfds with SET_IRQS (MSI: all vectors; MSI-X: vector 0
without an fd, then one vector per unmasked table entry). ``dev.enable_msi()`` does
the MSI one; the MSI-X tests replay QEMU's exact steps on the handle's client.
"""

import errno

import pytest

from vfiouser.errors import ErrorReply
from vfiouser.protocol import IrqIndex, IrqInfoFlags, IrqSetFlags
from vfiouser.testing import InterruptNotRaised

from .conftest import eventfd, fired
from .vector_probe import VectorProbe

EVENTFD_TRIGGER = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
MSI_CAP = 0x40  # first capability
MSIX_CAP = 0x58  # after the 24-byte MSI capability



@pytest.fixture
def handle(vfiouser_device, backend):
    return vfiouser_device(VectorProbe, backend=backend)  # BARs placed, decoding and bus mastering on


@pytest.fixture
def probe(handle):
    return handle.model, handle.client


def doorbell(c, offset, value):
    c.region_write(2, offset, value.to_bytes(4, "little"))


def test_capabilities_and_irq_info(probe, backend):
    dev, c = probe
    assert c.config_read(MSI_CAP, 1) == 0x05 and c.config_read(MSI_CAP + 1, 1) == MSIX_CAP
    assert c.config_read(MSI_CAP + 2, 2) == 0x0184  # MMC=2 (4 vectors), 64-bit, per-vector masking
    assert c.config_read(MSIX_CAP, 1) == 0x11
    assert c.config_read(MSIX_CAP + 2, 2) == 7  # table size - 1
    assert c.config_read(MSIX_CAP + 4) == 0x000 | 0  # table offset | BIR 0
    assert c.config_read(MSIX_CAP + 8) == 0x800 | 0
    # libvfio-user flags every index EVENTFD only (docs/backends.md); ours as Linux's vfio-pci does
    msi_flags = IrqInfoFlags.EVENTFD | (IrqInfoFlags.NORESIZE if backend == "vfiouser" else 0)
    assert c.get_irq_info(IrqIndex.MSI) == (msi_flags, 4)
    assert c.get_irq_info(IrqIndex.MSIX) == (IrqInfoFlags.EVENTFD, 8)  # never NORESIZE for MSI-X


def test_msi_write_masks_and_mme_clamp(probe):
    dev, c = probe
    c.config_write(MSI_CAP + 2, 0xFFFF, 2)
    assert c.config_read(MSI_CAP + 2, 2) == 0x01A5  # enable, MME clamped to MMC (2)
    c.config_write(MSI_CAP + 4, 0xFFFFFFFF)
    assert c.config_read(MSI_CAP + 4) == 0xFFFFFFFC
    c.config_write(MSI_CAP + 0x10, 0xFFFFFFFF)  # mask bits: only 4 vectors
    assert c.config_read(MSI_CAP + 0x10) == 0xF


# The server signals a vector's eventfd before it answers the doorbell write, so what
# ``irqs.fired()`` shows right after the write is all that write did.

def test_msi_vectors_fire_their_eventfd(handle):
    assert handle.enable_msi() == 4
    handle.bar(2).write(0x04, 4, 3)
    assert handle.irqs.fired() == {("msi", 3): 1}


def test_msi_masked_vector_is_held_then_sent_on_unmask(handle):
    handle.enable_msi()
    handle.config.write(MSI_CAP + 0x10, 4, 0b0010)  # mask vector 1
    handle.bar(2).write(0x04, 4, 1)
    assert handle.irqs.fired() == {}
    assert handle.config.read(MSI_CAP + 0x14) == 0b0010  # pending bit
    handle.config.write(MSI_CAP + 0x10, 4, 0)  # unmask
    assert handle.irqs.wait("msi", 1) == 1 and handle.config.read(MSI_CAP + 0x14) == 0


def test_msi_never_fires_beyond_the_enabled_vectors(handle):
    """QEMU asserts (and dies) if a vector >= 2**MME is signalled."""
    handle.enable_msi(4)
    handle.config.write(MSI_CAP + 2, 2, (0 << 4) | 1)  # MME shrinks to one vector while enabled
    handle.bar(2).write(0x04, 4, 2)
    assert handle.irqs.fired() == {}


def test_msi_needs_enable_and_bus_master(handle):
    handle.enable_msi()
    handle.config.write(0x04, 2, 0x0002)  # bus mastering off
    handle.bar(2).write(0x04, 4, 0)
    assert handle.irqs.fired() == {}
    handle.config.write(0x04, 2, 0x0006)
    handle.config.write(MSI_CAP + 2, 2, 0x0020)  # MSI off
    handle.bar(2).write(0x04, 4, 0)
    assert handle.irqs.fired() == {}


def test_msi_enable_drops_intx(handle):
    handle.bar(2).write(0x08, 4, 1)
    assert handle.irqs.wait("intx") == 1 and handle.model.intx_level and handle.irqs.intx_asserted()
    handle.enable_msi()
    assert not handle.model.intx_level and not handle.irqs.intx_asserted()


def test_intx_is_level_triggered_and_reported_again_while_asserted(handle):
    """Each wait("intx") unmasks first, as QEMU does at the guest's end of interrupt: a line that
    is still asserted fires again, one that was lowered does not."""
    doorbells = handle.bar(2)
    doorbells.write(0x08, 4, 1)
    assert handle.irqs.wait("intx") == 1
    assert handle.irqs.wait("intx") == 1  # still asserted
    doorbells.write(0x08, 4, 0)
    assert handle.irqs.fired() == {}
    with pytest.raises(InterruptNotRaised, match=r"intx vector 0 did not fire within 0.2s; fired meanwhile: nothing"):
        handle.irqs.wait("intx", timeout=0.2)
    doorbells.write(0x08, 4, 1)
    assert handle.irqs.wait("intx") == 1


def test_waiting_for_an_interrupt_that_does_not_come_names_what_did(handle):
    handle.enable_msi()
    handle.bar(2).write(0x04, 4, 2)
    with pytest.raises(AssertionError, match=r"msi vector 1 did not fire within 0.2s; fired meanwhile: msi 2 \(x1\)"):
        handle.irqs.wait("msi", 1, timeout=0.2)
    with pytest.raises(InterruptNotRaised, match=r"msix vector 0 has no eventfd.*call enable_msix\(\) first"):
        handle.irqs.wait("msix", 0, timeout=0.2)


def enable_msix(c):
    """QEMU's own steps: the capability, INTx off, MSI-X on with vector 0 and no eventfd."""
    c.config_write(MSIX_CAP + 2, 0x8000, 2)
    c.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 0)
    c.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 0, 1)  # "MSI-X on, vector 0 has no eventfd"


def pba(c) -> int:
    return int.from_bytes(c.region_read(0, 0x800, 8), "little")


def test_msix_vector_without_eventfd_is_pending_until_one_arrives(probe):
    dev, c = probe
    enable_msix(c)
    doorbell(c, 0x00, 5)
    assert pba(c) == 1 << 5
    fd = eventfd()
    c.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 5, 1, fds=[fd])  # the guest unmasked entry 5
    assert fired(fd) == 1 and pba(c) == 0


def test_msix_function_mask_holds_vectors(probe):
    dev, c = probe
    enable_msix(c)
    fd = eventfd()
    c.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 2, 1, fds=[fd])
    doorbell(c, 0x00, 2)
    assert fired(fd) == 1
    c.config_write(MSIX_CAP + 2, 0xC000, 2)  # function mask
    doorbell(c, 0x00, 2)
    assert fired(fd, 0.1) == 0 and pba(c) == 1 << 2
    c.config_write(MSIX_CAP + 2, 0x8000, 2)
    assert fired(fd) == 1 and pba(c) == 0


def test_msix_disabled_drops_vectors(probe):
    dev, c = probe
    doorbell(c, 0x00, 1)
    assert pba(c) == 0
    with pytest.raises(ErrorReply) as exc:
        doorbell(c, 0x00, 8)  # out of range: the model's ValueError becomes EIO
    assert exc.value.errno == errno.EIO


def test_msix_vector_fired_without_bus_mastering_is_dropped(probe):
    """Like MSI (and QEMU's devices): no bus mastering, no message, and nothing left to leak later."""
    dev, c = probe
    enable_msix(c)
    fd = eventfd()
    c.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 2, 1, fds=[fd])
    c.config_write(0x04, 0x0002, 2)  # bus mastering off
    doorbell(c, 0x00, 2)
    assert pba(c) == 0
    c.config_write(0x04, 0x0006, 2)
    assert fired(fd, 0.1) == 0
    doorbell(c, 0x00, 2)
    assert fired(fd) == 1


def test_msix_disable_forgets_held_vectors(probe):
    """A vector held for one driver must not reach the next one that enables MSI-X."""
    dev, c = probe
    enable_msix(c)
    doorbell(c, 0x00, 3)  # no eventfd yet: held in the PBA
    assert pba(c) == 1 << 3
    c.config_write(MSIX_CAP + 2, 0x0000, 2)  # the driver unloads
    assert pba(c) == 0
    enable_msix(c)
    fd = eventfd()
    c.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 3, 1, fds=[fd])
    assert fired(fd, 0.1) == 0


def test_msi_disable_forgets_held_vectors(handle):
    handle.enable_msi()
    handle.config.write(MSI_CAP + 0x10, 4, 0b0100)  # mask vector 2
    handle.bar(2).write(0x04, 4, 2)
    assert handle.config.read(MSI_CAP + 0x14) == 0b0100
    handle.config.write(MSI_CAP + 2, 2, 0x0020)  # MSI off
    assert handle.config.read(MSI_CAP + 0x14) == 0
    handle.config.write(MSI_CAP + 0x10, 4, 0)
    handle.config.write(MSI_CAP + 2, 2, 0x0021)  # on again, vector 2 unmasked
    assert handle.irqs.fired() == {}


def test_reset_disables_and_forgets_pending(probe):
    dev, c = probe
    enable_msix(c)
    doorbell(c, 0x00, 4)
    assert pba(c) == 1 << 4
    c.reset()
    c.bring_up()  # a reset leaves the BARs unprogrammed, as firmware finds them
    assert pba(c) == 0 and c.config_read(MSIX_CAP + 2, 2) == 7 and not dev.msix_enabled()


def test_msix_table_is_the_devices_own_copy(probe):
    """QEMU emulates the table itself; a client that forwards table accesses sees the device's copy."""
    dev, c = probe
    assert c.region_read(0, 0x0C, 4) == b"\x01\0\0\0"  # vector control: masked at reset
    c.region_write(0, 0x10, b"\x00\x10\xe0\xfe")
    assert c.region_read(0, 0x10, 4) == b"\x00\x10\xe0\xfe"
    c.region_write(0, 0x800, b"\xff" * 8)  # the PBA ignores writes
    assert pba(c) == 0
