"""The fds a plan names, made for one session and closed after it."""

from __future__ import annotations

import fcntl
import os

from .wire import RAM_SIZE


class FdFactory:
    """Makes the fds a plan names, and closes the ones it keeps at the end of a session.

    Kinds: ``eventfd``, ``memfd`` (the session's 128 MiB guest RAM), ``memfd-small``
    (4 KiB), ``pipe-r``/``pipe-w`` (a pipe end whose other end stays open),
    ``pipe-r-dead``/``pipe-w-dead`` (its other end closed), ``pipe-w-full`` (a write
    end whose pipe is full; blocking), ``file`` (a regular 4 KiB file).
    """

    KINDS = ("eventfd", "memfd", "memfd-small", "pipe-r", "pipe-w", "pipe-r-dead", "pipe-w-dead",
             "pipe-w-full", "file")

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.mine: list[int] = []
        self._ram: int | None = None

    def make(self, kind: str) -> int:
        """A new fd of ``kind`` (this process keeps it open until :meth:`close`)."""
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        elif kind == "memfd":
            if self._ram is None:
                self._ram = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
                os.ftruncate(self._ram, RAM_SIZE)
                self.mine.append(self._ram)
            return self._ram
        elif kind == "memfd-small":
            fd = os.memfd_create("fuzz-small", os.MFD_CLOEXEC)
            os.ftruncate(fd, 4096)
        elif kind.startswith("pipe-"):
            r, w = os.pipe2(os.O_CLOEXEC)
            fd, other = (r, w) if kind.startswith("pipe-r") else (w, r)
            if kind == "pipe-w-full":
                flags = fcntl.fcntl(w, fcntl.F_GETFL)
                fcntl.fcntl(w, fcntl.F_SETFL, flags | os.O_NONBLOCK)
                try:
                    while True:
                        os.write(w, b"\0" * 65536)
                except BlockingIOError:
                    pass
                fcntl.fcntl(w, fcntl.F_SETFL, flags)  # the server gets it blocking, as a careless client gives it
            if kind.endswith("-dead"):
                os.close(other)
            else:
                self.mine.append(other)
        elif kind == "file":
            fd = os.open(os.path.join(self.workdir, "regular-file"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, 4096)
        else:
            raise ValueError(f"unknown fd kind {kind!r}")
        self.mine.append(fd)
        return fd

    def close(self) -> None:
        """Close every fd made for this session."""
        for fd in self.mine:
            try:
                os.close(fd)
            except OSError:
                pass
        self.mine.clear()
        self._ram = None
