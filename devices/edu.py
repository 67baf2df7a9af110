"""QEMU's ``edu`` teaching device, register for register (QEMU 11.1.3's ``hw/misc/edu.c``).

A Python twin of the device QEMU ships for teaching driver writing. The test
suite runs the same qtest script against QEMU's own ``-device edu`` and against
this model over vfio-user, and requires the same answers.

Identity
    vendor 0x1234, device 0x11e8, revision 0x10, class 0x00ff00, subsystem
    1af4:1100, interrupt pin INTA. MSI capability at 0x40: one vector, 64-bit
    address, no per-vector masking. Config bytes 0x4e-0xff are writable
    scratch that survives reset, as QEMU's PCI core leaves them.

BAR0: 1 MiB, 32-bit memory (this table is ``EDU_REGS.markdown()``, checked by
tests/test_regs_models.py)
    Accesses are 4 bytes at 0x00-0x7f and 4 or 8 bytes at 0x80 and above.
    Narrower or misaligned accesses read 0 and are ignored (QEMU rejects them
    before edu sees them); 8-byte accesses below 0x80 read all-ones and are
    ignored; a 4-byte access at a 64-bit register is its low half (a write
    clears the upper half); offsets that are not registers read all-ones.

| offset | register | bits | access | reset | description |
| --- | --- | --- | --- | --- | --- |
| 0x00 | ident | 31:0 | RO | 0x10000ed | identification: major 1, minor 0, 0xed |
| 0x04 | liveness | 31:0 | RW | 0x0 | reads the bitwise inverse of the last value written |
| 0x08 | factorial | 31:0 | RW | 0x0 | write n: computes n! mod 2**32 in the background; read: the result (the input while computing); writes ignored while status.computing |
| 0x20 | status | 31:0 | mixed | 0x0 | status |
|  | .irq_fact | 7 | RW | 0x0 | raise interrupt 0x1 when a factorial completes |
|  | .computing | 0 | RO | 0x0 | a factorial is being computed |
| 0x24 | irq_status | 31:0 | RO | 0x0 | interrupts raised and not yet acknowledged |
| 0x60 | irq_raise | 31:0 | W1S (WO) | 0x0 | OR the value into the interrupt status, and signal it; alias of irq_status |
| 0x64 | irq_ack | 31:0 | W1C (WO) | 0x0 | clear those bits; INTx drops when none is left; alias of irq_status |
| 0x80 | dma_src | 63:0 | RW | 0x0 | DMA source address; writes ignored while dma_cmd.run |
| 0x88 | dma_dst | 63:0 | RW | 0x0 | DMA destination address; writes ignored while dma_cmd.run |
| 0x90 | dma_cnt | 63:0 | RW | 0x0 | DMA byte count; writes ignored while dma_cmd.run |
| 0x98 | dma_cmd | 63:0 | RW | 0x0 | DMA command; writes ignored while dma_cmd.run |
|  | .other | 63:3 | RW | 0x0 | kept as written |
|  | .irq | 2 | RW | 0x0 | raise interrupt 0x100 when the transfer is done |
|  | .to_ram | 1 | RW | 0x0 | direction: 0 RAM to buffer, 1 buffer to RAM |
|  | .run | 0 | RW | 0x0 | start a transfer (a write without it is ignored); cleared when it is done |

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
from vfiouser.devices.regs import (
    DECLINE,
    EXTEND,
    RO,
    W1C,
    W1S,
    WO,
    AccessPolicy,
    Field,
    Register,
    RegisterMap,
    before_write,
    on_write,
    when,
)

__all__ = ["Edu", "EDU_REGS"]

DMA_START = 0x40000
DMA_SIZE = 4096
FACT_IRQ = 0x00000001
DMA_IRQ = 0x00000100
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF

#: 4 or 8 bytes, aligned; the bus rejects anything else (reads 0). A narrow access is the
#: low half of a 64-bit register; an access wider than a 32-bit register misses it.
EDU_POLICY = AccessPolicy(sizes=(4, 8), aligned=True, refused=0x00, unmapped=0xFF, narrow=EXTEND, wide=DECLINE)

EDU_REGS = RegisterMap([
    Register("ident", 0x00, 32, sw=RO, reset=0x010000ED, doc="identification: major 1, minor 0, 0xed"),
    Register("liveness", 0x04, 32, doc="reads the bitwise inverse of the last value written"),
    Register("factorial", 0x08, 32, frozen_while=when("status.computing"),
             doc="write n: computes n! mod 2**32 in the background; read: the result (the input while computing)"),
    Register("status", 0x20, 32, [
        Field("computing", 0, sw=RO, doc="a factorial is being computed"),
        Field("irq_fact", 7, doc="raise interrupt 0x1 when a factorial completes"),
    ], doc="status"),
    Register("irq_status", 0x24, 32, sw=RO, doc="interrupts raised and not yet acknowledged"),
    Register("irq_raise", 0x60, 32, sw=WO, onwrite=W1S, alias_of="irq_status",
             doc="OR the value into the interrupt status, and signal it"),
    Register("irq_ack", 0x64, 32, sw=WO, onwrite=W1C, alias_of="irq_status",
             doc="clear those bits; INTx drops when none is left"),
    Register("dma_src", 0x80, 64, frozen_while=when("dma_cmd.run"), doc="DMA source address"),
    Register("dma_dst", 0x88, 64, frozen_while=when("dma_cmd.run"), doc="DMA destination address"),
    Register("dma_cnt", 0x90, 64, frozen_while=when("dma_cmd.run"), doc="DMA byte count"),
    Register("dma_cmd", 0x98, 64, [
        Field("run", 0, doc="start a transfer (a write without it is ignored); cleared when it is done"),
        Field("to_ram", 1, doc="direction: 0 RAM to buffer, 1 buffer to RAM"),
        Field("irq", 2, doc="raise interrupt 0x100 when the transfer is done"),
        Field("other", (63, 3), doc="kept as written"),
    ], frozen_while=when("dma_cmd.run"), doc="DMA command"),
], name="edu", policy=EDU_POLICY)


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
        self.regs = EDU_REGS.instantiate(self)
        self.add_bar(0, MemoryBar(1 << 20)).map(self.regs)
        self.add_msi(vectors=1, addr64=True, per_vector_mask=False)
        # QEMU's PCI core leaves device-specific config bytes writable, and reset does not touch them.
        scratch = 0x40 + self.msi.length
        self.config.set_wmask(scratch, b"\xff" * (256 - scratch))
        self.config.set_stickymask(scratch, b"\xff" * (256 - scratch))
        self._power_on()

    def _power_on(self) -> None:
        self.regs.reset()
        self.buffer = bytearray(DMA_SIZE)

    def reset(self, kind: ResetType) -> None:
        """A warm reset leaves edu's registers alone (QEMU's edu has no reset handler); a
        power cycle (a new VM) clears them."""
        if kind is ResetType.COLD:
            self._power_on()

    # -- register behaviour ----------------------------------------------------------------

    @on_write("liveness")
    def _liveness(self, reg, value: int) -> None:
        reg.value = ~value & U32

    @on_write("factorial")
    def _start_factorial(self, reg, value: int) -> None:
        self.regs.status.set("computing", 1)
        self.defer(self._compute_factorial)

    @on_write("irq_raise")
    def _raised(self, reg, value: int) -> None:
        if self.regs.irq_status.value:
            if self.msi_enabled():
                self.fire_msi(0)
            else:
                self.set_intx(True)

    @on_write("irq_ack")
    def _acknowledged(self, reg, value: int) -> None:
        if not self.regs.irq_status.value and not self.msi_enabled():
            self.set_intx(False)

    @before_write("dma_cmd")
    def _dma_command(self, reg, value: int) -> int | None:
        return value if value & 1 else None  # only a write that starts a transfer counts

    @on_write("dma_cmd")
    def _start_dma(self, reg, value: int) -> None:
        self.defer(self._run_dma, delay=self.dma_delay)

    # -- interrupts ------------------------------------------------------------------------

    def _raise_irq(self, value: int) -> None:
        """What a write of ``value`` to irq_raise does (the engines raise this way too)."""
        self.regs.irq_raise.sw_write(value, U32)

    # -- background work (the device's worker thread) --------------------------------------

    def _compute_factorial(self) -> None:
        with self.lock:
            n = self.regs.factorial.value
        result = factorial_u32(n)
        with self.lock:
            self.regs.factorial.value = result
            status = self.regs.status
            status.set("computing", 0)
            if status.get("irq_fact"):
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
        regs = self.regs
        with self.lock:
            cmd = regs.dma_cmd
            if not cmd.get("run"):
                return
            src, dst, count = regs.dma_src.value, regs.dma_dst.value, regs.dma_cnt.value
            to_ram = bool(cmd.get("to_ram"))
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
                regs.dma_cmd.set("run", 0)
                if regs.dma_cmd.get("irq"):
                    self._raise_irq(DMA_IRQ)
