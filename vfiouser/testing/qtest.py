"""Models served to a real QEMU under qtest, set up as firmware would leave them: what ``qemu_qtest`` returns.

:class:`QtestVm` serves each model on a socket of its own, starts a q35 QEMU
(:class:`~vfiouser.testing.qemu.QtestMachine`) with them attached from slot 4
on, places every BAR and turns decoding and bus mastering on, and intercepts
the IOAPIC's inputs. Each :class:`QtestDevice` then offers the same accesses as
the in-process handle (``bar(n).read/write``, ``config.read/write``,
``enable_msi()``, ``enable_msix()``, ``irqs.wait(kind, vector)``), but every one
goes through QEMU: config cycles on ports 0xcf8/0xcfc, BAR accesses at the
address firmware gave the BAR, interrupts as QEMU delivers them.

* INTx: the device's pin is routed the way q35 routes it; ``dev.intx_line`` is
  the IOAPIC input (GSI) it arrives on, and ``irqs.wait("intx")`` waits for it
  to be raised.
* MSI and MSI-X: messages are pointed at guest RAM (``dev.irqs.message_area``,
  one page per device), where QEMU's write lands and the test sees it:
  vector ``v`` writes ``MSG_DATA + v``.

QEMU lowers and re-raises a vfio device's INTx line on every BAR access while
the interrupt is pending (its end-of-interrupt handling), so a line that stays
asserted is seen raised again after the next access.
"""

from __future__ import annotations

import contextlib
import time

from vfiouser.devices.pci.config import PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX
from vfiouser.devices.pci.firmware import IO_BASE, MEM32_BASE, MEM64_BASE, assign_bars
from vfiouser.errors import UsageError

from .device import ConfigAccess
from .irqs import KINDS, InterruptNotRaised
from .qemu import QtestMachine
from .served import FIRST_SLOT, ServedModels

__all__ = ["QtestVm", "QtestDevice", "intx_gsi", "FIRST_SLOT", "MSG_DATA"]

#: Guest RAM pages where the devices' MSI/MSI-X messages land (one page per device).
MSG_AREA = 0x00F0_0000
#: The data of vector 0's message.
MSG_DATA = 0x0100
_MSI_OFFSET = 0xF00  # in a device's page: the MSI word; MSI-X vector v at 4 * v


def intx_gsi(slot: int, pin: int) -> int:
    """The IOAPIC input a q35 routes INTx ``pin`` (1 INTA ... 4 INTD) of bus-0 ``slot`` to.

    q35's LPC bridge maps slot and pin to PIRQ E-H, ``(slot + pin - 1) % 4 + 4``, and PIRQ n
    to GSI 16 + n (slots 25-31 have chipset-specific routing and are not supported here).

    >>> intx_gsi(4, 1), intx_gsi(5, 1), intx_gsi(4, 2)
    (20, 21, 21)
    """
    if not 1 <= pin <= 4:
        raise UsageError(f"interrupt pin {pin}: 1 (INTA) to 4 (INTD)")
    if not 1 <= slot <= 24:
        raise UsageError(f"slot {slot}: devices go in slots 1-24 of a q35 (25-31 are the chipset's)")
    return 16 + 4 + (slot + pin - 1) % 4


class _QtestConfig(ConfigAccess):
    """Config cycles through QEMU (ports 0xcf8/0xcfc)."""

    def __init__(self, machine: QtestMachine, slot: int) -> None:
        self._machine = machine
        self.slot = slot
        self.index, self.address = 7, None

    def read(self, offset: int, size: int = 4) -> int:
        return self._machine.pci_cfg_read(self.slot, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._machine.pci_cfg_write(self.slot, offset, value, size)


_IN = {1: "inb", 2: "inw", 4: "inl"}
_OUT = {1: "outb", 2: "outw", 4: "outl"}
_READ = {1: "readb", 2: "readw", 4: "readl", 8: "readq"}
_WRITE = {1: "writeb", 2: "writew", 4: "writel", 8: "writeq"}


class QtestBar:
    """A BAR as a driver reaches it: port I/O or memory accesses at the address firmware gave it."""

    def __init__(self, machine: QtestMachine, index: int, address: int, is_io: bool) -> None:
        self._machine = machine
        self.index, self.address, self.is_io = index, address, is_io

    def read(self, offset: int, size: int) -> int:
        """A ``size``-byte access at ``offset`` into the BAR."""
        table = _IN if self.is_io else _READ
        if size not in table:
            raise UsageError(f"a {'port' if self.is_io else 'memory'} access is {sorted(table)} bytes, not {size}")
        return getattr(self._machine, table[size])(self.address + offset)

    def write(self, offset: int, size: int, value: int) -> None:
        """Write ``value`` with a ``size``-byte access at ``offset`` into the BAR."""
        table = _OUT if self.is_io else _WRITE
        if size not in table:
            raise UsageError(f"a {'port' if self.is_io else 'memory'} access is {sorted(table)} bytes, not {size}")
        getattr(self._machine, table[size])(self.address + offset, value & ((1 << 8 * size) - 1))


class QtestInterrupts:
    """Interrupts of one device as QEMU delivers them (see the module docstring)."""

    def __init__(self, device: QtestDevice, message_area: int) -> None:
        self._device = device
        self._machine = device.machine
        self.message_area = message_area
        self.mode = "intx" if device.intx_line is not None else "none"
        self.vectors = 0

    def _message(self, kind: str, vector: int) -> int:
        return self.message_area + (_MSI_OFFSET if kind == "msi" else 4 * vector)

    def enable_msi(self, vectors: int | None = None) -> int:
        """Program the MSI capability to write into :attr:`message_area` and enable ``vectors``
        (default all); QEMU then gives the server its eventfds. Returns the vectors enabled."""
        config = self._device.config
        cap = config.find_capability(PCI_CAP_ID_MSI)
        if cap is None:
            raise UsageError("the device has no MSI capability (add it with add_msi())")
        control = config.read(cap + 2, 2)
        offered = 1 << ((control >> 1) & 7)
        vectors = offered if vectors is None else vectors
        if vectors < 1 or vectors > offered or vectors & (vectors - 1):
            raise UsageError(f"MSI vectors must be a power of two from 1 to {offered}, not {vectors}")
        self._machine.memwrite(self._message("msi", 0), bytes(4))
        config.write(cap + 4, 4, self._message("msi", 0))
        data = cap + 8
        if control & 0x80:
            config.write(cap + 8, 4, 0)
            data = cap + 12
        config.write(data, 2, MSG_DATA)
        config.write(cap + 2, 2, control & ~0x70 | (vectors.bit_length() - 1) << 4 | 1)
        self.mode, self.vectors = "msi", vectors
        return vectors

    def enable_msix(self, masked=()) -> int:
        """Fill the MSI-X table (in its BAR, where QEMU emulates it) so vector ``v`` writes
        ``MSG_DATA + v`` into :attr:`message_area`, entries unmasked except those in
        ``masked``, then enable MSI-X. Returns the number of vectors."""
        config = self._device.config
        cap = config.find_capability(PCI_CAP_ID_MSIX)
        if cap is None:
            raise UsageError("the device has no MSI-X capability (add it with add_msix())")
        control = config.read(cap + 2, 2)
        vectors = (control & 0x7FF) + 1
        table = config.read(cap + 4, 4)
        bar = self._device.bar(table & 7)
        self._machine.memwrite(self.message_area, bytes(4 * vectors))
        for v in range(vectors):
            entry = (table & ~7) + 16 * v
            bar.write(entry, 4, self._message("msix", v))
            bar.write(entry + 4, 4, 0)
            bar.write(entry + 8, 4, MSG_DATA + v)
            bar.write(entry + 12, 4, 1 if v in masked else 0)
        config.write(cap + 2, 2, control & ~0x4000 | 0x8000)
        self.mode, self.vectors = "msix", vectors
        return vectors

    def _take_message(self, kind: str, vector: int) -> bool:
        addr = self._message(kind, vector)
        value = int.from_bytes(self._machine.memread(addr, 4), "little")
        if value and (kind == "msix" or value == MSG_DATA + vector):
            self._machine.memwrite(addr, bytes(4))
            return True
        return False

    def wait(self, kind: str, vector: int = 0, timeout: float = 5.0) -> int:
        """Wait until ``vector`` of ``kind`` arrives: INTx raised at :attr:`QtestDevice.intx_line`,
        or the MSI/MSI-X message written; 1 when it did. :class:`InterruptNotRaised` (an
        ``AssertionError``) after ``timeout`` seconds, naming what arrived instead."""
        if kind not in KINDS:
            raise UsageError(f"interrupt kind {kind!r}: use one of {', '.join(KINDS)}")
        if kind == "intx":
            if self._device.intx_line is None:
                raise InterruptNotRaised("the device has no INTx pin")
            if self._machine.wait_irq("raise", self._device.intx_line, timeout):
                return 1
        else:
            if self.mode != kind or vector >= self.vectors:
                raise InterruptNotRaised(f"{kind} vector {vector} is not enabled (interrupts: {self.mode}"
                                         f"{f' with {self.vectors} vectors' if self.vectors else ''}); "
                                         f"call enable_{kind}() first")
            deadline = time.monotonic() + timeout
            while True:
                if self._take_message(kind, vector):
                    return 1
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
        raise InterruptNotRaised(f"{kind} vector {vector} did not arrive within {timeout:g}s; "
                                 f"meanwhile: {self._what_arrived()}")

    def _what_arrived(self) -> str:
        seen = [f"IRQ {kind} {num}" for kind, num in list(self._machine.irq_events) if num != 0]
        if self.mode in ("msi", "msix"):
            for v in range(self.vectors if self.mode == "msix" else 1):
                value = int.from_bytes(self._machine.memread(self._message(self.mode, v), 4), "little")
                if value:
                    seen.append(f"{self.mode} message {value:#x}")
        return ", ".join(seen) or "nothing"


class QtestDevice:
    """One device of a :class:`QtestVm`: its model, slot, BARs, config space and interrupts."""

    def __init__(self, machine: QtestMachine, slot: int, model, server, bars: dict[int, int],
                 message_area: int) -> None:
        self.machine, self.slot, self.model, self.server = machine, slot, model, server
        self.config = _QtestConfig(machine, slot)
        self.bars = bars
        pin = self.config.read(0x3D, 1)
        #: The IOAPIC input (GSI) the device's INTx arrives on, or None without a pin.
        self.intx_line = intx_gsi(slot, pin) if pin else None
        self.irqs = QtestInterrupts(self, message_area)

    def bar(self, index: int) -> QtestBar:
        """Accesses to BAR ``index`` at the address firmware gave it."""
        if index not in self.bars:
            raise UsageError(f"BAR{index} is not placed (the device's BARs: {sorted(self.bars) or 'none'})")
        return QtestBar(self.machine, index, self.bars[index], bool(self.config.read(0x10 + 4 * index) & 1))

    def enable_msi(self, vectors: int | None = None) -> int:
        """MSI on, messages into guest RAM (:meth:`QtestInterrupts.enable_msi`)."""
        return self.irqs.enable_msi(vectors)

    def enable_msix(self, masked=()) -> int:
        """MSI-X on, messages into guest RAM (:meth:`QtestInterrupts.enable_msix`)."""
        return self.irqs.enable_msix(masked)


class QtestVm:
    """A qtest QEMU with ``models`` served to it (see the module docstring).

    ``models`` are classes, device names or instances (``params`` go to the class when there
    is one model); ``backend`` names the protocol engine; ``memory``/``memfd``/``args`` are
    :class:`~vfiouser.testing.qemu.QtestMachine`'s.
    """

    def __init__(self, *models, backend: str | None = None, params: dict | None = None,
                 memory: str = "128M", memfd: bool = False, args=(), qemu: str | None = None,
                 bring_up: bool = True) -> None:
        if not models:
            raise UsageError("qemu_qtest needs at least one device model")
        if params and len(models) != 1:
            raise UsageError("params= applies to a single model; pass instances for several")
        self._stack = contextlib.ExitStack()
        try:
            self.served = self._stack.enter_context(ServedModels(models, backend=backend, params=params))
            self.backend = self.served.backend
            self.machine = self._stack.enter_context(
                QtestMachine(self.served.device_args, args, qemu=qemu, memory=memory, memfd=memfd))
            self.machine.irq_intercept_in("ioapic")
            served = zip(self.served.slots, self.served.models, self.served.servers)
            self.devices = self._bring_up(served, bring_up)
        except BaseException:
            self._stack.close()
            raise

    def _bring_up(self, served, bring_up: bool) -> list[QtestDevice]:
        devices = []
        io, mem32, mem64 = IO_BASE, MEM32_BASE, MEM64_BASE
        for i, (slot, model, server) in enumerate(served):
            placed = {}
            if bring_up:
                config = _QtestConfig(self.machine, slot)
                placed = assign_bars(config.read, lambda off, value, size: config.write(off, size, value),
                                     io_base=io, mem32_base=mem32, mem64_base=mem64)
                for index, address in placed.items():   # the next device's BARs go after these
                    end = address + self.machine.pci_bar_size(slot, index)[0]
                    if address < 0x1_0000:
                        io = max(io, end)
                    elif address < MEM64_BASE:
                        mem32 = max(mem32, end)
                    else:
                        mem64 = max(mem64, end)
            devices.append(QtestDevice(self.machine, slot, model, server, placed, MSG_AREA + 0x1000 * i))
        return devices

    @property
    def device(self) -> QtestDevice:
        """The first (or only) device."""
        return self.devices[0]

    def memread(self, addr: int, size: int) -> bytes:
        """Guest RAM ``[addr, addr + size)``."""
        return self.machine.memread(addr, size)

    def memwrite(self, addr: int, data: bytes) -> None:
        """Store ``data`` in guest RAM at ``addr``."""
        self.machine.memwrite(addr, data)

    def system_reset(self) -> None:
        """Reset the machine (QEMU sends every device DEVICE_RESET; BARs must be placed again)."""
        self.machine.system_reset()

    def close(self) -> None:
        """Quit QEMU, then stop the servers."""
        self._stack.close()

    def __enter__(self) -> QtestVm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
