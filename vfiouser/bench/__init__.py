"""The benchmark suite: ``scripts/bench`` or ``python -m vfiouser.bench``.

One run measures, side by side, and writes ``docs/performance.md`` (tables, the
machine, what the numbers mean) and ``docs/performance.png``:

==============  ==================================================================
section         what
==============  ==================================================================
``latency``     trapped BAR accesses through QEMU (qtest), Python server against
                QEMU's in-process ``pci-testdev`` (:mod:`.latency`)
``mmap``        the mmap-able BAR area, and what losing posted writes costs
``protocol``    the server's own processing, ping-pong and pipelining without
                QEMU (:mod:`.wire`)
``dma``         DMA bandwidth, mmap and message mode, on both backends (:mod:`.dmabw`)
``writemulti``  REGION_WRITE_MULTI under a burst of posted writes (:mod:`.burst`)
``guest``       guest boot-to-driver-ready time and server RSS (:mod:`.boot`)
``versus-c``    our idio16, on our engine and through libvfio-user, next to libvfio-user's
                C ``gpio-pci-idio-16`` sample (the reference) and a minimal Python loop:
                trapped I/O through QEMU, ping-pong, pipelining, each server's CPU time
                per message (:mod:`.versus_c`)
``storage``     our NVMe and virtio-blk next to QEMU's own on one image, the same
                guest jobs (sequential 1 MiB, random 4 KiB, direct I/O), and the
                server's CPU time per request (:mod:`.storage`)
==============  ==================================================================

``--quick`` runs fewer iterations; ``--only SECTION`` (repeatable) runs some
sections. A full run writes the report into ``docs/``; a quick or partial run
writes only where ``--out`` says (and always prints the targets). Nothing here
is a test: no figure makes anything fail.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

__all__ = ["SECTIONS", "Settings", "run", "main"]

log = logging.getLogger(__name__)

SECTIONS = ("latency", "mmap", "protocol", "dma", "writemulti", "guest", "versus-c", "storage")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Settings:
    """How much each section measures."""

    quick: bool
    latency_iterations: int
    latency_rounds: int
    latency_warmup: int
    processing_iterations: int
    pingpong_iterations: int
    pipelined_requests: int
    dma_sizes: tuple[int, ...]
    dma_min_reps: int
    dma_min_seconds: float
    stall_ms: int
    guest_baseline: bool
    #: versus-c, trapped I/O: ``(samples per figure, blocks)`` (warm-up: ``latency_warmup``)
    versus_latency: tuple[int, int] = (6000, 6)
    #: versus-c, CPU-timed runs, ``(min messages, min clock ticks of server CPU, max seconds)``
    versus_pingpong: tuple[int, int, float] = (20_000, 100, 3.0)
    versus_pipelined: tuple[int, int, float] = (100_000, 100, 1.5)
    #: storage: seconds per guest job, and alternating boots per implementation
    storage_seconds: int = 4
    storage_rounds: int = 3

    @classmethod
    def full(cls) -> Settings:
        return cls(False, 6000, 6, 300, 20000, 5000, 200_000, (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20),
                   5, 0.3, 500, True)

    @classmethod
    def quick_run(cls) -> Settings:
        return cls(True, 300, 1, 50, 2000, 300, 20_000, (4 << 10, 64 << 10, 1 << 20), 2, 0.02, 200, False,
                   versus_latency=(1200, 4), versus_pingpong=(5_000, 50, 1.5), versus_pipelined=(20_000, 25, 0.75),
                   storage_seconds=2, storage_rounds=1)


def _unavailable_reason(exc: BaseException) -> str | None:
    """A reason text if ``exc`` means "cannot be measured here" rather than "broke"."""
    from ..testing.guest import GuestAssetsMissing
    from ..testing.qemu import QemuNotFound
    from .storage import IojobUnavailable

    if isinstance(exc, (QemuNotFound, GuestAssetsMissing, IojobUnavailable)):
        return str(exc)
    return None


def _guarded(results: dict, keys: list[str], fn) -> None:
    """Run ``fn()``; an exception marks the ``keys`` sections unavailable or failed, never ends the bench."""
    try:
        fn()
    except Exception as exc:
        reason = _unavailable_reason(exc)
        for key in keys:
            if reason is not None:
                results[key] = {"unavailable": reason}
            else:
                results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        if reason is None:
            log.exception("section %s failed", "/".join(keys))
        else:
            log.warning("section %s not available: %s", "/".join(keys), reason)


def _passes(placement, quick: bool) -> list[tuple[str, tuple[int, ...] | None]]:
    """The server placements the socket-level sections are measured under."""
    from .placement import OWN_CPU, SHARED_CPU

    if not placement.pinned:
        return [("scheduler's choice", None)]
    own = (OWN_CPU, tuple(sorted(placement.server)))
    shared = (SHARED_CPU, tuple(sorted(placement.harness)))
    if own[1] == shared[1] or quick:
        return [own]
    return [own, shared]


def _latency_and_mmap(results: dict, want: set[str], settings: Settings, placement) -> None:
    from . import latency

    passes = _passes(placement, settings.quick)
    knobs = dict(iterations=settings.latency_iterations, rounds=settings.latency_rounds,
                 warmup=settings.latency_warmup)
    lat = {"iterations": settings.latency_iterations, "rounds": settings.latency_rounds, "passes": []}
    mm: dict = {"passes": [], "penalty": []}
    with latency.LatencyRig(mmap="mmap" in want, server_cpus=passes[0][1]) as rig:
        for label, cpus in passes:
            if cpus is not None:
                for server in rig.servers.values():
                    server.pin(cpus)
            log.info("latency, %s", label)
            if "latency" in want:
                lat["passes"].append({"label": label, "rows": latency.run_cases(rig, latency.latency_cases(),
                                                                                **knobs)})
            if "mmap" in want:
                rows = latency.run_cases(rig, latency.mmap_cases(), **knobs)
                mm["passes"].append({"label": label, "rows": rows})
                penalty = latency.posted_penalty(rows)
                if penalty:
                    mm["penalty"].append({"label": label, **penalty})
        if "latency" in want:
            lat["qtest_round_trip"] = latency.qtest_round_trip(rig, iterations=settings.latency_iterations,
                                                               warmup=settings.latency_warmup)
        if "mmap" in want:
            mm["verify"] = latency.verify_mmap_fast_path(rig)
    if "latency" in want:
        lat["threaded"] = latency.threaded_harness(iterations=settings.latency_iterations,
                                                   warmup=settings.latency_warmup, server_cpus=passes[0][1])
        if placement.pinned:
            placement.release()
            try:
                lat["unpinned_round_trip"] = latency.unpinned_round_trip(iterations=settings.latency_iterations,
                                                                         warmup=settings.latency_warmup)
            finally:
                placement.apply_harness()
        results["latency"] = lat
    if "mmap" in want:
        results["mmap"] = mm


def _protocol(results: dict, settings: Settings, placement) -> None:
    from . import wire

    results["protocol"] = wire.run(iterations=settings.processing_iterations,
                                   pingpong_iterations=settings.pingpong_iterations,
                                   pipelined_requests=settings.pipelined_requests,
                                   placements=_passes(placement, settings.quick))


def _dma(results: dict, settings: Settings, placement) -> None:
    from . import dmabw

    server = tuple(sorted(placement.server)) if placement.pinned else None
    results["dma"] = dmabw.run(sizes=settings.dma_sizes, min_reps=settings.dma_min_reps,
                               min_seconds=settings.dma_min_seconds, server_cpus=server)


def _writemulti(results: dict, settings: Settings, placement) -> None:
    from . import burst

    server = tuple(sorted(placement.server)) if placement.pinned else None
    results["writemulti"] = burst.run(stall_ms=settings.stall_ms, server_cpus=server)


def _guest(results: dict, settings: Settings, placement) -> None:
    from . import boot

    placement.release()  # the guest runs as the test-suite runs it: unpinned
    try:
        results["guest"] = boot.run(baseline=settings.guest_baseline)
    finally:
        placement.apply_harness()


def _versus_c(results: dict, settings: Settings, placement) -> None:
    from . import versus_c

    # Both placements even in a quick run: the targets name both.
    results["versus-c"] = versus_c.run(
        root=ROOT, passes=_passes(placement, quick=False), iterations=settings.versus_latency[0],
        rounds=settings.versus_latency[1], warmup=settings.latency_warmup,
        pingpong=versus_c.CpuBudget(*settings.versus_pingpong), pipeline=versus_c.CpuBudget(*settings.versus_pipelined))


def _storage(results: dict, settings: Settings, placement) -> None:
    from . import storage

    placement.release()  # the guest and both servers run as a user runs them: unpinned
    try:
        results["storage"] = storage.run(seconds=settings.storage_seconds, rounds=settings.storage_rounds)
    finally:
        placement.apply_harness()


def run(sections=SECTIONS, settings: Settings | None = None, *, pin: bool = True, command: str = "") -> dict:
    """Measure ``sections``; the results as plain data (what the report and ``--json`` use)."""
    from .machine import describe_machine
    from .placement import Placement

    settings = settings or Settings.full()
    want = set(sections)
    unknown = want - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    placement = Placement(pin)
    results: dict = {"machine": describe_machine(ROOT)}
    started = time.monotonic()
    placement.apply_harness()
    try:
        if want & {"latency", "mmap"}:
            _guarded(results, sorted(want & {"latency", "mmap"}),
                     lambda: _latency_and_mmap(results, want, settings, placement))
        for key, fn in (("protocol", _protocol), ("dma", _dma), ("writemulti", _writemulti), ("guest", _guest),
                        ("versus-c", _versus_c), ("storage", _storage)):
            if key in want:
                log.info("section %s", key)
                _guarded(results, [key], lambda fn=fn: fn(results, settings, placement))
    finally:
        placement.release()
    results["settings"] = {**asdict(settings), "sections": [s for s in SECTIONS if s in want],
                           "placement": placement.describe(), "command": command or "python -m vfiouser.bench",
                           "duration_s": time.monotonic() - started}
    return results


# -- command line -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vfiouser.bench",
                                     description="Measure vfiouser against QEMU and write docs/performance.md.")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (about a minute)")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--out", metavar="PATH",
                        help="Markdown report to write (default: docs/performance.md for a full run, none otherwise);"
                             " the plot goes next to it as .png")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the harness and the servers to CPUs")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(__name__).setLevel(logging.DEBUG if verbose else logging.INFO)


def _default_out(args) -> str | None:
    if args.out:
        return args.out
    if args.quick or args.only:
        return None
    docs = os.path.join(ROOT, "docs")
    return os.path.join(docs, "performance.md") if os.path.isdir(docs) else None


def _write_report(results: dict, out: str, plot: bool) -> None:
    from .report import PlotUnavailable, render_markdown, write_plot

    png = os.path.splitext(out)[0] + ".png"
    if plot:
        try:
            write_plot(results, png)
            results["plot"] = os.path.basename(png)
        except PlotUnavailable as exc:
            results["plot_error"] = str(exc)
            log.warning("%s", exc)
    else:
        results["plot_error"] = "plot disabled with --no-plot"
    with open(out, "w", encoding="utf-8") as f:
        f.write(render_markdown(results))
    log.info("report written to %s", out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vfiouser.bench``."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    sections = tuple(s for s in SECTIONS if s in args.only) if args.only else SECTIONS
    settings = Settings.quick_run() if args.quick else Settings.full()
    launcher = os.environ.get("VFIOUSER_BENCH_COMMAND", "python -m vfiouser.bench")
    command = " ".join([launcher, *argv])
    results = run(sections, settings, pin=not args.no_pin, command=command)
    out = _default_out(args)
    if out:
        _write_report(results, out, plot=not args.no_plot)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    from .report import targets, versus_c_targets
    from .storage_report import storage_targets

    print("\nTargets (issue 5):")
    for t in targets(results):
        holds = {True: "holds", False: "MISSED", None: "not measured"}[t["holds"]]
        print(f"  {holds:12} {t['target']}: {t['measured']}")
    if "versus-c" in sections:
        print("\nTargets (C side by side):")
        unavailable = ((results.get("versus-c") or {}).get("sample") or {}).get("unavailable")
        if unavailable:
            print(f"  the C sample is not available: {unavailable}")
        for t in versus_c_targets(results):
            holds = {True: "holds", False: "MISSED", None: "not measured"}[t["holds"]]
            print(f"  {holds:12} {t['target']}: {t['measured']}")
    if "storage" in sections:
        print("\nTargets (storage, ours against QEMU's own):")
        for t in storage_targets(results):
            holds = {True: "holds", False: "MISSED", None: "not measured"}[t["holds"]]
            print(f"  {holds:12} {t['target']}: {t['measured']}")
    failed = [k for k in sections if "error" in results.get(k, {})]
    if failed:
        print(f"\nSections that failed: {', '.join(failed)} (see the log above)")
    if out:
        print(f"\nReport: {out}")
    return 1 if failed else 0
