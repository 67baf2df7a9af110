"""The libvfio-user backend on its own: finding the library, its errors, and what it guards.

The behaviour both backends share is tested on both (the ``backend`` fixture in
test_dma, test_msi, test_session, test_backends and the QEMU and guest tiers);
this file covers what only this backend has.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import pytest

from vfiouser.client import Client
from vfiouser.devices.idio16 import Idio16
from vfiouser.libvfio_user import Library, LibraryNotFound, LibvfioUserError, find_library
from vfiouser.libvfio_user.server import LibvfioUserServer
from vfiouser.protocol import HEADER, REGION_ACCESS, Command
from vfiouser.server import serve_in_thread

from .probe import ProbeDevice


def test_the_library_comes_from_the_environment_then_the_cache(monkeypatch, tmp_path, libvfio_user_library):
    monkeypatch.setenv("VFIOUSER_LIBVFIO_USER", str(tmp_path / "nothing.so"))
    with pytest.raises(LibraryNotFound, match=r"\$VFIOUSER_LIBVFIO_USER is .*nothing\.so.*not a file"):
        find_library()
    monkeypatch.delenv("VFIOUSER_LIBVFIO_USER")
    monkeypatch.setenv("VFIOUSER_CACHE", str(tmp_path))
    with pytest.raises(LibraryNotFound, match="run scripts/get-libvfio-user") as exc:
        find_library()
    assert exc.value.errno == errno.ENOENT
    built = tmp_path / "libvfio-user" / "efd091bce1c1" / "build" / "lib" / "libvfio-user.so.0"
    built.parent.mkdir(parents=True)
    built.write_bytes(open(libvfio_user_library, "rb").read())
    assert find_library() == str(built)
    assert Library(str(built)).sg_size > 0  # it loads, with every function bound


def test_a_file_that_is_not_the_library_is_refused_clearly(tmp_path):
    bogus = tmp_path / "libvfio-user.so.0"
    bogus.write_bytes(b"not an ELF file")
    with pytest.raises(LibraryNotFound, match="cannot load"):
        Library(str(bogus))


def test_the_command_line_says_how_to_get_the_library(tmp_path):
    env = dict(os.environ, VFIOUSER_CACHE=str(tmp_path))
    env.pop("VFIOUSER_LIBVFIO_USER", None)
    done = subprocess.run([sys.executable, "-m", "vfiouser", "serve", "idio16", "--socket", str(tmp_path / "s"),
                           "--backend", "libvfio-user"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and "scripts/get-libvfio-user" in done.stderr
    assert not os.path.exists(tmp_path / "s")


def test_options_only_our_engine_has_are_refused(tmp_path, libvfio_user_library):
    done = subprocess.run([sys.executable, "-m", "vfiouser", "serve", "idio16", "--socket", str(tmp_path / "s"),
                           "--backend", "libvfio-user", "--trace", str(tmp_path / "t.jsonl")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--trace and --poll-us need the vfiouser backend" in done.stderr


def test_a_c_error_becomes_a_typed_error(libvfio_user_library, sockdir):
    lib = Library.load()
    with LibvfioUserServer(Idio16(), os.path.join(sockdir, "s.sock")) as server:
        with pytest.raises(LibvfioUserError) as exc:
            lib.vfu_irq_trigger(server.context.ctx, 4096)  # no such vector
        assert exc.value.errno == errno.EINVAL and exc.value.function == "vfu_irq_trigger"


def test_a_message_left_in_parts_never_holds_the_server(libvfio_user_library, sockdir, monkeypatch):
    """libvfio-user would wait in recv() for the rest of a body; the backend hands a message over
    only once it is all there, and drops a client that leaves one in parts."""
    monkeypatch.setattr(LibvfioUserServer, "partial_deadline", 0.5)
    with serve_in_thread(ProbeDevice(), os.path.join(sockdir, "s.sock"), backend="libvfio-user") as server:
        c = Client.connect(server.path)
        c.bring_up()
        msg_id = c.next_id()
        whole = HEADER.pack(msg_id, Command.REGION_WRITE, 16 + 16 + 4, 0, 0) + REGION_ACCESS.pack(0, 0, 4) + b"ab"
        c.send_raw(whole)  # two bytes of data short
        assert c.receive(timeout=0.2) is None  # nothing answered yet, nothing blocked:
        assert server.wait_idle(5)  # the client is dropped after the deadline
        c.close()
        with Client.connect(server.path) as again:
            again.bring_up()
            assert again.config_read(0) == 0xBEEF1234


def test_stop_is_prompt_while_a_message_arrives_in_parts(libvfio_user_library, sockdir):
    ctx = serve_in_thread(ProbeDevice(), os.path.join(sockdir, "s.sock"), backend="libvfio-user")
    server = ctx.__enter__()
    c = Client.connect(server.path)
    c.send_raw(HEADER.pack(c.next_id(), Command.REGION_READ, 32, 0, 0))  # the header only
    time.sleep(0.1)
    started = time.monotonic()
    ctx.__exit__(None, None, None)
    assert time.monotonic() - started < 3 and not ctx.thread.is_alive()
    c.close()


def test_a_dma_reply_arriving_in_pieces_is_assembled(libvfio_user_library, sockdir):
    """Our DMA replies are read without blocking: one that comes a few bytes at a time is put
    together across wake-ups while the loop stays free."""
    dev = ProbeDevice()
    with serve_in_thread(dev, os.path.join(sockdir, "s.sock"), backend="libvfio-user") as server:
        with Client.connect(server.path) as c:
            c.bring_up()
            c.dma_map(0x10000, 0x1000)
            got = {}
            reader = threading.Thread(target=lambda: got.setdefault("data", dev.dma.read(0x10010, 8)))
            reader.start()
            request = c.receive(timeout=2)
            assert request.cmd == Command.DMA_READ
            reply = HEADER.pack(request.msg_id, Command.DMA_READ, 16 + 16 + 8, 1, 0) + \
                request.payload[:16] + b"piecemeal"[:8]
            for i in range(0, len(reply), 5):
                c.send_raw(reply[i:i + 5])
                time.sleep(0.01)
            reader.join(5)
            assert got["data"] == b"piecemea"
            assert c.config_read(0) == 0xBEEF1234


def test_a_reply_too_large_to_be_ours_ends_the_connection(libvfio_user_library, sockdir):
    with serve_in_thread(ProbeDevice(), os.path.join(sockdir, "s.sock"), backend="libvfio-user") as server:
        c = Client.connect(server.path)
        c.send_raw(HEADER.pack(7, Command.DMA_READ, 1 << 30, 1, 0))
        assert server.wait_idle(5)
        c.close()
