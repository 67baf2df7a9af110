"""A register file from SystemRDL, served with no Python at all.

``vfiouser serve regfile --param rdl=PATH --param vendor_id=0x1234 --param device_id=0x11ff``
compiles ``PATH`` (``systemrdl-compiler``: ``pip install 'vfiouser[rdl]'``) and
serves its top address map as a PCI function:

Identity
    ``vendor_id``, ``device_id`` (parameters; defaults 1234:11ff), class 0xff0000,
    interrupt pin INTA, an MSI capability with one vector.

BAR0: memory, 32-bit, the top address map at offset 0
    The smallest power of two that holds the map, at least 4 KiB. Every
    register and field behaves as the SystemRDL says (see
    :mod:`vfiouser.devices.regs.rdl` for what is honoured and what is refused);
    accesses of 1, 2, 4 or 8 bytes at any offset reach the bytes they cover
    (byte lanes), and bytes no register covers read as 0 and ignore writes.

Interrupt
    The OR of the map's ``intr`` fields (each with its ``enable``/``mask``)
    drives INTx while the guest has MSI off, and sends MSI vector 0 on each
    rising edge once the guest enables MSI (and once when MSI is enabled while
    the line is high; disabling MSI gives the level back to INTx).

Host side
    :meth:`RegfileDevice.hw_write` and :meth:`RegfileDevice.hw_read` drive and
    read fields whose ``hw`` access allows it (an interrupt field is sticky:
    a host write sets bits, the driver clears them); :attr:`RegfileDevice.regs`
    is the live register block, for hooks attached by hierarchical name.

Reset
    Every register back to its SystemRDL reset value, warm or cold.
"""

from __future__ import annotations

import os

from vfiouser.devices.errors import DefinitionError
from vfiouser.devices.pci import INTA, MemoryBar, PciDevice, ResetType
from vfiouser.devices.regs.rdl import load_rdl

__all__ = ["RegfileDevice"]

#: Smallest BAR0.
MIN_BAR_SIZE = 4096


class RegfileDevice(PciDevice):
    """A SystemRDL address map at BAR0 (see the module docstring). ``rdl``: the file;
    ``top``: which address map (by type name; default the last one defined)."""

    vendor_id = 0x1234
    device_id = 0x11FF
    class_code = 0xFF0000
    interrupt_pin = INTA

    def __init__(self, rdl: str = "", vendor_id: int = 0x1234, device_id: int = 0x11FF, top: str = "") -> None:
        if not rdl:
            raise DefinitionError("regfile needs a SystemRDL file: --param rdl=PATH")
        self.vendor_id, self.device_id = vendor_id, device_id
        self.regmap = load_rdl(os.path.expanduser(rdl), top=top or None)
        super().__init__()
        size = max(MIN_BAR_SIZE, 1 << max(self.regmap.size - 1, 1).bit_length())
        #: The live registers (hooks attach here by hierarchical name).
        self.regs = self.regmap.instantiate(self)
        self.regs.on_interrupt = self._interrupt
        self.bar0 = self.add_bar(0, MemoryBar(size))
        self.bar0.map(self.regs)
        self.add_msi(vectors=1, addr64=True, per_vector_mask=False)
        self._msi_on = False
        # After the MSI capability's own hook: the line moves between INTx and MSI.
        self.config.add_write_hook(self.msi.offset + 2, 2, self._msi_control_written)

    def _interrupt(self, level: bool) -> None:
        if self.msi_enabled():
            if level:
                self.fire_msi(0)
        else:
            self.set_intx(level)

    def _msi_control_written(self, offset: int, size: int) -> None:
        """MSI switched on while the line is high: one message, so the condition is not lost;
        switched off: INTx takes the level again (enabling MSI dropped it)."""
        on = self.msi_enabled()
        if on != self._msi_on:
            self._msi_on = on
            if on and self.regs.irq_level:
                self.fire_msi(0)
            elif not on:
                self.set_intx(self.regs.irq_level)

    def hw_write(self, path: str, value: int) -> None:
        """Write field or register ``path`` from the host side (its ``hw`` access must allow it)."""
        with self.lock:
            self.regs.hw_write(path, value)

    def hw_read(self, path: str) -> int:
        """Read field or register ``path`` from the host side (its ``hw`` access must allow it)."""
        with self.lock:
            return self.regs.hw_read(path)

    def reset(self, kind: ResetType = ResetType.WARM) -> None:
        """Registers back to their reset values (the framework lowered INTx and turned MSI off;
        raise INTx again if reset values leave an interrupt field set)."""
        self._msi_on = False
        self.regs.reset()
        self._interrupt(self.regs.irq_level)
