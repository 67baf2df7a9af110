"""A whole backend in under 100 lines: it serves any device model through its device port alone.

What the vfio-user server does, minus the protocol: it attaches an interrupt sink
and a DMA backend, makes every access inside a batch, resets with a reason, and
detaches. Guest memory is a bytearray (so DMA is in place); interrupts are recorded.
"""

from __future__ import annotations

from vfiouser.devices.pci.dma import DmaPermissionError, DmaUnmapped
from vfiouser.devices.pci.firmware import assign_bars
from vfiouser.devices.port import DmaBackend, InterruptSink, ResetReason, as_port


class GuestMemory(DmaBackend):
    """Guest RAM ``[0, size)``, all of it mapped in place; ``read_only`` ranges refuse writes."""

    def __init__(self, size: int) -> None:
        self.ram = bytearray(size)
        self.read_only: list[tuple[int, int]] = []

    def _check(self, addr: int, size: int, write: bool) -> None:
        if addr < 0 or addr + size > len(self.ram):
            raise DmaUnmapped(f"[{addr:#x}, +{size:#x}) is not guest RAM", addr, size)
        if write and any(a < addr + size and addr < a + n for a, n in self.read_only):
            raise DmaPermissionError(f"[{addr:#x}, +{size:#x}) is read-only", addr, size)

    def read(self, addr: int, size: int, *, may_wait: bool) -> bytes:
        self._check(addr, size, False)
        return bytes(self.ram[addr : addr + size])

    def write(self, addr: int, data: bytes, *, may_wait: bool) -> None:
        self._check(addr, len(data), True)
        self.ram[addr : addr + len(data)] = data

    def mapped(self, addr: int, size: int, write: bool) -> list[tuple[int, int]]:
        lo, hi = max(addr, 0), min(addr + size, len(self.ram))
        return [(lo, hi - lo)] if lo < hi and not (write and self.read_only) else []

    def in_place(self, addr: int, size: int, write: bool) -> bool:
        return True


class Interrupts(InterruptSink):
    """Every INTx level and every MSI/MSI-X vector the device sends."""

    def __init__(self) -> None:
        self.intx_levels: list[bool] = []
        self.msi_vectors: list[int] = []
        self.msix_vectors: list[int] = []

    def intx(self, asserted: bool) -> None:
        self.intx_levels.append(asserted)

    def msi(self, vector: int) -> bool:
        self.msi_vectors.append(vector)
        return True

    def msix(self, vector: int) -> bool:
        self.msix_vectors.append(vector)
        return True


class PortBackend:
    """Serves ``device`` (a model or a port): accesses by region index and offset, as a client
    asks for them; :meth:`boot` does what firmware does first."""

    def __init__(self, device, memory_size: int = 1 << 20) -> None:
        self.port = as_port(device)
        self.memory = GuestMemory(memory_size)
        self.irqs = Interrupts()
        self.port.attach(self.irqs, self.memory)

    def read(self, index: int, offset: int, size: int) -> int:
        data = bytearray(size)
        with self.port.batch():
            self.port.region_read(index, offset, data)
        return int.from_bytes(data, "little")

    def write(self, index: int, offset: int, value: int, size: int) -> None:
        with self.port.batch():
            self.port.region_write(index, offset, value.to_bytes(size, "little"))

    def boot(self) -> dict[int, int]:
        """Place the BARs and enable decoding and bus mastering; ``{bar: address}``."""
        return assign_bars(lambda off, n: self.read(7, off, n), lambda off, v, n: self.write(7, off, v, n))

    def reset(self, reason: ResetReason = ResetReason.CLIENT_REQUEST) -> None:
        with self.port.batch():
            self.port.reset(reason)

    def close(self) -> None:
        """The client goes away: detach, and power-cycle the device for the next one."""
        self.port.detach()
        self.port.reset(ResetReason.CLIENT_LOST)
