"""QEMU's ``edu`` teaching device, register for register (QEMU 11.1.3's ``hw/misc/edu.c``).

A Python twin of the device QEMU ships for teaching driver writing. The test
suite runs the same qtest script against QEMU's own ``-device edu`` and against
this model over vfio-user, and requires the same answers.

Identity
    vendor 0x1234, device 0x11e8, revision 0x10, class 0x00ff00, subsystem
    1af4:1100, interrupt pin INTA. MSI capability at 0x40: one vector, 64-bit
    address, no per-vector masking. Config bytes 0x4e-0xff are writable
    scratch that survives reset, as QEMU's PCI core leaves them.

BAR0: 1 MiB, 32-bit memory
    Accesses are 4 bytes at 0x00-0x7f and 4 or 8 bytes at 0x80 and above.
    Narrower or misaligned accesses read 0 and are ignored (QEMU rejects them
    before edu sees them); 8-byte reads below 0x80 return all-ones; offsets
    that are not registers read all-ones.

    ======  =================  ===========================================================
    offset  register           behaviour
    ======  =================  ===========================================================
    0x00    identification     reads 0x010000ed (major 1, minor 0, 0xed)
    0x04    liveness check     reads the bitwise inverse of the last value written
    0x08    factorial          write n: computes n! mod 2**32 in the background (status
                               bit 0x01 set meanwhile; writes ignored while computing);
                               read: the result (the input while computing)
    0x20    status             bit 0x01 computing (read-only); bit 0x80: raise interrupt
                               0x1 when a factorial completes (read-write)
    0x24    interrupt status   bits raised and not yet acknowledged
    0x60    raise interrupt    write: OR the value into the interrupt status and signal
    0x64    acknowledge        write: clear those bits; INTx drops when none is left
    0x80    DMA source         64-bit; a 4-byte write clears the upper half
    0x88    DMA destination    64-bit, as 0x80
    0x90    DMA count          64-bit, as 0x80
    0x98    DMA command        bit 0x1 start, 0x2 direction (0: RAM to buffer, 1: buffer
                               to RAM), 0x4 interrupt 0x100 on completion. A write without
                               bit 0x1, or any write to 0x80-0x98 while a transfer runs,
                               is ignored. Reads back the value written, bit 0x1 cleared
                               when the transfer is done.
    ======  =================  ===========================================================

Interrupts
    Raising ORs bits into the interrupt status; while it is non-zero the device
    asserts INTx, or, with MSI enabled, signals its MSI vector on every raise.
    Acknowledging clears bits; INTx drops when the status reaches zero.

DMA engine
    A 4 KiB buffer that exists only in the device's DMA address space at
    0x40000-0x40fff (it is not visible through BAR0). A transfer copies
    ``count`` bytes between guest RAM and the buffer; the buffer side must lie
    inside 0x40000-0x41000, else nothing is copied (the transfer still
    completes and interrupts). The RAM-side address is masked with
    ``dma_mask`` (default 0x0fffffff). The RAM side behaves like QEMU's bus:
    bytes that are not mapped (or not writable, such as the BIOS shadow above
    0xc0000) read as zeros and swallow writes, the rest of the transfer goes
    through; with bus mastering off, nothing is read or written at all.
    The transfer runs ``dma_delay_ms`` (default 100, as QEMU's virtual-clock
    timer) after the command is written.

Reset
    edu has no reset of its own: registers, the buffer and a transfer in flight
    survive a reset; only config space (command, BAR, MSI) is reset. A power
    cycle (a new VM on the same server) clears them all, as a new QEMU's edu
    starts cleared.

Differences a guest can time but not see
    QEMU computes the factorial on a host thread and completes a transfer on
    its virtual clock. Here both run on the device's worker thread after the
    triggering write is answered, and a transfer after ``dma_delay_ms`` of
    real time: a vfio-user server cannot read QEMU's virtual clock. Drivers
    poll the status/command registers or wait for the interrupt, which behave
    the same. Two MSI raises in quick succession may reach the guest as one
    message, as QEMU reads the eventfd once per wake-up (the interrupt status
    register shows both).
"""

from __future__ import annotations

from vfiouser.devices.pci import INTA, DmaError, MemoryBar, PciDevice, ResetType

__all__ = ["Edu"]

# BAR0 register offsets.
IDENT = 0x00
LIVENESS = 0x04
FACTORIAL = 0x08
STATUS = 0x20
IRQ_STATUS = 0x24
IRQ_RAISE = 0x60
IRQ_ACK = 0x64
DMA_SRC = 0x80
DMA_DST = 0x88
DMA_CNT = 0x90
DMA_CMD = 0x98

IDENT_VALUE = 0x010000ED
STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80
FACT_IRQ = 0x00000001
DMA_IRQ = 0x00000100
DMA_RUN = 0x1
DMA_DIR_TO_RAM = 0x2
DMA_IRQ_ON_DONE = 0x4
DMA_START = 0x40000
DMA_SIZE = 4096
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF


def factorial_u32(n: int) -> int:
    """n! mod 2**32 (0 from 34 on, since 34! is a multiple of 2**32)."""
    if n >= 34:
        return 0
    result = 1
    for k in range(2, n + 1):
        result = result * k & U32
    return result


class Edu(PciDevice):
    """QEMU's edu device (see the module docstring). ``dma_mask``: RAM-side address mask;
    ``dma_delay_ms``: how long after the command a transfer runs."""

    vendor_id = 0x1234
    device_id = 0x11E8
    revision = 0x10
    class_code = 0x00FF00
    subsystem_vendor_id = 0x1AF4
    subsystem_id = 0x1100
    interrupt_pin = INTA
    #: edu has no reset handler: a transfer already started completes after a reset.
    reset_cancels_deferred = False

    def __init__(self, dma_mask: int = (1 << 28) - 1, dma_delay_ms: int = 100) -> None:
        super().__init__()
        self.dma_mask = dma_mask
        self.dma_delay = dma_delay_ms / 1000
        self.add_bar(0, MemoryBar(1 << 20)).map(self)
        self.add_msi(vectors=1, addr64=True, per_vector_mask=False)
        # QEMU's PCI core leaves device-specific config bytes writable, and reset does not touch them.
        scratch = 0x40 + self.msi.length
        self.config.set_wmask(scratch, b"\xff" * (256 - scratch))
        self.config.set_stickymask(scratch, b"\xff" * (256 - scratch))
        self._power_on()

    def _power_on(self) -> None:
        self.addr4 = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = self.dma_dst = self.dma_cnt = self.dma_cmd = 0
        self.buffer = bytearray(DMA_SIZE)

    def reset(self, kind: ResetType) -> None:
        """A warm reset leaves edu's registers alone (QEMU's edu has no reset handler); a
        power cycle (a new VM) clears them."""
        if kind is ResetType.COLD:
            self._power_on()

    # -- BAR0 ------------------------------------------------------------------------

    def read(self, base: int, offset: int, data) -> None:
        size = len(data)
        if size not in (4, 8) or offset % size:
            data[:] = bytes(size)  # rejected before the device: reads 0
            return
        value = U64
        if size == 4 or offset >= 0x80:
            value = self._register(offset)
        data[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _register(self, offset: int) -> int:
        if offset == IDENT:
            return IDENT_VALUE
        if offset == LIVENESS:
            return self.addr4
        if offset == FACTORIAL:
            return self.fact
        if offset == STATUS:
            return self.status
        if offset == IRQ_STATUS:
            return self.irq_status
        if offset == DMA_SRC:
            return self.dma_src
        if offset == DMA_DST:
            return self.dma_dst
        if offset == DMA_CNT:
            return self.dma_cnt
        if offset == DMA_CMD:
            return self.dma_cmd
        return U64

    def write(self, base: int, offset: int, data) -> None:
        size = len(data)
        if size not in (4, 8) or offset % size or (offset < 0x80 and size != 4):
            return
        value = int.from_bytes(data, "little")
        if offset == LIVENESS:
            self.addr4 = ~value & U32
        elif offset == FACTORIAL:
            if not self.status & STATUS_COMPUTING:
                self.fact = value
                self.status |= STATUS_COMPUTING
                self.defer(self._compute_factorial)
        elif offset == STATUS:
            if value & STATUS_IRQFACT:
                self.status |= STATUS_IRQFACT
            else:
                self.status &= ~STATUS_IRQFACT
        elif offset == IRQ_RAISE:
            self._raise_irq(value)
        elif offset == IRQ_ACK:
            self._lower_irq(value)
        elif offset in (DMA_SRC, DMA_DST, DMA_CNT, DMA_CMD):
            if self.dma_cmd & DMA_RUN:
                return  # a transfer is running: registers are frozen
            if offset == DMA_SRC:
                self.dma_src = value
            elif offset == DMA_DST:
                self.dma_dst = value
            elif offset == DMA_CNT:
                self.dma_cnt = value
            elif value & DMA_RUN:
                self.dma_cmd = value
                self.defer(self._run_dma, delay=self.dma_delay)

    # -- interrupts ------------------------------------------------------------------

    def _raise_irq(self, value: int) -> None:
        self.irq_status = (self.irq_status | value) & U32
        if self.irq_status:
            if self.msi_enabled():
                self.fire_msi(0)
            else:
                self.set_intx(True)

    def _lower_irq(self, value: int) -> None:
        self.irq_status &= ~value & U32
        if not self.irq_status and not self.msi_enabled():
            self.set_intx(False)

    # -- background work (the device's worker thread) --------------------------------

    def _compute_factorial(self) -> None:
        with self.lock:
            n = self.fact
        result = factorial_u32(n)
        with self.lock:
            self.fact = result
            self.status &= ~STATUS_COMPUTING
            if self.status & STATUS_IRQFACT:
                self._raise_irq(FACT_IRQ)

    @staticmethod
    def _buffer_range_ok(start: int, count: int) -> bool:
        end = (start + count) & U64
        return end >= start and start >= DMA_START and end <= DMA_START + DMA_SIZE

    def _read_ram(self, addr: int, count: int) -> bytes:
        """Guest RAM as edu's bus sees it: what cannot be read reads as zeros."""
        try:
            return self.dma.read_available(addr, count)
        except DmaError as exc:  # no bus mastering, no client, aborted: nothing arrives
            self.log.debug("DMA read of %#x+%#x: %s; zeros", addr, count, exc)
            return bytes(count)

    def _write_ram(self, addr: int, data: bytes) -> None:
        """Guest RAM as edu's bus sees it: writes where nothing writable is mapped vanish."""
        try:
            self.dma.write_available(addr, data)
        except DmaError as exc:
            self.log.debug("DMA write of %#x+%#x: %s; dropped", addr, len(data), exc)

    def _run_dma(self) -> None:
        with self.lock:
            if not self.dma_cmd & DMA_RUN:
                return
            cmd, src, dst, count = self.dma_cmd, self.dma_src, self.dma_dst, self.dma_cnt
            to_ram = bool(cmd & DMA_DIR_TO_RAM)
            buffer_side = src if to_ram else dst
            ok = self._buffer_range_ok(buffer_side, count)
            if ok and to_ram:
                data = bytes(self.buffer[src - DMA_START : src - DMA_START + count])
        try:
            if not ok:
                self.log.warning("DMA range %#x+%#x is outside the buffer (0x40000-0x40fff); nothing copied",
                                 buffer_side, count)
            elif to_ram:
                self._write_ram(dst & self.dma_mask, data)
            else:
                data = self._read_ram(src & self.dma_mask, count)
                with self.lock:
                    self.buffer[dst - DMA_START : dst - DMA_START + count] = data
        finally:  # whatever happened, the transfer is over: never leave the engine busy
            with self.lock:
                self.dma_cmd &= ~DMA_RUN
                if self.dma_cmd & DMA_IRQ_ON_DONE:
                    self._raise_irq(DMA_IRQ)
