"""Boot a real Linux guest with devices attached, run a script in it, watch its console.

The guest is Debian's stock kernel and a busybox initramfs built here, on the
fly, for each run: ``/init`` mounts ``/proc``, ``/sys`` and ``/dev``, loads the
kernel modules the test asks for (their dependencies first, read from each
module's ``.modinfo``), runs the test's shell script, prints a result marker on
the serial console and powers off. ``scripts/get-guest`` (in a checkout) or
``python -m vfiouser.testing.fetch guest`` fetches the kernel and busybox from
Debian's packages into ``~/.cache/vfiouser/guest``; ``vfiouser guest`` does it
on first use. (Moved here from ``vfiouser.guest``, which re-exports these names.)

::

    assets = GuestAssets.find()
    with serve_in_thread(Idio16(), sock) as server:
        with Guest(assets, script="cat /sys/bus/pci/devices/*/vendor",
                   devices=[server.qemu_device_json()]) as guest:
            result = guest.wait()
    assert result.exit_code == 0 and "0x494f" in result.console

While the guest runs, :meth:`Guest.expect` waits for a line on its console and
:meth:`Guest.send` types into it, so a test can drive the host side of a
device in step with the guest (``echo READY`` in the script, ``expect("READY")``
in the test).

Accelerator: KVM when ``/dev/kvm`` is a normal, usable KVM; TCG otherwise
(``VFIOUSER_ACCEL`` overrides). Guest RAM is a shared memfd by default, so
devices do DMA in place; ``memfd=False`` gives QEMU's default RAM (DMA by
messages).
"""

from __future__ import annotations

import gzip
import io
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from vfiouser.errors import VfioUserError
from vfiouser.paths import cache_dir

from .qemu import find_qemu, machine_args

__all__ = [
    "GuestAssets",
    "GuestAssetsMissing",
    "GuestError",
    "GuestResult",
    "Guest",
    "build_initramfs",
    "module_dependencies",
    "default_accel",
    "guest_assets_dir",
]

log = logging.getLogger(__name__)

READY_MARKER = "VFIOUSER-GUEST-READY"
EXIT_MARKER = "VFIOUSER-GUEST-EXIT"


class GuestError(VfioUserError):
    """The guest did not boot, did not finish in time, or failed."""


class GuestAssetsMissing(GuestError):
    """The guest kernel and busybox have not been fetched (none in the cache, or none at ``$VFIOUSER_GUEST``)."""


def guest_assets_dir() -> str:
    """``$VFIOUSER_GUEST``, or the newest kernel directory ``scripts/get-guest`` unpacked."""
    env = os.environ.get("VFIOUSER_GUEST")
    if env:
        return env
    root = os.path.join(cache_dir(), "guest")
    candidates = sorted(
        (os.path.join(root, d) for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "VERSION")))
        if os.path.isdir(root) else []
    )
    if not candidates:
        raise GuestAssetsMissing(f"no guest kernel in {root}: run `python -m vfiouser.testing.fetch guest` "
                                 "(scripts/get-guest in a checkout) or set $VFIOUSER_GUEST")
    return candidates[-1]


@dataclass(frozen=True)
class GuestAssets:
    """A kernel, its module tree and a static busybox."""

    kernel: str
    busybox: str
    modules: str
    version: str

    @classmethod
    def find(cls, path: str | None = None) -> GuestAssets:
        path = path or guest_assets_dir()
        parts = {name: os.path.join(path, name) for name in ("vmlinuz", "busybox", "modules", "VERSION")}
        missing = [name for name, p in parts.items() if not os.path.exists(p)]
        if missing:
            raise GuestAssetsMissing(f"{path} lacks {', '.join(missing)}: run `python -m vfiouser.testing.fetch "
                                     "guest` (scripts/get-guest in a checkout)")
        with open(parts["VERSION"]) as f:
            version = f.read().strip()
        return cls(parts["vmlinuz"], parts["busybox"], parts["modules"], version)

    def module_index(self) -> dict[str, str]:
        """Module name (``-`` and ``_`` equivalent) -> path of its ``.ko.xz``."""
        index = {}
        for dirpath, _, files in os.walk(self.modules):
            for f in files:
                if f.endswith((".ko", ".ko.xz", ".ko.zst", ".ko.gz")):
                    index[_norm(f.split(".ko")[0])] = os.path.join(dirpath, f)
        return index


    def module_image(self, name: str) -> bytes:
        """The kernel module ``name`` of this kernel's tree, decompressed: a ``.ko`` file's bytes."""
        path = self.module_index().get(_norm(name))
        if path is None:
            raise GuestError(f"kernel {self.version} has no module {name!r} (built in, or not built?)")
        return _load_module(path)


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _load_module(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        raise GuestError(f"{path}: zstd-compressed modules are not supported")
    return data


def _modinfo(elf: bytes) -> dict[str, str]:
    """The ``.modinfo`` section of a kernel module (an ELF64 little-endian object)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise GuestError("not an ELF64 little-endian kernel module")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i):
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, offset, size

    _, str_off, str_size = section(shstrndx)
    names = elf[str_off : str_off + str_size]
    for i in range(shnum):
        name, offset, size = section(i)
        if names[name : names.index(b"\0", name)] == b".modinfo":
            info = {}
            for entry in elf[offset : offset + size].split(b"\0"):
                key, sep, value = entry.partition(b"=")
                if sep:
                    info.setdefault(key.decode(), value.decode(errors="replace"))
            return info
    return {}


def _own_module(name) -> str | None:
    """The host path of a module given as a file (``./mydrv.ko``) rather than by name."""
    text = os.fspath(name)
    if os.sep in text or text.endswith((".ko", ".ko.xz", ".ko.gz")):
        if not os.path.isfile(text):
            raise GuestError(f"kernel module file {text} does not exist")
        return text
    return None


def module_dependencies(assets: GuestAssets, names) -> list[tuple[str, bytes]]:
    """``(name, image)`` for ``names`` and everything they depend on, dependencies first.

    A name is a module of the guest kernel's tree (``gpio-pci-idio-16``) or the path of
    a module file of your own (``./mydrv.ko``, built for that kernel), whose ``depends=``
    are looked up in the tree."""
    index = assets.module_index()
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        own = _own_module(name)
        key = _norm(os.path.basename(own).split(".ko")[0] if own else name)
        if key in seen:
            return
        if key in chain:
            raise GuestError(f"module dependency loop: {' -> '.join(chain + (key,))}")
        path = own or index.get(key)
        if path is None:
            raise GuestError(f"kernel {assets.version} has no module {name!r} (built in, or not built?)")
        image = _load_module(path)
        for dep in filter(None, _modinfo(image).get("depends", "").split(",")):
            visit(dep, chain + (key,))
        seen.add(key)
        order.append((key, image))

    for name in names:
        visit(name, ())
    return order


# -- initramfs ------------------------------------------------------------------

class _Cpio:
    """A newc cpio archive, the format the kernel unpacks an initramfs from."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_b = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0)
        self.ino += 1
        self.out.write(b"070701" + b"".join(b"%08x" % f for f in fields))
        self.out.write(name_b)
        self.out.write(b"\0" * (-(110 + len(name_b)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self.out.getvalue()


_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp
for m in $(cat /etc/modules.order); do
    insmod /lib/modules/$m.ko || echo "VFIOUSER-INSMOD-FAILED $m"
done
echo {ready}
sh /test.sh
echo "{exit} $?"
poweroff -f
"""


def _file_data(guest_path: str, source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as exc:
        raise GuestError(f"file for {guest_path}: cannot read {source}: {exc.strerror}") from None


def build_initramfs(assets: GuestAssets, script: str, modules=(), files: dict | None = None) -> bytes:
    """An initramfs (newc cpio) that loads ``modules`` and runs ``script`` with busybox ``sh``.

    ``files`` maps a path in the guest to its contents (bytes) or to a host file to copy;
    files are executable, and the directories above them are created."""
    cpio = _Cpio()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp"):
        cpio.add(d, stat.S_IFDIR | 0o755)
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    with open(assets.busybox, "rb") as f:
        cpio.add("bin/busybox", stat.S_IFREG | 0o755, f.read())
    cpio.add("bin/sh", stat.S_IFLNK | 0o777, b"busybox")
    order = module_dependencies(assets, modules)
    for name, image in order:
        cpio.add(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, image)
    cpio.add("etc/modules.order", stat.S_IFREG | 0o644, "\n".join(n for n, _ in order).encode() + b"\n")
    cpio.add("init", stat.S_IFREG | 0o755, _INIT.format(ready=READY_MARKER, exit=EXIT_MARKER).encode())
    cpio.add("test.sh", stat.S_IFREG | 0o755, script.encode())
    made = {"bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp"}
    for path, source in (files or {}).items():
        name = path.strip("/")
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if directory not in made:
                cpio.add(directory, stat.S_IFDIR | 0o755)
                made.add(directory)
        cpio.add(name, stat.S_IFREG | 0o755, _file_data(path, source))
    return cpio.finish()


# -- running a guest ------------------------------------------------------------

def default_accel() -> str:
    """``kvm`` when /dev/kvm is a normal, usable KVM; ``tcg`` otherwise (or ``$VFIOUSER_ACCEL``)."""
    env = os.environ.get("VFIOUSER_ACCEL")
    if env:
        return env
    if os.path.exists("/sys/module/kvm_pvm"):  # only runs PVM-enabled guest kernels
        return "tcg"
    if os.access("/dev/kvm", os.R_OK | os.W_OK) and (
        os.path.exists("/sys/module/kvm_intel") or os.path.exists("/sys/module/kvm_amd")
    ):
        return "kvm"
    return "tcg"


@dataclass
class GuestResult:
    """How a guest run ended."""

    exit_code: int | None
    console: str
    elapsed: float
    qemu_status: int | None = None
    lines: list[str] = field(default_factory=list)


class Guest:
    """A QEMU running the test guest (see the module docstring)."""

    def __init__(self, assets: GuestAssets, script: str, *, devices=(), modules=(), files=None,
                 memory: str = "512M", memfd: bool = True, append: str = "", cpus: int = 1,
                 accel: str | None = None, qemu: str | None = None, extra_args=(),
                 console: str = "ttyS0", interactive: bool = False) -> None:
        """``console`` is the kernel's console and ``/dev/console``: ``ttyS0`` is QEMU's own
        UART, which this object reads and :meth:`send` types into. Another port (``ttyS1``, a
        UART model served over vfio-user) takes the script's output and result markers with it,
        so then :attr:`exit_code` stays ``None`` and the caller reads that UART instead; ttyS0
        still carries :meth:`send`'s input for a script that reads ``/dev/ttyS0``.

        ``interactive=True`` gives the console to this process's terminal instead (QEMU's
        ``mon:stdio``: Ctrl-a x quits, Ctrl-a c is QEMU's monitor); nothing is read, so
        :meth:`expect` and :attr:`exit_code` are not available."""
        self.qemu = qemu or find_qemu()
        self.accel = accel or default_accel()
        #: The models served for this guest (filled in by ``linux_guest`` and ``vfiouser guest``).
        self.models: list = []
        self._dir = tempfile.mkdtemp(prefix="vfiouser-guest-")
        initrd = os.path.join(self._dir, "initramfs.cpio")
        with open(initrd, "wb") as f:
            f.write(build_initramfs(assets, script, modules, files))
        self.interactive = interactive
        serial = "mon:stdio" if interactive else "stdio"
        cmd = [self.qemu, "-accel", self.accel, "-smp", str(cpus), "-no-reboot", "-serial", serial,
               "-kernel", assets.kernel, "-initrd", initrd,
               "-append", f"console={console} panic=-1 loglevel=4 {append}".strip()]
        if self.accel == "kvm":
            cmd += ["-cpu", "host"]
        cmd += [*machine_args(devices, memory=memory, memfd=memfd), *extra_args]
        self.cmdline = cmd
        log.debug("booting: %s", " ".join(cmd))
        self.started = time.monotonic()
        if interactive:
            self.proc = subprocess.Popen(cmd)
        else:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._pending: deque[str] = deque()
        self._cond = threading.Condition()
        self._eof = False
        self.exit_code: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        if not interactive:
            self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            with self._cond:
                self.lines.append(line)
                self._pending.append(line)
                if line.startswith(EXIT_MARKER):
                    try:
                        self.exit_code = int(line.split()[1])
                    except (IndexError, ValueError):
                        pass
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def console(self) -> str:
        """Everything the guest printed so far."""
        with self._cond:
            return "\n".join(self.lines)

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """Wait for a console line matching ``pattern`` (a regex); lines before it are consumed."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._pending:
                    line = self._pending.popleft()
                    match = regex.search(line)
                    if match:
                        return match
                    if line.startswith(EXIT_MARKER):
                        raise GuestError(f"the guest finished before printing {pattern!r}:\n{self.tail()}")
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "QEMU exited" if self._eof else f"{timeout}s passed"
                    raise GuestError(f"{why} before the guest printed {pattern!r}:\n{self.tail()}")
                self._cond.wait(left)

    def send(self, text: str) -> None:
        """Type ``text`` on the guest's serial console."""
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def tail(self, lines: int = 60) -> str:
        with self._cond:
            return "\n".join(self.lines[-lines:])

    def wait(self, timeout: float = 120.0) -> GuestResult:
        """Wait for the guest to power off; its result (the script's exit status)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise GuestError(f"the guest did not finish within {timeout}s:\n{self.tail()}") from None
        if not self.interactive:
            self._reader.join(5)
        return GuestResult(self.exit_code, self.console, time.monotonic() - self.started, self.proc.returncode,
                           list(self.lines))

    def close(self) -> None:
        """Stop QEMU if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is None:  # interactive: the terminal's, not ours
                continue
            try:
                stream.close()
            except OSError:
                pass
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
