"""A lean qtest client for timing: one blocking socket, no reader thread.

:class:`vfiouser.testing.qemu.QtestMachine` reads qtest answers on a thread and hands
them over through a condition variable, which costs the same few microseconds
on every access, in-QEMU device and vfio-user device alike, and so makes a
slow device look closer to the floor than it is. :class:`LeanQtest` writes a
command and reads its answer on the calling thread, and asks QEMU not to log
qtest traffic (``-qtest-log none``; by default QEMU logs every command to
stderr). QEMU runs without QMP; :meth:`LeanQtest.close` ends it with SIGTERM.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time

from ..testing.qemu import QemuError, find_qemu, machine_args, qtest_args

__all__ = ["LeanQtest", "cfg_address"]

log = logging.getLogger(__name__)

_OK = ord("O")
_IN = {1: "inb", 2: "inw", 4: "inl"}
_OUT = {1: "outb", 2: "outw", 4: "outl"}


def cfg_address(slot: int, offset: int, func: int = 0) -> int:
    """The 0xcf8 value of a config cycle to bus 0, ``slot``.``func``, dword at ``offset``."""
    return 0x8000_0000 | (slot << 11) | (func << 8) | (offset & 0xFC)


class LeanQtest:
    """A q35 QEMU under the qtest accelerator, driven synchronously (see the module docstring)."""

    def __init__(self, devices=(), args=(), *, qemu: str | None = None, memory: str = "128M",
                 memfd: bool = False, timeout: float = 30.0) -> None:
        self.qemu = qemu or find_qemu()
        self._dir = tempfile.mkdtemp(prefix="vfu-bench-")
        path = os.path.join(self._dir, "qtest.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        cmd = [self.qemu, *qtest_args(path), *machine_args(devices, memory=memory, memfd=memfd), *args]
        self.cmdline = cmd
        self.log_path = os.path.join(self._dir, "qemu.log")
        self._log = open(self.log_path, "wb")
        log.debug("starting %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        self._sock: socket.socket | None = None
        try:
            self._sock = self._accept(timeout)
        except BaseException:
            self.close()
            raise
        self._fd = self._sock.fileno()

    def _accept(self, timeout: float) -> socket.socket:
        self._listener.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise QemuError(f"QEMU exited with status {self.proc.returncode}:\n{self.output()}")
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            return conn
        raise QemuError(f"QEMU did not connect to qtest within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        """What QEMU printed so far."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # -- commands ---------------------------------------------------------------

    def _read_line(self) -> bytes:
        data = os.read(self._fd, 4096)
        while not data.endswith(b"\n"):
            more = os.read(self._fd, 4096)
            if not more:
                raise QemuError(f"QEMU closed qtest (status {self.proc.poll()}):\n{self.output()}")
            data += more
        return data

    def cmd(self, text: str) -> str:
        """One qtest command; what follows ``OK`` (:class:`QemuError` on anything else)."""
        os.write(self._fd, text.encode() + b"\n")
        line = self._read_line().decode(errors="replace").strip()
        if not line.startswith("OK"):
            raise QemuError(f"qtest {text!r} answered {line!r}")
        return line[2:].strip()

    def value(self, text: str) -> int:
        """A command that answers a number (``readl``, ``inb``, ...)."""
        return int(self.cmd(text), 0)

    def sample(self, line: bytes, count: int) -> list[int]:
        """Run the command ``line`` (bytes, newline-terminated) ``count`` times; the duration
        of each, in nanoseconds, from just before the write to just after the answer."""
        fd, write, read, clock = self._fd, os.write, os.read, time.perf_counter_ns
        out = [0] * count
        for i in range(count):
            t0 = clock()
            write(fd, line)
            data = read(fd, 256)
            while data[-1] != 10:
                data += read(fd, 256)
            out[i] = clock() - t0
            if data[0] != _OK:
                raise QemuError(f"qtest {line!r} answered {data!r}")
        return out

    # -- PCI configuration --------------------------------------------------------

    def cfg_read(self, slot: int, offset: int, size: int = 4) -> int:
        self.cmd(f"outl 0xcf8 {cfg_address(slot, offset):#x}")
        port = 0xCFC + (offset & 3)
        return self.value(f"{_IN[size]} {port:#x}")

    def cfg_write(self, slot: int, offset: int, value: int, size: int = 4) -> None:
        self.cmd(f"outl 0xcf8 {cfg_address(slot, offset):#x}")
        port = 0xCFC + (offset & 3)
        self.cmd(f"{_OUT[size]} {port:#x} {value:#x}")

    def vendor_device(self, slot: int) -> int:
        """Config dword 0 of ``slot`` (0xffffffff when the slot is empty)."""
        return self.cfg_read(slot, 0)

    # -- shutdown --------------------------------------------------------------------

    def close(self) -> int | None:
        """Stop QEMU (SIGTERM, then SIGKILL) and remove the temporary directory."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for sock in (self._sock, self._listener):
            if sock is not None:
                sock.close()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> LeanQtest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
