"""Interrupts of a libvfio-user session: the :class:`~vfiouser.devices.port.InterruptSink` it hands the port.

libvfio-user keeps one eventfd per vector for whichever interrupt index the
client enabled last, and ``vfu_irq_trigger(vector)`` signals it. On top of that
:class:`Interrupts` keeps what the port contract and QEMU need:

* INTx is level-triggered and *automasked*, as with our own engine: the trigger
  eventfd is signalled when the level rises, and INTx stays masked until the
  client unmasks it (SET_IRQS NONE|UNMASK after the guest's EOI, which
  libvfio-user reports through its irq-state callback); a level still high then
  is signalled again. A new INTx eventfd unmasks too.
* MSI/MSI-X vectors the client masked (SET_IRQS MASK) are refused, so the model
  holds them until :meth:`~vfiouser.devices.port.DevicePort.routes_changed`; a
  vector with no eventfd yet (ENOENT) likewise.
"""

from __future__ import annotations

from vfiouser.devices.port import InterruptSink

from .bindings import IrqType

__all__ = ["Interrupts"]


class Interrupts(InterruptSink):
    """The interrupt sink of one session; ``context`` is its :class:`~.context.Context`."""

    def __init__(self, context) -> None:
        self.context = context
        # The context's interrupt lock: SET_IRQS holds it while its callbacks reach in here.
        self._lock = context.irq_lock
        self.level = False
        self.intx_masked = False
        self._masked = {IrqType.MSI: set(), IrqType.MSIX: set()}

    # -- InterruptSink (any thread) ---------------------------------------------------------------

    def intx(self, asserted: bool) -> None:
        with self._lock:
            self.level = asserted
            if asserted and not self.intx_masked and self.context.trigger(0):
                self.intx_masked = True

    def msi(self, vector: int) -> bool:
        return self._vector(IrqType.MSI, vector)

    def msix(self, vector: int) -> bool:
        return self._vector(IrqType.MSIX, vector)

    def _vector(self, index: IrqType, vector: int) -> bool:
        with self._lock:
            if vector in self._masked[index]:
                return False
        return self.context.trigger(vector)

    # -- from libvfio-user (the serving thread) ----------------------------------------------------

    def intx_unmasked(self) -> None:
        """The client unmasked INTx, or gave it a new eventfd: a level still high fires again."""
        with self._lock:
            self.intx_masked = False
            if self.level and self.context.trigger(0):
                self.intx_masked = True

    def vectors_masked(self, index: IrqType, start: int, count: int, masked: bool) -> None:
        """SET_IRQS MASK/UNMASK of MSI or MSI-X vectors."""
        with self._lock:
            vectors = range(start, start + count)
            if masked:
                self._masked[index].update(vectors)
            else:
                self._masked[index].difference_update(vectors)
