"""What a run says: its totals, a plan described message by message (the reproducer), the failure
report, the machine-readable ``TOTALS`` line and the optional Markdown summary."""

from __future__ import annotations

import datetime
import time
from collections import Counter
from dataclasses import dataclass, field

from .child import Resources
from .replies import SessionResult
from .wire import FuzzFailure, SessionPlan, ranges


@dataclass
class Totals:
    """Counts of a whole run."""

    sessions: int = 0
    warmups: int = 0
    planned: int = 0
    messages: int = 0
    replies: int = 0
    errors: Counter = field(default_factory=Counter)
    server_requests: int = 0
    closed_by_server: int = 0
    abrupt: int = 0
    mutations: Counter = field(default_factory=Counter)
    resource_checks: int = 0
    idle_checks: int = 0
    per_device: dict = field(default_factory=dict)

    def add(self, plan: SessionPlan, result: SessionResult) -> None:
        """Count what one session (or the part of it that ran) did."""
        self.messages += result.sent
        self.replies += result.replies
        self.errors.update(result.errors)
        self.server_requests += result.server_requests
        self.closed_by_server += result.closed_by_server
        self.abrupt += result.abrupt
        if plan.idle_check:
            self.idle_checks += 1

    def add_session(self, plan: SessionPlan, result: SessionResult) -> None:
        """Count a whole fuzzed session: its messages, mutations and device."""
        self.sessions += 1
        self.planned += len(plan.msgs)
        self.add(plan, result)
        for i in plan.mutated:
            for note in plan.msgs[i].notes:
                family, _, what = note.partition(": ")
                self.mutations[what.split(" (")[0] if family == "json" else family] += 1
        per = self.per_device.setdefault(plan.device, Counter())
        per["sessions"] += 1
        per["messages"] += result.sent


def describe_plan(plan: SessionPlan, full: bool = False, failing: int | None = None, suspects=()) -> str:
    """The plan's messages: every one with ``full``, else the mutated ones, the failing one and the
    ``suspects``; each with its origin, header, fds, mutations and wire bytes."""
    lines = [f"session {plan.number} on {plan.device}, shape {plan.shape}: {len(plan.msgs)} messages, "
             f"replies awaited after messages {ranges(plan.flush_after)}"]
    if plan.cut:
        lines.append(f"  ends abruptly after {plan.cut[1]} bytes of message {plan.cut[0]}")
    if plan.half_close:
        lines.append("  ends with a half-close (the server must close its side)")
    picked = set(plan.mutated) | set(suspects) | ({failing} if failing is not None else set())
    for i in range(len(plan.msgs)) if full else sorted(picked):
        if not 0 <= i < len(plan.msgs):
            continue
        m = plan.msgs[i]
        wire = m.wire()
        tag = " <-- failed here" if i == failing else " <-- sent since the last reply" if i in suspects else ""
        lines.append(f"  [{i}] {m.origin}: {m.describe()}{tag}")
        for note in m.notes:
            lines.append(f"       mutation: {note}")
        more = "" if len(wire) <= 512 else f"... ({len(wire)} bytes in all)"
        lines.append(f"       hex: {wire[:512].hex()}{more}")
    return "\n".join(lines)


class Report:
    """The output of one run (printed, and as Markdown with ``--report``)."""

    def __init__(self, seed: int, devices: list[str], engine: str) -> None:
        self.seed = seed
        self.devices = devices
        self.engine = engine
        self.started = time.monotonic()
        self.totals = Totals()
        self.baselines: dict[str, Resources] = {}
        self.peak: dict[str, Resources] = {}
        #: each device's resources after its last session, once settled
        self.final: dict[str, Resources] = {}
        #: the first failure: (the plan it happened in, or None; the failure)
        self.failure: tuple[SessionPlan | None, FuzzFailure] | None = None

    def seen(self, device: str, now: Resources) -> None:
        """Keep the peak of each resource of ``device``'s server."""
        peak = self.peak.setdefault(device, now)
        self.peak[device] = Resources(max(peak.fds, now.fds), max(peak.threads, now.threads),
                                      max(peak.maps, now.maps), max(peak.rss_kb, now.rss_kb))

    def growth(self) -> Resources:
        """The largest growth of each resource over its device's baseline."""
        pairs = [(self.peak[d], b) for d, b in self.baselines.items() if d in self.peak]
        return Resources(*(max([getattr(p, k) - getattr(b, k) for p, b in pairs], default=0)
                           for k in ("fds", "threads", "maps", "rss_kb")))

    def failure_text(self, reproducer: str | None, server, workdir: str) -> str:
        """The failure: what failed, the reproducer, the plan's relevant messages, the server's log."""
        plan, exc = self.failure
        lines = [f"\nFUZZ FAILURE [{exc.kind}]: {exc}"]
        if plan is not None:
            lines.append(f"seed {self.seed}, device {plan.device}, session {plan.number}"
                         + (" (a warm-up session)" if plan.number < 0 else ""))
            lines.append(f"reproduce with: {reproducer}")
            lines.append(describe_plan(plan, failing=exc.index, suspects=exc.suspects))
        if server is not None:
            if exc.server_state:
                lines.append(f"server threads when it was seen: {exc.server_state}")
            lines.append(f"server ({server.exit_text()}), last lines of its log {server.log_path}:")
            lines.append(server.log_tail())
        lines.append(f"files kept in {workdir}")
        return "\n".join(lines)

    def totals_text(self) -> str:
        """The summary; its last line (``TOTALS ...``) is machine-readable."""
        t = self.totals
        errs = ", ".join(f"{k} {v}" for k, v in t.errors.most_common()) or "none"
        lines = [f"fuzz: seed {self.seed}, devices {', '.join(self.devices)}, engine {self.engine}, "
                 f"{time.monotonic() - self.started:.1f} s",
                 f"fuzz: {t.sessions} sessions (+{t.warmups} warm-up), {t.planned} messages planned, "
                 f"{t.messages} sent (all sessions), {t.replies} replies, {t.server_requests} server requests "
                 f"answered, {t.closed_by_server} connections closed by the server, {t.abrupt} abrupt ends, "
                 f"{t.resource_checks} resource checks, {t.idle_checks} idle-CPU checks",
                 f"fuzz: error replies by errno: {errs}"]
        for device, peak in self.peak.items():
            lines.append(f"fuzz: {device}: peak {peak} (baseline {self.baselines.get(device, '-')}; "
                         f"at the end {self.final.get(device, '-')})")
        kind = self.failure[1].kind if self.failure else None
        g = self.growth()
        lines.append(f"TOTALS sessions={t.sessions} messages={t.messages} replies={t.replies} "
                     f"error_replies={sum(t.errors.values())} crashes={int(kind == 'crash')} "
                     f"hangs={int(kind == 'hang')} replies_to_no_reply={int(kind == 'reply-to-no-reply')} "
                     f"fd_growth={g.fds} thread_growth={g.threads} map_growth={g.maps} "
                     f"rss_growth_kb={g.rss_kb} result={'FAIL' if self.failure else 'PASS'}")
        return "\n".join(lines)

    def markdown(self, command: str, reproducer: str | None) -> str:
        """The run as a Markdown page."""
        t = self.totals
        lines = ["# vfiouser fuzz report", "",
                 f"* date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
                 f"* command: `{command}`", f"* seed: {self.seed}", f"* devices: {', '.join(self.devices)}",
                 f"* engine: {self.engine}", f"* duration: {time.monotonic() - self.started:.1f} s",
                 f"* result: {'FAIL' if self.failure else 'PASS'}", "",
                 "| total | count |", "|---|---|",
                 f"| sessions | {t.sessions} (+{t.warmups} warm-up) |", f"| messages planned | {t.planned} |",
                 f"| messages sent (all sessions) | {t.messages} |",
                 f"| replies | {t.replies} |", f"| error replies | {sum(t.errors.values())} |",
                 f"| server requests answered | {t.server_requests} |",
                 f"| connections closed by the server | {t.closed_by_server} |",
                 f"| abrupt client ends | {t.abrupt} |", f"| resource checks | {t.resource_checks} |",
                 f"| idle-CPU checks | {t.idle_checks} |", "",
                 "| errno | replies |", "|---|---|", *[f"| {k} | {v} |" for k, v in t.errors.most_common()], "",
                 "| device | sessions | messages | baseline (after warm-up) | peak (between sessions) | at the end |",
                 "|---|---|---|---|---|---|"]
        for device in self.devices:
            per = t.per_device.get(device, Counter())
            lines.append(f"| {device} | {per['sessions']} | {per['messages']} | {self.baselines.get(device, '')} "
                         f"| {self.peak.get(device, '')} | {self.final.get(device, '')} |")
        lines += ["", "| mutation | count |", "|---|---|",
                  *[f"| {k} | {v} |" for k, v in sorted(t.mutations.items(), key=lambda kv: (-kv[1], kv[0]))]]
        if self.failure:
            plan, exc = self.failure
            lines += ["", "## Failure", "", f"`{exc.kind}`: {exc}", ""]
            if plan is not None:
                lines += [f"Reproduce: `{reproducer}`", "", "```",
                          describe_plan(plan, failing=exc.index, suspects=exc.suspects), "```"]
        return "\n".join(lines) + "\n"
