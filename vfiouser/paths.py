"""Where the set-up scripts put what they fetch and build: the project's cache.

``scripts/get-qemu``, ``scripts/get-guest`` and ``scripts/get-libvfio-user``
install into ``$VFIOUSER_CACHE``, else ``$XDG_CACHE_HOME/vfiouser``, else
``~/.cache/vfiouser``; the library finds them there with :func:`cache_dir`.
"""

from __future__ import annotations

import os

__all__ = ["cache_dir"]


def cache_dir() -> str:
    """The project's cache directory (it need not exist yet)."""
    return os.environ.get("VFIOUSER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vfiouser"
    )
