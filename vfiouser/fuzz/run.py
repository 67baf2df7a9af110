"""A whole fuzz run: for each device a server, unmutated warm-up sessions and the baseline, then
the planned sessions with resource checks every :data:`CHECK_EVERY` sessions; or one session
replayed alone (``--session``, the reproducer)."""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
import tempfile

from .. import fastpath
from .child import Resources, ServerProcess
from .plan import build_plan, iter_plans
from .replies import SessionResult
from .player import SessionRunner
from .report import Report, describe_plan
from .shapes import device_profile, load_shapes
from .watch import MAP_SLACK, THREAD_SLACK, ResourceWatch
from .wire import BUILTIN, FuzzFailure, SessionPlan

log = logging.getLogger(__name__)

CHECK_EVERY = 50
WARMUPS = 3


def engine_name() -> str:
    """The serving loop a ``vfiouser serve`` started from here uses (it inherits the environment)."""
    return "C fast loop" if fastpath.wanted() else "pure Python"


class Fuzzer:
    """A whole run (see the module docstring); ``args`` are the parsed command line."""

    def __init__(self, args) -> None:
        self.args = args
        self.seed = args.seed
        self.devices = [args.device] if args.device else list(BUILTIN)
        self.shapes = load_shapes(args.vectors)
        self.profiles = {d: device_profile(d) for d in self.devices}
        self.report = Report(self.seed, self.devices, engine_name())
        self.totals = self.report.totals
        self.workdir = tempfile.mkdtemp(prefix="vfu-fuzz-")
        self.server: ServerProcess | None = None
        self.watch: ResourceWatch | None = None
        self._current: SessionPlan | None = None

    def reproducer(self, device: str, number: int) -> str:
        """The command line that replays session ``number`` on ``device`` alone."""
        cmd = f"scripts/fuzz --device {device} --seed {self.seed} --session {number}"
        if self.args.server_command:
            cmd += f" --server-command {shlex.quote(self.args.server_command)}"
        return cmd

    def _start(self, device: str) -> None:
        self.server = ServerProcess(device, self.workdir, self.args.server_command)
        self.watch = ResourceWatch(self.server)

    def _stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            alive = server.alive()
            code = server.stop()
            if alive and code not in (0, None) and not self.args.server_command:
                raise FuzzFailure("shutdown", f"the server for {server.device} did not shut down cleanly on SIGTERM "
                                              f"({server.exit_text()}):\n{server.log_tail()}")

    def run_plan(self, plan: SessionPlan) -> SessionResult:
        """One session; then the server must still be alive."""
        self._current = plan
        runner = SessionRunner(self.server, plan, self.workdir, deadline=self.args.deadline)
        try:
            result = runner.run()
        except FuzzFailure as exc:
            self.totals.add(plan, runner.result)  # what the failing session did, for the totals
            if not self.server.alive():
                raise FuzzFailure("crash", f"the server {self.server.exit_text()} ({exc})", exc.index) from None
            raise
        if not self.server.alive():
            raise FuzzFailure("crash", f"the server {self.server.exit_text()} after this session")
        return result

    def check_resources(self, label: str) -> None:
        """The server's resources against its baseline (:class:`ResourceWatch`), peaks kept."""
        now = self.watch.check(label)
        self.totals.resource_checks += 1
        self.report.seen(self.server.device, now)

    def final_resources(self) -> None:
        """After a device's last session: its resources once the server let go of the last
        client (fds back to the baseline, if they come back within the wait), for the report."""
        b = self.watch.baseline
        self.report.final[self.server.device] = self.watch.settle(Resources(b.fds, b.threads + THREAD_SLACK,
                                                                            b.maps + MAP_SLACK, 0))

    def warm_up(self, device: str) -> None:
        """Unmutated recorded sessions, then the baseline."""
        for k in range(1, WARMUPS + 1):
            plan = build_plan(self.seed, device, -k, self.profiles[device], self.shapes)
            self.totals.add(plan, self.run_plan(plan))
            self.totals.warmups += 1
        baseline = self.watch.take_baseline()
        self.report.baselines[device] = self.report.peak[device] = baseline

    def run(self) -> int:
        """The whole run (or one session with ``--session``). Returns the exit status."""
        print(f"fuzz: seed {self.seed}, engine {self.report.engine}", flush=True)
        try:
            if self.args.session is not None:
                return self._replay()
            self._run_all()
        except FuzzFailure as exc:
            self.report.failure = (self._current, exc)
            plan = self._current
            reproducer = self.reproducer(plan.device, plan.number) if plan is not None else None
            print(self.report.failure_text(reproducer, self.server, self.workdir), flush=True)
            print(self.report.totals_text(), flush=True)
            return 1
        except Exception:
            plan = self._current
            where = f"at or after session {plan.number} on {plan.device}" if plan is not None else "at start-up"
            log.exception("internal error of the fuzzer (seed %s, %s); this is not a server failure",
                          self.seed, where)
            self.report.failure = (plan, FuzzFailure("internal", "internal error of the fuzzer"))
            return 3
        finally:
            if self.server is not None:
                self.server.stop()
            self._write_report()
            if self.report.failure is None and not self.args.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)
        print(self.report.totals_text(), flush=True)
        return 0

    def _run_all(self) -> None:
        device = None
        since_check = 0
        for plan in iter_plans(self.seed, self.devices, self.args.messages, self.profiles, self.shapes):
            if plan.device != device:
                if device is not None:
                    self.check_resources(f"end of {device}")
                    self.final_resources()
                    self._stop()
                device = plan.device
                self._start(device)
                self.warm_up(device)
                since_check = 0
            if self.args.verbose:
                notes = "; ".join(f"#{i}: {', '.join(plan.msgs[i].notes)}" for i in plan.mutated)
                log.info("session %d %s %s: %d messages%s%s %s", plan.number, plan.device, plan.shape,
                         len(plan.msgs), f", cut at {plan.cut}" if plan.cut else "",
                         ", half-close" if plan.half_close else "", notes or "(unmutated)")
            self.totals.add_session(plan, self.run_plan(plan))
            since_check += 1
            if since_check >= CHECK_EVERY:
                self.check_resources(f"after session {plan.number}")
                since_check = 0
        if device is not None:
            self.check_resources(f"end of {device}")
            self.final_resources()
            self._stop()

    def _replay(self) -> int:
        number = self.args.session
        device = self.args.device
        if device is None:
            device = next((p.device for p in iter_plans(self.seed, self.devices, self.args.messages, self.profiles,
                                                        self.shapes) if p.number == number), None)
            if device is None:
                print(f"fuzz: seed {self.seed} with --messages {self.args.messages} has no session {number}; "
                      "give --device", file=sys.stderr)
                return 2
        plan = build_plan(self.seed, device, number, self.profiles[device], self.shapes)
        print(f"fuzz: replaying session {number} of seed {self.seed} on {device}")
        print(describe_plan(plan, full=True))
        self._start(device)
        self.totals.add_session(plan, self.run_plan(plan))
        self.run_plan(build_plan(self.seed, device, -1, self.profiles[device], self.shapes))  # the next is served
        self._stop()
        print(f"fuzz: session {number} passed every check")
        return 0

    def _write_report(self) -> None:
        if not self.args.report:
            return
        plan = self.report.failure[0] if self.report.failure else None
        reproducer = self.reproducer(plan.device, plan.number) if plan is not None else None
        command = "scripts/fuzz " + " ".join(shlex.quote(a) for a in self.args.argv)
        with open(self.args.report, "w", encoding="utf-8") as f:
            f.write(self.report.markdown(command, reproducer))
