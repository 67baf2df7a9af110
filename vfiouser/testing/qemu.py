"""Find a QEMU with ``vfio-user-pci`` and drive it without a guest (qtest accelerator).

(Moved here from ``vfiouser.qemu``, which re-exports these names.)

:func:`find_qemu` picks the binary: ``$QEMU`` if set, else a ``qemu-system-x86_64``
on ``PATH`` that has ``vfio-user-pci``, else the one ``scripts/get-qemu``
installs (``~/.cache/vfiouser/qemu``; ``vfiouser guest`` fetches it on first
use). :class:`QtestMachine` starts it with ``-accel qtest`` and a QMP monitor
(spoken through ``qemu.qmp``, :mod:`vfiouser.testing.qmp`) and offers what a
test needs: port and memory accesses, PCI configuration cycles, interrupt
interception, reset. The pytest fixture ``qemu_qtest`` builds on it::

    with serve_in_thread(Idio16(), "/tmp/idio16.sock") as server:
        with QtestMachine([server.qemu_device_json(addr="04.0")]) as vm:
            assert vm.pci_cfg_read(4, 0x00) == 0x0DC8494F
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque

from vfiouser.errors import VfioUserError
from vfiouser.paths import cache_dir

from .qmp import Monitor, QmpError

__all__ = ["QemuError", "QemuNotFound", "find_qemu", "has_vfio_user", "QtestMachine", "fetched_qemu_path",
           "machine_args", "qtest_args"]

log = logging.getLogger(__name__)


class QemuError(VfioUserError):
    """QEMU failed to start, exited early, or answered a command with an error."""


class QemuNotFound(QemuError):
    """No QEMU with ``vfio-user-pci`` could be found."""


def fetched_qemu_path() -> str:
    """Where ``scripts/get-qemu`` (and ``vfiouser guest``) install QEMU's wrapper by default."""
    return os.path.join(cache_dir(), "qemu", "bin", "qemu-system-x86_64")


_checked: dict[str, bool] = {}


def has_vfio_user(binary: str) -> bool:
    """Whether ``binary`` runs and offers the ``vfio-user-pci`` device."""
    if binary not in _checked:
        try:
            out = subprocess.run([binary, "-device", "help"], capture_output=True, text=True, timeout=30).stdout
            _checked[binary] = '"vfio-user-pci"' in out
        except (OSError, subprocess.SubprocessError):
            _checked[binary] = False
    return _checked[binary]


def find_qemu() -> str:
    """The QEMU binary to use (see the module docstring); :class:`QemuNotFound` if none."""
    env = os.environ.get("QEMU")
    if env:
        if not has_vfio_user(env):
            raise QemuNotFound(f"$QEMU={env} does not run or has no vfio-user-pci device (QEMU >= 10.1 needed)")
        return env
    system = shutil.which("qemu-system-x86_64")
    if system and has_vfio_user(system):
        return system
    fetched = fetched_qemu_path()
    if os.path.exists(fetched) and has_vfio_user(fetched):
        return fetched
    raise QemuNotFound(
        "no QEMU with vfio-user-pci: run `python -m vfiouser.testing.fetch qemu` (installs QEMU 11.1 "
        "privately; scripts/get-qemu in a checkout) or set $QEMU"
    )


def qtest_args(socket_path: str) -> list[str]:
    """The qtest accelerator, talking on the UNIX socket ``socket_path`` (which must listen)."""
    # -qtest-log none: otherwise QEMU logs every qtest command to stderr, doubling its cost.
    return ["-accel", "qtest", "-qtest", f"unix:{socket_path}", "-qtest-log", "none"]


def machine_args(devices=(), *, memory: str, memfd: bool = False) -> list[str]:
    """A q35 with ``memory`` of RAM, a shared memfd when ``memfd`` (so a vfio-user server can
    reach guest memory in place), and ``devices`` as ``-device`` arguments."""
    args = ["-m", memory, "-display", "none", "-nodefaults"]
    machine = "q35"
    if memfd:
        args += ["-object", f"memory-backend-memfd,id=mem,size={memory},share=on"]
        machine += ",memory-backend=mem"
    args += ["-machine", machine]
    for dev in devices:
        args += ["-device", dev]
    return args


class QtestMachine:
    """A q35 QEMU under the qtest accelerator, with extra ``-device`` arguments.

    ``devices`` are ``-device`` values (e.g. the JSON from
    :meth:`vfiouser.server.Server.qemu_device_json`); ``args`` are more QEMU
    arguments. QEMU's stderr goes to :attr:`log_path`.
    """

    def __init__(self, devices=(), args=(), *, qemu: str | None = None, memory: str = "128M",
                 memfd: bool = False, timeout: float = 30.0) -> None:
        self.qemu = qemu or find_qemu()
        self.timeout = timeout
        self._dir = tempfile.mkdtemp(prefix="vfiouser-qtest-")
        self.log_path = os.path.join(self._dir, "qemu.log")
        qtest_path = os.path.join(self._dir, "qtest.sock")
        qmp_path = os.path.join(self._dir, "qmp.sock")
        self._qtest_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._qtest_listener.bind(qtest_path)
        self._qtest_listener.listen(1)
        cmd = [self.qemu, *qtest_args(qtest_path), "-qmp", f"unix:{qmp_path},server=on,wait=off",
               *machine_args(devices, memory=memory, memfd=memfd), *args]
        self.cmdline = cmd
        self._log = open(self.log_path, "wb")
        log.debug("starting %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        self.irq_events: deque[tuple[str, int]] = deque()
        self._lines: deque[str] = deque()
        self._cond = threading.Condition()
        self._closed = False
        try:
            self._qtest = self._accept(self._qtest_listener)
            self._reader = threading.Thread(target=self._read_qtest, daemon=True)
            self._reader.start()
            self._qmp = self._connect_qmp(qmp_path)
        except BaseException:
            self.close()
            raise

    # -- start-up ------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> socket.socket:
        listener.settimeout(0.2)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise QemuError(f"QEMU exited with status {self.proc.returncode} during start-up:\n{self.output()}")
            try:
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            except socket.timeout:
                continue
        raise QemuError(f"QEMU did not connect to qtest within {self.timeout}s:\n{self.output()}")

    def _connect_qmp(self, path: str) -> Monitor:
        try:
            return Monitor(path, connect_timeout=self.timeout, timeout=self.timeout,
                           alive=lambda: self.proc.poll() is None)
        except QmpError as exc:
            raise QemuError(f"{exc}:\n{self.output()}") from None

    def output(self) -> str:
        """QEMU's stderr/stdout so far (kept after :meth:`close`)."""
        if getattr(self, "_final_output", None) is not None:
            return self._final_output
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # -- qtest protocol ------------------------------------------------------------

    def _read_qtest(self) -> None:
        f = self._qtest.makefile("rb")
        for raw in f:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                if line.startswith("IRQ "):
                    _, kind, num = line.split()
                    self.irq_events.append((kind, int(num)))
                else:
                    self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def cmd(self, text: str, timeout: float | None = None) -> str:
        """Send one qtest command; return what follows ``OK`` (``QemuError`` on FAIL)."""
        self._qtest.sendall(text.encode() + b"\n")
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while not self._lines:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise QemuError(f"no answer to qtest {text!r} (QEMU {self._state()}):\n{self.output()}")
                self._cond.wait(left)
            line = self._lines.popleft()
        if not line.startswith("OK"):
            raise QemuError(f"qtest {text!r} failed: {line}")
        return line[2:].strip()

    def _state(self) -> str:
        code = self.proc.poll()
        return "running" if code is None else f"exited with {code}"

    def wait_irq(self, kind: str, num: int, timeout: float = 5.0) -> bool:
        """Wait for an intercepted ``IRQ raise/lower num`` event; True if it came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, event in enumerate(self.irq_events):
                    if event == (kind, num):
                        del self.irq_events[i]
                        return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)

    def _int(self, text: str) -> int:
        return int(self.cmd(text), 0)

    def inb(self, port: int) -> int:
        return self._int(f"inb {port:#x}")

    def inw(self, port: int) -> int:
        return self._int(f"inw {port:#x}")

    def inl(self, port: int) -> int:
        return self._int(f"inl {port:#x}")

    def outb(self, port: int, value: int) -> None:
        self.cmd(f"outb {port:#x} {value:#x}")

    def outw(self, port: int, value: int) -> None:
        self.cmd(f"outw {port:#x} {value:#x}")

    def outl(self, port: int, value: int) -> None:
        self.cmd(f"outl {port:#x} {value:#x}")

    def readb(self, addr: int) -> int:
        return self._int(f"readb {addr:#x}")

    def readw(self, addr: int) -> int:
        return self._int(f"readw {addr:#x}")

    def readl(self, addr: int) -> int:
        return self._int(f"readl {addr:#x}")

    def readq(self, addr: int) -> int:
        return self._int(f"readq {addr:#x}")

    def writeb(self, addr: int, value: int) -> None:
        self.cmd(f"writeb {addr:#x} {value:#x}")

    def writew(self, addr: int, value: int) -> None:
        self.cmd(f"writew {addr:#x} {value:#x}")

    def writel(self, addr: int, value: int) -> None:
        self.cmd(f"writel {addr:#x} {value:#x}")

    def writeq(self, addr: int, value: int) -> None:
        self.cmd(f"writeq {addr:#x} {value:#x}")

    def memread(self, addr: int, size: int) -> bytes:
        """Guest memory ``[addr, addr+size)``."""
        return bytes.fromhex(self.cmd(f"read {addr:#x} {size:#x}")[2:])

    def memwrite(self, addr: int, data: bytes) -> None:
        """Write ``data`` to guest memory at ``addr``."""
        self.cmd(f"write {addr:#x} {len(data):#x} 0x{data.hex()}")

    def clock_step(self, ns: int | None = None) -> int:
        """Advance virtual time (to the next timer, or by ``ns``)."""
        return int(self.cmd("clock_step" if ns is None else f"clock_step {ns}"))

    def irq_intercept_in(self, qom_path: str = "ioapic") -> None:
        """Report the interrupt lines into ``qom_path`` as ``IRQ raise/lower N`` events."""
        self.cmd(f"irq_intercept_in {qom_path}")

    # -- PCI configuration cycles (bus 0) --------------------------------------------

    @staticmethod
    def _cfg_addr(slot: int, offset: int, func: int = 0) -> int:
        return 0x8000_0000 | (slot << 11) | (func << 8) | (offset & 0xFC)

    def pci_cfg_read(self, slot: int, offset: int, size: int = 4, func: int = 0) -> int:
        """A config read of ``size`` (1, 2, 4) bytes through ports 0xcf8/0xcfc."""
        self.outl(0xCF8, self._cfg_addr(slot, offset, func))
        port = 0xCFC + (offset & 3)
        return {1: self.inb, 2: self.inw, 4: self.inl}[size](port)

    def pci_cfg_write(self, slot: int, offset: int, value: int, size: int = 4, func: int = 0) -> None:
        """A config write through ports 0xcf8/0xcfc."""
        self.outl(0xCF8, self._cfg_addr(slot, offset, func))
        port = 0xCFC + (offset & 3)
        {1: self.outb, 2: self.outw, 4: self.outl}[size](port, value)

    def pci_bar_size(self, slot: int, bar: int) -> tuple[int, bool]:
        """Size a BAR the way firmware does; returns ``(size, is_io)`` and restores the register."""
        reg = 0x10 + 4 * bar
        old = self.pci_cfg_read(slot, reg)
        self.pci_cfg_write(slot, reg, 0xFFFF_FFFF)
        mask = self.pci_cfg_read(slot, reg)
        self.pci_cfg_write(slot, reg, old)
        if mask == 0:
            return 0, False
        is_io = bool(mask & 1)
        mask &= ~0x3 if is_io else ~0xF
        if is_io:
            mask |= 0xFFFF_0000
        return (~mask + 1) & 0xFFFF_FFFF, is_io

    # -- QMP -------------------------------------------------------------------------

    def qmp(self, command: str, **arguments) -> object:
        """Run a QMP command and return its result (:class:`QemuError` if it fails)."""
        try:
            return self._qmp.execute(command, **arguments)
        except QmpError as exc:
            raise QemuError(f"{exc} (QEMU {self._state()}):\n{self.output()}") from None

    def system_reset(self) -> None:
        """Reset the machine (every device, vfio-user ones get DEVICE_RESET)."""
        self.qmp("system_reset")

    # -- shutdown --------------------------------------------------------------------

    def close(self) -> int | None:
        """Quit QEMU (QMP ``quit``, then kill if needed) and clean up; returns its exit status."""
        if getattr(self, "_done", False):
            return self.proc.returncode
        self._done = True
        try:
            if self.proc.poll() is None and hasattr(self, "_qmp"):
                try:
                    self._qmp.execute("quit")
                except QmpError:
                    pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        finally:
            if hasattr(self, "_qmp"):
                self._qmp.close()
            for name in ("_qtest", "_qtest_listener"):
                sock = getattr(self, name, None)
                if sock is not None:
                    sock.close()
            self._log.close()
            self._final_output = self.output()
            shutil.rmtree(self._dir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> QtestMachine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
