"""ACCES PCI-IDIO-16: 16 isolated digital inputs, 16 FET outputs, change-of-state interrupt.

Register-compatible with the board as Linux's ``gpio-pci-idio-16`` driver (and
its ``gpio-idio-16`` library) uses it.

Identity
    vendor 0x494F (ACCES I/O), device 0x0DC8, class 0xFF0000 (unclassified),
    interrupt pin INTA.

BARs
    BAR2: 256-byte I/O BAR. The board decodes ports 0-7; the other 248 ports
    are unclaimed (reads return all-ones, writes are dropped).

Registers (BAR2, 8 bits each; accesses of 1-4 bytes reach one port per byte; ports 3
and 7 read 0. This table is ``IDIO16_REGS.markdown()``, checked by tests/test_regs_models.py)

| offset | register | bits | access | reset | description |
| --- | --- | --- | --- | --- | --- |
| 0x00 | out0_7 | 7:0 | RW | 0x0 | outputs 0-7, as last written |
| 0x01 | in0_7 | 7:0 | RO | 0x0 | read: inputs 0-7; write (any value): clear the interrupt |
| 0x02 | irq_ctl | 7:0 | reserved | 0x0 | read: enable the interrupt (reads 0); write (any value): disable it |
| 0x03 | filter_ctl | 7:0 | WO | 0x0 | write (any value): deactivate the input filters |
| 0x04 | out8_15 | 7:0 | RW | 0x0 | outputs 8-15, as last written |
| 0x05 | in8_15 | 7:0 | RO | 0x0 | inputs 8-15 |
| 0x06 | irq_status | 7:0 | RO | 0x0 | interrupt status |
|  | .pending | 2 | RO | 0x0 | interrupt pending |
|  | .group1 | 1 | RO | 0x0 | an input of 8-15 changed |
|  | .group0 | 0 | RO | 0x0 | an input of 0-7 changed |

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
from vfiouser.devices.regs import RO, RSVD, WO, Field, Register, RegisterMap, on_read, on_write

__all__ = ["Idio16", "IDIO16_REGS"]

#: Ports the board decodes in BAR2.
DECODED_PORTS = 8

STATUS_GROUP0 = 0x1
STATUS_GROUP1 = 0x2
STATUS_PENDING = 0x4

IDIO16_REGS = RegisterMap([
    Register("out0_7", 0, 8, doc="outputs 0-7, as last written"),
    Register("in0_7", 1, 8, sw=RO, doc="read: inputs 0-7; write (any value): clear the interrupt"),
    Register("irq_ctl", 2, 8, sw=RSVD, doc="read: enable the interrupt (reads 0); write (any value): disable it"),
    Register("filter_ctl", 3, 8, sw=WO, doc="write (any value): deactivate the input filters"),
    Register("out8_15", 4, 8, doc="outputs 8-15, as last written"),
    Register("in8_15", 5, 8, sw=RO, doc="inputs 8-15"),
    Register("irq_status", 6, 8, [
        Field("group0", 0, sw=RO, doc="an input of 0-7 changed"),
        Field("group1", 1, sw=RO, doc="an input of 8-15 changed"),
        Field("pending", 2, sw=RO, doc="interrupt pending"),
    ], doc="interrupt status"),
], name="idio16", size=DECODED_PORTS)


class Idio16(PciDevice):
    """The PCI-IDIO-16 model. ``loopback``: wire outputs 0-15 to inputs 0-15."""

    vendor_id = 0x494F
    device_id = 0x0DC8
    class_code = 0xFF0000
    interrupt_pin = INTA

    def __init__(self, loopback: bool = False) -> None:
        super().__init__()
        self.loopback = bool(loopback)
        self.regs = IDIO16_REGS.instantiate(self)
        self.bar2 = self.add_bar(2, IoBar(0x100))
        self.bar2.map(self.regs, 0, DECODED_PORTS)
        self._external = 0  # input levels driven by the host
        self.reset()

    # -- reset -------------------------------------------------------------------

    def reset(self) -> None:
        self.regs.reset()
        self._outputs_seen = 0
        self.irq_enabled = False
        self.filters_active = True
        self._last_inputs = self.inputs

    # -- state -------------------------------------------------------------------

    @property
    def outputs(self) -> int:
        """The 16 output lines (bit n = output n)."""
        regs = self.regs
        return regs.out8_15.value << 8 | regs.out0_7.value

    @property
    def status(self) -> int:
        """The interrupt status register."""
        return self.regs.irq_status.value

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
            status = self.regs.irq_status
            if changed & 0x00FF:
                status.set("group0", 1)
            if changed & 0xFF00:
                status.set("group1", 1)
            status.set("pending", 1)
            self.log.debug("inputs changed (%#06x), interrupt pending", changed)
            self._update_irq()

    def _update_irq(self) -> None:
        self.set_intx(self.irq_enabled and bool(self.regs.irq_status.get("pending")))

    # -- register behaviour --------------------------------------------------------

    @on_write("out0_7")
    @on_write("out8_15")
    def _outputs_written(self, reg, value) -> None:
        now = self.outputs
        if now != self._outputs_seen:
            self.log.info("outputs %#06x -> %#06x", self._outputs_seen, now)
        self._outputs_seen = now
        if self.loopback:
            self._inputs_changed()

    @on_read("in0_7")
    def _inputs_low(self, reg) -> int:
        return self.inputs & 0xFF

    @on_read("in8_15")
    def _inputs_high(self, reg) -> int:
        return self.inputs >> 8

    @on_write("in0_7")
    def _clear_interrupt(self, reg, value) -> None:
        self.regs.irq_status.value = 0
        self._update_irq()

    @on_read("irq_ctl")
    def _enable_interrupt(self, reg) -> None:
        if not self.irq_enabled:
            self.log.debug("interrupts enabled")
        self.irq_enabled = True
        self._update_irq()

    @on_write("irq_ctl")
    def _disable_interrupt(self, reg, value) -> None:
        if self.irq_enabled:
            self.log.debug("interrupts disabled")
        self.irq_enabled = False
        self._update_irq()

    @on_write("filter_ctl")
    def _deactivate_filters(self, reg, value) -> None:
        self.filters_active = False
