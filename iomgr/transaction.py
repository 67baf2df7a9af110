"""Transactions: change an IoManager while other threads dispatch through it.

:class:`IoManagerContext` is the interface (dbs-device's trait of the same
name): ``begin_tx()`` opens a transaction, ``register_device_io(ctx, ...)`` and
``unregister_device_io(ctx, ...)`` stage changes in it, ``commit_tx(ctx)``
publishes them and ``cancel_tx(ctx)`` drops them.

:class:`CowIoManager` implements it copy-on-write, like Dragonball's device
manager: ``begin_tx`` takes the writer lock and clones the current
:class:`~vfiouser.iomgr.manager.IoManager`, changes go to that clone, and ``commit_tx``
swaps it in with one reference assignment. A reader takes ``current`` once per
access and uses that snapshot, so it sees either the whole transaction or none
of it, never half a change.

>>> from vfiouser.iomgr import CowIoManager, DeviceIo, MmioAddressRange
>>> cow = CowIoManager()
>>> with cow.transaction() as tx:
...     cow.register_device_io(tx, DeviceIo(), [MmioAddressRange(0x1000, 0x10)])
...     cow.register_device_io(tx, DeviceIo(), [MmioAddressRange(0x2000, 0x10)])
>>> cow.current
IoManager(mmio[0x1000,+0x10), mmio[0x2000,+0x10))
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .device import DeviceIo
from .errors import TransactionError
from .manager import IoManager
from .resources import Resource

__all__ = ["IoManagerContext", "Transaction", "CowIoManager"]


class Transaction:
    """An open transaction: a private copy of the manager that changes are staged in."""

    __slots__ = ("_owner", "staged", "_open")

    def __init__(self, owner: CowIoManager, staged: IoManager) -> None:
        self._owner = owner
        self.staged = staged
        self._open = True

    def _check(self, owner: CowIoManager) -> None:
        if self._owner is not owner:
            raise TransactionError("transaction belongs to another manager")
        if not self._open:
            raise TransactionError("transaction already committed or cancelled")


class IoManagerContext:
    """Interface of a transactional IoManager (see the module docstring)."""

    def begin_tx(self) -> Transaction:
        """Start a transaction; it must end with :meth:`commit_tx` or :meth:`cancel_tx`."""
        raise NotImplementedError

    def commit_tx(self, ctx: Transaction) -> None:
        """Publish every change staged in ``ctx``."""
        raise NotImplementedError

    def cancel_tx(self, ctx: Transaction) -> None:
        """Drop every change staged in ``ctx``."""
        raise NotImplementedError

    def register_device_io(self, ctx: Transaction, device: DeviceIo, resources: Iterable[Resource]) -> None:
        """Stage a registration (see :meth:`IoManager.register_device_io`)."""
        raise NotImplementedError

    def unregister_device_io(self, ctx: Transaction, resources: Iterable[Resource]) -> None:
        """Stage an unregistration (see :meth:`IoManager.unregister_device_io`)."""
        raise NotImplementedError

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """``with mgr.transaction() as tx:`` commits on success, cancels on an exception."""
        tx = self.begin_tx()
        try:
            yield tx
        except BaseException:
            self.cancel_tx(tx)
            raise
        self.commit_tx(tx)


class CowIoManager(IoManagerContext):
    """A copy-on-write, transactional holder of an :class:`IoManager`.

    One writer at a time (``begin_tx`` blocks while another thread's
    transaction is open); readers never block. The dispatch methods forward to
    the current snapshot.
    """

    def __init__(self, initial: IoManager | None = None) -> None:
        #: The published snapshot (replaced whole by :meth:`commit_tx`, never changed in place).
        #: Take it once and use it for a whole access. A plain attribute: read on every access.
        self.current: IoManager = initial if initial is not None else IoManager()
        self._lock = threading.Lock()
        self._writer: int | None = None

    def begin_tx(self) -> Transaction:
        me = threading.get_ident()
        if self._writer == me:
            raise TransactionError("a transaction is already open in this thread")
        self._lock.acquire()
        self._writer = me
        return Transaction(self, self.current.clone())

    def _finish(self, ctx: Transaction) -> None:
        ctx._open = False
        self._writer = None
        self._lock.release()

    def commit_tx(self, ctx: Transaction) -> None:
        ctx._check(self)
        self.current = ctx.staged
        self._finish(ctx)

    def cancel_tx(self, ctx: Transaction) -> None:
        ctx._check(self)
        self._finish(ctx)

    def register_device_io(self, ctx: Transaction, device: DeviceIo, resources: Iterable[Resource]) -> None:
        ctx._check(self)
        ctx.staged.register_device_io(device, resources)

    def unregister_device_io(self, ctx: Transaction, resources: Iterable[Resource]) -> None:
        ctx._check(self)
        ctx.staged.unregister_device_io(resources)

    # Dispatch through the current snapshot.

    def mmio_read(self, addr: int, data: bytearray | memoryview) -> None:
        """:meth:`IoManager.mmio_read` on the current snapshot."""
        self.current.mmio_read(addr, data)

    def mmio_write(self, addr: int, data: bytes | memoryview) -> None:
        """:meth:`IoManager.mmio_write` on the current snapshot."""
        self.current.mmio_write(addr, data)

    def pio_read(self, addr: int, data: bytearray | memoryview) -> None:
        """:meth:`IoManager.pio_read` on the current snapshot."""
        self.current.pio_read(addr, data)

    def pio_write(self, addr: int, data: bytes | memoryview) -> None:
        """:meth:`IoManager.pio_write` on the current snapshot."""
        self.current.pio_write(addr, data)

    def __repr__(self) -> str:
        return f"CowIoManager({self.current!r})"
