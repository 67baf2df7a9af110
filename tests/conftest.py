"""Shared fixtures: temporary socket paths, a served device, QEMU, fd-leak checks.

The fixtures a device author uses (``vfiouser_device``, ``qemu_qtest``, ``linux_guest``)
come from the plugin that vfiouser installs (vfiouser/testing/plugin.py); the tests use
them wherever they fit, so the plugin is exercised on every run. What is here is the
test-suite's own plumbing."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from vfiouser.devices.pci.dma import NO_BACKEND
from vfiouser.devices.pci.firmware import bring_up
from vfiouser.devices.port import InterruptSink
from vfiouser.server import serve_in_thread
from vfiouser.testing.plugin import real_parts_required, require_guest_assets, require_qemu


def open_fds() -> set[int]:
    """The fds this process has open (from /proc)."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def eventfd() -> int:
    """A non-blocking eventfd, as a client hands the server for an interrupt."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def fired(fd: int, timeout: float = 1.0) -> int:
    """How many times the eventfd was signalled (0 if not within ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            if time.monotonic() > deadline:
                return 0
            time.sleep(0.005)


@pytest.fixture
def sockdir():
    """A short-pathed private directory for UNIX sockets (sun_path is 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="vfu-") as d:
        yield d


#: The protocol engines the built-in devices are tested on (vfiouser.backends).
BACKENDS = ("vfiouser", "libvfio-user")


@pytest.fixture(scope="session")
def libvfio_user_library() -> str:
    """The path of libvfio-user.so.0 (scripts/get-libvfio-user). Missing fails the run in CI."""
    from vfiouser.libvfio_user import LibraryNotFound, find_library

    try:
        return find_library()
    except LibraryNotFound as exc:
        if real_parts_required():
            pytest.fail(f"libvfio-user backend tests required but {exc}", pytrace=False)
        pytest.skip(f"{exc} (set VFIOUSER_REQUIRE_QEMU=1 to make this an error)")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each protocol engine in turn: tests that take it run once per backend."""
    if request.param == "libvfio-user":
        request.getfixturevalue("libvfio_user_library")
    return request.param


@pytest.fixture
def serve(sockdir):
    """``serve(device, backend=...)`` serves a model on a background thread; yields the server."""
    stack = []

    def start(device, name="dev.sock", **kwargs):
        ctx = serve_in_thread(device, os.path.join(sockdir, name), **kwargs)
        server = ctx.__enter__()
        stack.append(ctx)
        return server

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


@pytest.fixture
def no_fd_leak():
    """Fails the test if it leaves fds open in this process."""
    before = open_fds()
    yield
    import gc

    gc.collect()
    leaked = open_fds() - before
    # Ignore fds that are no longer valid by the time we look (listing races).
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"fds left open: {sorted(leaked)} -> {[os.readlink(f'/proc/self/fd/{fd}') for fd in leaked]}"


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    """The QEMU to test against. Missing QEMU fails the run in CI and under scripts/test."""
    return require_qemu()


@pytest.fixture
def guest(linux_guest):
    """The plugin's ``linux_guest`` under the name tests used before the plugin existed."""
    return linux_guest


@pytest.fixture(scope="session")
def guest_assets():
    """The guest kernel and busybox (scripts/get-guest). Missing assets fail the run in CI."""
    return require_guest_assets()


class RecordingSink(InterruptSink):
    """An interrupt sink for tests: records every INTx level and the MSI/MSI-X vectors sent.
    ``routed=False``: the backend has no eventfds yet (vectors are refused, so held)."""

    def __init__(self, routed: bool = True) -> None:
        self.levels: list[bool] = []
        self.msi_sent: list[int] = []
        self.msix_sent: list[int] = []
        self.routed = routed

    def intx(self, asserted: bool) -> None:
        self.levels.append(asserted)

    def msi(self, vector: int) -> bool:
        if self.routed:
            self.msi_sent.append(vector)
        return self.routed

    def msix(self, vector: int) -> bool:
        if self.routed:
            self.msix_sent.append(vector)
        return self.routed


def served(dev, sink: InterruptSink | None = None, dma=None, *, decode: bool = True):
    """``dev``'s port as a backend serves it: BARs placed and decoding on, as firmware leaves
    them (unless ``decode=False``), and ``sink``/``dma`` attached. Returns the port."""
    port = dev.port
    if decode:
        bring_up(port)
    port.attach(sink if sink is not None else RecordingSink(), dma if dma is not None else NO_BACKEND)
    return port
