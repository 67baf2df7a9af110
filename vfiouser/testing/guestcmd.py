"""``vfiouser guest``: serve devices, boot the Debian guest with them, run a script or give a console.

::

    vfiouser guest DEVICE [--param key=value ...] [--device SPEC ...] [--file PATH[:GUEST_PATH] ...]
                   [--modules m1,m2] [--run SCRIPT] [--backend NAME] [--timeout S] [--no-memfd]

``DEVICE`` (and each ``--device``) is a built-in name or ``package.module:Class``,
as for ``vfiouser serve``; ``--param`` sets DEVICE's parameters, and a
``--device`` takes its own after commas (``--device edu,dma_delay_ms=0``). The
devices go in slots 4, 5, ... of a q35 machine. ``--file`` copies a host file
into the guest (by default as ``/NAME``, where the script starts). ``--modules``
loads kernel modules, dependencies first: names from the guest kernel's tree,
or paths of your own ``.ko`` files.

With ``--run SCRIPT`` the script runs with busybox ``sh`` once the modules are
loaded, its output is shown as it comes, and the command exits with the
script's exit status (124 if it did not finish within ``--timeout`` seconds, 1
if the guest stopped without one). Without it you get a shell on the guest's
console; ``exit`` powers the guest off, Ctrl-a x quits QEMU.

QEMU and the guest kernel are fetched on first use (see
:mod:`vfiouser.testing.fetch`), with progress on standard error and the place
they are cached in.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vfiouser.backends import BACKENDS, DEFAULT_BACKEND
from vfiouser.devices import DeviceLoadError, make_device

__all__ = ["add_parser", "run"]

log = logging.getLogger(__name__)

#: The console script of an interactive guest: a shell with job control on the console.
INTERACTIVE = "echo 'vfiouser guest: exit powers off; Ctrl-a x quits QEMU'\nsetsid cttyhack sh\n"

#: The exit status when the guest did not finish in time (as timeout(1)).
TIMED_OUT = 124


def _pairs(items, what: str) -> dict[str, str]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeviceLoadError(f"{what} {item!r}: expected key=value")
        params[key] = value
    return params


def _device(spec: str, params: dict[str, str]):
    # ``mod:Class`` resolves from the current directory, as for ``vfiouser serve``.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return make_device(spec, params)


def _files(items) -> dict[str, str]:
    files = {}
    for item in items:
        host, sep, guest = item.partition(":")
        if not os.path.isfile(host):
            raise DeviceLoadError(f"--file {item!r}: {host} is not a file")
        files[guest if sep and guest else "/" + os.path.basename(host)] = host
    return files


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``guest`` subcommand to the ``vfiouser`` command's subparsers."""
    p = sub.add_parser("guest", help="boot the Debian test guest with devices attached; run a script or get a shell",
                       description=__doc__.split("::")[0].strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("device", help="built-in device name or package.module:Class (slot 4)")
    p.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                   help="parameter of DEVICE (repeatable)")
    p.add_argument("--device", "-d", dest="more", action="append", default=[], metavar="SPEC[,KEY=VALUE...]",
                   help="another device, with its parameters after commas (repeatable; slots 5, 6, ...)")
    p.add_argument("--file", "-f", action="append", default=[], metavar="PATH[:GUEST_PATH]",
                   help="copy a host file into the guest (default /NAME; repeatable)")
    p.add_argument("--modules", "-m", default="", metavar="M1,M2",
                   help="kernel modules to load first: names from the guest kernel, or paths of .ko files")
    p.add_argument("--run", "-r", metavar="SCRIPT", help="shell script to run in the guest; its exit status "
                   "is the command's (without it: an interactive shell)")
    p.add_argument("--backend", "-b", choices=sorted(BACKENDS), default=DEFAULT_BACKEND,
                   help=f"protocol engine serving the devices (default {DEFAULT_BACKEND})")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds the script may take (default 300)")
    p.add_argument("--no-memfd", dest="memfd", action="store_false",
                   help="QEMU's default guest RAM: devices DMA by messages instead of in place")
    p.add_argument("--append", default="", metavar="ARGS", help="more kernel command-line arguments")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log every decoded message")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Run ``vfiouser guest`` with parsed ``args``; the exit status."""
    from .fetch import FetchError, ensure_guest, ensure_qemu
    from .guest import Guest, GuestError
    from .served import ServedModels

    def say(text: str) -> None:
        print(f"vfiouser: {text}", file=sys.stderr, flush=True)

    try:
        models = [_device(args.device, _pairs(args.param, "--param"))]
        for spec in args.more:
            name, *params = spec.split(",")
            models.append(_device(name, _pairs(params, f"--device {name}")))
        files = _files(args.file)
        modules = [m for m in args.modules.split(",") if m]
        script = INTERACTIVE
        if args.run:
            with open(args.run, encoding="utf-8") as f:
                script = f.read()
    except (DeviceLoadError, OSError) as exc:
        say(str(exc))
        return 2
    try:
        qemu = ensure_qemu(say)
        assets = ensure_guest(say)
    except FetchError as exc:
        say(str(exc))
        return 1
    say(f"QEMU {qemu}; guest kernel {assets.version} from {os.path.dirname(assets.kernel)}")
    with ServedModels(models, backend=args.backend) as served:
        for model, slot in zip(served.models, served.slots):
            say(f"{type(model).__name__} at 00:{slot:02x}.0")
        try:
            guest = Guest(assets, script, devices=served.device_args, modules=modules, files=files, qemu=qemu,
                          memfd=args.memfd, append=args.append, interactive=not args.run)
        except GuestError as exc:
            say(str(exc))
            return 2
        with guest:
            if not args.run:
                guest.proc.wait()
                return 0
            return _follow(guest, args.timeout, say)


def _follow(guest, timeout: float, say) -> int:
    """Print the guest's console as it comes; the script's exit status."""
    import time

    from .guest import EXIT_MARKER, READY_MARKER

    deadline = time.monotonic() + timeout
    shown = 0
    while True:
        finished = guest.proc.poll() is not None
        lines = guest.lines[shown:]
        shown += len(lines)
        for line in lines:
            if not line.startswith((EXIT_MARKER, READY_MARKER)):
                print(line, flush=True)
        if finished:
            break
        if time.monotonic() > deadline:
            say(f"the guest did not finish within {timeout:g} s")
            return TIMED_OUT
        time.sleep(0.05)
    result = guest.wait(10)
    for line in guest.lines[shown:]:
        if not line.startswith((EXIT_MARKER, READY_MARKER)):
            print(line, flush=True)
    if result.exit_code is None:
        say(f"the guest stopped without the script's exit status (QEMU exit status {result.qemu_status})")
        return 1
    return result.exit_code
