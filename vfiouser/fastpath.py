"""The serving thread's hot loop in C, when it is there: :mod:`vfiouser._fastloop`.

The pure-Python path frames, dispatches and replies in about 30,000 interpreter
instructions per small REGION_READ besides the model's own work. The C loop
takes exactly the messages :meth:`vfiouser.dispatch.Dispatcher.dispatch`'s fast
path takes (a well-formed REGION_READ of 16 payload bytes or REGION_WRITE of
1, 2, 4 or 8 data bytes, flags 0 or NO_REPLY, no fds), queues the same replies
in the session's outbox and sends them under the transport's send lock, holds
the port's batch around each wake-up's messages, and keeps the loop watchdog's
``since`` up to date. Where the port offers shortcuts
(:mod:`vfiouser.devices.shortcut`), the loop runs a BAR access's shortcut itself
(a register's value or hook, a handler's read or write) instead of calling
``port.region_read``/``region_write`` and the layers under them; otherwise it
calls those with the same arguments as the Python path. Everything else, it hands to Python as received bytes
(:meth:`vfiouser.transport.Transport.feed`), so the full path stays the only
place that checks anything else.

The extension is optional: built by ``pip install`` when a C compiler and
Python's headers are there (``setup.py``), and skipped otherwise, leaving the
pure-Python loop. ``VFIOUSER_PURE_PYTHON=1``, or ``Server(fast_loop=False)``,
turns it off; :data:`AVAILABLE` says whether it was built.
"""

from __future__ import annotations

import os

from .devices.pci.worker import DeviceWorker
from .errors import ConnectionClosed, FramingError

try:
    from ._fastloop import FastLoop
except ImportError:  # not built: the pure-Python loop serves
    FastLoop = None

__all__ = ["AVAILABLE", "wanted", "for_session", "serve"]

#: whether the C loop was built
AVAILABLE = FastLoop is not None


def wanted(requested: bool = True) -> bool:
    """Whether to serve with the C loop: built, requested, and not turned off by the environment."""
    return requested and AVAILABLE and os.environ.get("VFIOUSER_PURE_PYTHON", "") in ("", "0")


def for_session(session, *, watchdog, spin: float):
    """A C loop serving ``session``'s socket (see the module docstring)."""
    transport, batch = session.transport, session._batch
    if isinstance(batch, DeviceWorker):  # its release takes no arguments: no wrapper per wake-up
        release = batch.release
    else:
        exit_batch = batch.__exit__

        def release() -> None:
            exit_batch(None, None, None)

    port = session.port
    lock = getattr(port, "shortcut_lock", None)
    return FastLoop(fd=transport.fileno(), region_read=port.region_read,
                    region_write=port.region_write, hold=batch.__enter__, release=release,
                    outbox=session.outbox, failed=session.dispatcher.failed, send_lock=transport._send_lock,
                    send_rest=transport.send, watchdog=watchdog, max_xfer=session.dispatcher.max_xfer,
                    anc_size=transport._ancbuf, spin=spin,
                    shortcut=port.shortcut if lock is not None else None, shortcut_lock=lock,
                    gate=batch if isinstance(batch, DeviceWorker) else None)


def serve(session, fast) -> list | None:
    """Let the C loop ``fast`` serve ``session`` until it meets something for Python; the
    frames it handed over (None when the session is over), as
    :meth:`vfiouser.transport.Transport.receive` would return them."""
    try:
        kind, data, ancdata, msg_flags = fast.run()
    except ConnectionClosed as exc:  # sending its replies failed: as Session.process
        session.log.info("client disconnected while we replied (%s)", exc)
        session.close_after_reply("send failed")
        return None
    try:
        if kind == "data":
            return session.transport.feed(data, ancdata or (), msg_flags)
        if kind == "eof":
            raise ConnectionClosed("peer closed the connection")
        raise ConnectionClosed(f"receive failed: {os.strerror(data)}")
    except (ConnectionClosed, FramingError) as exc:
        return session.receive_failed(exc)
