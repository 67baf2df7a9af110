"""Interrupt state of a session: eventfds per index and vector, and their rules.

DEVICE_SET_IRQS installs, fires, masks and unmasks the eventfds through which
the server signals interrupts to the client. Validation follows the rules of
the specification as libvfio-user enforces them (an error is ``EINVAL``):

* exactly one data type (NONE, BOOL, EVENTFD) and one action (MASK, UNMASK, TRIGGER);
* ``index`` below the number of interrupt indexes, and ``start + count`` within
  the index's vector count (``start < count`` when ``count > 0``);
* ``count == 0`` only with NONE|TRIGGER and ``start == 0``: it disables the index;
* ERR and REQ take TRIGGER only, one vector;
* fds only with EVENTFD, and then either one per vector or none (QEMU sends
  EVENTFD with no fds to mean "no eventfd for these vectors");
* BOOL carries ``count`` bytes after the 20-byte header; ``argsz`` covers them.

Semantics, as QEMU 11.1.3 uses them:

* EVENTFD|TRIGGER installs the fds for ``start..start+count-1`` and enables the
  index; NONE|TRIGGER with ``count > 0`` fires those vectors, BOOL|TRIGGER the
  ones whose byte is 1.
* INTx is level-triggered and *automasked*: when the device asserts it, the
  server signals the trigger eventfd and masks INTx until the client unmasks
  it (NONE|UNMASK after the guest's EOI, or a write to the *resample* eventfd
  installed with EVENTFD|UNMASK under KVM). On unmask, a line that is still
  asserted is signalled again.

:class:`IrqState` is also the session's
:class:`~vfiouser.devices.port.InterruptSink`: the device port tells it the
INTx level and hands it MSI/MSI-X vectors to signal.
"""

from __future__ import annotations

import logging
import os
import threading

from vfiouser.devices.port import InterruptSink

from .errors import BadIrqRequest
from .protocol import IrqIndex, IrqInfoFlags, IrqSetFlags

__all__ = ["IrqState", "NUM_IRQ_INDEXES"]

_log = logging.getLogger(__name__)

NUM_IRQ_INDEXES = 5
_ONE = (1).to_bytes(8, "little")


def _adopt(fd: int) -> int:
    """Make a client's fd non-blocking: the server never waits on a fd a client gave it
    (QEMU's eventfds are non-blocking already; a hostile client's pipe might not be)."""
    try:
        os.set_blocking(fd, False)
    except OSError:
        pass  # not a kind of fd that has the flag; writes fail instead of blocking then
    return fd


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class IrqState(InterruptSink):
    """Eventfds and masks of one session, for a device with ``counts[i]`` vectors at index ``i``.

    Thread-safe: the session thread changes it, device threads fire through it.
    ``watch(fd)`` / ``unwatch(fd)`` are called when a resample eventfd appears
    or goes away, so the server loop can poll it and call :meth:`resampled`.
    """

    def __init__(self, counts, *, watch=None, unwatch=None, log=None) -> None:
        self.counts = list(counts)
        self.fds: list[list[int | None]] = [[None] * n for n in self.counts]
        self.enabled = [False] * len(self.counts)
        self.masked: list[list[bool]] = [[False] * n for n in self.counts]
        self.resample_fd: int | None = None
        #: the device's effective INTx level, as the port last said
        self.intx_level = False
        self._watch = watch or (lambda fd: None)
        self._unwatch = unwatch or (lambda fd: None)
        self._lock = threading.RLock()
        self._failed_fds: set[int] = set()  # fds we already warned about
        self.log = log if log is not None else _log

    # -- GET_IRQ_INFO ------------------------------------------------------------

    def info(self, index: int) -> tuple[int, int]:
        """``(flags, count)`` for DEVICE_GET_IRQ_INFO."""
        if not 0 <= index < len(self.counts):
            raise BadIrqRequest(f"irq index {index} out of range (0-{len(self.counts) - 1})")
        flags = IrqInfoFlags.EVENTFD
        if index == IrqIndex.INTX:
            flags |= IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED
        elif index != IrqIndex.MSIX:
            flags |= IrqInfoFlags.NORESIZE
        return int(flags), self.counts[index]

    # -- DEVICE_SET_IRQS ---------------------------------------------------------

    def set_irqs(self, flags: int, index: int, start: int, count: int, data: bytes, fds: list[int]) -> None:
        """Apply one DEVICE_SET_IRQS. Takes the fds it keeps out of ``fds``; raises
        :class:`BadIrqRequest` (leaving ``fds`` for the caller to close) if invalid."""
        dtype = flags & IrqSetFlags.DATA_TYPE_MASK
        action = flags & IrqSetFlags.ACTION_TYPE_MASK
        if flags & ~int(IrqSetFlags.DATA_TYPE_MASK | IrqSetFlags.ACTION_TYPE_MASK):
            raise BadIrqRequest(f"unknown SET_IRQS flag bits {flags:#x}")
        if bin(dtype).count("1") != 1:
            raise BadIrqRequest(f"SET_IRQS needs exactly one data type, flags={flags:#x}")
        if bin(action).count("1") != 1:
            raise BadIrqRequest(f"SET_IRQS needs exactly one action, flags={flags:#x}")
        if not 0 <= index < len(self.counts):
            raise BadIrqRequest(f"irq index {index} out of range (0-{len(self.counts) - 1})")
        vectors = self.counts[index]
        if count == 0:
            if not (dtype == IrqSetFlags.DATA_NONE and action == IrqSetFlags.ACTION_TRIGGER) or start != 0:
                raise BadIrqRequest("count 0 is only valid with NONE|TRIGGER and start 0")
        elif start >= vectors or start + count > vectors:
            raise BadIrqRequest(f"vectors {start}..{start + count - 1} out of range for index {index} ({vectors})")
        if index in (IrqIndex.ERR, IrqIndex.REQ) and (action != IrqSetFlags.ACTION_TRIGGER or count > 1):
            raise BadIrqRequest(f"index {index} only takes TRIGGER of one vector")
        if dtype != IrqSetFlags.DATA_EVENTFD and fds:
            raise BadIrqRequest(f"{len(fds)} fd(s) sent without DATA_EVENTFD")
        if dtype == IrqSetFlags.DATA_EVENTFD and fds and len(fds) != count:
            raise BadIrqRequest(f"{len(fds)} fd(s) for {count} vector(s)")
        if dtype == IrqSetFlags.DATA_BOOL and len(data) != count:
            raise BadIrqRequest(f"DATA_BOOL needs {count} byte(s), got {len(data)}")
        if dtype != IrqSetFlags.DATA_BOOL and data:
            raise BadIrqRequest(f"{len(data)} unexpected data byte(s)")
        if index == IrqIndex.INTX and action == IrqSetFlags.ACTION_UNMASK and dtype == IrqSetFlags.DATA_EVENTFD:
            if count != 1:
                raise BadIrqRequest("the INTx resample eventfd is a single vector")

        with self._lock:
            if action == IrqSetFlags.ACTION_TRIGGER:
                self._trigger(dtype, index, start, count, data, fds)
            elif action == IrqSetFlags.ACTION_MASK:
                self._mask(dtype, index, start, count, data, True)
            else:
                self._unmask(dtype, index, start, count, data, fds)

    def _selected(self, dtype: int, start: int, count: int, data: bytes) -> list[int]:
        if dtype == IrqSetFlags.DATA_BOOL:
            return [start + i for i in range(count) if data[i]]
        return list(range(start, start + count))

    def _trigger(self, dtype, index, start, count, data, fds) -> None:
        if count == 0:
            self._disable(index)
            return
        if dtype == IrqSetFlags.DATA_EVENTFD:
            for i in range(count):
                vec = start + i
                self._forget(self.fds[index][vec])
                self.fds[index][vec] = _adopt(fds[i]) if fds else None
                self.masked[index][vec] = False
            if fds:
                fds.clear()
            self.enabled[index] = True
            self.log.debug("irq index %d vectors %d..%d: %s", index, start, start + count - 1,
                           "eventfds set" if self.fds[index][start] is not None else "no eventfd")
            if index == IrqIndex.INTX and self.intx_level:
                self._fire_intx()
            return
        for vec in self._selected(dtype, start, count, data):
            if index == IrqIndex.INTX:
                self._fire_intx()
            else:
                self._fire(index, vec)

    def _disable(self, index: int) -> None:
        for vec, fd in enumerate(self.fds[index]):
            self._forget(fd)
            self.fds[index][vec] = None
            self.masked[index][vec] = False
        self.enabled[index] = False
        if index == IrqIndex.INTX:
            self._drop_resample()
        self.log.debug("irq index %d disabled", index)

    def _mask(self, dtype, index, start, count, data, masked: bool) -> None:
        if dtype == IrqSetFlags.DATA_EVENTFD:
            raise BadIrqRequest("MASK takes no eventfd")
        for vec in self._selected(dtype, start, count, data):
            self.masked[index][vec] = masked

    def _unmask(self, dtype, index, start, count, data, fds) -> None:
        if dtype == IrqSetFlags.DATA_EVENTFD:
            if index != IrqIndex.INTX:
                raise BadIrqRequest("an unmask eventfd is only defined for INTx")
            self._drop_resample()
            if fds:
                fd = fds.pop(0)
                try:
                    self._watch(_adopt(fd))
                except (OSError, ValueError) as exc:
                    _close(fd)
                    raise BadIrqRequest(f"the INTx resample fd cannot be polled: {exc}") from None
                self.resample_fd = fd
            return
        for vec in self._selected(dtype, start, count, data):
            self.masked[index][vec] = False
            if index == IrqIndex.INTX and self.intx_level:
                self._fire_intx()

    def _drop_resample(self) -> None:
        if self.resample_fd is not None:
            self._unwatch(self.resample_fd)
            _close(self.resample_fd)
            self.resample_fd = None

    # -- firing ------------------------------------------------------------------

    def _fire(self, index: int, vec: int) -> bool:
        fd = self.fds[index][vec]
        if fd is None or not self.enabled[index] or self.masked[index][vec]:
            return False
        self._signal(fd)
        return True

    def _signal(self, fd: int) -> None:
        """Write the eventfd; never blocks. A write that cannot go (a full counter, a pipe
        nobody reads, a broken fd) loses this interrupt: the client's problem, logged once."""
        try:
            os.write(fd, _ONE)
        except OSError as exc:
            if fd not in self._failed_fds:
                self._failed_fds.add(fd)
                why = "it is full (the client does not read it)" if isinstance(exc, BlockingIOError) else exc
                self.log.warning("interrupt fd %d cannot be signalled: %s; its interrupts are lost", fd, why)

    def _forget(self, fd: int | None) -> None:
        if fd is not None:
            self._failed_fds.discard(fd)
            _close(fd)

    def _fire_intx(self) -> bool:
        if self._fire(IrqIndex.INTX, 0):
            self.masked[IrqIndex.INTX][0] = True  # automasked until the client unmasks
            return True
        return False

    def fire_vector(self, index: int, vector: int) -> bool:
        """Signal an MSI/MSI-X vector; False if it has no eventfd (or is disabled or masked)."""
        with self._lock:
            if not 0 <= vector < self.counts[index]:
                return False
            return self._fire(index, vector)

    # -- InterruptSink ------------------------------------------------------------

    def intx(self, asserted: bool) -> bool:
        """The device's effective INTx level changed. Returns whether the eventfd was signalled
        (not while INTx is masked, or without an eventfd: then the unmask signals it)."""
        with self._lock:
            self.intx_level = asserted
            return self._fire_intx() if asserted else False

    def msi(self, vector: int) -> bool:
        return self.fire_vector(IrqIndex.MSI, vector)

    def msix(self, vector: int) -> bool:
        return self.fire_vector(IrqIndex.MSIX, vector)

    def resampled(self) -> None:
        """The resample eventfd fired: the guest acknowledged INTx; unmask and re-assert if pending."""
        fd = self.resample_fd
        if fd is None:
            return
        try:
            data = os.read(fd, 8)
        except BlockingIOError:
            return  # nothing to read: a spurious wake-up
        except OSError as exc:
            data, why = b"", exc
        else:
            why = "end of file (its writer is gone)"
        if not data:  # a dead fd is readable for ever: drop it, or the loop would spin on it
            self.log.warning("the INTx resample fd %d is dead (%s); dropped, INTx is unmasked by message only",
                             fd, why)
            with self._lock:
                self._drop_resample()
            return
        with self._lock:
            self.masked[IrqIndex.INTX][0] = False
            if self.intx_level:
                self._fire_intx()

    # -- teardown ----------------------------------------------------------------

    def close(self) -> None:
        """Close every eventfd (the client is gone)."""
        with self._lock:
            for index in range(len(self.counts)):
                for vec, fd in enumerate(self.fds[index]):
                    self._forget(fd)
                    self.fds[index][vec] = None
                self.enabled[index] = False
            self._drop_resample()
