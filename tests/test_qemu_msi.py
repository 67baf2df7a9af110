"""MSI and MSI-X through the real QEMU: messages are pointed at guest RAM, so qtest can see them land.

The device is tests/vector_probe.py: MSI with 4 vectors and per-vector masking,
MSI-X with 8 vectors (table at BAR0+0, PBA at BAR0+0x800), doorbells in BAR2.
QEMU emulates both capabilities and the MSI-X table; the server sees config
writes, SET_IRQS and PBA reads.
"""

import time

import pytest

from vfiouser.testing.qemu import QtestMachine

from .vector_probe import VectorProbe

pytestmark = pytest.mark.qemu

SLOT = 4
BAR0, BAR2 = 0xE000_0000, 0xE000_1000
MSIX_RAM, MSI_RAM = 0x7000, 0x8000
MSI_CAP, MSIX_CAP = 0x40, 0x58


def landed(vm, addr: int, timeout: float = 2.0) -> int:
    """The 4-byte message at ``addr`` once it arrives (0 if none within ``timeout``); clears it."""
    deadline = time.monotonic() + timeout
    while True:
        value = int.from_bytes(vm.memread(addr, 4), "little")
        if value or time.monotonic() > deadline:
            vm.memwrite(addr, bytes(4))
            return value
        time.sleep(0.01)


@pytest.fixture
def vm(qemu_binary, serve, backend):
    server = serve(VectorProbe(), backend=backend)
    with QtestMachine([server.qemu_device_json(addr=f"{SLOT:02x}.0")], qemu=qemu_binary) as vm:
        vm.pci_cfg_write(SLOT, 0x10, BAR0)
        vm.pci_cfg_write(SLOT, 0x18, BAR2)
        vm.pci_cfg_write(SLOT, 0x04, 0x0006, 2)
        vm.memwrite(MSIX_RAM, bytes(0x100))
        vm.memwrite(MSI_RAM, bytes(0x10))
        yield vm


def test_msix_through_qemu(vm):
    for v in range(8):  # the table QEMU emulates in BAR0
        entry = BAR0 + 16 * v
        vm.writel(entry + 0, MSIX_RAM + 0x10 * v)
        vm.writel(entry + 4, 0)
        vm.writel(entry + 8, 0x100 + v)
        vm.writel(entry + 12, 0 if v < 4 else 1)  # entries 0-3 unmasked
    vm.pci_cfg_write(SLOT, MSIX_CAP + 2, 0x8000, 2)  # enable
    vm.writel(BAR2 + 0x00, 2)
    assert landed(vm, MSIX_RAM + 0x20) == 0x102

    vm.writel(BAR2 + 0x00, 5)  # entry 5 is masked and has no eventfd: the device holds it
    assert landed(vm, MSIX_RAM + 0x50, 0.3) == 0
    assert vm.readq(BAR0 + 0x800) == 1 << 5  # the PBA, read from the device
    vm.writel(BAR0 + 16 * 5 + 12, 0)  # unmask: QEMU installs an eventfd, the device sends
    assert landed(vm, MSIX_RAM + 0x50) == 0x105
    assert vm.readq(BAR0 + 0x800) == 0

    vm.writel(BAR0 + 16 * 1 + 12, 1)  # mask a vector in use: QEMU holds it
    vm.writel(BAR2 + 0x00, 1)
    assert landed(vm, MSIX_RAM + 0x10, 0.3) == 0
    vm.writel(BAR0 + 16 * 1 + 12, 0)
    assert landed(vm, MSIX_RAM + 0x10) == 0x101

    vm.pci_cfg_write(SLOT, MSIX_CAP + 2, 0xC000, 2)  # function mask: the device holds vectors
    vm.writel(BAR2 + 0x00, 3)
    assert landed(vm, MSIX_RAM + 0x30, 0.3) == 0
    assert vm.readq(BAR0 + 0x800) == 1 << 3
    vm.pci_cfg_write(SLOT, MSIX_CAP + 2, 0x8000, 2)
    assert landed(vm, MSIX_RAM + 0x30) == 0x103

    vm.pci_cfg_write(SLOT, MSIX_CAP + 2, 0x0000, 2)  # disabled: nothing is sent
    vm.writel(BAR2 + 0x00, 0)
    assert landed(vm, MSIX_RAM + 0x00, 0.3) == 0


def test_msi_multiple_vectors_and_masking_through_qemu(vm):
    """What a guest sees, end to end: vector numbers in the data, a masked vector held and sent
    on unmask, nothing without bus mastering. Under qtest QEMU routes MSI through its own
    emulation, which also latches masked vectors and drops messages without bus mastering, so
    the masking and bus-master assertions here check the whole chain, not the server alone; the
    server's own masking (what matters when KVM irqfds bypass that emulation) is tested with
    the Python client in tests/test_msi.py."""
    vm.pci_cfg_write(SLOT, MSI_CAP + 4, MSI_RAM)
    vm.pci_cfg_write(SLOT, MSI_CAP + 8, 0)
    vm.pci_cfg_write(SLOT, MSI_CAP + 0xC, 0x200, 2)
    vm.pci_cfg_write(SLOT, MSI_CAP + 2, (2 << 4) | 1, 2)  # 4 vectors, enabled
    for v in (0, 3):
        vm.writel(BAR2 + 0x04, v)
        assert landed(vm, MSI_RAM) == 0x200 | v
    vm.pci_cfg_write(SLOT, MSI_CAP + 0x10, 0b0010)  # mask vector 1
    vm.writel(BAR2 + 0x04, 1)
    assert landed(vm, MSI_RAM, 0.3) == 0
    vm.pci_cfg_write(SLOT, MSI_CAP + 0x10, 0)  # unmask: the held message is sent
    assert landed(vm, MSI_RAM) == 0x201
    vm.pci_cfg_write(SLOT, 0x04, 0x0002, 2)  # no bus mastering: no message
    vm.writel(BAR2 + 0x04, 2)
    assert landed(vm, MSI_RAM, 0.3) == 0
