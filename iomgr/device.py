"""The device side of the IoManager: what a trapped-I/O handler implements.

A handler subclasses :class:`DeviceIo` and overrides the accesses it traps;
every method has a no-op default (reads leave the buffer untouched, writes are
dropped). The manager calls

* ``read(base, offset, data)`` / ``write(base, offset, data)`` for MMIO and
* ``pio_read(base, offset, data)`` / ``pio_write(base, offset, data)`` for PIO,

where ``base`` is the base of the registered range that matched, ``offset``
the distance from that base, and ``data`` the access buffer: a writable buffer
(``bytearray`` or ``memoryview``) for reads, which the handler fills in place,
and a bytes-like object for writes. ``len(data)`` is the access width.

:class:`DeviceIo` handlers may be called from several threads; they must do
their own locking. A handler written as if single-threaded subclasses
:class:`DeviceIoMut` and is wrapped in :class:`LockedDevice`, which serialises
all its calls with a lock (the Python counterpart of dbs-device's
``Mutex<T: DeviceIoMut>`` adapter).

>>> class Scratch(DeviceIo):
...     def __init__(self):
...         self.value = bytearray(4)
...     def read(self, base, offset, data):
...         data[:] = self.value[offset:offset + len(data)]
...     def write(self, base, offset, data):
...         self.value[offset:offset + len(data)] = data
>>> dev = Scratch()
>>> dev.write(0x1000, 1, b"\\xab")
>>> buf = bytearray(4); dev.read(0x1000, 0, buf); bytes(buf)
b'\\x00\\xab\\x00\\x00'
"""

from __future__ import annotations

import threading

from .resources import DeviceResources

__all__ = ["DeviceIo", "DeviceIoMut", "LockedDevice"]


class _Handlers:
    """The four access handlers and the resource queries, all no-ops by default."""

    __slots__ = ()

    def read(self, base: int, offset: int, data: bytearray | memoryview) -> None:
        """MMIO read at ``base + offset`` of ``len(data)`` bytes into ``data``."""

    def write(self, base: int, offset: int, data: bytes | memoryview) -> None:
        """MMIO write of ``data`` at ``base + offset``."""

    def pio_read(self, base: int, offset: int, data: bytearray | memoryview) -> None:
        """Port read at ``base + offset`` of ``len(data)`` bytes into ``data``."""

    def pio_write(self, base: int, offset: int, data: bytes | memoryview) -> None:
        """Port write of ``data`` at ``base + offset``."""

    def get_assigned_resources(self) -> DeviceResources:
        """Every resource assigned to this device (default: none)."""
        return DeviceResources()

    def get_trapped_io_resources(self) -> DeviceResources:
        """The PIO/MMIO ranges this device traps (default: its assigned resources)."""
        return self.get_assigned_resources()


class DeviceIo(_Handlers):
    """A device that handles trapped MMIO and PIO accesses; it does its own locking."""


class DeviceIoMut(_Handlers):
    """A device written as if it were called from one thread at a time.

    Same methods and defaults as :class:`DeviceIo`; wrap an instance in
    :class:`LockedDevice` to register it with an IoManager.
    """


class LockedDevice(DeviceIo):
    """Adapts a :class:`DeviceIoMut` to :class:`DeviceIo` by taking a lock per call.

    ``inner`` is the wrapped device (reachable as ``.inner``); ``lock`` defaults
    to a new :class:`threading.RLock`. Pass a shared lock to serialise several
    handlers of one device model together.
    """

    __slots__ = ("inner", "lock")

    def __init__(self, inner: DeviceIoMut, lock: threading.RLock | threading.Lock | None = None) -> None:
        self.inner = inner
        self.lock = lock if lock is not None else threading.RLock()

    def read(self, base, offset, data):
        with self.lock:
            self.inner.read(base, offset, data)

    def write(self, base, offset, data):
        with self.lock:
            self.inner.write(base, offset, data)

    def pio_read(self, base, offset, data):
        with self.lock:
            self.inner.pio_read(base, offset, data)

    def pio_write(self, base, offset, data):
        with self.lock:
            self.inner.pio_write(base, offset, data)

    def get_assigned_resources(self) -> DeviceResources:
        return self.inner.get_assigned_resources()

    def get_trapped_io_resources(self) -> DeviceResources:
        return self.inner.get_trapped_io_resources()

    def __repr__(self) -> str:
        return f"LockedDevice({self.inner!r})"
