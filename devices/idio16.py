"""ACCES PCI-IDIO-16: 16 isolated digital inputs, 16 FET outputs, change-of-state interrupt.

Register-compatible with the board as Linux's ``gpio-pci-idio-16`` driver (and
its ``gpio-idio-16`` library) uses it.

Identity
    vendor 0x494F (ACCES I/O), device 0x0DC8, class 0xFF0000 (unclassified),
    interrupt pin INTA.

BARs
    BAR2: 256-byte I/O BAR. The board decodes ports 0-7; the other 248 ports
    are unclaimed (reads return all-ones, writes are dropped).

Registers (BAR2, 8 bits each)

    ====== ========================================== ===========================
    offset read                                       write
    ====== ========================================== ===========================
    0      outputs 0-7, as last written               outputs 0-7
    1      inputs 0-7                                 clear interrupt (any value)
    2      enable interrupt (side effect; reads 0)    disable interrupt (any value)
    3      0                                          deactivate input filters
    4      outputs 8-15, as last written              outputs 8-15
    5      inputs 8-15                                ignored
    6      interrupt status (below)                   ignored
    7      0                                          ignored
    ====== ========================================== ===========================

Interrupt status (offset 6)
    bit 0: an input of 0-7 changed; bit 1: an input of 8-15 changed;
    bit 2: interrupt pending. While interrupts are enabled, any change of an
    input line latches bit 0 or 1 and bit 2 and asserts INTx; writing offset
    1 clears the status and deasserts INTx. Disabling interrupts deasserts
    INTx. (The driver treats bit 2 as "this board interrupted" for all 16
    inputs; bits 0-1 keep the older driver's ``status & 3`` test true.)

Host side
    :meth:`Idio16.set_inputs` and :meth:`Idio16.set_input` drive the input
    lines; :attr:`Idio16.outputs` is the output state. With ``loopback=True``
    outputs 0-15 are also wired to inputs 0-15 like a test cable (a line reads
    high if the cable or the host drives it high).

Reset
    Outputs low, interrupts disabled, status clear, input filters active.
    The host-driven input levels are outside the board and survive a reset.
"""

from __future__ import annotations

from vfiouser.devices.errors import DeviceUsageError
from vfiouser.devices.pci import INTA, IoBar, PciDevice

__all__ = ["Idio16"]

# Register offsets in BAR2.
OUT0_7 = 0x0
IN0_7 = 0x1  # write: clear interrupt
IRQ_CTL = 0x2  # read: enable, write: disable
FILTER_CTL = 0x3  # write: deactivate input filters
OUT8_15 = 0x4
IN8_15 = 0x5
IRQ_STATUS = 0x6

#: Ports the board decodes in BAR2.
DECODED_PORTS = 8

STATUS_GROUP0 = 0x1
STATUS_GROUP1 = 0x2
STATUS_PENDING = 0x4


class Idio16(PciDevice):
    """The PCI-IDIO-16 model. ``loopback``: wire outputs 0-15 to inputs 0-15."""

    vendor_id = 0x494F
    device_id = 0x0DC8
    class_code = 0xFF0000
    interrupt_pin = INTA

    def __init__(self, loopback: bool = False) -> None:
        super().__init__()
        self.loopback = bool(loopback)
        self.bar2 = self.add_bar(2, IoBar(0x100))
        self.bar2.map(self, 0, DECODED_PORTS)
        self._external = 0  # input levels driven by the host
        self.reset()

    # -- reset -------------------------------------------------------------------

    def reset(self) -> None:
        self.outputs = 0
        self.irq_enabled = False
        self.status = 0
        self.filters_active = True
        self._last_inputs = self.inputs

    # -- state -------------------------------------------------------------------

    @property
    def inputs(self) -> int:
        """The 16 input lines as the board sees them (bit n = input n)."""
        return self._external | (self.outputs if self.loopback else 0)

    def set_inputs(self, value: int, mask: int = 0xFFFF) -> None:
        """Drive the input lines in ``mask`` to the bits of ``value`` (host side)."""
        with self.lock:
            self._external = (self._external & ~mask | value & mask) & 0xFFFF
            self._inputs_changed()

    def set_input(self, line: int, level: bool) -> None:
        """Drive input ``line`` (0-15) high or low (host side)."""
        if not 0 <= line < 16:
            raise DeviceUsageError(f"input line {line} is not in 0-15")
        self.set_inputs((1 << line) if level else 0, 1 << line)

    def _inputs_changed(self) -> None:
        now = self.inputs
        changed = now ^ self._last_inputs
        self._last_inputs = now
        if changed and self.irq_enabled:
            if changed & 0x00FF:
                self.status |= STATUS_GROUP0
            if changed & 0xFF00:
                self.status |= STATUS_GROUP1
            self.status |= STATUS_PENDING
            self.log.debug("inputs changed (%#06x), interrupt pending", changed)
            self._update_irq()

    def _update_irq(self) -> None:
        self.set_intx(self.irq_enabled and bool(self.status & STATUS_PENDING))

    def _set_outputs(self, value: int) -> None:
        if value != self.outputs:
            self.log.info("outputs %#06x -> %#06x", self.outputs, value)
        self.outputs = value
        if self.loopback:
            self._inputs_changed()

    # -- BAR2 --------------------------------------------------------------------

    def pio_read(self, base: int, offset: int, data) -> None:
        for i in range(len(data)):
            data[i] = self._read_port(offset + i)

    def pio_write(self, base: int, offset: int, data) -> None:
        for i, value in enumerate(data):
            self._write_port(offset + i, value)

    def _read_port(self, port: int) -> int:
        if port == OUT0_7:
            return self.outputs & 0xFF
        if port == IN0_7:
            return self.inputs & 0xFF
        if port == IRQ_CTL:
            if not self.irq_enabled:
                self.log.debug("interrupts enabled")
            self.irq_enabled = True
            self._update_irq()
            return 0
        if port == OUT8_15:
            return self.outputs >> 8
        if port == IN8_15:
            return self.inputs >> 8
        if port == IRQ_STATUS:
            return self.status
        return 0

    def _write_port(self, port: int, value: int) -> None:
        if port == OUT0_7:
            self._set_outputs(self.outputs & 0xFF00 | value)
        elif port == OUT8_15:
            self._set_outputs(self.outputs & 0x00FF | value << 8)
        elif port == IN0_7:
            self.status = 0
            self._update_irq()
        elif port == IRQ_CTL:
            if self.irq_enabled:
                self.log.debug("interrupts disabled")
            self.irq_enabled = False
            self._update_irq()
        elif port == FILTER_CTL:
            self.filters_active = False
