"""Moved: the guest harness is :mod:`vfiouser.testing.guest` now.

This module re-exports its names (and the result markers) so that code written
against ``vfiouser.guest`` keeps working; new code imports from
:mod:`vfiouser.testing` (or :mod:`vfiouser.testing.guest`).
"""

from vfiouser.testing.guest import *  # noqa: F401,F403
from vfiouser.testing.guest import EXIT_MARKER, READY_MARKER, __all__  # noqa: F401
