"""The pytest plugin: ``vfiouser_device``, ``qemu_qtest`` and ``linux_guest``.

Registered through the ``pytest11`` entry point, so installing vfiouser is all
a project needs; ``pytest --fixtures`` lists the fixtures with their
documentation. Each fixture is a factory: call it in the test (as often as the
test needs), and everything it started is stopped when the test ends.

Fixtures that need a QEMU with ``vfio-user-pci`` (found as
:func:`vfiouser.testing.qemu.find_qemu` says) or the guest kernel (``$VFIOUSER_GUEST``
or the cache) skip the test with the reason when those are missing, and fail
it instead when ``$VFIOUSER_REQUIRE_QEMU`` is ``1`` or ``$CI`` is set, so a CI
run cannot pass by skipping. The same holds for ``backend="libvfio-user"``
without the library.
"""

from __future__ import annotations

import logging
import os

import pytest

__all__ = ["real_parts_required", "require_qemu", "require_guest_assets", "require_backend"]

#: The stash key under which a test's guests and QEMUs are kept for its report.
_REPORT = pytest.StashKey[dict]()


def real_parts_required() -> bool:
    """Whether a missing QEMU, guest or backend library fails tests instead of skipping them
    (``$VFIOUSER_REQUIRE_QEMU=1``, or ``$CI`` set)."""
    return os.environ.get("VFIOUSER_REQUIRE_QEMU") == "1" or bool(os.environ.get("CI"))


def _missing(what: str, exc: Exception):
    if real_parts_required():
        pytest.fail(f"{what} required ($VFIOUSER_REQUIRE_QEMU=1 or $CI) but {exc}", pytrace=False)
    pytest.skip(f"{exc} (set VFIOUSER_REQUIRE_QEMU=1 to make this an error)")


def require_qemu() -> str:
    """The QEMU binary to use; skips or fails the calling test (see the module docstring) if none."""
    from .qemu import QemuNotFound, find_qemu

    try:
        return find_qemu()
    except QemuNotFound as exc:
        _missing("a QEMU with vfio-user-pci is", exc)


def require_guest_assets():
    """The guest kernel and busybox (:class:`~vfiouser.testing.guest.GuestAssets`); skips or fails
    the calling test if they have not been fetched."""
    from .guest import GuestAssets, GuestAssetsMissing

    try:
        return GuestAssets.find()
    except GuestAssetsMissing as exc:
        _missing("the guest kernel is", exc)


def require_backend(backend: str | None) -> None:
    """Skips or fails the calling test if ``backend`` needs a library that is not there."""
    if backend == "libvfio-user":
        from vfiouser.libvfio_user import LibraryNotFound, find_library

        try:
            find_library()
        except LibraryNotFound as exc:
            _missing("libvfio-user is", exc)


@pytest.fixture
def vfiouser_device():
    """Serve a device model in-process and drive it as QEMU would, without QEMU.

    ``dev = vfiouser_device(Model, **params)`` (``Model``: a PciDevice subclass, a built-in
    name such as ``"edu"``, ``"package.module:Class"``, or an instance) serves the model
    on a private socket, connects a client, maps 16 MiB of guest RAM at address 0, gives
    INTx an eventfd and places the BARs as firmware does. Options: ``backend=`` (default
    ``"vfiouser"``; ``"libvfio-user"``), ``dma="message"`` (DMA by DMA_READ/DMA_WRITE
    instead of in place), ``memory=`` (bytes of guest RAM).

    The handle: ``dev.model`` (the live model), ``dev.bar(n).read(offset, size)`` /
    ``.write(offset, size, value)``, ``dev.config.read(offset, size)`` /
    ``.write(offset, size, value)``, ``dev.enable_msi()``, ``dev.enable_msix()``,
    ``dev.irqs.wait("intx" | "msi" | "msix", vector=0, timeout=5)`` (fails the test
    naming what fired instead), ``dev.memory.read(addr, n)`` / ``.write(addr, data)``,
    ``dev.reset()``. DMA requests are answered in the background.
    """
    from .device import ServedDevice

    started: list[ServedDevice] = []

    def serve(model, *, backend: str | None = None, **kwargs) -> ServedDevice:
        require_backend(backend)
        dev = ServedDevice(model, backend=backend, **kwargs)
        started.append(dev)
        return dev

    yield serve
    for dev in reversed(started):
        dev.close()


@pytest.fixture
def qemu_qtest(request):
    """Attach device models to a real QEMU under the qtest accelerator (no guest OS).

    ``vm = qemu_qtest(Model, ...)`` serves each model (class, name or instance; several
    models go in slots 4, 5, ...), starts a q35 QEMU with them, places every BAR and turns
    decoding and bus mastering on, as firmware does. Options: ``backend=``, ``params={...}``
    (for a single model class), ``memfd=True`` (guest RAM shared, DMA in place),
    ``memory="128M"``, ``args=[...]`` (more QEMU arguments).

    ``vm.device`` (or ``vm.devices[i]``) offers ``model``, ``slot``, ``bar(n).read/write``
    (port or memory accesses at the BAR's address), ``config.read/write`` (config cycles),
    ``intx_line`` (the IOAPIC input the INTx pin is routed to), ``enable_msi()``,
    ``enable_msix()`` (messages land in guest RAM) and ``irqs.wait(kind, vector)``.
    ``vm.machine`` is the raw :class:`~vfiouser.testing.qemu.QtestMachine`. Needs QEMU:
    skips without it, fails under ``$VFIOUSER_REQUIRE_QEMU=1`` or ``$CI``.
    """
    from .qtest import QtestVm

    started: list[QtestVm] = []
    report = request.node.stash.setdefault(_REPORT, {})

    def start(*models, backend: str | None = None, **kwargs) -> QtestVm:
        qemu = kwargs.pop("qemu", None) or require_qemu()
        require_backend(backend)
        vm = QtestVm(*models, backend=backend, qemu=qemu, **kwargs)
        started.append(vm)
        report.setdefault("qemu", []).append(vm.machine)
        return vm

    with _server_log_at_info(report):
        yield start
        for vm in reversed(started):
            vm.close()


@pytest.fixture
def linux_guest(request):
    """Boot the Debian guest (stock kernel, busybox) with devices attached and run a script.

    ``g = linux_guest(script, devices=[Model, ...], modules=["gpio-pci-idio-16"],
    files={"/bin/tool": "/host/path" or b"bytes"})`` serves each model (class, name or
    instance; a string that starts with ``{`` is passed to QEMU as a ``-device`` value
    as is) in slots 4, 5, ..., loads the modules (names from the kernel's tree, or paths
    to your own ``.ko``; dependencies first), boots, and runs ``script`` with busybox
    ``sh``. ``g.models`` are the served models, ``g.expect(regex)`` waits for a console
    line, ``g.send(text)`` types on the console, and ``g.wait(timeout)`` returns the
    result (``exit_code`` of the script, ``console``). Options: ``backend=``,
    ``memfd=False`` (DMA by messages), ``append=``, ``memory=``. On failure the report
    shows the guest console, and pytest's captured log the server's (INFO and up). Needs QEMU and the guest kernel
    (``python -m vfiouser.testing.fetch guest``): skips without them, fails under
    ``$VFIOUSER_REQUIRE_QEMU=1`` or ``$CI``.
    """
    from .guest import Guest
    from .served import ServedModels

    report = request.node.stash.setdefault(_REPORT, {})
    started: list = []

    def boot(script: str, *, devices=(), backend: str | None = None, **kwargs):
        qemu = kwargs.pop("qemu", None) or require_qemu()
        assets = require_guest_assets()
        require_backend(backend)
        served = ServedModels(devices, backend=backend)
        started.append(served)
        guest = Guest(assets, script, devices=served.device_args, qemu=qemu, **kwargs)
        guest.models = served.models
        started.append(guest)
        report.setdefault("guests", []).append(guest)
        return guest

    with _server_log_at_info(report):
        yield boot
        for thing in reversed(started):
            thing.close()


class _server_log_at_info:
    """While a fixture's test runs, vfiouser's INFO records (clients, resets, the model's own
    log lines) reach pytest's log capture, which shows them when the test fails."""

    def __init__(self, report: dict) -> None:
        self.report = report
        self.logger = logging.getLogger("vfiouser")
        self.old_level = None

    def __enter__(self):
        if not self.report.get("log_raised") and self.logger.getEffectiveLevel() > logging.INFO:
            self.report["log_raised"] = True
            self.old_level = self.logger.level
            self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        if self.old_level is not None:
            self.logger.setLevel(self.old_level)
            self.report["log_raised"] = False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    kept = item.stash.get(_REPORT, None)
    if report.failed and kept:
        for i, guest in enumerate(kept.get("guests", ())):
            report.sections.append((f"guest {i} console", guest.console or "(nothing printed)"))
        for i, machine in enumerate(kept.get("qemu", ())):
            output = machine.output()
            if output.strip():
                report.sections.append((f"QEMU {i} output", output))
    return report
