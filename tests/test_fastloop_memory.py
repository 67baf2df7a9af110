"""The C serving loop (vfiouser._fastloop) never keeps a finished session alive.

A session's objects may form reference cycles that pass through its FastLoop: the loop holds
bound methods of the session's outbox, dispatcher and port, and a frame that holds the loop
can end up referenced from the session (a stored exception's traceback, for one). The cyclic
garbage collector must be able to free such cycles, as it does on the pure-Python loop;
otherwise every such session stays in memory for good (the fuzzer saw the server grow by a
few KiB per session).
"""

import gc
import json
import logging
import socket
import threading

import pytest

from vfiouser import fastpath
from vfiouser.client import DEFAULT_CLIENT_CAPS
from vfiouser.devices.pci.firmware import bring_up
from vfiouser.protocol import HEADER, HEADER_SIZE, REGION_ACCESS, Command, Version
from vfiouser.session import Session

from .conftest import real_parts_required
from .probe import ProbeDevice

SESSIONS = 25


def _require_c_loop() -> None:
    if not fastpath.AVAILABLE:
        if real_parts_required():
            pytest.fail("vfiouser._fastloop was not built (pip install needs a C compiler and Python's headers)")
        pytest.skip("vfiouser._fastloop was not built (no C compiler here)")


def _message(cmd: int, payload: bytes = b"", msg_id: int = 0) -> bytes:
    return HEADER.pack(msg_id, cmd, HEADER_SIZE + len(payload), 0, 0) + payload


def _live_sessions() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, Session))


def _unframeable_session(path: str) -> None:
    """VERSION, a BAR read the C loop serves, then a header whose msg_size is below 16: the
    server must hang up (that error is raised from the transport's stored framing error)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(path)
        version = Version.build(dict(major=0, minor=0, json=json.dumps(DEFAULT_CLIENT_CAPS)))
        sock.sendall(_message(int(Command.VERSION), version, 1))
        size = HEADER.unpack(sock.recv(HEADER_SIZE, socket.MSG_PEEK | socket.MSG_WAITALL))[2]
        sock.recv(size, socket.MSG_WAITALL)
        sock.sendall(_message(int(Command.REGION_READ), REGION_ACCESS.pack(0, 0, 4), 2))
        reply = sock.recv(HEADER_SIZE + REGION_ACCESS.size + 4, socket.MSG_WAITALL)
        assert HEADER.unpack_from(reply)[:2] == (2, int(Command.REGION_READ))
        sock.sendall(HEADER.pack(3, int(Command.REGION_READ), 8, 0, 0))
        while sock.recv(4096):  # the server closes its end
            pass


def test_sessions_ended_by_an_unframeable_header_are_freed(serve):
    """Many sessions that end on an unframeable header, served by the C loop: none of them
    stays alive once the server is idle again."""
    _require_c_loop()
    dev = ProbeDevice()
    bring_up(dev.port)
    server = serve(dev)
    assert server.fast_loop
    # pytest keeps every log record, and the record of the unframeable header holds the error
    # (so its traceback, and the session): no records while the sessions run
    logging.disable(logging.CRITICAL)
    try:
        before = _live_sessions()
        for _ in range(SESSIONS):
            _unframeable_session(server.path)
            assert server.wait_idle(20)
        assert _live_sessions() - before <= 1, "finished sessions are kept alive"
    finally:
        logging.disable(logging.NOTSET)


class _Owner:
    """An object whose bound method a FastLoop holds, and which holds that FastLoop."""

    def method(self, *args):
        return None


def test_a_reference_cycle_through_a_fastloop_is_collected():
    """The cyclic GC sees what a FastLoop refers to: a cycle that passes through one is freed."""
    _require_c_loop()
    from vfiouser._fastloop import FastLoop

    a, b = socket.socketpair()
    try:
        owner = _Owner()
        loop = FastLoop(fd=a.fileno(), region_read=owner.method, region_write=owner.method, hold=owner.method,
                        release=owner.method, outbox=owner, failed=owner.method, send_lock=threading.Lock(),
                        send_rest=owner.method, watchdog=owner, max_xfer=4096, anc_size=64, spin=0.0)
        owner.loop = loop
        gone = threading.Event()
        import weakref

        weakref.finalize(owner, gone.set)
        del owner, loop
        gc.collect()
        assert gone.is_set(), "a cycle through a FastLoop was not collected"
    finally:
        a.close()
        b.close()
