"""Command line: ``vfiouser serve``, ``devices``, ``trace show`` and ``replay``.

``vfiouser serve <device> --socket PATH [--param key=value ...] [--backend NAME] [-v]``
serves a model; ``vfiouser devices [DEVICE ...]`` lists models with their
parameters; ``vfiouser trace show FILE`` prints a recorded trace;
``vfiouser replay FILE <device> [--param ...]`` re-runs one against a model;
``vfiouser guest`` boots the test guest with devices attached
(:mod:`vfiouser.testing.guestcmd`).

``<device>`` is a built-in name (``vfiouser devices`` lists them),
``package.module:Class`` (resolved from the current directory too) or
``path/to/file.py:Class``. Once the socket listens, the exact QEMU ``-device``
argument is printed on standard output (one line, flushed), so a script can
wait for it. SIGINT and SIGTERM stop the server cleanly and remove the socket;
a server that has not stopped 5 s later (a device model stuck in a handler),
or a second signal, ends the process at once, socket removed. The soft limit
on open fds is raised to the hard one (each fd-backed DMA map holds one).

``-v`` logs every message with its reply, and what the device does (interrupts,
DMA, deferred work), readably (:mod:`vfiouser.readable`); ``--only``/``--hide``
pick what to show (e.g. ``--only bar0``, ``--hide config``); ``-vv`` adds every
debug line and the raw protocol. ``--trace FILE`` records the session as JSON
lines (:mod:`vfiouser.trace`) for ``vfiouser trace show`` and ``vfiouser replay``
(:mod:`vfiouser.replay`: exit 0 when everything matches, 1 at the first
divergence). ``--backend libvfio-user`` serves the device through libvfio-user
instead of our own engine (:mod:`vfiouser.backends`; it takes no ``--trace`` or
``--poll-us``). Refusals are one line that says what to do (exit 2 for bad
arguments, 1 when the server cannot start).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import stat
import sys
import threading

from vfiouser.devices import BUILTIN_DEVICES, DeviceLoadError, load_device_class, make_device, parameters

from . import __version__, observe
from .backends import BACKENDS, DEFAULT_BACKEND, make_server
from .errors import VfioUserError
from .libvfio_user.bindings import LibraryNotFound
from .readable import Filter, UnknownCategory
from .replay import DEFAULT_TIMEOUT, ReplayError, replay
from .trace import TraceError, Tracer, load_events
from .traceview import lines

__all__ = ["main"]

log = logging.getLogger(__name__)

#: Seconds the server may take to stop after SIGINT/SIGTERM before the process exits anyway.
STOP_GRACE = 5.0


def _parse_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeviceLoadError(f"--param {item!r}: expected key=value")
        params[key] = value
    return params


def _poll_us(text: str) -> float:
    """``--poll-us``: a number of microseconds, 0 or more, at most one second."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1e6:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..1000000")
    return value


class _LineFormatter(logging.Formatter):
    """Readable message and event lines (they carry their client and time) as they are; the
    rest with the time of day, the logger and the level."""

    def format(self, record: logging.LogRecord) -> str:
        if hasattr(record, "vfu_category"):
            return record.getMessage()
        return super().format(record)


class _CategoryFilter(logging.Filter):
    """Drops readable lines whose category the user's ``--only``/``--hide`` leave out."""

    def __init__(self, wanted: Filter) -> None:
        super().__init__()
        self.wanted = wanted

    def filter(self, record: logging.LogRecord) -> bool:
        category = getattr(record, "vfu_category", None)
        return category is None or self.wanted.allows(category)


def _setup_logging(verbosity: int, wanted: Filter | None = None, quiet: bool = False) -> None:
    """``-v``: messages and device events, readable (:mod:`vfiouser.observe`); ``-vv``: every
    debug line too, raw protocol included."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    if wanted is not None and not wanted.everything:
        handler.addFilter(_CategoryFilter(wanted))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING if quiet else logging.INFO)
    if verbosity >= 1:
        logging.getLogger(observe.__name__).setLevel(logging.DEBUG)


def _cmd_serve(args) -> int:
    try:
        device = make_device(args.device, _parse_params(args.param))
    except DeviceLoadError as exc:
        print(f"vfiouser: {exc}", file=sys.stderr)
        return 2
    options = {}
    if args.backend == DEFAULT_BACKEND:
        options = {"poll_us": args.poll_us}
    elif args.trace or args.poll_us:
        print(f"vfiouser: --trace and --poll-us need the {DEFAULT_BACKEND} backend; "
              f"{args.backend} does not offer them", file=sys.stderr)
        return 2
    try:
        tracer = _open_trace(args.trace) if args.trace else None
    except OSError as exc:
        print(f"vfiouser: {exc}", file=sys.stderr)
        return 2
    if tracer is not None:
        options["tracer"] = tracer
    try:
        server = make_server(device, args.socket, backend=args.backend, **options)
    except LibraryNotFound as exc:
        print(f"vfiouser: {exc}", file=sys.stderr)
        return 1
    except (VfioUserError, OSError) as exc:
        print(f"vfiouser: cannot listen on {args.socket}: {exc}", file=sys.stderr)
        if tracer is not None:
            tracer.close()
        return 1

    _raise_fd_limit()
    signals = []
    grace = threading.Timer(STOP_GRACE, _exit_now, args=(server.path, f"the server did not stop within {STOP_GRACE:g} s"))
    grace.daemon = True

    def stop(signum, frame):
        name = signal.Signals(signum).name
        signals.append(name)
        if len(signals) > 1:  # a handler stuck in a loop: the second signal ends the process
            _exit_now(server.path, f"{name} again")
        log.info("%s: shutting down (a second signal exits at once)", name)
        server.stop()
        grace.start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"-device '{server.qemu_device_json()}'", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
        grace.cancel()
        if tracer is not None:
            tracer.close()
    return 0


def _open_trace(path: str) -> Tracer:
    """A tracer writing to ``path``; an OSError whose message says what to do when it cannot."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(f"--trace {path}: the folder {folder} does not exist; create it (mkdir -p {folder}) "
                      f"or choose another path")
    try:
        return Tracer(open(path, "w", encoding="utf-8"))
    except OSError as exc:
        raise OSError(f"--trace {path}: cannot write it ({exc.strerror}); choose a path you may write") from None


def _exit_now(path: str, why: str) -> None:
    """End the process at once (the loop is stuck in a model), removing the socket first."""
    log.error("%s: exiting now", why)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass
    logging.shutdown()
    os._exit(1)


def _raise_fd_limit() -> None:
    """Each fd-backed DMA map holds an fd (see vfiouser.dma): allow as many as the system lets us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.debug("cannot raise the fd limit from %d to %d: %s", soft, hard, exc)


def _cmd_devices(args) -> int:
    """List the built-in devices (or the ones named), each with its parameters."""
    names = args.names or sorted(BUILTIN_DEVICES)
    for name in names:
        try:
            cls = load_device_class(name)
        except DeviceLoadError as exc:
            print(f"vfiouser: {exc}", file=sys.stderr)
            return 2
        module_doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        class_doc = (cls.__doc__ or "").strip().splitlines()
        summary = (module_doc or class_doc or [""])[0].replace("``", "")
        print(f"{name:14} {cls.vendor_id:04x}:{cls.device_id:04x}  {summary}")
        params = parameters(cls)
        width = max((len(p.describe()) for p in params), default=0)
        for p in params:
            print(f"    --param {p.describe():{width}}  {p.help}".rstrip())
    return 0


def _cmd_trace_show(args) -> int:
    """Print a recorded trace the way ``-v`` logs a session."""
    try:
        for line in lines(load_events(args.file), args.wanted, raw=args.raw):
            print(line)
    except TraceError as exc:
        print(f"vfiouser: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # | head
        sys.stderr.close()
    return 0


def _cmd_replay(args) -> int:
    """Replay a trace against a model: 0 when every reply matches, 1 at the first divergence."""
    try:
        entries = list(load_events(args.file))
        device = make_device(args.device, _parse_params(args.param))
        result = replay(entries, device, timeout=args.timeout)
    except (TraceError, DeviceLoadError, ReplayError) as exc:
        print(f"vfiouser: {exc}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"vfiouser: note: {note}", file=sys.stderr)
    if result.ok:
        print(f"replay: the model matches the recording ({result.summary()})")
        return 0
    print(f"replay: {result.divergence}")
    print(f"replay: matched before it: {result.summary()}")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vfiouser", description="Python PCI device models for QEMU's vfio-user-pci.")
    parser.add_argument("--version", action="version", version=f"vfiouser {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a device model on a UNIX socket")
    serve.add_argument("device", help="built-in device name, package.module:Class or path/to/file.py:Class")
    serve.add_argument("--socket", "-s", required=True, metavar="PATH", help="UNIX socket to listen on")
    serve.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                       help="device parameter (repeatable), e.g. loopback=on")
    serve.add_argument("--poll-us", type=_poll_us, default=0.0, metavar="US",
                       help="after each wake-up, keep polling the socket this many µs before sleeping: lower "
                            "latency for a server with a CPU of its own, at the cost of CPU time (default 0: off)")
    serve.add_argument("--backend", "-b", choices=sorted(BACKENDS), default=DEFAULT_BACKEND,
                       help=f"protocol engine (default {DEFAULT_BACKEND}: ours; libvfio-user: the C library, "
                            "built by scripts/get-libvfio-user or named by $VFIOUSER_LIBVFIO_USER)")
    serve.add_argument("--trace", metavar="FILE", help="record every message to FILE as JSON lines")
    serve.add_argument("-v", "--verbose", action="count", default=0,
                       help="log every message with its reply, interrupts, DMA and deferred work, readably "
                            "(-vv: also every debug line and the raw protocol)")
    add_filter_options(serve)
    serve.set_defaults(func=_cmd_serve)
    devices = sub.add_parser("devices", help="list the built-in devices and their parameters")
    devices.add_argument("names", nargs="*", metavar="DEVICE",
                         help="only these devices (built-in names, package.module:Class or path/to/file.py:Class)")
    devices.set_defaults(func=_cmd_devices, verbose=0)
    trace = sub.add_parser("trace", help="read a trace recorded by vfiouser serve --trace")
    trace_sub = trace.add_subparsers(dest="trace_command", required=True)
    show = trace_sub.add_parser("show", help="print a trace the way -v logs a session")
    show.add_argument("file", help="the trace (JSON lines)")
    show.add_argument("--raw", action="store_true", help="every message decoded field by field, as -vv logs them")
    add_filter_options(show)
    show.set_defaults(func=_cmd_trace_show, verbose=0)
    rerun = sub.add_parser("replay", help="re-run a trace against a model without a VM and compare every reply")
    rerun.add_argument("file", help="a trace recorded by vfiouser serve --trace")
    rerun.add_argument("device", help="built-in device name, package.module:Class or path/to/file.py:Class")
    rerun.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                       help="device parameter (repeatable), as for serve")
    rerun.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                       help=f"seconds to wait for the device's deferred work at each step (default {DEFAULT_TIMEOUT:g})")
    rerun.add_argument("-v", "--verbose", action="count", default=0,
                       help="log the replayed session as -v logs a live one")
    add_filter_options(rerun)
    rerun.set_defaults(func=_cmd_replay, quiet=True)
    from .testing.guestcmd import add_parser as add_guest_parser  # vfiouser guest: its own module

    add_guest_parser(sub)
    return parser


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    """``--only`` and ``--hide``: which categories of lines to show (:class:`~vfiouser.readable.Filter`)."""
    names = "bar0-bar5, bars, rom, config, vga, irq, dma, task, setup"
    parser.add_argument("--only", action="append", default=[], metavar="WHAT",
                        help=f"show only these (repeatable or comma-separated: {names})")
    parser.add_argument("--hide", action="append", default=[], metavar="WHAT",
                        help="leave these out (same names), e.g. --hide config")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vfiouser`` command."""
    args = build_parser().parse_args(argv)
    try:
        wanted = Filter(getattr(args, "only", ()), getattr(args, "hide", ()))
    except UnknownCategory as exc:
        print(f"vfiouser: {exc}", file=sys.stderr)
        return 2
    _setup_logging(args.verbose, wanted, quiet=getattr(args, "quiet", False))
    args.wanted = wanted
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
