"""libvfio-user as a second backend: the C reference implementation of vfio-user, through ctypes.

The same device models our own engine serves, served by libvfio-user
(``libvfio-user.so.0``, built by ``scripts/get-libvfio-user``)::

    vfiouser serve --backend libvfio-user edu --socket /tmp/edu.sock

or from Python, ``LibvfioUserServer(Edu(), "/tmp/edu.sock").serve_forever()``.
The backend reaches the model only through its device port
(:mod:`vfiouser.devices.port`).

Modules: :mod:`.bindings` (the C API, declared once), :mod:`.context` (a
``vfu_ctx_t`` set up from a port, its callbacks and locks), :mod:`.wire` (the
socket as we share it with libvfio-user: our DMA requests and their replies),
:mod:`.memory` (guest memory: in place through libvfio-user, else by message),
:mod:`.interrupts` (the interrupt sink), :mod:`.server` (the loop).
``docs/backends.md`` compares the two engines.
"""

from .bindings import COMMIT, Library, LibraryNotFound, LibvfioUserError, find_library

__all__ = ["COMMIT", "Library", "LibraryNotFound", "LibvfioUserError", "LibvfioUserServer", "find_library"]


def __getattr__(name: str):
    if name == "LibvfioUserServer":  # the server pulls in the engine's modules: only when asked
        from .server import LibvfioUserServer

        return LibvfioUserServer
    raise AttributeError(name)
