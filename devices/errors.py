"""Errors of the device framework, under the one root :class:`~vfiouser.iomgr.VfioUserError`.

* :class:`DeviceError` - the device side could not do what was asked (EIO);
* :class:`DefinitionError` - a model declares something that cannot work (IDs, BARs,
  capabilities, parameters); raised while the model is built;
* :class:`DeviceUsageError` - a call a device cannot take (a vector it does not have,
  an input line out of range); a programming error of the caller;
* :class:`RegionAccessError` - a backend asked for an access outside a region (EINVAL),
  or a write to a read-only one (EACCES); the device port checks this, once;
* DMA failures (:mod:`vfiouser.devices.pci.dma`) and virtqueue errors
  (:mod:`vfiouser.devices.virtio.queue`) derive from :class:`DeviceError` too.

Each carries ``errno``, which a backend answers with when the error escapes a
request (see :mod:`vfiouser.iomgr.errors`).
"""

from __future__ import annotations

import errno as _errno

from vfiouser.iomgr.errors import VfioUserError

__all__ = ["VfioUserError", "DeviceError", "DefinitionError", "DeviceUsageError", "RegionAccessError"]


class DeviceError(VfioUserError):
    """Base class of the device framework's errors."""


class DefinitionError(DeviceError, ValueError):
    """A device model declares something that cannot work; also a :class:`ValueError`."""


class DeviceUsageError(DeviceError, ValueError):
    """A call with arguments the device cannot take; also a :class:`ValueError`."""


class RegionAccessError(DeviceError):
    """An access outside a region, or of a kind the region does not allow.

    ``index``, ``offset`` and ``size`` give the access; ``errno`` is EINVAL
    (outside the region, empty) or EACCES (a write to a read-only region).
    """

    errno = _errno.EINVAL

    def __init__(self, message: str, index: int, offset: int, size: int, *, errno: int | None = None) -> None:
        super().__init__(message, errno=errno)
        self.index, self.offset, self.size = index, offset, size
