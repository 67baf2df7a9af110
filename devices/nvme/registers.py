"""The NVMe controller registers (BAR0 0x000-0xfff), declared as a table.

The table reads like the specification's register map: each row is a
register's offset, width, the bits the host may write and its value after a
controller reset. :class:`RegisterFile` serves any access to it (1-8 bytes, any
alignment, across registers: Linux reads CAP as two 32-bit halves) and calls
the controller back with ``(name, old, new)`` after a register changes, so the
controller's behaviour is a handful of write hooks, not an address decoder.

======  ======  ======  ==========================================  ===========================
offset  name    width   writable bits                                what the model does
======  ======  ======  ==========================================  ===========================
0x00    CAP     64      -                                           MQES, CQR, TO, CSS, page sizes
0x08    VS      32      -                                           1.4.0
0x0c    INTMS   32      vector mask (write 1 to set)                INTx only: masks the pin
0x10    INTMC   32      vector mask (write 1 to clear)              reads the same mask
0x14    CC      32      EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES      enable, reset, shutdown
0x1c    CSTS    32      NSSRO (write 1 to clear)                    RDY, CFS, SHST
0x20    NSSR    32      -                                           no NVM subsystem reset
0x24    AQA     32      ASQS (11:0), ACQS (27:16)                   admin queue sizes, 0-based
0x28    ASQ     64      63:12                                       admin SQ base
0x30    ACQ     64      63:12                                       admin CQ base
0x38    CMBLOC  32      -                                           no controller memory buffer
0x3c    CMBSZ   32      -                                           (0: none)
======  ======  ======  ==========================================  ===========================

Unlisted offsets up to 0xfff read as zero and ignore writes (reserved, as in
the specification). Doorbells (0x1000 on) are not registers of this table:
they are the hot path and have a handler of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Register", "RegisterFile", "CONTROLLER_REGISTERS", "REGISTER_SPACE"]

#: Bytes of BAR0 the register table covers; doorbells follow.
REGISTER_SPACE = 0x1000


@dataclass(frozen=True)
class Register:
    """One register: where, how wide, which bits the host writes, its reset value."""

    name: str
    offset: int
    size: int
    writable: int = 0
    reset: int = 0
    #: Write-1-to-clear bits.
    w1c: int = 0
    #: A write is a command, not a value: the hook gets the bits written and the stored value
    #: stays what the device sets (INTMS and INTMC set and clear bits of one interrupt mask).
    command: bool = False
    doc: str = ""


CONTROLLER_REGISTERS: tuple[Register, ...] = (
    Register("CAP", 0x00, 8, doc="Controller Capabilities (set by the controller at build)"),
    Register("VS", 0x08, 4, doc="Version"),
    Register("INTMS", 0x0C, 4, command=True, doc="Interrupt Mask Set"),
    Register("INTMC", 0x10, 4, command=True, doc="Interrupt Mask Clear"),
    Register("CC", 0x14, 4, writable=0x00FF_FFF1, doc="Controller Configuration"),
    Register("CSTS", 0x1C, 4, w1c=1 << 4, doc="Controller Status"),
    Register("NSSR", 0x20, 4, doc="NVM Subsystem Reset (not supported: CAP.NSSRS is 0)"),
    Register("AQA", 0x24, 4, writable=0x0FFF_0FFF, doc="Admin Queue Attributes"),
    Register("ASQ", 0x28, 8, writable=~0xFFF & (1 << 64) - 1, doc="Admin Submission Queue Base Address"),
    Register("ACQ", 0x30, 8, writable=~0xFFF & (1 << 64) - 1, doc="Admin Completion Queue Base Address"),
    Register("CMBLOC", 0x38, 4, doc="Controller Memory Buffer Location (none)"),
    Register("CMBSZ", 0x3C, 4, doc="Controller Memory Buffer Size (none)"),
)


class RegisterFile:
    """The values of a register table and the accesses to them.

    ``on_write(name, old, new)`` runs after a host write to a register's
    writable or write-1-to-clear bits (for a *command* register like INTMS,
    ``new`` is the bits written, and the hook decides what they mean).
    """

    def __init__(self, table: Sequence[Register], on_write: Callable[[str, int, int], None]) -> None:
        self.table = tuple(table)
        self._by_name = {reg.name: reg for reg in self.table}
        self._on_write = on_write
        self.values: dict[str, int] = {}
        end = max(reg.offset + reg.size for reg in self.table)
        #: offset -> the register covering it (a lookup per byte, built once)
        self._at: list[Register | None] = [None] * end
        for reg in self.table:
            for i in range(reg.size):
                if self._at[reg.offset + i] is not None:
                    raise ValueError(f"registers {reg.name} and {self._at[reg.offset + i].name} overlap")
                self._at[reg.offset + i] = reg
        self.reset()

    def reset(self) -> None:
        """Every register back to its reset value."""
        self.values = {reg.name: reg.reset for reg in self.table}

    def __getitem__(self, name: str) -> int:
        return self.values[name]

    def __setitem__(self, name: str, value: int) -> None:
        """Set a register from the device side (no hook runs)."""
        reg = self._by_name[name]
        self.values[name] = value & ((1 << 8 * reg.size) - 1)

    def _touched(self, offset: int, size: int) -> list[Register]:
        seen: list[Register] = []
        for pos in range(offset, min(offset + size, len(self._at))):
            reg = self._at[pos]
            if reg is not None and (not seen or seen[-1] is not reg):
                seen.append(reg)
        return seen

    def read(self, offset: int, data: bytearray | memoryview) -> None:
        """Fill ``data`` with the bytes at ``offset`` (reserved bytes read 0)."""
        size = len(data)
        reg = self._at[offset] if offset < len(self._at) else None
        if reg is not None and reg.offset == offset and reg.size == size:  # the usual case: one whole register
            data[:] = self.values[reg.name].to_bytes(size, "little")
            return
        data[:] = bytes(size)
        for reg in self._touched(offset, size):
            raw = self.values[reg.name].to_bytes(reg.size, "little")
            for pos in range(max(offset, reg.offset), min(offset + size, reg.offset + reg.size)):
                data[pos - offset] = raw[pos - reg.offset]

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Apply a host write: writable bits change, write-1-to-clear bits clear, hooks run in
        register order once every touched register is updated."""
        size = len(data)
        changes = []
        for reg in self._touched(offset, size):
            old = self.values[reg.name]
            raw = bytearray(old.to_bytes(reg.size, "little"))
            hit = bytearray(reg.size)  # which bytes of the register this access covers
            for pos in range(max(offset, reg.offset), min(offset + size, reg.offset + reg.size)):
                raw[pos - reg.offset] = data[pos - offset]
                hit[pos - reg.offset] = 0xFF
            written = int.from_bytes(raw, "little")
            covered = int.from_bytes(hit, "little")
            if reg.command:
                changes.append((reg.name, old, written & covered))
                continue
            new = (old & ~(reg.writable & covered)) | (written & reg.writable & covered)
            new &= ~(written & reg.w1c & covered)
            self.values[reg.name] = new
            if reg.writable & covered or reg.w1c & covered:
                changes.append((reg.name, old, new))
        for name, old, new in changes:
            self._on_write(name, old, new)
