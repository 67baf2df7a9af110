"""What the bench ran on: CPU, kernel, Python, QEMU, accelerator, source revision."""

from __future__ import annotations

import datetime
import logging
import os
import platform
import subprocess

from .. import __version__
from ..testing.guest import default_accel
from ..testing.qemu import QemuNotFound, find_qemu

__all__ = ["describe_machine"]

log = logging.getLogger(__name__)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _qemu_version() -> tuple[str, str]:
    try:
        binary = find_qemu()
    except QemuNotFound as exc:
        return "not found", str(exc)
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return "unknown", f"{binary}: {exc}"
    return (out.splitlines() or ["unknown"])[0], binary


def _git_revision(root: str) -> str:
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown (not a git checkout)"
    return f"{head}" + (" with uncommitted changes" if dirty else "")


def _kvm_note() -> str:
    if os.path.exists("/sys/module/kvm_pvm"):
        return "/dev/kvm is kvm_pvm (runs PVM guests only): not used"
    if os.path.exists("/dev/kvm"):
        return "/dev/kvm present"
    return "no /dev/kvm"


def describe_machine(root: str) -> dict:
    """The machine description for the report (``root``: the source tree, for its revision)."""
    qemu_version, qemu_path = _qemu_version()
    uname = platform.uname()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "kernel": f"{uname.system} {uname.release} ({uname.machine})",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "qemu": qemu_version,
        "qemu_path": qemu_path,
        "accel_qtest": "qtest (no guest CPU) for sections 1-5",
        "accel_guest": f"{default_accel()} for the guest (section 6); {_kvm_note()}",
        "vfiouser": f"{__version__}, revision {_git_revision(root)}",
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
