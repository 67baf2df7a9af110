"""A session's states, and the guard that keeps commands to the states they belong to.

::

    NEGOTIATING --VERSION--> RUNNING --end of stream, unframeable input, failed VERSION--> CLOSED
         \\______________________________________________________________________________/

:class:`SessionState` is set in one place, ``Session._set_state``, which logs
every transition. ``@require(...)`` (after qemu.qmp's ``@require`` on its
runstates) refuses a command in any other state: before VERSION with
:class:`~vfiouser.errors.NegotiationError` (the connection is then closed, as
libvfio-user does), otherwise with EINVAL.
"""

from __future__ import annotations

import enum
import functools

from .errors import MalformedMessage, NegotiationError
from .protocol import command_name

__all__ = ["SessionState", "require"]


class SessionState(enum.Enum):
    """Where a session is in its life."""

    NEGOTIATING = "negotiating"
    RUNNING = "running"
    CLOSED = "closed"


def require(*states: SessionState):
    """Decorate a command handler ``(self, frame)`` whose ``self.session`` must be in ``states``."""

    def wrap(fn):
        @functools.wraps(fn)
        def guarded(self, frame):
            state = self.session.state
            if state not in states:
                name = command_name(frame.cmd)
                if state is SessionState.NEGOTIATING:
                    raise NegotiationError(f"{name} before VERSION", raw=bytes(frame.payload[:64]))
                raise MalformedMessage(f"{name} is not valid once the session is {state.value}")
            return fn(self, frame)

        guarded.states = states
        return guarded

    return wrap
