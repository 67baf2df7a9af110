"""One libvfio-user context, set up from a device port: regions, interrupts, DMA, reset.

:class:`Context` creates the ``vfu_ctx_t`` (socket transport, non-blocking
attach), describes the port to it and installs one callback per concern:

=====================  ================================================================
libvfio-user calls     we do
=====================  ================================================================
region access          ``port.region_read/region_write`` for BAR0-5, the ROM and config
                       space (``VFU_REGION_FLAG_ALWAYS_CB``: our config-space model
                       answers every config access, libvfio-user's own is unused)
reset                  ``DEVICE``/``PCI_FLR``: ``port.reset(CLIENT_REQUEST)`` at once;
                       ``LOST_CONN``: noted, the server ends the session after the call
quiesce                stop touching guest memory and interrupt fds (see *Locks*)
DMA register           the range goes into :class:`~.memory.GuestMemory`'s table
DMA unregister         it leaves the table; transfers waiting on it fail
irq state              INTx unmask (re-assert a held level); MSI/MSI-X masks
log                    this module's logger (syslog levels mapped to logging's)
=====================  ================================================================

Every callback catches every exception: an exception cannot cross C, so a
model's failure becomes ``-1`` with the errno of a framework error (EIO for
anything else) and a log line, and libvfio-user answers the client with it.

**Locks.** libvfio-user is single-threaded: only the serving thread calls
``vfu_run_ctx``. Models fire interrupts and move guest memory from other
threads too (``vfu_irq_trigger``, ``vfu_addr_to_sgl``, ``vfu_sgl_read/write``),
and those read tables that ``vfu_run_ctx`` changes: the eventfds (SET_IRQS, a
lost client) and the DMA regions (DMA_MAP/DMA_UNMAP, a lost client). Two
locks keep them apart: :attr:`Context.irq_lock` around every trigger and every
message that changes the eventfds, :attr:`Context.memory_lock` around every
transfer and every message that changes the DMA regions. Neither is held while
a callback reaches into the model (which takes the device's lock), so no lock
order can invert; the quiesce callback takes both, except for DEVICE_RESET,
which changes neither table and whose callback does reach the model.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading

from vfiouser.devices.port import DevicePort, RegionKind, ResetReason

from ..errors import VfioUserError
from ..protocol import Command
from .bindings import (ATTACH_NB, DMA_CB, IRQ_STATE_CB, LOG_FN, PCI_HEADER_TYPE_NORMAL, QUIESCE_CB, REGION_ACCESS_CB,
                       RESET_CB, IoVec, IrqType, Library, PciRegion, PciType, RegionFlags, ResetType, Transport)

__all__ = ["Context", "MAX_DMA_REGIONS"]

log = logging.getLogger(__name__)

#: DMA regions a client may register (as many as our own engine keeps fd-backed maps).
MAX_DMA_REGIONS = 1024

#: syslog level -> logging level
_LEVELS = {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL, 3: logging.ERROR, 4: logging.WARNING,
           5: logging.INFO, 6: logging.INFO, 7: logging.DEBUG}
#: libvfio-user logs this at LOG_ERR when a vector has no eventfd yet; under the device port that
#: is normal (the vector is held until the client installs one), so it is logged at DEBUG.
_NO_FD_FOR_INTERRUPT = b"no fd for interrupt"


class Context:
    """A ``vfu_ctx_t`` listening on ``path`` and serving ``port`` (see the module docstring).

    ``events`` (the server) is told what the callbacks learn: ``client_lost()``,
    ``intx_unmasked()``, ``vectors_masked(index, start, count, masked)``, and the DMA
    table's ``dma_added(addr, size, vaddr, prot)`` / ``dma_removed(addr, size)``.
    """

    def __init__(self, port: DevicePort, path: str, events, *, library: Library | None = None) -> None:
        self.lib = library or Library.load()
        self.port = port
        self.events = events
        self.irq_lock = threading.RLock()
        self.memory_lock = threading.RLock()
        #: the command vfu_run_ctx is handling (the serving loop peeked it), or None
        self.running_cmd: int | None = None
        self._quiesce_held = 0
        self._keep: list = []  # ctypes callbacks and buffers C holds pointers to
        self.ctx = self.lib.vfu_create_ctx(Transport.SOCK, path.encode(), ATTACH_NB, None, 0)
        try:
            self._setup()
            self.lib.vfu_realize_ctx(self.ctx)
        except BaseException:
            self.lib.vfu_destroy_ctx(self.ctx)
            self.ctx = None
            raise

    def _keep_alive(self, obj):
        self._keep.append(obj)
        return obj

    # -- set-up ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        lib, ctx, port = self.lib, self.ctx, self.port
        level = 7 if log.isEnabledFor(logging.DEBUG) else 6
        lib.vfu_setup_log(ctx, self._keep_alive(LOG_FN(self._log)), level)
        regions = port.regions
        config = regions[PciRegion.CONFIG]
        pci_type = PciType.EXPRESS if config.size > 256 else PciType.CONVENTIONAL
        lib.vfu_pci_init(ctx, pci_type, PCI_HEADER_TYPE_NORMAL, 0)
        for region in regions[: PciRegion.VGA]:
            if region.size:
                self._setup_region(region)
        lib.vfu_setup_device_reset_cb(ctx, self._keep_alive(RESET_CB(self._reset)))
        lib.vfu_setup_device_quiesce_cb(ctx, self._keep_alive(QUIESCE_CB(self._quiesce)))
        lib.vfu_setup_device_dma(ctx, MAX_DMA_REGIONS, self._keep_alive(DMA_CB(self._dma_register)),
                                 self._keep_alive(DMA_CB(self._dma_unregister)))
        for index, count in enumerate(port.irq_counts):
            if count:
                lib.vfu_setup_device_nr_irqs(ctx, index, count)
        if port.irq_counts.intx:
            lib.vfu_setup_irq_state_callback(ctx, IrqType.INTX, self._keep_alive(IRQ_STATE_CB(self._irq_state_intx)))
        for index in (IrqType.MSI, IrqType.MSIX):
            if port.irq_counts[index]:
                callback = self._keep_alive(IRQ_STATE_CB(self._irq_state_callback(index)))
                lib.vfu_setup_irq_state_callback(ctx, index, callback)

    def _setup_region(self, region) -> None:
        flags = 0
        if region.readable:
            flags |= RegionFlags.READ
        if region.writable:
            flags |= RegionFlags.WRITE
        if region.index == PciRegion.CONFIG:
            flags = RegionFlags.RW | RegionFlags.ALWAYS_CB  # our config space answers every access
        elif region.kind in (RegionKind.MEMORY, RegionKind.ROM):
            flags |= RegionFlags.MEM
        areas, count, fd = None, 0, -1
        if region.mmap_areas and region.mmap_fd is not None:
            count = len(region.mmap_areas)
            areas = self._keep_alive((IoVec * count)(*(IoVec(offset, size) for offset, size in region.mmap_areas)))
            fd = region.mmap_fd
        callback = self._keep_alive(REGION_ACCESS_CB(self._region_callback(region.index)))
        self.lib.vfu_setup_region(self.ctx, region.index, region.size, callback, int(flags), areas, count, fd, 0)

    # -- callbacks ------------------------------------------------------------------------------

    def _region_callback(self, index: int):
        port, string_at, memmove = self.port, ctypes.string_at, ctypes.memmove
        read, write = port.region_read, port.region_write
        failed = self._failed

        def access(_ctx, buf, count, offset, is_write):
            try:
                if is_write:
                    write(index, offset, string_at(buf, count))
                else:
                    data = bytearray(count)
                    read(index, offset, data)
                    memmove(buf, bytes(data), count)
                return count
            except BaseException as exc:  # nothing may cross into C
                return failed(exc, f"{'write to' if is_write else 'read of'} region {index} at {offset:#x}+{count}")

        return access

    @staticmethod
    def _failed(exc: BaseException, what: str) -> int:
        """A framework error is answered with its errno; anything else is a bug in the model: EIO."""
        if isinstance(exc, VfioUserError):
            log.debug("%s refused: %s", what, exc)
            code = exc.errno
        else:
            log.error("%s failed in the device model", what, exc_info=exc)
            code = errno.EIO
        ctypes.set_errno(code)
        return -1

    def _reset(self, _ctx, kind) -> int:
        try:
            if kind == ResetType.LOST_CONN:
                self.events.client_lost()
            else:
                self.port.reset(ResetReason.CLIENT_REQUEST)
            return 0
        except BaseException as exc:
            return self._failed(exc, f"reset ({ResetType(kind).name})")

    def _quiesce(self, _ctx) -> int:
        # DEVICE_RESET changes no table and its callback reaches the model: no lock (see Locks).
        if self.running_cmd != Command.DEVICE_RESET:
            self.memory_lock.acquire()
            self.irq_lock.acquire()
            self._quiesce_held += 1
        return 0

    def unquiesce(self) -> None:
        """Release what the quiesce callback took (the serving loop, after ``vfu_run_ctx``)."""
        while self._quiesce_held:
            self._quiesce_held -= 1
            self.irq_lock.release()
            self.memory_lock.release()

    def _dma_register(self, _ctx, info) -> None:
        try:
            info = info.contents
            self.events.dma_added(info.iova.iov_base or 0, info.iova.iov_len, info.vaddr, info.prot)
        except BaseException:
            log.exception("DMA register callback failed")

    def _dma_unregister(self, _ctx, info) -> None:
        try:
            info = info.contents
            self.events.dma_removed(info.iova.iov_base or 0, info.iova.iov_len)
        except BaseException:
            log.exception("DMA unregister callback failed")

    def _irq_state_intx(self, _ctx, start, count, mask) -> None:
        try:
            if not mask:
                self.events.intx_unmasked()
        except BaseException:
            log.exception("INTx state callback failed")

    def _irq_state_callback(self, index: IrqType):
        def state(_ctx, start, count, mask) -> None:
            try:
                self.events.vectors_masked(index, start, count, bool(mask))
            except BaseException:
                log.exception("%s state callback failed", index.name)

        return state

    @staticmethod
    def _log(_ctx, level, msg) -> None:
        try:
            text = msg or b""
            py_level = logging.DEBUG if text.startswith(_NO_FD_FOR_INTERRUPT) else _LEVELS.get(level, logging.INFO)
            if log.isEnabledFor(py_level):
                log.log(py_level, "libvfio-user: %s", text.decode(errors="replace").rstrip())
        except BaseException:  # nothing may cross into C
            pass

    # -- calls from other threads ---------------------------------------------------------------

    def trigger(self, vector: int) -> bool:
        """``vfu_irq_trigger``: True if the vector's eventfd was signalled, False if it has none."""
        with self.irq_lock:
            if self.ctx is None:
                return False
            try:
                self.lib.vfu_irq_trigger(self.ctx, vector)
                return True
            except Exception as exc:  # ENOENT: no eventfd yet; others are logged by libvfio-user
                if getattr(exc, "errno", None) != errno.ENOENT:
                    log.debug("vfu_irq_trigger(%d): %s", vector, exc)
                return False

    def destroy(self) -> None:
        """``vfu_destroy_ctx`` (closes the socket and removes its path), with no transfer or trigger running."""
        with self.memory_lock, self.irq_lock:
            ctx, self.ctx = self.ctx, None
            if ctx is not None:
                self.lib.vfu_destroy_ctx(ctx)
        self._keep.clear()
