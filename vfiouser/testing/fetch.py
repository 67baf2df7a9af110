"""Fetch QEMU and the test guest into the cache, from an installed vfiouser.

``python -m vfiouser.testing.fetch qemu|guest|all`` (and ``vfiouser guest``, on
first use) runs the provisioning scripts that ship in the package
(``vfiouser/testing/provision/``; ``scripts/get-qemu`` and ``scripts/get-guest``
run the same ones from a checkout). They download Debian's packages with a
private apt state, from the Debian archive this machine's apt sources name (or
``$VFIOUSER_DEBIAN_MIRROR``), and unpack them into the cache
(:func:`vfiouser.paths.cache_dir`) without changing the system. They need
``bash``, ``apt-get`` and ``dpkg-deb`` (a Debian or Ubuntu host). Their
progress goes to standard error.

What is found already (``$QEMU``, a system QEMU with ``vfio-user-pci``,
``$VFIOUSER_GUEST``, the cache) is used as is.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

from vfiouser.errors import UsageError
from vfiouser.paths import cache_dir

__all__ = ["FetchError", "ensure_qemu", "ensure_guest", "provision_script", "main"]

_HERE = os.path.dirname(os.path.abspath(__file__))


class FetchError(UsageError):
    """QEMU or the guest could not be fetched (the message says what to do instead)."""


def provision_script(name: str) -> str:
    """The path of a provisioning script shipped in the package (``get-qemu``, ``get-guest``)."""
    path = os.path.join(_HERE, "provision", name)
    if not os.path.isfile(path):
        raise FetchError(f"{path} is missing: this vfiouser was installed without its provisioning scripts")
    return path


def _run(name: str, variable: str, log) -> str:
    missing = [tool for tool in ("bash", "apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise FetchError(f"fetching needs {', '.join(missing)} (a Debian or Ubuntu host); elsewhere install "
                         f"what it would fetch yourself and set ${variable}")
    log(f"fetching into {cache_dir()} with {provision_script(name)} (first use only)")
    proc = subprocess.run(["bash", provision_script(name)], stdout=subprocess.PIPE, text=True)
    match = re.search(rf"^export {variable}=(.+)$", proc.stdout, re.M)
    if proc.returncode != 0 or match is None:
        raise FetchError(f"{name} failed (exit status {proc.returncode}); its messages are above. "
                         f"Set ${variable} to use one you have.")
    return match.group(1).strip()


def ensure_qemu(log=None) -> str:
    """A QEMU with ``vfio-user-pci``: the one :func:`~vfiouser.testing.qemu.find_qemu` finds, else
    QEMU 11.1 fetched into the cache now. ``log(text)`` reports progress (default: stderr)."""
    from .qemu import QemuNotFound, find_qemu

    log = log or _stderr
    try:
        return find_qemu()
    except QemuNotFound as exc:
        if os.environ.get("QEMU"):
            raise FetchError(str(exc)) from None
    path = _run("get-qemu", "QEMU", log)
    log(f"QEMU is {path}")
    return path


def ensure_guest(log=None):
    """The guest kernel and busybox (:class:`~vfiouser.testing.guest.GuestAssets`): found, else
    fetched into the cache now."""
    from .guest import GuestAssets, GuestAssetsMissing

    log = log or _stderr
    try:
        return GuestAssets.find()
    except GuestAssetsMissing as exc:
        if os.environ.get("VFIOUSER_GUEST"):
            raise FetchError(str(exc)) from None
    path = _run("get-guest", "VFIOUSER_GUEST", log)
    log(f"guest kernel and busybox are in {path}")
    return GuestAssets.find(path)


def _stderr(text: str) -> None:
    print(f"vfiouser: {text}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """``python -m vfiouser.testing.fetch qemu|guest|all``: fetch what is missing, print where it is."""
    parser = argparse.ArgumentParser(prog="python -m vfiouser.testing.fetch",
                                     description="Fetch QEMU with vfio-user-pci and the test guest into "
                                                 f"the cache ({cache_dir()}).")
    parser.add_argument("what", choices=["qemu", "guest", "all"])
    args = parser.parse_args(argv)
    try:
        if args.what in ("qemu", "all"):
            print(f"QEMU={ensure_qemu()}")
        if args.what in ("guest", "all"):
            print(f"VFIOUSER_GUEST={os.path.dirname(ensure_guest().kernel)}")
    except FetchError as exc:
        _stderr(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
