"""Moved: the QEMU harness is :mod:`vfiouser.testing.qemu` now.

This module re-exports its names so that code written against ``vfiouser.qemu``
keeps working; new code imports from :mod:`vfiouser.testing` (or
:mod:`vfiouser.testing.qemu`).
"""

from vfiouser.testing.qemu import *  # noqa: F401,F403
from vfiouser.testing.qemu import __all__  # noqa: F401
