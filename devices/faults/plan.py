"""Fault plans: a JSON list of rules, checked once, when the plan is loaded.

A rule says *when* something goes wrong (``on`` and its selectors, ``count``,
``after``, ``probability``) and *what* (``do``). :func:`load_plan` takes the
JSON text, a path to it, or the already-parsed list, and returns a
:class:`FaultPlan`; anything wrong raises :class:`FaultPlanError`, which names
the rule (by index) and the field.

>>> plan = load_plan('[{"on": "read", "region": "bar2", "offset": 1, "size": 1, "do": {"xor": 255}, "count": 1}]')
>>> rule = plan.rules[0]
>>> rule.region, rule.offsets, rule.action, rule.operand, rule.count
(2, (1, 1), 'xor', 255, 1)
>>> load_plan('[{"on": "read", "region": "bar9", "do": "random"}]')
Traceback (most recent call last):
    ...
vfiouser.devices.faults.plan.FaultPlanError: fault plan rule 0, field 'region': 'bar9' is not a region (bar0-bar5, rom, config)

``docs/hardening.md`` describes every field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from vfiouser.devices.errors import DeviceError

__all__ = ["FaultPlan", "FaultRule", "FaultPlanError", "load_plan", "REGIONS", "COMMANDS", "ACTIONS"]

#: Region names a rule may use, VFIO-numbered.
REGIONS = {**{f"bar{i}": i for i in range(6)}, "rom": 6, "config": 7}

#: vfio-user commands a ``reply`` rule may name (the protocol's numbering is the engine's business).
COMMANDS = ("VERSION", "DMA_MAP", "DMA_UNMAP", "DEVICE_GET_INFO", "DEVICE_GET_REGION_INFO",
            "DEVICE_GET_REGION_IO_FDS", "DEVICE_GET_IRQ_INFO", "DEVICE_SET_IRQS", "REGION_READ", "REGION_WRITE",
            "DEVICE_RESET", "REGION_WRITE_MULTI")

#: What each ``on`` may ``do``. Value actions (a number, xor/and/or) and "random" change data.
ACTIONS = {
    "read": {"value", "xor", "and", "or", "random", "delay_ms", "disconnect"},
    "write": {"value", "xor", "and", "or", "drop", "delay_ms", "duplicate", "disconnect"},
    "irq": {"drop", "delay_ms", "duplicate"},
    "dma": {"fail", "corrupt", "delay_ms", "drop"},
    "reply": {"fail", "drop", "delay_ms", "disconnect"},
    "time": {"spurious"},
}
_MASK_ACTIONS = ("xor", "and", "or")
_IRQ_KINDS = ("intx", "msi", "msix")
_COMMON = {"on", "do", "count", "after", "probability", "comment"}
_FIELDS = {
    "read": {"region", "offset", "size", "register"},
    "write": {"region", "offset", "size", "register"},
    "irq": {"kind", "vector"},
    "dma": {"op", "addr", "size"},
    "reply": {"command", "errno"},
    "time": {"kind", "vector", "every_ms", "after_ms"},
}


class FaultPlanError(DeviceError, ValueError):
    """A fault plan that cannot be used; says which rule (``rule``, its index) and ``field``."""

    def __init__(self, message: str, rule: int | None = None, field: str | None = None) -> None:
        where = "fault plan"
        if rule is not None:
            where += f" rule {rule}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")
        self.rule, self.field = rule, field


@dataclass(frozen=True)
class FaultRule:
    """One rule, validated (see the module docstring); ``index`` is its place in the plan."""

    index: int
    on: str
    action: str
    operand: int | float | None = None
    region: int | None = None
    offsets: tuple[int, int] | None = None  # inclusive
    size: int | None = None
    register: str | None = None
    kind: str | None = None
    vector: int | None = None
    op: str | None = None
    addrs: tuple[int, int] | None = None
    command: str | None = None
    errno: int | None = None
    every_ms: float | None = None
    after_ms: float = 0.0
    count: int | None = None
    after: int = 0
    probability: float = 1.0
    source: dict = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> str:
        """The rule as the plan gave it, on one line."""
        return json.dumps(self.source, separators=(", ", ": "))


@dataclass(frozen=True)
class FaultPlan:
    """A validated list of :class:`FaultRule`."""

    rules: tuple[FaultRule, ...]

    def on(self, kind: str) -> tuple[FaultRule, ...]:
        """The rules with ``on == kind``, in plan order."""
        return tuple(r for r in self.rules if r.on == kind)


def _int(value, index: int, name: str, *, minimum: int = 0) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise FaultPlanError(f"{value!r} is not a number", index, name) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FaultPlanError(f"{value!r} is not an integer", index, name)
    if value < minimum:
        raise FaultPlanError(f"{value} is below {minimum}", index, name)
    return value


def _number(value, index: int, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise FaultPlanError(f"{value!r} is not a number of 0 or more", index, name)
    return float(value)


def _range(value, index: int, name: str) -> tuple[int, int]:
    """A number, or an inclusive range ``"0x20-0x2f"``."""
    if isinstance(value, str) and "-" in value.strip().lstrip("-"):
        low, _, high = value.partition("-")
        lo, hi = _int(low.strip(), index, name), _int(high.strip(), index, name)
        if hi < lo:
            raise FaultPlanError(f"the range {value!r} ends before it starts", index, name)
        return lo, hi
    n = _int(value, index, name)
    return n, n


def _action(do, on: str, index: int) -> tuple[str, int | float | None]:
    if isinstance(do, bool):
        raise FaultPlanError(f"{do!r} is not an action", index, "do")
    if isinstance(do, int):
        action, operand = "value", _int(do, index, "do")
    elif isinstance(do, str):
        action, operand = do, None
        if do in ("value", "delay_ms") or do in _MASK_ACTIONS:
            raise FaultPlanError(f"{do!r} needs an operand: {{\"{do}\": N}}", index, "do")
    elif isinstance(do, dict) and len(do) == 1:
        (action, operand), = do.items()
        if action in _MASK_ACTIONS or action == "value":
            operand = _int(operand, index, f"do.{action}")
        elif action == "delay_ms":
            operand = _number(operand, index, "do.delay_ms")
        else:
            raise FaultPlanError(f"{action!r} takes no operand", index, "do")
    else:
        raise FaultPlanError(f"{do!r} is not an action: a value, {{\"xor\": m}}, {{\"and\": m}}, {{\"or\": m}}, "
                             f"{{\"delay_ms\": n}} or one of random, drop, duplicate, spurious, fail, corrupt, "
                             f"disconnect", index, "do")
    allowed = ACTIONS[on]
    if action not in allowed:
        raise FaultPlanError(f"{action!r} does not apply to {on} rules (they take: {', '.join(sorted(allowed))})",
                             index, "do")
    return action, operand


def _rule(index: int, raw) -> FaultRule:
    if not isinstance(raw, dict):
        raise FaultPlanError(f"a rule is a JSON object, not {type(raw).__name__}", index)
    on = raw.get("on")
    if on not in ACTIONS:
        raise FaultPlanError(f"{on!r} is not one of {', '.join(ACTIONS)}", index, "on")
    unknown = sorted(set(raw) - _COMMON - _FIELDS[on])
    if unknown:
        raise FaultPlanError(f"unknown for {on} rules (they take: {', '.join(sorted(_FIELDS[on]))})", index,
                             unknown[0])
    if "do" not in raw:
        raise FaultPlanError("missing: what the fault does", index, "do")
    action, operand = _action(raw["do"], on, index)
    args: dict = {"index": index, "on": on, "action": action, "operand": operand, "source": dict(raw)}
    if "region" in raw:
        region = raw["region"]
        if region not in REGIONS:
            raise FaultPlanError(f"{region!r} is not a region (bar0-bar5, rom, config)", index, "region")
        args["region"] = REGIONS[region]
    if "offset" in raw:
        args["offsets"] = _range(raw["offset"], index, "offset")
    if "size" in raw:
        args["size"] = _int(raw["size"], index, "size", minimum=1)
    if "register" in raw:
        if not isinstance(raw["register"], str) or not raw["register"]:
            raise FaultPlanError("a register (or register.field) name", index, "register")
        if "offset" in raw:
            raise FaultPlanError("give a register or an offset, not both", index, "register")
        args["register"] = raw["register"]
    if "kind" in raw:
        if raw["kind"] not in _IRQ_KINDS:
            raise FaultPlanError(f"{raw['kind']!r} is not one of {', '.join(_IRQ_KINDS)}", index, "kind")
        args["kind"] = raw["kind"]
    if "vector" in raw:
        args["vector"] = _int(raw["vector"], index, "vector")
    if "op" in raw:
        if raw["op"] not in ("read", "write"):
            raise FaultPlanError(f"{raw['op']!r} is not read or write", index, "op")
        args["op"] = raw["op"]
    if "addr" in raw:
        args["addrs"] = _range(raw["addr"], index, "addr")
    if "command" in raw:
        if raw["command"] not in COMMANDS:
            raise FaultPlanError(f"{raw['command']!r} is not a vfio-user command ({', '.join(COMMANDS)})", index,
                                 "command")
        args["command"] = raw["command"]
    if "errno" in raw:
        args["errno"] = _int(raw["errno"], index, "errno", minimum=1)
    for name in ("every_ms", "after_ms"):
        if name in raw:
            args[name] = _number(raw[name], index, name)
    if "count" in raw:
        args["count"] = _int(raw["count"], index, "count", minimum=1)
    if "after" in raw:
        args["after"] = _int(raw["after"], index, "after")
    if "probability" in raw:
        p = raw["probability"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise FaultPlanError(f"{p!r} is not a probability between 0 and 1", index, "probability")
        args["probability"] = float(p)
    return _checked(FaultRule(**args))


def _checked(rule: FaultRule) -> FaultRule:
    """What a rule needs besides valid fields."""
    i = rule.index
    if rule.on == "reply" and rule.command is None:
        raise FaultPlanError("reply rules name the command whose reply they change", i, "command")
    if rule.errno is not None and rule.action != "fail":
        raise FaultPlanError("only a \"fail\" reply takes an errno", i, "errno")
    if rule.on == "time":
        if rule.kind is None:
            raise FaultPlanError("a spurious interrupt needs its kind (intx, msi, msix)", i, "kind")
        if not rule.every_ms:
            raise FaultPlanError("time rules fire every so many ms: give every_ms above 0", i, "every_ms")
    if rule.on == "irq" and rule.vector is not None and rule.kind == "intx":
        raise FaultPlanError("INTx has no vectors", i, "vector")
    if rule.on == "time" and rule.kind in ("msi", "msix") and rule.vector is None:
        raise FaultPlanError(f"a spurious {rule.kind} needs its vector", i, "vector")
    if rule.on == "dma" and rule.action == "drop" and rule.op != "write":
        raise FaultPlanError("only a DMA write can be dropped: add \"op\": \"write\"", i, "op")
    if rule.on in ("read", "write") and rule.offsets is not None and rule.region is None:
        raise FaultPlanError("an offset is inside a region: give the region too", i, "region")
    return rule


def load_plan(plan) -> FaultPlan:
    """A :class:`FaultPlan` from ``plan``: a :class:`FaultPlan` (returned as is), a list of rule
    dicts, JSON text, or the path of a JSON file. Raises :class:`FaultPlanError`."""
    if isinstance(plan, FaultPlan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        text = os.fspath(plan)
        if not text.lstrip().startswith("["):
            try:
                with open(text, encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                raise FaultPlanError(f"cannot read {plan}: {exc.strerror}") from None
        try:
            plan = json.loads(text)
        except ValueError as exc:
            raise FaultPlanError(f"not JSON ({exc})") from None
    if not isinstance(plan, (list, tuple)):
        raise FaultPlanError(f"a plan is a JSON list of rules, not {type(plan).__name__}")
    return FaultPlan(tuple(_rule(i, raw) for i, raw in enumerate(plan)))
