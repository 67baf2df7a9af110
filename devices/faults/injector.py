"""Deciding, reporting and counting faults: one :class:`FaultInjector` per fault plan.

Each rule has its own ``random.Random``, seeded from the plan's seed and the
rule's index, for its ``probability`` draws and its random data: the same seed
and the same accesses give the same faults, and the interrupts a device's
worker thread raises cannot shift the random stream of the rules on reads.

Every fault that fires is reported as one event (a dict, see :func:`fault_line`
for its fields) to the :class:`FaultWatcher` the backend installed (the
vfio-user server's session observer: ``-v`` and ``--trace``), or else logged
at DEBUG on this module's logger; and counted for :meth:`FaultInjector.summary`.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass

from vfiouser.devices.errors import DeviceError

from .plan import FaultPlan, FaultRule

__all__ = ["FaultInjector", "FaultSummary", "RuleCount", "FaultWatcher", "Disconnect", "InjectedFailure",
           "fault_line"]

log = logging.getLogger(__name__)

_REGION_NAMES = ("BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "config")


class Disconnect(DeviceError):
    """Raised by a fault port where the plan says the device vanishes: the backend drops its
    client (no reply to the request that met it)."""


class InjectedFailure(DeviceError):
    """A reply the fault plan makes fail: the backend answers with :attr:`errno`."""


class FaultWatcher:
    """Told about every fault that fires (:meth:`FaultInjector.watch`); runs on the thread of
    the access, interrupt or DMA concerned and must return quickly."""

    def fault(self, event: dict) -> None:
        """One fault: ``event`` as :func:`fault_line` describes it."""


def _value_text(data: bytes | None) -> str:
    return "-" if data is None else "0x" + (bytes(reversed(data)).hex() or "0")


def fault_line(event: dict) -> str:
    """One readable line for a fault event (``FAULT rule 0: read BAR2+0x1 (1 byte) xor 0xff: 0x0f -> 0xf0``).

    Fields: ``rule`` (index), ``on``, ``do`` (the action), and by kind: ``region``,
    ``offset``, ``size``, ``before``/``after`` (hex, little-endian, the data as the model
    read it or the guest wrote it, and as faulted); ``kind``, ``vector``/``level``
    (interrupts); ``op``, ``addr``, ``size`` (DMA); ``command`` (replies); ``operand``."""
    on, do = event.get("on"), event.get("do")
    head = f"FAULT rule {event.get('rule')}: {on}"
    if on in ("read", "write"):
        region = event.get("region", 0)
        name = _REGION_NAMES[region] if 0 <= region < len(_REGION_NAMES) else f"region{region}"
        size = event.get("size", 0)
        head += f" {name}+{event.get('offset', 0):#x} ({size} byte{'s' if size != 1 else ''})"
        if event.get("names"):
            head += f" {event['names']}"
    elif on in ("irq", "time"):
        kind = {"intx": "INTx", "msi": "MSI", "msix": "MSI-X"}.get(event.get("kind"), event.get("kind"))
        head += f" {kind}" + (f" vector {event['vector']}" if event.get("vector") is not None else "")
    elif on == "dma":
        head += f" {event.get('op')} {event.get('addr', 0):#x} +{event.get('size', 0):#x}"
    elif on == "reply":
        head += f" to {event.get('command')}"
    operand = event.get("operand")
    head += f" {do}" + (f" {operand:#x}" if isinstance(operand, int) and do != "delay_ms" else
                        f" {operand:g} ms" if do == "delay_ms" and operand is not None else "")
    if "before" in event:
        before = bytes.fromhex(event["before"])
        after = bytes.fromhex(event["after"]) if event.get("after") is not None else None
        head += f": {_value_text(before)} -> {_value_text(after) if after is not None else 'dropped'}"
    return head


@dataclass(frozen=True)
class RuleCount:
    """One rule's line of the summary: how often it matched and how often it fired."""

    rule: int
    on: str
    action: str
    matched: int
    fired: int
    text: str


@dataclass(frozen=True)
class FaultSummary:
    """What a plan did: one :class:`RuleCount` per rule, in plan order."""

    rules: tuple[RuleCount, ...]
    seed: int

    @property
    def total(self) -> int:
        """Faults injected, all rules together."""
        return sum(r.fired for r in self.rules)

    def __str__(self) -> str:
        lines = [f"fault plan (seed {self.seed}): {self.total} fault{'s' if self.total != 1 else ''} injected"]
        for r in self.rules:
            lines.append(f"  rule {r.rule} ({r.on} {r.action}): fired {r.fired} of {r.matched} match"
                         f"{'es' if r.matched != 1 else ''}  {r.text}")
        return "\n".join(lines)


class _RuleState:
    __slots__ = ("matched", "fired", "rng")

    def __init__(self, seed: int, index: int) -> None:
        self.matched = 0
        self.fired = 0
        self.rng = random.Random(f"vfiouser-faults/{seed}/{index}")


class FaultInjector:
    """The decisions and the record of one plan (see the module docstring). Thread-safe."""

    def __init__(self, plan: FaultPlan, seed: int = 0) -> None:
        self.plan = plan
        self.seed = seed
        self._lock = threading.Lock()
        self._state = [_RuleState(seed, r.index) for r in plan.rules]
        self._watcher: FaultWatcher | None = None

    def watch(self, watcher: FaultWatcher | None) -> None:
        """Report faults to ``watcher`` (None: log them on this module's logger)."""
        self._watcher = watcher

    def fires(self, rule: FaultRule) -> bool:
        """A match of ``rule``: counted, and whether the fault happens this time (``after``,
        ``count``, then ``probability``, drawn from the rule's own stream)."""
        with self._lock:
            st = self._state[rule.index]
            st.matched += 1
            if st.matched <= rule.after:
                return False
            if rule.count is not None and st.fired >= rule.count:
                return False
            if rule.probability < 1.0 and st.rng.random() >= rule.probability:
                return False
            st.fired += 1
            return True

    def randbits(self, rule: FaultRule, bits: int) -> int:
        """``bits`` random bits from ``rule``'s stream."""
        with self._lock:
            return self._state[rule.index].rng.getrandbits(bits) if bits else 0

    def randrange(self, rule: FaultRule, n: int) -> int:
        """A random number in ``[0, n)`` from ``rule``'s stream."""
        with self._lock:
            return self._state[rule.index].rng.randrange(n)

    def report(self, rule: FaultRule, **fields) -> None:
        """Tell the watcher (or the log) that ``rule`` fired; never raises."""
        event = {"rule": rule.index, "on": rule.on, "do": rule.action, **fields}
        if rule.operand is not None:
            event["operand"] = rule.operand
        try:
            watcher = self._watcher
            if watcher is not None:
                watcher.fault(event)
            else:
                log.debug("%s", fault_line(event))
        except Exception:
            log.exception("could not report fault %r", event)

    def summary(self) -> FaultSummary:
        """Every rule's counts so far."""
        with self._lock:
            return FaultSummary(tuple(RuleCount(r.index, r.on, r.action, s.matched, s.fired, r.describe())
                                      for r, s in zip(self.plan.rules, self._state)), self.seed)
