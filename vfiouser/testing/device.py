"""A device model served in-process and driven like QEMU would drive it: what ``vfiouser_device`` returns.

:class:`ServedDevice` serves a model on a private socket (on a backend of your
choice), connects a :class:`~vfiouser.client.Client`, attaches guest RAM
(:class:`~vfiouser.testing.memory.GuestMemory`, from guest address 0), gives
INTx an eventfd, does what firmware does (BARs placed, decoding and bus
mastering on) and answers the server's DMA requests on a thread of its own::

    >>> from vfiouser.devices.edu import Edu
    >>> with ServedDevice(Edu) as dev:
    ...     dev.bar(0).write(0x04, 4, 0x12345678)        # edu's liveness register inverts
    ...     hex(dev.bar(0).read(0x04, 4))
    '0xedcba987'

With ``dma="fd"`` (the default) the server maps guest RAM and moves DMA in
place, as with QEMU's ``memory-backend-memfd,share=on``; with ``dma="message"``
it asks for every transfer with DMA_READ/DMA_WRITE, as with QEMU's default RAM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile

from vfiouser.backends import DEFAULT_BACKEND
from vfiouser.client import Client
from vfiouser.devices import load_device_class
from vfiouser.devices.pci.config import PCI_CAPABILITY_LIST, PCI_STATUS, PCI_STATUS_CAP_LIST
from vfiouser.errors import UsageError
from vfiouser.server import serve_in_thread

from .irqs import Interrupts
from .memory import DEFAULT_MEMORY, GuestMemory

__all__ = ["ServedDevice", "BarAccess", "ConfigAccess", "make_model", "DMA_MODES"]

log = logging.getLogger(__name__)

#: How the served device reaches guest RAM: in place through the memfd, or by messages.
DMA_MODES = ("fd", "message")

#: The region index of config space in the vfio-user region table.
CONFIG_REGION = 7


def make_model(model, params: dict):
    """A model instance from a :class:`~vfiouser.devices.pci.PciDevice` subclass, a device name
    (built-in, or ``package.module:Class``) or an instance; ``params`` go to its ``__init__``."""
    if isinstance(model, str):
        model = load_device_class(model)
    if isinstance(model, type):
        return model(**params)
    if params:
        raise UsageError(f"parameters {sorted(params)} given with a model instance: pass its class instead")
    return model


def _check_size(size: int) -> None:
    if size not in (1, 2, 4, 8):
        raise UsageError(f"an access is 1, 2, 4 or 8 bytes wide, not {size}")


class BarAccess:
    """Register accesses to one BAR, by offset into it (what a driver's ``ioread``/``iowrite`` do)."""

    def __init__(self, client: Client, index: int, address: int | None) -> None:
        self._client = client
        self.index = index
        #: Where firmware placed the BAR (None: not placed, e.g. a BAR the device lacks).
        self.address = address

    def read(self, offset: int, size: int) -> int:
        """A ``size``-byte (1, 2, 4, 8) little-endian register at ``offset``."""
        _check_size(size)
        return int.from_bytes(self._client.region_read(self.index, offset, size), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Write ``value`` to the ``size``-byte register at ``offset`` (waits for the device)."""
        _check_size(size)
        self._client.region_write(self.index, offset, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))

    def read_bytes(self, offset: int, count: int) -> bytes:
        """``count`` bytes from ``offset`` in one access."""
        return self._client.region_read(self.index, offset, count)

    def write_bytes(self, offset: int, data: bytes) -> None:
        """``data`` at ``offset`` in one access."""
        self._client.region_write(self.index, offset, bytes(data))


class ConfigAccess(BarAccess):
    """Config-space accesses (``read(offset, size=4)``, ``write(offset, size, value)``)."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, CONFIG_REGION, None)

    def read(self, offset: int, size: int = 4) -> int:
        """A ``size``-byte config register at ``offset``."""
        return super().read(offset, size)

    def find_capability(self, cap_id: int) -> int | None:
        """The offset of the first capability with ID ``cap_id`` (0x05 MSI, 0x11 MSI-X, 0x09
        vendor-specific, ...), or None."""
        if not self.read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
            return None
        offset, seen = self.read(PCI_CAPABILITY_LIST, 1) & 0xFC, set()
        while offset and offset not in seen:
            seen.add(offset)
            if self.read(offset, 1) == cap_id:
                return offset
            offset = self.read(offset + 1, 1) & 0xFC
        return None


class ServedDevice:
    """A model served in-process with a negotiated client (see the module docstring).

    ``model`` is a class, a device name or an instance; ``params`` go to the class.
    ``backend`` names the protocol engine (:mod:`vfiouser.backends`); ``memory`` is the
    size of guest RAM from address 0; ``dma`` is ``"fd"`` or ``"message"``.
    """

    def __init__(self, model, *, backend: str | None = None, memory: int = DEFAULT_MEMORY,
                 dma: str = "fd", timeout: float = 5.0, **params) -> None:
        if dma not in DMA_MODES:
            raise UsageError(f"dma={dma!r}: use one of {', '.join(DMA_MODES)}")
        self.model = make_model(model, params)
        self.backend = backend or DEFAULT_BACKEND
        self.dma_mode = dma
        self._stack = contextlib.ExitStack()
        try:
            self._dir = tempfile.mkdtemp(prefix="vfu-")
            self._stack.callback(shutil.rmtree, self._dir, True)
            self.server = self._stack.enter_context(
                serve_in_thread(self.model, os.path.join(self._dir, "dev.sock"), backend=self.backend))
            self.memory = GuestMemory(memory)
            self._stack.callback(self.memory.close)
            self.client = Client.connect(self.server.path, dma_handler=self.memory.serve_dma, timeout=timeout)
            self._stack.callback(self.client.close)
            self.client.dma_map(self.memory.base, self.memory.size,
                                fd=self.memory.fd if dma == "fd" else None)
            self.config = ConfigAccess(self.client)
            self.irqs = Interrupts(self.client, self.config)
            self._stack.callback(self.irqs.close)
            self.bars = self.client.bring_up()
            self._stack.enter_context(self.client.serving())
        except BaseException:
            self._stack.close()
            raise

    def bar(self, index: int) -> BarAccess:
        """Accesses to BAR ``index`` (0-5; 6 is the expansion ROM, read-only)."""
        if not 0 <= index <= 6:
            raise UsageError(f"BAR index {index}: use 0-5, or 6 for the expansion ROM")
        return BarAccess(self.client, index, self.bars.get(index))

    def enable_msi(self, vectors: int | None = None) -> int:
        """MSI on (see :meth:`Interrupts.enable_msi`); the number of vectors."""
        return self.irqs.enable_msi(vectors)

    def enable_msix(self) -> int:
        """MSI-X on (see :meth:`Interrupts.enable_msix`); the number of vectors."""
        return self.irqs.enable_msix()

    def reset(self) -> None:
        """A function-level reset (DEVICE_RESET, what QEMU sends at every machine reset), then
        firmware's bring-up again; interrupts are back to INTx."""
        self.client.reset()
        self.irqs.disable()
        self.bars = self.client.bring_up()

    def close(self) -> None:
        """Disconnect (the server power-cycles the model), stop the server, free guest RAM."""
        self._stack.close()

    def __enter__(self) -> ServedDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ServedDevice {type(self.model).__name__} on {self.backend}, dma={self.dma_mode}>"
