"""The command line: ``python -m vfiouser.fuzz`` (``scripts/fuzz``)."""

from __future__ import annotations

import argparse
import logging
import random
import sys

from .run import Fuzzer
from .shapes import default_vector_dir
from .wire import BUILTIN


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m vfiouser.fuzz`` command line."""
    parser = argparse.ArgumentParser(
        prog="scripts/fuzz",
        description="Seeded mutation fuzzer of whole vfio-user sessions against `vfiouser serve` "
                    "(docs/fuzzing.md). Exit status: 0 pass, 1 a failure (a reproducer is printed), "
                    "2 a usage error, 3 an internal error of the fuzzer.")
    parser.add_argument("--device", choices=BUILTIN, help="one built-in device (default: all, in turn)")
    parser.add_argument("--seed", type=int, help="seed (default: random; always printed)")
    parser.add_argument("--messages", type=int, default=20000, metavar="N", help="message budget (default 20000)")
    parser.add_argument("--session", type=int, metavar="N", help="replay just session N of the seed")
    parser.add_argument("--report", metavar="PATH", help="write a Markdown summary to PATH")
    parser.add_argument("--deadline", type=float, default=3.0, metavar="S",
                        help="seconds of the server's time to wait for each expected reply (default 3)")
    parser.add_argument("--vectors", default=default_vector_dir(), metavar="DIR",
                        help="recorded QEMU sessions (default: tests/vectors of this checkout)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server logs)")
    parser.add_argument("--server-command", help=argparse.SUPPRESS)  # for the fuzzer's own tests
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log every session (-vv: more)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vfiouser.fuzz``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    if args.deadline <= 0:
        parser.error("--deadline must be positive")
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    try:
        fuzzer = Fuzzer(args)
    except (OSError, ValueError) as exc:
        print(f"fuzz: {exc}", file=sys.stderr)
        return 2
    return fuzzer.run()
