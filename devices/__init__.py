"""Device models and the PCI device framework they are built on.

``vfiouser.devices.pci`` is the framework; each other module is a model. Built-in models
are served by name (``vfiouser serve idio16``); any other model by its import
path (``vfiouser serve mypkg.mymod:MyDevice``) or its file (``vfiouser serve
./mydev.py:MyDevice``). :func:`parameters` lists what a model takes
(:mod:`vfiouser.devices.params`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import traceback

from vfiouser.devices.errors import DefinitionError, DeviceError
from vfiouser.devices.params import Parameter, ParameterError, convert, parameters

__all__ = ["BUILTIN_DEVICES", "load_device_class", "make_device", "DeviceLoadError", "parameters"]

#: Built-in device names and where their classes live.
BUILTIN_DEVICES: dict[str, str] = {
    "idio16": "vfiouser.devices.idio16:Idio16",
    "edu": "vfiouser.devices.edu:Edu",
    "pci-serial": "vfiouser.devices.serial:PciSerial",
    "virtio-rng": "vfiouser.devices.virtio.rng:VirtioRng",
    "virtio-blk": "vfiouser.devices.virtio.blk:VirtioBlk",
    "ivshmem-plain": "vfiouser.devices.ivshmem:Ivshmem",
    "regfile": "vfiouser.devices.regfile:RegfileDevice",
    "nvme": "vfiouser.devices.nvme:NvmeController",
}


class DeviceLoadError(DeviceError):
    """A device name or path could not be turned into a device model, or its parameters are wrong.
    The message says what to do about it."""


def _import_file(path: str):
    """Import the Python file ``path`` as a module named after it (its folder goes first on
    ``sys.path``, as ``python path.py`` has it, so the file's own imports of its neighbours work)."""
    if not os.path.isfile(path):
        raise DeviceLoadError(f"{path}: no such file (give path/to/file.py:Class, or package.module:Class)")
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.splitext(os.path.basename(path))[0]
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") == os.path.abspath(path):
        return loaded
    if loaded is not None or not name.isidentifier():  # a name taken by another module, or not a name
        name = f"_vfiouser_file_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        raise DeviceLoadError(f"importing {path} failed: {_where(exc, path)}") from exc
    return module


def _where(exc: BaseException, path: str) -> str:
    """``ExcType: message (file:line)``, the line being the deepest one in ``path``."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}:{exc.lineno})"
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(frame.filename) == os.path.abspath(path):
            line = frame.lineno
    return f"{type(exc).__name__}: {exc}" + (f" ({path}:{line})" if line else "")


def _import_module(module_name: str, class_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.split(".")[0] == exc.name.split(".")[0]:
            first, last = module_name.split(".")[0], module_name.split(".")[-1]
            raise DeviceLoadError(
                f"cannot import {module_name!r}: no module {exc.name!r} on the path; run vfiouser from the "
                f"folder that holds {first}.py (or {first}/), or give the file: path/to/{last}.py:{class_name}"
            ) from exc
        raise DeviceLoadError(f"importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise DeviceLoadError(f"importing {module_name} failed: {_where(exc, getattr(exc, 'filename', '') or '')}") \
            from exc


def load_device_class(spec: str | type) -> type:
    """The device class named by ``spec``: a built-in name, ``package.module:Class`` (resolved
    from the current directory too, as ``python -m`` does), ``path/to/file.py:Class``, or a
    :class:`~vfiouser.devices.pci.PciDevice` subclass itself."""
    from vfiouser.devices.pci import PciDevice

    if inspect.isclass(spec):
        if not issubclass(spec, PciDevice):
            raise DeviceLoadError(f"{spec.__qualname__} is not a PciDevice subclass")
        return spec
    path = BUILTIN_DEVICES.get(spec, spec)
    module_name, sep, class_name = path.rpartition(":")
    if not sep or not module_name or not class_name:
        known = ", ".join(sorted(BUILTIN_DEVICES))
        raise DeviceLoadError(f"unknown device {spec!r}: use a built-in name ({known}), package.module:Class "
                              f"or path/to/file.py:Class")
    if module_name.endswith(".py") or os.sep in module_name:
        module = _import_file(module_name)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:  # as ``python -m`` resolves a module
            sys.path.insert(0, os.getcwd())
        module = _import_module(module_name, class_name)
    cls = getattr(module, class_name, None)
    if cls is None:
        models = sorted(n for n, v in vars(module).items()
                        if inspect.isclass(v) and issubclass(v, PciDevice) and v is not PciDevice)
        there = f"; device classes there: {', '.join(models)}" if models else "; it defines no PciDevice subclass"
        raise DeviceLoadError(f"{module_name} has no {class_name!r}{there}")
    if not (inspect.isclass(cls) and issubclass(cls, PciDevice)):
        raise DeviceLoadError(f"{path!r} is not a PciDevice subclass (a model subclasses "
                              f"vfiouser.devices.pci.PciDevice)")
    return cls


def make_device(spec: str | type, params: dict[str, str] | None = None):
    """Instantiate the device named by ``spec`` (see :func:`load_device_class`) with string
    ``params`` converted to each parameter's type (:mod:`vfiouser.devices.params`: from its
    annotation or its default; bool accepts on/off/yes/no/true/false/1/0). A model that
    refuses its parameters (a :class:`DefinitionError`: a missing file, a description it
    cannot serve) is a :class:`DeviceLoadError` with its message."""
    cls = load_device_class(spec)
    name = spec if isinstance(spec, str) else cls.__qualname__
    known = {p.name: p for p in parameters(cls)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    kwargs = {}
    for key, text in (params or {}).items():
        param = known.get(key.replace("-", "_"))
        if param is None:
            if not takes_any:
                choices = ", ".join(known) or "none"
                raise DeviceLoadError(f"{name} has no parameter {key!r} (its parameters: {choices}; "
                                      f"`vfiouser devices {name}` describes them)")
            param = Parameter(key.replace("-", "_"), str, inspect.Parameter.empty)
        try:
            kwargs[param.name] = convert(param, text)
        except ParameterError as exc:
            raise DeviceLoadError(str(exc)) from None
    missing = [p.name for p in known.values() if p.required and p.name not in kwargs]
    if missing:
        raise DeviceLoadError(f"{name} needs " + ", ".join(f"--param {m}=VALUE" for m in missing))
    try:
        return cls(**kwargs)
    except DeviceLoadError:
        raise
    except DefinitionError as exc:  # what it names is wrong: its own message says what
        raise DeviceLoadError(f"cannot create {name}: {exc}") from exc
    except Exception as exc:
        raise DeviceLoadError(f"cannot create {name} with {kwargs or 'no parameters'}: {type(exc).__name__}: "
                              f"{exc}") from exc
