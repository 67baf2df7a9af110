"""What the server does for each client command: one handler per command.

A handler takes the received :class:`~vfiouser.transport.Frame` and returns the
reply payload (bytes, a list of buffers, or ``(payload, fds)``; ``None`` for an
empty reply). It raises a framework error (:class:`~vfiouser.errors.ProtocolError`,
:class:`~vfiouser.devices.errors.RegionAccessError`, ...) for a request it
refuses; the dispatcher answers with that error's ``errno``. A handler that
keeps an fd takes it out of ``frame.fds``; the dispatcher closes the rest.

``@handles(Command.X)`` binds a handler to its command and ``@require(...)``
(:mod:`vfiouser.state`) names the session states it may run in. The
dispatcher builds its table from these and the protocol's message registry.
Region accesses go to the device port, which checks them (bounds, rights);
the one check made here is the protocol's size limit, which the dispatcher's
fast path shares (:meth:`CommandHandlers.check_count`).
"""

from __future__ import annotations

import errno

from vfiouser.devices.port import ResetReason

from .errors import BadDmaRequest, BadRegionAccess, MalformedMessage, UnsupportedCommand
from .negotiation import negotiate
from .protocol import REGION_ACCESS, Command, DeviceFlags, DmaUnmapFlags, FeatureFlags, IrqIndex, Layout, command_name
from .state import SessionState, require

__all__ = ["CommandHandlers", "handles", "MAX_WRITE_MULTI"]

#: Most writes in one REGION_WRITE_MULTI (the specification's limit).
MAX_WRITE_MULTI = 200
#: Most bytes in one REGION_WRITE_MULTI write.
MULTI_WRITE_MAX_DATA = 8

_RUNNING = SessionState.RUNNING


def handles(command: Command):
    """Bind the decorated handler to ``command``."""

    def mark(fn):
        fn.command = command
        return fn

    return mark


def _fixed(frame, layout, *, argsz: bool = True) -> tuple:
    """Unpack the fixed part of a payload; check its length and ``argsz``."""
    payload = frame.payload
    if len(payload) < layout.size:
        raise MalformedMessage(f"{command_name(frame.cmd)} payload is {len(payload)} bytes, needs {layout.size}",
                               raw=bytes(payload))
    fields = layout.unpack_from(payload)
    if argsz and fields[0] < layout.size:
        raise MalformedMessage(f"{command_name(frame.cmd)} argsz {fields[0]} is smaller than {layout.size}",
                               raw=bytes(payload))
    return fields


def _no_fds(frame) -> None:
    if frame.fds:
        raise MalformedMessage(f"{command_name(frame.cmd)} carries {len(frame.fds)} unexpected fd(s)")


class CommandHandlers:
    """The handlers of one session, one method per command (see the module docstring)."""

    def __init__(self, session) -> None:
        self.session = session
        self.port = session.port
        self.regions = session.regions
        #: the largest region access served: the one limit both dispatch paths use
        self.max_xfer = session.caps.max_data_xfer_size

    def table(self) -> dict[int, object]:
        """``command -> bound handler`` for every method marked with :func:`handles`."""
        out = {}
        for name, member in vars(type(self)).items():
            command = getattr(member, "command", None)
            if command is not None:
                out[int(command)] = getattr(self, name)
        return out

    def check_count(self, count: int) -> None:
        """The protocol's limit on one region access (the port checks the region's bounds)."""
        if count > self.max_xfer:
            raise BadRegionAccess(f"{count} bytes exceeds max_data_xfer_size", errno=errno.E2BIG)

    # -- negotiation and device information ----------------------------------------------

    @handles(Command.VERSION)
    @require(SessionState.NEGOTIATING)
    def version(self, frame):
        client, reply, minor, omitted = negotiate(frame.payload, frame.fds, self.session.caps)
        if omitted:
            self.session.log.info("VERSION reply leaves out %s: the client reads the reply into its %d-byte "
                                  "request, as QEMU does", ", ".join(omitted), len(frame.payload) + 16)
        self.session.negotiated(client, minor)
        return reply

    @handles(Command.DEVICE_GET_INFO)
    @require(_RUNNING)
    def get_info(self, frame):
        _no_fds(frame)
        _fixed(frame, Layout.DEVICE_INFO)
        flags = int(DeviceFlags.PCI | DeviceFlags.RESET)
        return Layout.DEVICE_INFO.pack(Layout.DEVICE_INFO.size, flags, len(self.regions), len(self.port.irq_counts))

    @handles(Command.DEVICE_GET_REGION_INFO)
    @require(_RUNNING)
    def get_region_info(self, frame):
        _no_fds(frame)
        argsz, _, index, _, _, _ = _fixed(frame, Layout.REGION_INFO)
        if index >= len(self.regions):
            raise BadRegionAccess(f"region index {index} out of range ({len(self.regions)} regions)")
        info, fd = self.regions.reply(index, argsz)
        # The fd of an mmap-able region goes with its info; the model owns it, the transport only sends it.
        return (info, [fd]) if fd is not None else info

    @handles(Command.DEVICE_GET_REGION_IO_FDS)
    @require(_RUNNING)
    def get_region_io_fds(self, frame):
        _no_fds(frame)
        _, _, index, _ = _fixed(frame, Layout.IO_FDS)
        if index >= len(self.regions) or not self.regions.entries[index].size:
            raise BadRegionAccess(f"region index {index} does not exist")
        return Layout.IO_FDS.pack(Layout.IO_FDS.size, 0, index, 0)  # no ioeventfd offload: all accesses are messages

    @handles(Command.DEVICE_GET_IRQ_INFO)
    @require(_RUNNING)
    def get_irq_info(self, frame):
        _no_fds(frame)
        _, _, index, _ = _fixed(frame, Layout.IRQ_INFO)
        flags, count = self.session.irqs.info(index)
        return Layout.IRQ_INFO.pack(Layout.IRQ_INFO.size, flags, index, count)

    # -- interrupts ------------------------------------------------------------------------

    @handles(Command.DEVICE_SET_IRQS)
    @require(_RUNNING)
    def set_irqs(self, frame):
        argsz, flags, index, start, count = _fixed(frame, Layout.IRQ_SET)
        if argsz > len(frame.payload):
            raise MalformedMessage(f"DEVICE_SET_IRQS argsz {argsz} exceeds the {len(frame.payload)}-byte payload")
        data = bytes(frame.payload[Layout.IRQ_SET.size : argsz])
        self.session.irqs.set_irqs(flags, index, start, count, data, frame.fds)
        if index in (IrqIndex.MSI, IrqIndex.MSIX) and count:
            self.port.routes_changed()  # vectors held for lack of an eventfd may go now

    # -- region access (the full path; see Dispatcher for the fast one) ---------------------

    @handles(Command.REGION_READ)
    @require(_RUNNING)
    def region_read(self, frame):
        _no_fds(frame)
        if len(frame.payload) != REGION_ACCESS.size:
            raise MalformedMessage(f"REGION_READ payload is {len(frame.payload)} bytes, needs 16",
                                   raw=bytes(frame.payload))
        offset, region, count = REGION_ACCESS.unpack_from(frame.payload)
        self.check_count(count)
        out = bytearray(REGION_ACCESS.size + count)
        REGION_ACCESS.pack_into(out, 0, offset, region, count)
        self.port.region_read(region, offset, memoryview(out)[REGION_ACCESS.size :])
        return out

    @handles(Command.REGION_WRITE)
    @require(_RUNNING)
    def region_write(self, frame):
        _no_fds(frame)
        payload = frame.payload
        if len(payload) < REGION_ACCESS.size:
            raise MalformedMessage(f"REGION_WRITE payload is {len(payload)} bytes, needs 16+", raw=bytes(payload))
        offset, region, count = REGION_ACCESS.unpack_from(payload)
        if len(payload) - REGION_ACCESS.size != count:
            raise MalformedMessage(f"REGION_WRITE count {count} but {len(payload) - REGION_ACCESS.size} data bytes",
                                   raw=bytes(payload))
        self.check_count(count)
        self.port.region_write(region, offset, bytes(payload[REGION_ACCESS.size :]))
        return REGION_ACCESS.pack(offset, region, count)

    @handles(Command.REGION_WRITE_MULTI)
    @require(_RUNNING)
    def region_write_multi(self, frame):
        _no_fds(frame)
        (wr_cnt,) = _fixed(frame, Layout.WRITE_MULTI_COUNT, argsz=False)
        if not 0 < wr_cnt <= MAX_WRITE_MULTI:
            raise MalformedMessage(f"REGION_WRITE_MULTI wr_cnt {wr_cnt} not in 1..{MAX_WRITE_MULTI}")
        expected = Layout.WRITE_MULTI_COUNT.size + wr_cnt * Layout.WRITE_MULTI_ENTRY.size
        if len(frame.payload) != expected:
            raise MalformedMessage(f"REGION_WRITE_MULTI of {wr_cnt} writes is {len(frame.payload)} bytes, "
                                   f"not {expected}")
        writes = list(Layout.WRITE_MULTI_ENTRY.iter_unpack(frame.payload[Layout.WRITE_MULTI_COUNT.size :]))
        if any(not 0 < count <= MULTI_WRITE_MAX_DATA for _, _, count, _ in writes):
            raise MalformedMessage("REGION_WRITE_MULTI has a write of 0 or more than 8 bytes")
        # Each write is a posted bus write of its own: a refused one is dropped (and reported),
        # the others land, in order.
        failed = None
        for offset, region, count, data in writes:
            try:
                self.port.region_write(region, offset, data[:count])
            except Exception as exc:
                self.session.log.warning("REGION_WRITE_MULTI #%d: write of %d byte(s) to region %d at %#x "
                                         "dropped: %s", frame.msg_id, count, region, offset, exc)
                failed = failed or exc
        if failed is not None:
            raise failed
        return Layout.WRITE_MULTI_COUNT.pack(wr_cnt)

    # -- DMA maps --------------------------------------------------------------------------

    @handles(Command.DMA_MAP)
    @require(_RUNNING)
    def dma_map(self, frame):
        _, flags, offset, addr, size = _fixed(frame, Layout.DMA_MAP)
        if len(frame.fds) > 1:
            raise BadDmaRequest(f"DMA_MAP carries {len(frame.fds)} fds (at most 1)")
        fd = frame.fds.pop() if frame.fds else None
        self.session.dma_maps.add(addr, size, flags, fd, offset)

    @handles(Command.DMA_UNMAP)
    @require(_RUNNING)
    def dma_unmap(self, frame):
        _no_fds(frame)
        _, flags, addr, size = _fixed(frame, Layout.DMA_UNMAP)
        if flags & DmaUnmapFlags.GET_DIRTY_BITMAP:
            raise UnsupportedCommand("DMA_UNMAP with GET_DIRTY_BITMAP: dirty tracking is not supported")
        if flags & ~int(DmaUnmapFlags.ALL):
            raise BadDmaRequest(f"unknown DMA_UNMAP flag bits {flags:#x}")
        if flags & DmaUnmapFlags.ALL:
            if addr or size:
                raise BadDmaRequest("DMA_UNMAP ALL needs addr and size 0")
            self.session.dma_maps.remove_all()
        else:
            self.session.dma_maps.remove(addr, size)
        return bytes(frame.payload[: Layout.DMA_UNMAP.size])

    # -- reset, features, migration ---------------------------------------------------------

    @handles(Command.DEVICE_RESET)
    @require(_RUNNING)
    def reset(self, frame):
        _no_fds(frame)
        if len(frame.payload):
            raise MalformedMessage(f"DEVICE_RESET carries {len(frame.payload)} payload bytes",
                                   raw=bytes(frame.payload))
        self.session.log.info("device reset")
        self.port.reset(ResetReason.CLIENT_REQUEST)

    @handles(Command.DEVICE_FEATURE)
    @require(_RUNNING)
    def device_feature(self, frame):
        _no_fds(frame)
        _, flags = _fixed(frame, Layout.DEVICE_FEATURE)
        ops = flags & int(FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE)
        if not ops or flags & ~(int(FeatureFlags.MASK) | ops):
            raise MalformedMessage(f"DEVICE_FEATURE flags {flags:#x}: need GET, SET or PROBE")
        if (ops & FeatureFlags.GET) and (ops & FeatureFlags.SET):
            raise MalformedMessage("DEVICE_FEATURE cannot GET and SET at once")
        raise UnsupportedCommand(f"device feature {flags & FeatureFlags.MASK} is not supported")

    @handles(Command.MIG_DATA_READ)
    @require(_RUNNING)
    def mig_data_read(self, frame):
        raise UnsupportedCommand("migration data needs a migration state; live migration is not supported")

    @handles(Command.MIG_DATA_WRITE)
    @require(_RUNNING)
    def mig_data_write(self, frame):
        raise UnsupportedCommand("migration data needs a migration state; live migration is not supported")
