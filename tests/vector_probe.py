"""A test device with every message-signalled interrupt the framework offers.

Identity 1234:5a5a, INTA.

BAR0  4 KiB memory: the MSI-X table (8 vectors) at 0x000, the PBA at 0x800 (the framework maps both)
BAR2  4 KiB memory, doorbells:
      0x00  write n: fire MSI-X vector n
      0x04  write n: fire MSI vector n
      0x08  write 1/0: raise/lower INTx
MSI   4 vectors, 64-bit address, per-vector masking
"""

from __future__ import annotations

from vfiouser.devices.pci import INTA, MemoryBar, PciDevice


class VectorProbe(PciDevice):
    vendor_id = 0x1234
    device_id = 0x5A5A
    interrupt_pin = INTA

    def __init__(self) -> None:
        super().__init__()
        self.add_bar(0, MemoryBar(0x1000))
        self.add_bar(2, MemoryBar(0x1000)).map(self, 0, 0x10)
        self.add_msi(vectors=4, addr64=True, per_vector_mask=True)
        self.add_msix(vectors=8, table_bar=0, table_offset=0x000, pba_offset=0x800)

    def write(self, base, offset, data):
        value = int.from_bytes(data, "little")
        if offset == 0x00:
            self.fire_msix(value)
        elif offset == 0x04:
            self.fire_msi(value)
        elif offset == 0x08:
            self.set_intx(bool(value))

    def read(self, base, offset, data):
        data[:] = bytes(len(data))
