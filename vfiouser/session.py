"""A server session: one client connection, from VERSION to end of stream.

States: ``NEGOTIATING`` (only VERSION is accepted) -> ``RUNNING`` -> ``CLOSED``.

Each wake-up reads every complete message the socket holds, processes them
strictly in arrival order (a read after a posted write sees that write) and
sends the replies together, in as few ``sendmsg`` calls as the kernel's
IOV_MAX allows (a reply that carries fds starts a new one, so the fds arrive
with its first byte). A command flagged NO_REPLY never
gets a reply, not even an error one.

Bad input never ends the session: it is answered with an error reply whose
errno says what was wrong (see :mod:`vfiouser.errors`), logged, and the next
message is processed. The exceptions are the ones that leave nothing to talk
about: a header that cannot be framed and a failed VERSION exchange (error
reply, then the connection is closed). An exception raised by the device model
becomes an EIO error reply and a logged traceback.

Device DMA through messages (guest RAM without an fd) is a request of the
server's own: :meth:`Session.dma_read` / :meth:`Session.dma_write` send
DMA_READ/DMA_WRITE, chunked to the client's ``max_data_xfer_size``, and wait
for the reply, which the server loop routes back by message id. They must be
called from a device's worker thread, never from the loop (it is the only
reader of the socket); deferred work is released only after the loop has sent
the replies of the batch that deferred it, so QEMU is free to answer.

On end of stream the session closes every fd the client gave it, drops every
DMA mapping, fails DMA still waiting for the client and stops routing
interrupts; the device model and its state stay for the next client.
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import struct
import threading
from contextlib import closing
from dataclasses import dataclass, field

from vfiouser.devices.pci import RegionAccessError
from vfiouser.devices.pci.dma import DmaAborted, DmaBusMasterDisabled, DmaError, DmaUnavailable, DmaWouldDeadlock

from .dma import DmaMappings
from .endpoint import DeviceEndpoint
from .errors import (
    BadDmaRequest,
    BadIrqRequest,
    BadRegionAccess,
    ConnectionClosed,
    FramingError,
    MalformedMessage,
    MessageTooLarge,
    NegotiationError,
    ProtocolError,
    UnknownCommand,
    UnsupportedCommand,
)
from .irq import IrqState
from .protocol import (
    DMA_ACCESS,
    HEADER,
    HEADER_SIZE,
    Layout,
    REGION_ACCESS,
    REGION_INFO_SIZE,
    Command,
    DeviceFlags,
    DmaUnmapFlags,
    FeatureFlags,
    IrqIndex,
    MsgFlags,
    MsgType,
    RegionFlags,
    Version,
    build_region_caps,
    command_name,
    describe,
)
from .transport import Frame, Transport, close_fds

__all__ = ["Session", "SessionState", "ServerCapabilities", "ClientCapabilities", "MAX_WRITE_MULTI"]

log = logging.getLogger(__name__)

#: Most writes in one REGION_WRITE_MULTI (the specification's limit).
MAX_WRITE_MULTI = 200
#: Most bytes in one REGION_WRITE_MULTI write.
MULTI_WRITE_MAX_DATA = 8
#: Most bytes one DMA_READ asks for (see Session._dma_chunk): the reply (32 KiB + 32) fits in
#: one AF_UNIX socket buffer unit (about 36 KiB on Linux), which QEMU writes all or nothing.
DMA_READ_CHUNK = 32 * 1024


_REPLY = int(MsgType.REPLY)
_ERROR_REPLY = int(MsgType.REPLY | MsgFlags.ERROR)
_NO_REPLY = int(MsgFlags.NO_REPLY)
_TYPE_MASK = int(MsgFlags.TYPE_MASK)

# The hot path (the start of Session._dispatch): plain ints, and layouts derived from the protocol's.
_REGION_READ = int(Command.REGION_READ)
_REGION_WRITE = int(Command.REGION_WRITE)
_ACCESS_SIZE = HEADER_SIZE + REGION_ACCESS.size  # header + region access: 32 bytes
_ACCESS_UNPACK = REGION_ACCESS.unpack_from
#: a reply's header and region access in one pack
_REPLY_ACCESS = struct.Struct(HEADER.format + REGION_ACCESS.format.lstrip("<"))
#: a REGION_WRITE payload of 1, 2, 4 or 8 data bytes in one unpack (the data comes out as bytes)
_WRITE_PAYLOAD = {n: struct.Struct(f"{REGION_ACCESS.format}{n}s") for n in (1, 2, 4, 8)}


class SessionState(enum.Enum):
    """Where a session is in its life."""

    NEGOTIATING = "negotiating"
    RUNNING = "running"
    CLOSED = "closed"


# Module constants for the hot path: ``SessionState.RUNNING`` costs an enum lookup (~50 ns).
_RUNNING = SessionState.RUNNING
_CLOSED = SessionState.CLOSED


@dataclass
class ServerCapabilities:
    """What the server advertises in its VERSION reply."""

    max_msg_fds: int = 16
    max_data_xfer_size: int = 1 << 20
    pgsizes: int = 4096
    max_dma_maps: int = 65535
    write_multiple: bool = True

    def json_candidates(self) -> list[str]:
        """Compact JSON texts, most complete first; the reply uses the first that fits."""
        full = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": self.pgsizes,
            "max_dma_maps": self.max_dma_maps,
            "write_multiple": self.write_multiple,
        }
        order = ["max_dma_maps", "pgsizes", "write_multiple", "max_msg_fds", "max_data_xfer_size"]
        out = []
        caps = dict(full)
        out.append(json.dumps({"capabilities": caps}, separators=(",", ":")))
        for key in order:
            caps.pop(key)
            out.append(json.dumps({"capabilities": caps}, separators=(",", ":")))
        return out


@dataclass
class ClientCapabilities:
    """What the client announced in its VERSION request (defaults when absent)."""

    max_msg_fds: int = 1
    max_data_xfer_size: int = 1 << 20
    pgsizes: int = 4096
    max_dma_maps: int = 65535
    write_multiple: bool = False
    migration: dict = field(default_factory=dict)
    other: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str | None) -> ClientCapabilities:
        """Validate and read the JSON of a VERSION request; :class:`NegotiationError` if malformed."""
        caps = cls()
        if text is None:
            return caps
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise NegotiationError(f"VERSION JSON does not parse: {exc}") from None
        if not isinstance(doc, dict):
            raise NegotiationError("VERSION JSON is not an object")
        body = doc.get("capabilities", {})
        if not isinstance(body, dict):
            raise NegotiationError("VERSION 'capabilities' is not an object")

        def uint(key: str, low: int, high: int) -> None:
            if key in body:
                value = body[key]
                if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                    raise NegotiationError(f"VERSION capability {key}={value!r} is not an integer in [{low}, {high}]")
                setattr(caps, key, value)

        uint("max_msg_fds", 0, 1024)
        uint("max_data_xfer_size", 1, 1 << 32)
        uint("pgsizes", 1, (1 << 64) - 1)
        uint("max_dma_maps", 0, 1 << 32)
        if "write_multiple" in body:
            if not isinstance(body["write_multiple"], bool):
                raise NegotiationError("VERSION capability write_multiple is not a boolean")
            caps.write_multiple = body["write_multiple"]
        if "migration" in body:
            if not isinstance(body["migration"], dict):
                raise NegotiationError("VERSION capability migration is not an object")
            caps.migration = body["migration"]
        known = {"max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps", "write_multiple", "migration"}
        caps.other = {k: v for k, v in body.items() if k not in known}
        return caps


def _close_all(fds: list[int]) -> None:
    close_fds(fds)
    fds.clear()


class _Waiter:
    """A server request waiting for its reply."""

    __slots__ = ("cmd", "region", "event", "reply", "error")

    def __init__(self, cmd: int, region) -> None:
        self.cmd, self.region = cmd, region
        self.event = threading.Event()
        self.reply: bytes | None = None
        self.error: Exception | None = None

    def fail(self, error: Exception) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


class Session:
    """Serves one client connection for a :class:`DeviceEndpoint`.

    ``watch(fd, callback)`` / ``unwatch(fd)`` let the session ask the server
    loop to poll extra fds (the INTx resample eventfd).
    """

    def __init__(
        self,
        sock,
        endpoint: DeviceEndpoint,
        *,
        name: str = "session",
        caps: ServerCapabilities | None = None,
        tracer=None,
        watch=None,
        unwatch=None,
    ) -> None:
        self.name = name
        self.log = log.getChild(name)
        self.endpoint = endpoint
        self.model = endpoint.model
        self.caps = caps or ServerCapabilities()
        self.client_caps = ClientCapabilities()
        self.state = SessionState.NEGOTIATING
        # A client may send up to max_data_xfer_size of data, plus headers (WRITE_MULTI is smaller).
        self.transport = Transport(sock, max_msg_size=self.caps.max_data_xfer_size + 4096, name=name)
        self.tracer = tracer
        self._watch = watch or (lambda fd, cb: None)
        self._unwatch = unwatch or (lambda fd: None)
        self.irqs = IrqState(
            endpoint.irq_counts,
            watch=lambda fd: self._watch(fd, self.irqs.resampled),
            unwatch=lambda fd: self._unwatch(fd),
            intx_level=endpoint.intx_level,
        )
        self.irqs.log = self.log
        self.dma = DmaMappings(self.caps.max_dma_maps, on_remove=self._fail_region_waiters)
        #: seconds a device's DMA waits for the client's reply
        self.dma_timeout = 10.0
        self._req_lock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._next_req_id = 0
        self._loop_thread: int | None = None
        self._out: list = []
        self._verbose = self.log.isEnabledFor(logging.DEBUG)
        self._handlers = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._get_info,
            Command.DEVICE_GET_REGION_INFO: self._get_region_info,
            Command.DEVICE_GET_REGION_IO_FDS: self._get_region_io_fds,
            Command.DEVICE_GET_IRQ_INFO: self._get_irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.DEVICE_RESET: self._reset,
            Command.REGION_WRITE_MULTI: self._region_write_multi,
            Command.DEVICE_FEATURE: self._device_feature,
            Command.MIG_DATA_READ: self._migration,
            Command.MIG_DATA_WRITE: self._migration,
        }
        endpoint.connect(self)

    # -- event loop entry points ---------------------------------------------------

    def fileno(self) -> int:
        return self.transport.fileno()

    def on_readable(self) -> bool:
        """Process everything that arrived. Returns False when the session is over."""
        if self.state is _CLOSED:
            return False
        try:
            frames = self.transport.receive()
        except ConnectionClosed as exc:
            self.log.info("client disconnected (%s)", exc)
            self.state = _CLOSED
            return False
        except FramingError as exc:
            self._framing_failed(exc)
            return False
        self._loop_thread = threading.get_ident()
        worker = self.model.worker
        worker.hold()  # deferred work starts only once these requests are answered
        try:
            dispatch = self._dispatch
            for frame in frames:
                if self.state is _CLOSED:  # e.g. a failed VERSION: nothing after it runs
                    close_fds(frame.fds)
                    continue
                dispatch(frame)
            self._flush()
        except ConnectionClosed as exc:
            self.log.info("client disconnected while we replied (%s)", exc)
            self.state = _CLOSED
        finally:
            worker.release()
        if self.transport.framing_error is not None and self.state is not _CLOSED:
            self._framing_failed(self.transport.framing_error)
        return self.state is not _CLOSED

    def _framing_failed(self, exc: FramingError) -> None:
        """The stream cannot be framed any more: answer the bad header if we can, then hang up."""
        self.log.error("unframeable input, dropping the connection: %s", exc)
        if exc.raw and len(exc.raw) >= HEADER_SIZE:
            msg_id, cmd, _, flags, _ = HEADER.unpack_from(exc.raw)
            if flags & _TYPE_MASK == MsgType.COMMAND and not flags & _NO_REPLY:
                self._queue_error(msg_id, cmd, exc.errno)
        try:
            self._flush()
        except ConnectionClosed:
            pass
        self.state = SessionState.CLOSED

    # -- dispatch ------------------------------------------------------------------

    def _rejected(self, msg_id: int, cmd: int, flags: int, exc: Exception) -> None:
        """Log a failed command and queue its error reply (unless NO_REPLY). Call it from the
        ``except`` clause, so a model failure is logged with its traceback."""
        no_reply = flags & _NO_REPLY
        if isinstance(exc, ProtocolError):
            self.log.warning("%s #%d rejected (%s): %s", command_name(cmd), msg_id,
                             errno.errorcode.get(exc.errno, exc.errno), exc)
            if not no_reply:
                self._queue_error(msg_id, cmd, exc.errno)
            if isinstance(exc, NegotiationError):
                self.state = SessionState.CLOSED
        elif isinstance(exc, RegionAccessError):
            self.log.warning("%s #%d rejected: %s", command_name(cmd), msg_id, exc)
            if not no_reply:
                self._queue_error(msg_id, cmd, errno.EINVAL)
        else:
            self.log.exception("device model failed on %s #%d", command_name(cmd), msg_id)
            if not no_reply:
                self._queue_error(msg_id, cmd, errno.EIO)

    def _dispatch(self, frame: Frame) -> None:
        msg_id, cmd, msg_size, flags, error_no, payload, fds = frame
        # Fast path: a well-formed, in-bounds REGION_READ/REGION_WRITE without fds, in a RUNNING
        # session that neither traces nor logs messages: one unpack, the checks of _check_region,
        # one buffer per reply. Anything else goes on below, which checks it again.
        if ((cmd == _REGION_READ or cmd == _REGION_WRITE) and not fds and (flags == 0 or flags == _NO_REPLY)
                and self.state is _RUNNING and self.tracer is None and not self._verbose):
            sizes = self.endpoint.region_sizes
            if cmd == _REGION_READ:
                if msg_size == _ACCESS_SIZE:
                    offset, region, count = _ACCESS_UNPACK(payload)
                    if region < len(sizes) and 0 < count <= self.caps.max_data_xfer_size \
                            and offset + count <= sizes[region]:
                        reply = bytearray(_ACCESS_SIZE + count)
                        _REPLY_ACCESS.pack_into(reply, 0, msg_id, cmd, _ACCESS_SIZE + count, _REPLY, 0,
                                                offset, region, count)
                        try:
                            self.model.region_read(region, offset, memoryview(reply)[_ACCESS_SIZE:])
                        except Exception as exc:
                            self._rejected(msg_id, cmd, flags, exc)
                            return
                        if not flags:
                            self._out.append(reply)
                        return
            else:
                layout = _WRITE_PAYLOAD.get(msg_size - _ACCESS_SIZE)
                if layout is not None:
                    offset, region, count, data = layout.unpack(payload)
                    if (count == msg_size - _ACCESS_SIZE and region < len(sizes)
                            and count <= self.caps.max_data_xfer_size and offset + count <= sizes[region]
                            and self.endpoint.region_writable[region]):
                        try:
                            self.model.region_write(region, offset, data)
                        except Exception as exc:
                            self._rejected(msg_id, cmd, flags, exc)
                            return
                        if not flags:
                            self._out.append(_REPLY_ACCESS.pack(msg_id, cmd, _ACCESS_SIZE, _REPLY, 0,
                                                                offset, region, count))
                        return
        if self.tracer is not None and payload is not None:
            self._trace("in", HEADER.pack(msg_id, cmd, msg_size, flags, error_no) + bytes(payload), len(fds))
        if self._verbose:
            self.log.debug("<<< %s", describe(cmd, flags, payload if payload is not None else b"",
                                              msg_id=msg_id, nfds=len(fds)))
        mtype = flags & _TYPE_MASK
        if mtype == MsgType.REPLY:
            self._route_reply(msg_id, cmd, flags, error_no, payload, fds)
            return
        no_reply = flags & _NO_REPLY
        try:
            if mtype != MsgType.COMMAND:
                raise MalformedMessage(f"unknown message type {mtype} in flags {flags:#x}")
            if payload is None:
                raise MessageTooLarge(f"{msg_size}-byte message exceeds the {self.transport.max_msg_size}-byte limit")
            if self.state is not SessionState.RUNNING and cmd != Command.VERSION:
                raise NegotiationError(f"{command_name(cmd)} before VERSION", raw=bytes(payload[:64]))
            handler = self._handlers.get(cmd)
            if handler is None:
                if cmd in (Command.DMA_READ, Command.DMA_WRITE):
                    raise MalformedMessage(f"{command_name(cmd)} is a server-to-client command")
                raise UnknownCommand(f"unknown command {cmd}")
            reply = handler(msg_id, flags, payload, fds)
        except Exception as exc:
            self._rejected(msg_id, cmd, flags, exc)
            return
        finally:
            if fds:
                self.log.debug("closing %d fd(s) %s #%d did not use", len(fds), command_name(cmd), msg_id)
                _close_all(fds)
        if not no_reply:
            parts, reply_fds = reply if isinstance(reply, tuple) else (reply, ())
            self._queue_reply(msg_id, cmd, parts, reply_fds)

    # -- replies -------------------------------------------------------------------

    def _queue_reply(self, msg_id: int, cmd: int, parts, fds=()) -> None:
        if parts is None:
            parts = []
        elif not isinstance(parts, list):
            parts = [parts]
        size = HEADER_SIZE + sum(len(p) for p in parts)
        header = HEADER.pack(msg_id, cmd, size, _REPLY, 0)
        if self._verbose or self.tracer is not None:
            payload = b"".join(bytes(p) for p in parts)
            if self._verbose:
                self.log.debug(">>> %s", describe(cmd, _REPLY, payload, msg_id=msg_id, nfds=len(fds)))
            if self.tracer is not None:
                self._trace("out", header + payload, len(fds))
        if fds:
            self._flush()
            self.transport.send([header, *parts], fds)
        else:
            self._out.append(header)
            self._out.extend(parts)

    def _queue_error(self, msg_id: int, cmd: int, err: int) -> None:
        header = HEADER.pack(msg_id, cmd, HEADER_SIZE, _ERROR_REPLY, err)
        if self._verbose:
            self.log.debug(">>> %s #%d reply ERROR %s", command_name(cmd), msg_id, errno.errorcode.get(err, err))
        if self.tracer is not None:
            self._trace("out", header, 0)
        self._out.append(header)

    def _trace(self, direction: str, msg: bytes, nfds: int) -> None:
        try:
            self.tracer.record(direction, msg, nfds)
        except Exception as exc:  # a full disk must not take the device down
            self.log.error("message trace failed (%s); tracing stops", exc)
            self.tracer = None

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self.transport.send(out)

    # -- helpers ---------------------------------------------------------------------

    @staticmethod
    def _fixed(payload, layout, name: str, *, argsz: bool = True) -> tuple:
        """Unpack the fixed part of a payload; check its length and ``argsz``."""
        if len(payload) < layout.size:
            raise MalformedMessage(f"{name} payload is {len(payload)} bytes, needs {layout.size}", raw=bytes(payload))
        fields = layout.unpack_from(payload)
        if argsz and fields[0] < layout.size:
            raise MalformedMessage(f"{name} argsz {fields[0]} is smaller than {layout.size}", raw=bytes(payload))
        return fields

    @staticmethod
    def _no_fds(fds: list[int], name: str) -> None:
        if fds:
            raise MalformedMessage(f"{name} carries {len(fds)} unexpected fd(s)")

    def _check_region(self, region: int, offset: int, count: int, name: str, write: bool) -> None:
        sizes = self.endpoint.region_sizes
        if region >= len(sizes):
            raise BadRegionAccess(f"{name}: region {region} does not exist ({len(sizes)} regions)")
        if count == 0:
            raise BadRegionAccess(f"{name}: zero-byte access")
        if count > self.caps.max_data_xfer_size:
            raise BadRegionAccess(f"{name}: {count} bytes exceeds max_data_xfer_size", errno=errno.E2BIG)
        size = sizes[region]
        if offset + count > size:
            raise BadRegionAccess(f"{name}: [{offset:#x}, +{count:#x}) outside region {region} ({size:#x} bytes)")
        if write and not self.endpoint.region_writable[region]:
            raise BadRegionAccess(f"{name}: region {region} is read-only", errno=errno.EACCES)

    # -- VERSION ---------------------------------------------------------------------

    def _version(self, msg_id, flags, payload, fds):
        if self.state is not SessionState.NEGOTIATING:
            raise MalformedMessage("VERSION was already negotiated")
        if fds:
            raise NegotiationError(f"VERSION carries {len(fds)} fd(s)")
        if len(payload) < 4:
            raise NegotiationError(f"VERSION payload is {len(payload)} bytes, needs 4", raw=bytes(payload))
        try:
            req = Version.parse(bytes(payload))
        except Exception as exc:
            raise NegotiationError(f"VERSION does not parse: {exc}", raw=bytes(payload)) from None
        if req.major != 0:
            raise NegotiationError(f"protocol major version {req.major} is not supported (only 0)")
        self.client_caps = ClientCapabilities.from_json(req.json)
        if self.client_caps.other:
            self.log.debug("ignoring unknown client capabilities %s", sorted(self.client_caps.other))
        limit = HEADER_SIZE + len(payload)  # QEMU reads the reply into its request buffer
        reply = Version.build(dict(major=0, minor=0, json=None))
        for text in self.caps.json_candidates():
            candidate = Version.build(dict(major=0, minor=0, json=text))
            if HEADER_SIZE + len(candidate) <= limit:
                reply = candidate
                break
        self.state = SessionState.RUNNING
        self.log.info("negotiated protocol 0.%d with client capabilities %s", req.minor,
                      json.dumps(json.loads(req.json)) if req.json else "{}")
        return reply

    # -- device information ------------------------------------------------------------

    def _get_info(self, msg_id, flags, payload, fds):
        self._no_fds(fds, "DEVICE_GET_INFO")
        self._fixed(payload, Layout.DEVICE_INFO, "DEVICE_GET_INFO")
        dev_flags = int(DeviceFlags.PCI | DeviceFlags.RESET)
        return Layout.DEVICE_INFO.pack(Layout.DEVICE_INFO.size, dev_flags, self.endpoint.num_regions, self.endpoint.num_irqs)

    def _get_region_info(self, msg_id, flags, payload, fds):
        self._no_fds(fds, "DEVICE_GET_REGION_INFO")
        argsz, _, index, _, _, _ = self._fixed(payload, Layout.REGION_INFO, "DEVICE_GET_REGION_INFO")
        if index >= self.endpoint.num_regions:
            raise BadRegionAccess(f"region index {index} out of range ({self.endpoint.num_regions} regions)")
        region = self.endpoint.regions[index]
        caps_blob, cap_offset = build_region_caps(self.endpoint.region_caps[index])
        needed = REGION_INFO_SIZE + len(caps_blob)
        flags = region.flags | (RegionFlags.CAPS if caps_blob else 0)
        if argsz < needed:
            # Too small for the capabilities: say how much is needed, send none and no fd (the client re-asks).
            return Layout.REGION_INFO.pack(needed, region.flags & ~RegionFlags.MMAP, index, 0, region.size, 0)
        info = Layout.REGION_INFO.pack(needed, flags, index, cap_offset, region.size, 0) + caps_blob
        fd = self.endpoint.region_fds[index]
        # An mmap-able region: its memory's fd goes with the reply (offset 0 of the fd is offset 0
        # of the region); the transport sends it and keeps it open, the model owns it.
        return (info, [fd]) if fd is not None else info

    def _get_region_io_fds(self, msg_id, flags, payload, fds):
        self._no_fds(fds, "DEVICE_GET_REGION_IO_FDS")
        argsz, _, index, _ = self._fixed(payload, Layout.IO_FDS, "DEVICE_GET_REGION_IO_FDS")
        if index >= self.endpoint.num_regions or not self.endpoint.region_sizes[index]:
            raise BadRegionAccess(f"region index {index} does not exist")
        # No ioeventfd/ioregionfd offload: every access comes as a message.
        return Layout.IO_FDS.pack(Layout.IO_FDS.size, 0, index, 0)

    def _get_irq_info(self, msg_id, flags, payload, fds):
        self._no_fds(fds, "DEVICE_GET_IRQ_INFO")
        _, _, index, _ = self._fixed(payload, Layout.IRQ_INFO, "DEVICE_GET_IRQ_INFO")
        info_flags, count = self.irqs.info(index)
        return Layout.IRQ_INFO.pack(Layout.IRQ_INFO.size, info_flags, index, count)

    # -- interrupts ----------------------------------------------------------------------

    def _set_irqs(self, msg_id, flags, payload, fds):
        argsz, irq_flags, index, start, count = self._fixed(payload, Layout.IRQ_SET, "DEVICE_SET_IRQS")
        if argsz > len(payload):
            raise BadIrqRequest(f"DEVICE_SET_IRQS argsz {argsz} exceeds the {len(payload)}-byte payload")
        data = bytes(payload[Layout.IRQ_SET.size : argsz])
        self.irqs.set_irqs(irq_flags, index, start, count, data, fds)
        if index in (IrqIndex.MSI, IrqIndex.MSIX) and count:
            self.model.retry_interrupts()  # vectors held for lack of an eventfd may go now

    # -- region access -------------------------------------------------------------------

    def _region_read(self, msg_id, flags, payload, fds):
        self._no_fds(fds, "REGION_READ")
        if len(payload) != REGION_ACCESS.size:
            raise MalformedMessage(f"REGION_READ payload is {len(payload)} bytes, needs 16", raw=bytes(payload))
        offset, region, count = REGION_ACCESS.unpack_from(payload)
        self._check_region(region, offset, count, "REGION_READ", False)
        out = bytearray(REGION_ACCESS.size + count)
        REGION_ACCESS.pack_into(out, 0, offset, region, count)
        self.model.region_read(region, offset, memoryview(out)[REGION_ACCESS.size :])
        return out

    def _region_write(self, msg_id, flags, payload, fds):
        self._no_fds(fds, "REGION_WRITE")
        if len(payload) < REGION_ACCESS.size:
            raise MalformedMessage(f"REGION_WRITE payload is {len(payload)} bytes, needs 16+", raw=bytes(payload))
        offset, region, count = REGION_ACCESS.unpack_from(payload)
        if len(payload) - REGION_ACCESS.size != count:
            raise MalformedMessage(
                f"REGION_WRITE count {count} but {len(payload) - REGION_ACCESS.size} data bytes", raw=bytes(payload)
            )
        self._check_region(region, offset, count, "REGION_WRITE", True)
        self.model.region_write(region, offset, bytes(payload[REGION_ACCESS.size :]))
        return REGION_ACCESS.pack(offset, region, count)

    def _region_write_multi(self, msg_id, flags, payload, fds):
        self._no_fds(fds, "REGION_WRITE_MULTI")
        (wr_cnt,) = self._fixed(payload, Layout.WRITE_MULTI_COUNT, "REGION_WRITE_MULTI", argsz=False)
        if not 0 < wr_cnt <= MAX_WRITE_MULTI:
            raise MalformedMessage(f"REGION_WRITE_MULTI wr_cnt {wr_cnt} not in 1..{MAX_WRITE_MULTI}")
        expected = Layout.WRITE_MULTI_COUNT.size + wr_cnt * Layout.WRITE_MULTI_ENTRY.size
        if len(payload) != expected:
            raise MalformedMessage(f"REGION_WRITE_MULTI of {wr_cnt} writes is {len(payload)} bytes, not {expected}")
        writes = list(Layout.WRITE_MULTI_ENTRY.iter_unpack(payload[Layout.WRITE_MULTI_COUNT.size :]))
        for offset, region, count, _ in writes:  # all or nothing: check every write first
            if count > MULTI_WRITE_MAX_DATA:
                raise MalformedMessage(f"REGION_WRITE_MULTI write of {count} bytes (max 8)")
            self._check_region(region, offset, count, "REGION_WRITE_MULTI", True)
        for offset, region, count, data in writes:
            self.model.region_write(region, offset, data[:count])
        return Layout.WRITE_MULTI_COUNT.pack(wr_cnt)

    # -- DMA -----------------------------------------------------------------------------

    def _dma_map(self, msg_id, flags, payload, fds):
        _, map_flags, offset, addr, size = self._fixed(payload, Layout.DMA_MAP, "DMA_MAP")
        if len(fds) > 1:
            raise BadDmaRequest(f"DMA_MAP carries {len(fds)} fds (at most 1)")
        fd = fds.pop() if fds else None
        self.dma.add(addr, size, map_flags, fd, offset)

    def _dma_unmap(self, msg_id, flags, payload, fds):
        self._no_fds(fds, "DMA_UNMAP")
        _, unmap_flags, addr, size = self._fixed(payload, Layout.DMA_UNMAP, "DMA_UNMAP")
        if unmap_flags & DmaUnmapFlags.GET_DIRTY_BITMAP:
            raise UnsupportedCommand("DMA_UNMAP with GET_DIRTY_BITMAP: dirty tracking is not supported")
        if unmap_flags & ~int(DmaUnmapFlags.ALL):
            raise BadDmaRequest(f"unknown DMA_UNMAP flag bits {unmap_flags:#x}")
        if unmap_flags & DmaUnmapFlags.ALL:
            if addr or size:
                raise BadDmaRequest("DMA_UNMAP ALL needs addr and size 0")
            self.dma.remove_all()
        else:
            self.dma.remove(addr, size)
        return bytes(payload[: Layout.DMA_UNMAP.size])

    # -- reset, features, migration ------------------------------------------------------------

    def _reset(self, msg_id, flags, payload, fds):
        self._no_fds(fds, "DEVICE_RESET")
        if len(payload):
            raise MalformedMessage(f"DEVICE_RESET carries {len(payload)} payload bytes", raw=bytes(payload))
        self.log.info("device reset")
        self.model.device_reset()

    def _device_feature(self, msg_id, flags, payload, fds):
        self._no_fds(fds, "DEVICE_FEATURE")
        _, feature_flags = self._fixed(payload, Layout.DEVICE_FEATURE, "DEVICE_FEATURE")
        ops = feature_flags & int(FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE)
        if not ops or feature_flags & ~(int(FeatureFlags.MASK) | ops):
            raise MalformedMessage(f"DEVICE_FEATURE flags {feature_flags:#x}: need GET, SET or PROBE")
        if (ops & FeatureFlags.GET) and (ops & FeatureFlags.SET):
            raise MalformedMessage("DEVICE_FEATURE cannot GET and SET at once")
        raise UnsupportedCommand(f"device feature {feature_flags & FeatureFlags.MASK} is not supported")

    def _migration(self, msg_id, flags, payload, fds):
        raise UnsupportedCommand("migration data needs a migration state; live migration is not supported")

    # -- requests of our own (device DMA in message mode) ---------------------------------

    def _route_reply(self, msg_id, cmd, flags, error_no, payload, fds) -> None:
        with self._req_lock:
            waiter = self._pending.pop(msg_id, None)
        if waiter is None:
            self.log.warning("unexpected reply %s #%d (no request of ours is waiting); dropped",
                             command_name(cmd), msg_id)
            _close_all(fds)
            return
        if fds:
            _close_all(fds)
            waiter.fail(DmaAborted(f"{command_name(cmd)} reply carried fds"))
        elif cmd != waiter.cmd:
            waiter.fail(DmaAborted(f"reply #{msg_id} is for {command_name(cmd)}, not {command_name(waiter.cmd)}"))
        elif flags & MsgFlags.ERROR:
            name = errno.errorcode.get(error_no, str(error_no))
            waiter.fail(DmaAborted(f"client answered {command_name(cmd)} with {name}"))
        elif payload is None:
            waiter.fail(DmaAborted(f"{command_name(cmd)} reply too large"))
        else:
            waiter.reply = bytes(payload)
            waiter.event.set()

    def _request(self, cmd: int, payload: bytes, region) -> bytes:
        """Send a request to the client and wait for the reply's payload (worker threads only)."""
        waiter = _Waiter(cmd, region)
        with self._req_lock:
            if self.state is SessionState.CLOSED:
                raise DmaUnavailable("the client disconnected")
            if region.dead:
                raise DmaAborted("the DMA range was unmapped")
            msg_id = self._next_req_id
            while msg_id in self._pending:
                msg_id = (msg_id + 1) & 0xFFFF
            self._next_req_id = (msg_id + 1) & 0xFFFF
            self._pending[msg_id] = waiter
            region.waiters.add(waiter)
        try:
            header = HEADER.pack(msg_id, cmd, HEADER_SIZE + len(payload), MsgType.COMMAND, 0)
            if self._verbose:
                self.log.debug(">>> %s", describe(cmd, 0, payload, msg_id=msg_id))
            if self.tracer is not None:
                self._trace("out", header + payload, 0)
            try:
                self.transport.send([header, payload])
            except ConnectionClosed as exc:
                raise DmaUnavailable(f"the client disconnected ({exc})") from None
            if not waiter.event.wait(self.dma_timeout):
                raise DmaAborted(f"no reply to {command_name(cmd)} #{msg_id} within {self.dma_timeout:g}s")
            if waiter.error is not None:
                raise waiter.error
            return waiter.reply
        finally:
            with self._req_lock:
                if self._pending.get(msg_id) is waiter:
                    del self._pending[msg_id]
                region.waiters.discard(waiter)

    def _fail_region_waiters(self, region) -> None:
        with self._req_lock:
            waiters = list(region.waiters)
        for waiter in waiters:
            waiter.fail(DmaAborted(f"DMA range [{region.addr:#x}, +{region.size:#x}) was unmapped during the transfer"))

    def _dma_chunk(self, cmd: int) -> int:
        chunk = min(self.client_caps.max_data_xfer_size, self.caps.max_data_xfer_size)
        if cmd == Command.DMA_READ:
            # QEMU 11.1.3 sends a reply with one writev and treats a partial write as complete.
            # Linux splits an AF_UNIX stream write into buffers of about 36 KiB, and a writev
            # that needs more than one can stop between them when the socket is full (QEMU's
            # posted writes we have not read yet fill it): the reply arrives truncated, the data
            # silently wrong, and the stream is lost. A reply that fits one buffer goes whole or
            # not at all (EAGAIN, and QEMU queues it).
            chunk = min(chunk, DMA_READ_CHUNK)
        return max(1, chunk)

    def _check_dma_thread(self, addr: int, size: int) -> None:
        if threading.get_ident() == self._loop_thread:
            raise DmaWouldDeadlock("DMA from the server loop (a request handler); defer it", addr, size)

    def _check_bus_master(self, addr: int, size: int) -> None:
        if not self.model.bus_master_enabled():
            raise DmaBusMasterDisabled("bus mastering was turned off during the transfer", addr, size)

    def _pieces(self, addr: int, size: int, write: bool):
        """Check the whole range is mapped with the right rights, then yield ``(region, offset,
        length)`` one piece at a time, each pinned only while it is in use. An unmap never waits
        for a piece that is not being copied, and fails the message a piece is waiting for."""
        self.dma.release(self.dma.acquire(addr, size, write))  # all or nothing, before any byte moves
        pos, end = addr, addr + size
        while pos < end:
            try:
                pinned = self.dma.acquire(pos, 1, write)
            except DmaError as exc:
                raise DmaAborted(f"guest memory at {pos:#x} was unmapped during the transfer", addr, size) from exc
            region = pinned[0][0]
            length = min(end, region.end) - pos
            try:
                yield region, pos - region.addr, length
            finally:
                self.dma.release(pinned)
            pos += length

    def _check_open(self, addr: int, size: int) -> None:
        if self.state is SessionState.CLOSED:
            raise DmaUnavailable("the client disconnected", addr, size)

    def dma_mapped(self, addr: int, size: int, write: bool) -> list[tuple[int, int]]:
        """The parts of ``[addr, addr+size)`` mapped with the right permission, as ``(addr, size)``."""
        self._check_open(addr, size)
        return self.dma.reachable(addr, size, write)

    def dma_read(self, addr: int, size: int) -> bytes:
        """Read guest memory for the device: in place if mmapped, else with DMA_READ messages."""
        self._check_dma_thread(addr, size)
        self._check_open(addr, size)
        out = bytearray()
        with closing(self._pieces(addr, size, write=False)) as pieces:
            self._read_pieces(pieces, addr, size, out)
        return bytes(out)

    def _read_pieces(self, pieces, addr: int, size: int, out: bytearray) -> None:
        for region, offset, length in pieces:
            self._check_bus_master(addr, size)
            if region.mem is not None:
                try:
                    out += region.mem[offset : offset + length]
                except (TypeError, ValueError) as exc:  # released under us after UNMAP_WAIT
                    raise DmaAborted(f"guest memory at {region.addr + offset:#x} went away: {exc}", addr, size)
                continue
            chunk = self._dma_chunk(Command.DMA_READ)
            for pos in range(0, length, chunk):
                self._check_bus_master(addr, size)
                n = min(chunk, length - pos)
                where = region.addr + offset + pos
                reply = self._request(Command.DMA_READ, DMA_ACCESS.pack(where, n), region)
                if len(reply) != DMA_ACCESS.size + n or DMA_ACCESS.unpack_from(reply) != (where, n):
                    raise DmaAborted(f"DMA_READ reply does not match the request ({len(reply)} bytes)", where, n)
                out += reply[DMA_ACCESS.size :]

    def dma_write(self, addr: int, data: bytes) -> None:
        """Write guest memory for the device: in place if mmapped, else with DMA_WRITE messages."""
        self._check_dma_thread(addr, len(data))
        self._check_open(addr, len(data))
        with closing(self._pieces(addr, len(data), write=True)) as pieces:
            self._write_pieces(pieces, addr, data)

    def _write_pieces(self, pieces, addr: int, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        for region, offset, length in pieces:
            self._check_bus_master(addr, len(data))
            part = view[pos : pos + length]
            pos += length
            if region.mem is not None:
                try:
                    region.mem[offset : offset + length] = part
                except (TypeError, ValueError) as exc:  # released under us after UNMAP_WAIT
                    raise DmaAborted(f"guest memory at {region.addr + offset:#x} went away: {exc}", addr,
                                     len(data))
                continue
            chunk = self._dma_chunk(Command.DMA_WRITE)
            for sub in range(0, length, chunk):
                self._check_bus_master(addr, len(data))
                n = min(chunk, length - sub)
                where = region.addr + offset + sub
                reply = self._request(Command.DMA_WRITE, DMA_ACCESS.pack(where, n) + part[sub : sub + n], region)
                # QEMU 11.1.3 echoes (addr, count); older clients reply with the header only.
                if reply and (len(reply) != DMA_ACCESS.size or DMA_ACCESS.unpack_from(reply) != (where, n)):
                    raise DmaAborted("DMA_WRITE reply does not match the request", where, n)

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Release everything the client gave us: eventfds, DMA mappings, the socket;
        fail the DMA still waiting for a reply."""
        with self._req_lock:
            self.state = SessionState.CLOSED
            waiters, self._pending = list(self._pending.values()), {}
        for waiter in waiters:
            waiter.fail(DmaUnavailable("the client disconnected"))
        self.endpoint.disconnect(self)
        self.irqs.close()
        self.dma.close()
        self.transport.close()
