"""Shared fixtures: temporary socket paths, a served device, QEMU, fd-leak checks."""

from __future__ import annotations

import os
import tempfile

import pytest

from vfiouser.qemu import QemuNotFound, find_qemu
from vfiouser.server import serve_in_thread


def open_fds() -> set[int]:
    """The fds this process has open (from /proc)."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def sockdir():
    """A short-pathed private directory for UNIX sockets (sun_path is 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="vfu-") as d:
        yield d


@pytest.fixture
def serve(sockdir):
    """``serve(device)`` serves a model on a background thread; yields the server."""
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


def _qemu_required() -> bool:
    return os.environ.get("VFIOUSER_REQUIRE_QEMU") == "1" or bool(os.environ.get("CI"))


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    """The QEMU to test against. Missing QEMU fails the run in CI and under scripts/test."""
    try:
        return find_qemu()
    except QemuNotFound as exc:
        if _qemu_required():
            pytest.fail(f"real-QEMU tests required but {exc}", pytrace=False)
        pytest.skip(f"{exc} (set VFIOUSER_REQUIRE_QEMU=1 to make this an error)")
