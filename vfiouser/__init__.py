"""vfiouser: serve Python PCI device models to an unmodified QEMU over vfio-user.

Three layers, each its own subpackage, the lower never importing the higher:

* :mod:`vfiouser.iomgr` - trapped-I/O dispatch after the Rust crate dbs-device;
* :mod:`vfiouser.devices` - the PCI device framework and the built-in models;
* the protocol engine, in the order data flows through it:
  :mod:`vfiouser.transport` (framing, fd passing), :mod:`vfiouser.protocol` (every
  message declared once with construct), :mod:`vfiouser.session` (one client),
  :mod:`vfiouser.server` (the listening socket), plus :mod:`vfiouser.client`
  (a Python client for tests and tools) and :mod:`vfiouser.cli` (``vfiouser serve``).

The names below are imported lazily, so ``import vfiouser.devices`` (what a
device model does) never loads the protocol engine.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "Server": "vfiouser.server",
    "serve_in_thread": "vfiouser.server",
    "Client": "vfiouser.client",
    "ServerCapabilities": "vfiouser.negotiation",
    "VfioUserError": "vfiouser.iomgr.errors",
    "ProtocolError": "vfiouser.errors",
    "ErrorReply": "vfiouser.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vfiouser' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
