"""ctypes bindings for the part of libvfio-user's public API a backend needs.

Written from ``include/libvfio-user.h`` at the pinned commit (efd091bce1c1):
each C type, enum and prototype is declared here once. :class:`Library` loads
``libvfio-user.so.0`` (:func:`find_library`) and exposes the functions with
their argument and result types set; every function that reports failure
through ``errno`` raises :class:`LibvfioUserError` (with ``errno`` and the
function's name) instead of returning -1 or NULL.

Callbacks are made with the ``*_CB`` function types below. ctypes does not
keep a callback alive: whoever passes one to C keeps a reference for as long as
the context lives (:class:`~vfiouser.libvfio_user.context.Context` does). The
types that report failure (region access, reset, quiesce) are made with
``use_errno=True``, so a callback sets the errno C sees with
:func:`ctypes.set_errno` before returning -1.

>>> import ctypes
>>> ctypes.sizeof(DmaInfo) == 2 * ctypes.sizeof(IoVec) + 2 * ctypes.sizeof(ctypes.c_void_p) + 8
True
>>> int(IrqType.MSIX), int(PciRegion.CONFIG), int(ResetType.LOST_CONN)
(2, 7, 1)
"""

from __future__ import annotations

import ctypes
import enum
import errno as _errno
import os
from ctypes import CFUNCTYPE, POINTER, Structure, c_bool, c_char_p, c_int, c_int64, c_size_t, c_ssize_t, c_uint8
from ctypes import c_uint16, c_uint32, c_void_p

from ..errors import VfioUserError
from ..paths import cache_dir

__all__ = [
    "COMMIT",
    "LibvfioUserError",
    "LibraryNotFound",
    "find_library",
    "Library",
    "IoVec",
    "DmaInfo",
    "Transport",
    "PciType",
    "PciRegion",
    "RegionFlags",
    "ResetType",
    "IrqType",
    "ATTACH_NB",
    "LOG_FN",
    "REGION_ACCESS_CB",
    "RESET_CB",
    "QUIESCE_CB",
    "DMA_CB",
    "IRQ_STATE_CB",
]

#: The libvfio-user commit these bindings are written against (``scripts/get-libvfio-user`` builds it).
COMMIT = "efd091bce1c1"


class LibvfioUserError(VfioUserError):
    """A libvfio-user call failed. ``function`` names it, ``errno`` is what it set."""

    def __init__(self, function: str, errno: int, detail: str = "") -> None:
        self.function = function
        why = os.strerror(errno) if errno else "failed"
        super().__init__(f"{function}: {why}{' (' + detail + ')' if detail else ''}", errno=errno or _errno.EIO)


class LibraryNotFound(LibvfioUserError):
    """No ``libvfio-user.so.0`` to load; the message says how to get one."""

    def __init__(self, message: str) -> None:
        VfioUserError.__init__(self, message, errno=_errno.ENOENT)
        self.function = "dlopen"


def find_library() -> str:
    """The path of ``libvfio-user.so.0``: ``$VFIOUSER_LIBVFIO_USER``, else the one
    ``scripts/get-libvfio-user`` built into the project's cache. Raises
    :class:`LibraryNotFound` naming both when neither exists."""
    env = os.environ.get("VFIOUSER_LIBVFIO_USER")
    if env:
        if not os.path.isfile(env):
            raise LibraryNotFound(f"$VFIOUSER_LIBVFIO_USER is {env!r}, which is not a file")
        return env
    built = os.path.join(cache_dir(), "libvfio-user", COMMIT, "build", "lib", "libvfio-user.so.0")
    if os.path.isfile(built):
        return built
    raise LibraryNotFound(
        "libvfio-user is not built: run scripts/get-libvfio-user (it builds the pinned commit "
        f"{COMMIT} into {os.path.dirname(os.path.dirname(os.path.dirname(built)))} and prints the library's "
        "path), or set $VFIOUSER_LIBVFIO_USER to a libvfio-user.so.0"
    )


# -- types ---------------------------------------------------------------------------------


class IoVec(Structure):
    """``struct iovec``."""

    _fields_ = [("iov_base", c_void_p), ("iov_len", c_size_t)]


class DmaInfo(Structure):
    """``vfu_dma_info_t``: a guest DMA region. ``iova`` is always set; ``vaddr`` and
    ``mapping`` only when the client gave an fd (the region is mapped in this process)."""

    _fields_ = [
        ("iova", IoVec),
        ("vaddr", c_void_p),
        ("mapping", IoVec),
        ("page_size", c_size_t),
        ("prot", c_uint32),
    ]


class Transport(enum.IntEnum):
    """``vfu_trans_t``."""

    SOCK = 0
    PIPE = 1


class PciType(enum.IntEnum):
    """``vfu_pci_type_t``: decides the size of libvfio-user's own config space."""

    CONVENTIONAL = 0
    PCI_X_1 = 1
    PCI_X_2 = 2
    EXPRESS = 3


class PciRegion(enum.IntEnum):
    """Region indexes of a PCI device (``VFU_PCI_DEV_*_REGION_IDX``)."""

    BAR0 = 0
    ROM = 6
    CONFIG = 7
    VGA = 8
    COUNT = 9


class RegionFlags(enum.IntFlag):
    """``VFU_REGION_FLAG_*``."""

    READ = 1 << 0
    WRITE = 1 << 1
    RW = READ | WRITE
    MEM = 1 << 2
    ALWAYS_CB = 1 << 3
    BITS_64 = 1 << 4
    PREFETCH = 1 << 5


class ResetType(enum.IntEnum):
    """``vfu_reset_type_t``: why the reset callback is called."""

    DEVICE = 0  # the client asked (DEVICE_RESET)
    LOST_CONN = 1  # the client went away
    PCI_FLR = 2  # the client asked for a function-level reset


class IrqType(enum.IntEnum):
    """``enum vfu_dev_irq_type`` (the same order as VFIO's interrupt indexes)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4
    COUNT = 5


#: ``LIBVFIO_USER_FLAG_ATTACH_NB``: ``vfu_attach_ctx`` does not wait for a client, and
#: ``vfu_run_ctx`` handles at most one message per call.
ATTACH_NB = 1 << 0
#: ``VFU_SGL_DIRECT_ACCESS`` is not used: these bindings leave sgl flags at 0.
PCI_HEADER_TYPE_NORMAL = 0

_ctx = c_void_p
#: ``void log(vfu_ctx_t *, int level, const char *msg)``
LOG_FN = CFUNCTYPE(None, _ctx, c_int, c_char_p)
#: ``ssize_t access(vfu_ctx_t *, char *buf, size_t count, loff_t offset, bool is_write)``
REGION_ACCESS_CB = CFUNCTYPE(c_ssize_t, _ctx, c_void_p, c_size_t, c_int64, c_bool, use_errno=True)
#: ``int reset(vfu_ctx_t *, vfu_reset_type_t)``
RESET_CB = CFUNCTYPE(c_int, _ctx, c_int, use_errno=True)
#: ``int quiesce(vfu_ctx_t *)``
QUIESCE_CB = CFUNCTYPE(c_int, _ctx, use_errno=True)
#: ``void dma_register(vfu_ctx_t *, vfu_dma_info_t *)`` (and unregister)
DMA_CB = CFUNCTYPE(None, _ctx, POINTER(DmaInfo))
#: ``void irq_state(vfu_ctx_t *, uint32_t start, uint32_t count, bool mask)``
IRQ_STATE_CB = CFUNCTYPE(None, _ctx, c_uint32, c_uint32, c_bool)


# -- functions -------------------------------------------------------------------------------


def _minus_one(result, func, args):
    if result == -1:
        raise LibvfioUserError(func.__name__, ctypes.get_errno())
    return result


def _null(result, func, args):
    if not result:
        raise LibvfioUserError(func.__name__, ctypes.get_errno())
    return result


#: name: (restype, argtypes, errcheck)
_PROTOTYPES = {
    "vfu_create_ctx": (c_void_p, [c_int, c_char_p, c_int, c_void_p, c_int], _null),
    "vfu_realize_ctx": (c_int, [_ctx], _minus_one),
    "vfu_attach_ctx": (c_int, [_ctx], _minus_one),
    "vfu_get_poll_fd": (c_int, [_ctx], _minus_one),
    "vfu_run_ctx": (c_int, [_ctx], _minus_one),
    "vfu_destroy_ctx": (None, [_ctx], None),
    "vfu_setup_log": (c_int, [_ctx, LOG_FN, c_int], _minus_one),
    "vfu_setup_region": (c_int, [_ctx, c_int, c_size_t, REGION_ACCESS_CB, c_int, POINTER(IoVec), c_uint32, c_int,
                                 ctypes.c_uint64], _minus_one),
    "vfu_setup_device_reset_cb": (c_int, [_ctx, RESET_CB], _minus_one),
    "vfu_setup_device_quiesce_cb": (None, [_ctx, QUIESCE_CB], None),
    "vfu_setup_device_dma": (c_int, [_ctx, c_size_t, DMA_CB, DMA_CB], _minus_one),
    "vfu_setup_device_nr_irqs": (c_int, [_ctx, c_int, c_uint32], _minus_one),
    "vfu_setup_irq_state_callback": (c_int, [_ctx, c_int, IRQ_STATE_CB], _minus_one),
    "vfu_irq_trigger": (c_int, [_ctx, c_uint32], _minus_one),
    "vfu_addr_to_sgl": (c_int, [_ctx, c_void_p, c_size_t, c_void_p, c_size_t, c_int], None),
    "vfu_sgl_read": (c_int, [_ctx, c_void_p, c_size_t, c_void_p, c_int], _minus_one),
    "vfu_sgl_write": (c_int, [_ctx, c_void_p, c_size_t, c_void_p, c_int], _minus_one),
    "vfu_sg_is_mappable": (c_bool, [_ctx, c_void_p], None),
    "dma_sg_size": (c_size_t, [], None),
    "vfu_pci_init": (c_int, [_ctx, c_int, c_int, c_int], _minus_one),
    "vfu_pci_set_id": (None, [_ctx, c_uint16, c_uint16, c_uint16, c_uint16], None),
    "vfu_pci_set_class": (None, [_ctx, c_uint8, c_uint8, c_uint8], None),
}


class Library:
    """``libvfio-user.so.0``, loaded, with every function of :data:`_PROTOTYPES` as an attribute.

    ``Library()`` loads the library :func:`find_library` finds; ``Library(path)`` that one.
    A library that cannot be loaded, or lacks a function, raises :class:`LibraryNotFound`.
    """

    _loaded: dict[str, Library] = {}

    def __init__(self, path: str | None = None) -> None:
        self.path = path or find_library()
        try:
            self._dll = ctypes.CDLL(self.path, use_errno=True)
        except OSError as exc:
            raise LibraryNotFound(f"cannot load {self.path}: {exc}") from None
        for name, (restype, argtypes, errcheck) in _PROTOTYPES.items():
            try:
                func = getattr(self._dll, name)
            except AttributeError:
                raise LibraryNotFound(f"{self.path} has no {name}: not libvfio-user {COMMIT}?") from None
            func.restype, func.argtypes = restype, argtypes
            if errcheck is not None:
                func.errcheck = errcheck
            setattr(self, name, func)
        #: ``sizeof(dma_sg_t)``, which the header keeps opaque
        self.sg_size = self.dma_sg_size()

    @classmethod
    def load(cls, path: str | None = None) -> Library:
        """The library at ``path`` (default: :func:`find_library`), loaded once per process."""
        path = path or find_library()
        if path not in cls._loaded:
            cls._loaded[path] = cls(path)
        return cls._loaded[path]

    def addr_to_sgl(self, ctx, addr: int, size: int, prot: int) -> tuple[ctypes.Array, int]:
        """``vfu_addr_to_sgl`` with an sgl array grown as needed: ``(sgl, entries)``.
        Raises :class:`LibvfioUserError` with ENOENT (not mapped) or EACCES (protection)."""
        entries = 4
        while True:
            sgl = (ctypes.c_char * (self.sg_size * entries))()
            ctypes.set_errno(0)
            count = self.vfu_addr_to_sgl(ctx, addr, size, sgl, entries, prot)
            if count >= 0:
                return sgl, count
            if count == -1:
                raise LibvfioUserError("vfu_addr_to_sgl", ctypes.get_errno() or _errno.EINVAL,
                                       f"[{addr:#x}, +{size:#x})")
            entries = -count - 1  # it told us how many it needs
