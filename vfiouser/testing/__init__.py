"""A kit for testing device models: a pytest plugin, and the harnesses it is built on.

Installing vfiouser installs the plugin (a ``pytest11`` entry point,
:mod:`vfiouser.testing.plugin`); its fixtures, each documented in
``pytest --fixtures``:

* ``vfiouser_device``: a model served in-process, driven like QEMU would drive it
  (:class:`~vfiouser.testing.device.ServedDevice`): registers, config space,
  INTx/MSI/MSI-X on eventfds, guest RAM and DMA, no QEMU needed;
* ``qemu_qtest``: a real QEMU under the qtest accelerator with your devices
  attached and their BARs programmed (:class:`~vfiouser.testing.qtest.QtestVm`);
* ``linux_guest``: a Debian guest booted with your devices, modules and files,
  running your script (:class:`~vfiouser.testing.guest.Guest`).

Fixtures that need QEMU or the guest skip, with the reason, when those are
missing, and fail instead when ``$VFIOUSER_REQUIRE_QEMU`` is ``1`` or ``$CI`` is
set. The harnesses work without pytest too; the names below are imported lazily.
"""

from __future__ import annotations

import importlib

#: public name -> module that defines it
_EXPORTS = {
    "ServedDevice": "vfiouser.testing.device",
    "BarAccess": "vfiouser.testing.device",
    "ConfigAccess": "vfiouser.testing.device",
    "Interrupts": "vfiouser.testing.irqs",
    "InterruptNotRaised": "vfiouser.testing.irqs",
    "GuestMemory": "vfiouser.testing.memory",
    "QtestMachine": "vfiouser.testing.qemu",
    "QemuError": "vfiouser.testing.qemu",
    "QemuNotFound": "vfiouser.testing.qemu",
    "find_qemu": "vfiouser.testing.qemu",
    "QtestVm": "vfiouser.testing.qtest",
    "QtestDevice": "vfiouser.testing.qtest",
    "Guest": "vfiouser.testing.guest",
    "GuestAssets": "vfiouser.testing.guest",
    "GuestAssetsMissing": "vfiouser.testing.guest",
    "GuestError": "vfiouser.testing.guest",
    "GuestResult": "vfiouser.testing.guest",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vfiouser.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
