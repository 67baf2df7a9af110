"""Protocol engines that serve a device port: which exist, and how to make a server of one.

================  ==========================================================================
name              server
================  ==========================================================================
``vfiouser``      :class:`vfiouser.server.Server`: our own engine, pure Python (the default)
``libvfio-user``  :class:`vfiouser.libvfio_user.LibvfioUserServer`: the C reference library
                  through ctypes (``scripts/get-libvfio-user`` builds it)
================  ==========================================================================

Both take ``(device, path)`` and serve any model unchanged; ``docs/backends.md``
says when to pick which.

>>> sorted(BACKENDS)
['libvfio-user', 'vfiouser']
>>> server_class("vfiouser").__name__
'Server'
>>> server_class("qemu")
Traceback (most recent call last):
    ...
vfiouser.backends.UnknownBackend: unknown backend 'qemu': choose one of libvfio-user, vfiouser
"""

from __future__ import annotations

import importlib

from .errors import UsageError

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "UnknownBackend", "server_class", "make_server"]

#: backend name -> "module:Class" of its server (imported when asked for: libvfio-user's
#: backend loads a C library)
BACKENDS = {
    "vfiouser": "vfiouser.server:Server",
    "libvfio-user": "vfiouser.libvfio_user.server:LibvfioUserServer",
}
DEFAULT_BACKEND = "vfiouser"


class UnknownBackend(UsageError):
    """No backend of that name."""


def server_class(name: str) -> type:
    """The server class of backend ``name``."""
    try:
        module, _, cls = BACKENDS[name].partition(":")
    except KeyError:
        raise UnknownBackend(f"unknown backend {name!r}: choose one of {', '.join(sorted(BACKENDS))}") from None
    return getattr(importlib.import_module(module), cls)


def make_server(device, path: str, *, backend: str | None = None, **kwargs):
    """A server of ``backend`` (default :data:`DEFAULT_BACKEND`) serving ``device`` on ``path``;
    ``kwargs`` go to its constructor."""
    return server_class(backend or DEFAULT_BACKEND)(device, path, **kwargs)
