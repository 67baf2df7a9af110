"""Device models and the PCI device framework they are built on.

``vfiouser.devices.pci`` is the framework; each other module is a model. Built-in models
are served by name (``vfiouser serve idio16``); any other model by its import
path (``vfiouser serve mypkg.mymod:MyDevice``).
"""

from __future__ import annotations

import importlib
import inspect

from vfiouser.devices.errors import DeviceError

__all__ = ["BUILTIN_DEVICES", "load_device_class", "make_device", "DeviceLoadError"]

#: Built-in device names and where their classes live.
BUILTIN_DEVICES: dict[str, str] = {
    "idio16": "vfiouser.devices.idio16:Idio16",
    "edu": "vfiouser.devices.edu:Edu",
    "pci-serial": "vfiouser.devices.serial:PciSerial",
    "virtio-rng": "vfiouser.devices.virtio.rng:VirtioRng",
    "virtio-blk": "vfiouser.devices.virtio.blk:VirtioBlk",
    "ivshmem-plain": "vfiouser.devices.ivshmem:Ivshmem",
    "nvme": "vfiouser.devices.nvme:NvmeController",
}


class DeviceLoadError(DeviceError):
    """A device name or path could not be turned into a device model, or its parameters are wrong."""


def load_device_class(spec: str) -> type:
    """The device class named by ``spec``: a built-in name or ``package.module:Class``."""
    from vfiouser.devices.pci import PciDevice

    path = BUILTIN_DEVICES.get(spec, spec)
    module_name, sep, class_name = path.partition(":")
    if not sep or not module_name or not class_name:
        known = ", ".join(sorted(BUILTIN_DEVICES))
        raise DeviceLoadError(f"unknown device {spec!r}: use a built-in name ({known}) or package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DeviceLoadError(f"cannot import {module_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, PciDevice)):
        raise DeviceLoadError(f"{path!r} is not a PciDevice subclass")
    return cls


def _convert(name: str, text: str, annotation) -> object:
    kind = annotation if isinstance(annotation, type) else None
    if isinstance(annotation, str):  # postponed annotations
        kind = {"bool": bool, "int": int, "float": float, "str": str}.get(annotation.split("|")[0].strip())
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "on", "yes", "true"):
            return True
        if lowered in ("0", "off", "no", "false"):
            return False
        raise DeviceLoadError(f"parameter {name}: {text!r} is not on/off")
    if kind is int:
        try:
            return int(text, 0)
        except ValueError:
            raise DeviceLoadError(f"parameter {name}: {text!r} is not an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise DeviceLoadError(f"parameter {name}: {text!r} is not a number") from None
    return text


def make_device(spec: str, params: dict[str, str] | None = None):
    """Instantiate the device named by ``spec`` with string ``params`` converted to
    the types its ``__init__`` annotates (bool accepts on/off/yes/no/true/false/1/0)."""
    cls = load_device_class(spec)
    params = dict(params or {})
    sig = inspect.signature(cls.__init__)
    accepted = {n: p for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    kwargs = {}
    for name, text in params.items():
        key = name.replace("-", "_")
        if key not in accepted and not takes_any:
            choices = ", ".join(accepted) or "none"
            raise DeviceLoadError(f"{spec} has no parameter {name!r} (parameters: {choices})")
        annotation = accepted[key].annotation if key in accepted else str
        kwargs[key] = _convert(name, text, annotation)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise DeviceLoadError(f"cannot create {spec}: {exc}") from exc
