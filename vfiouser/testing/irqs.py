"""Interrupts of a device served in-process, seen the way QEMU sees them: one eventfd per vector.

:class:`Interrupts` owns the eventfds a :class:`~vfiouser.testing.device.ServedDevice`
hands the server. INTx has its eventfd from the start; :meth:`Interrupts.enable_msi`
and :meth:`Interrupts.enable_msix` do what QEMU does when a guest driver turns
MSI or MSI-X on (program the capability, turn the INTx eventfd off, give every
vector an eventfd). :meth:`Interrupts.wait` returns once a vector has fired, or
fails the test naming what did fire instead.

INTx is level-triggered and, as under QEMU, masked by the server each time it
fires: every ``wait("intx")`` first unmasks the line (what QEMU does at the
guest's end of interrupt), so a line that is still asserted is reported again.
"""

from __future__ import annotations

import errno
import os
import select
import time

from vfiouser.devices.pci.config import PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX, PCI_STATUS, PCI_STATUS_INTERRUPT
from vfiouser.errors import UsageError
from vfiouser.protocol import IrqIndex, IrqSetFlags

__all__ = ["Interrupts", "InterruptNotRaised", "KINDS"]

#: Interrupt kinds a test waits for.
KINDS = ("intx", "msi", "msix")

_INDEX = {"intx": IrqIndex.INTX, "msi": IrqIndex.MSI, "msix": IrqIndex.MSIX}
_EVENTFD = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
_NONE = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER

#: Where MSI messages point (the x86 local APIC window) and the data of vector 0.
MSI_ADDRESS = 0xFEE0_0000
MSI_DATA = 0x4000

_MSI_ENABLE = 0x0001
_MSI_64BIT = 0x0080
_MSIX_ENABLE = 0x8000
_MSIX_MASKALL = 0x4000


class InterruptNotRaised(UsageError, AssertionError):
    """An interrupt a test waited for did not fire in time (an ``AssertionError``, so it fails
    the test like a failed ``assert``); the message says what fired instead."""

    errno = errno.ETIMEDOUT


class Interrupts:
    """The interrupt eventfds of one served device (see the module docstring)."""

    def __init__(self, client, config) -> None:
        self._client = client
        self._config = config
        self._fds: dict[tuple[str, int], int] = {}
        self._counts: dict[tuple[str, int], int] = {}
        self._intx_fired = False
        self.mode = "none"
        if client.get_irq_info(IrqIndex.INTX)[1]:
            self._install("intx", 1)
            self.mode = "intx"

    # -- set-up ------------------------------------------------------------------------

    def _install(self, kind: str, count: int) -> None:
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        try:
            self._client.set_irqs(_INDEX[kind], _EVENTFD, 0, count, fds=fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for vector, fd in enumerate(fds):
            self._fds[(kind, vector)] = fd

    def _remove(self, kind: str) -> None:
        keys = [key for key in self._fds if key[0] == kind]
        if not keys:
            return
        self._client.set_irqs(_INDEX[kind], _NONE, 0, 0)
        for key in keys:
            os.close(self._fds.pop(key))
            self._counts.pop(key, None)

    def _capability(self, cap_id: int, name: str) -> int:
        offset = self._config.find_capability(cap_id)
        if offset is None:
            raise UsageError(f"the device has no {name} capability (add it with add_{name.lower().replace('-', '')}())")
        return offset

    def enable_msi(self, vectors: int | None = None) -> int:
        """Turn MSI on as a guest driver and QEMU would: message address and data programmed,
        ``vectors`` enabled (default: all the capability offers; a power of two), INTx's
        eventfd off, one eventfd per vector. Returns the number of vectors enabled."""
        cap = self._capability(PCI_CAP_ID_MSI, "MSI")
        control = self._config.read(cap + 2, 2)
        offered = 1 << ((control >> 1) & 7)
        vectors = offered if vectors is None else vectors
        if vectors < 1 or vectors > offered or vectors & (vectors - 1):
            raise UsageError(f"MSI vectors must be a power of two from 1 to {offered}, not {vectors}")
        self._config.write(cap + 4, 4, MSI_ADDRESS)
        data = cap + 8
        if control & _MSI_64BIT:
            self._config.write(cap + 8, 4, 0)
            data = cap + 12
        self._config.write(data, 2, MSI_DATA)
        self._config.write(cap + 2, 2, control & ~0x70 | (vectors.bit_length() - 1) << 4 | _MSI_ENABLE)
        self._remove("msix")
        self._remove("intx")
        self._install("msi", vectors)
        self.mode = "msi"
        return vectors

    def enable_msix(self) -> int:
        """Turn MSI-X on as a guest driver and QEMU would: the function enabled and unmasked,
        INTx's eventfd off, one eventfd per vector (QEMU emulates the table itself, so the
        device's own copy stays as it was). Returns the number of vectors."""
        cap = self._capability(PCI_CAP_ID_MSIX, "MSI-X")
        control = self._config.read(cap + 2, 2)
        vectors = (control & 0x7FF) + 1
        self._config.write(cap + 2, 2, control & ~_MSIX_MASKALL | _MSIX_ENABLE)
        self._remove("msi")
        self._remove("intx")
        self._install("msix", vectors)
        self.mode = "msix"
        return vectors

    def disable(self) -> None:
        """MSI and MSI-X off, INTx's eventfd back (what QEMU does when a driver lets go of
        its vectors)."""
        for kind, cap_id in (("msi", PCI_CAP_ID_MSI), ("msix", PCI_CAP_ID_MSIX)):
            cap = self._config.find_capability(cap_id)
            if cap is not None:
                control = self._config.read(cap + 2, 2)
                self._config.write(cap + 2, 2, control & ~(_MSI_ENABLE if kind == "msi" else _MSIX_ENABLE))
            self._remove(kind)
        if ("intx", 0) not in self._fds and self._client.get_irq_info(IrqIndex.INTX)[1]:
            self._install("intx", 1)
            self._intx_fired = False
        self.mode = "intx" if ("intx", 0) in self._fds else "none"

    # -- observing -----------------------------------------------------------------------

    def _drain(self) -> None:
        for key, fd in self._fds.items():
            try:
                n = os.eventfd_read(fd)
            except BlockingIOError:
                continue
            self._counts[key] = self._counts.get(key, 0) + n

    def _unmask_intx(self) -> None:
        if self._intx_fired and ("intx", 0) in self._fds:
            self._intx_fired = False
            self._client.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)

    def fired(self) -> dict[tuple[str, int], int]:
        """Every vector signalled since the last :meth:`wait` or :meth:`fired` that took it,
        as ``{(kind, vector): times}``; taking them clears them."""
        self._drain()
        taken = {key: n for key, n in self._counts.items() if n}
        self._counts.clear()
        if ("intx", 0) in taken:
            self._intx_fired = True
        return taken

    def wait(self, kind: str, vector: int = 0, timeout: float = 5.0) -> int:
        """Wait until ``vector`` of ``kind`` (``"intx"``, ``"msi"`` or ``"msix"``) fires; how many
        times it did (signals coalesce, as an eventfd's do). Raises :class:`InterruptNotRaised`
        (an ``AssertionError``) after ``timeout`` seconds, naming what fired instead."""
        if kind not in _INDEX:
            raise UsageError(f"interrupt kind {kind!r}: use one of {', '.join(KINDS)}")
        key = (kind, vector)
        if key not in self._fds:
            raise InterruptNotRaised(f"{kind} vector {vector} has no eventfd: the device's interrupts are "
                                     f"{self._describe_mode()}" + self._enable_hint(kind))
        if kind == "intx":
            self._unmask_intx()
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._fds[key], select.POLLIN)
        while True:
            self._drain()
            n = self._counts.pop(key, 0)
            if n:
                if kind == "intx":
                    self._intx_fired = True
                return n
            left = deadline - time.monotonic()
            if left <= 0:
                break
            poller.poll(min(left, 0.5) * 1000)
        others = ", ".join(f"{k} {v} (x{n})" if k != "intx" else f"intx (x{n})"
                           for (k, v), n in sorted(self._counts.items()) if n)
        raise InterruptNotRaised(f"{kind} vector {vector} did not fire within {timeout:g}s; "
                                 f"fired meanwhile: {others or 'nothing'} (interrupts: {self._describe_mode()})")

    def intx_asserted(self) -> bool:
        """Whether the device holds its INTx line asserted (the status register's bit)."""
        return bool(self._config.read(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT)

    def _describe_mode(self) -> str:
        counts = {}
        for kind, _ in self._fds:
            counts[kind] = counts.get(kind, 0) + 1
        if not counts:
            return "none set up (the device has no INTx pin)"
        return ", ".join(f"{kind} with {n} vector{'s' if n > 1 else ''}" for kind, n in counts.items())

    @staticmethod
    def _enable_hint(kind: str) -> str:
        if kind == "msi":
            return "; call enable_msi() first"
        if kind == "msix":
            return "; call enable_msix() first"
        return ""

    def close(self) -> None:
        """Close every eventfd (the server has its own copies until its client leaves)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
