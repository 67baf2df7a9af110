"""The fault port: a :class:`~vfiouser.devices.port.DevicePort` that wraps a model's port and
misbehaves as a fault plan says, for any backend and any model, without touching model code.

::

    backend --region_read/region_write--> FaultPort --> the model's port
    backend <--sink.intx/msi/msix, dma---- FaultSink, FaultDma <-- the model

Reads and writes are changed in :meth:`FaultPort.region_read` and
:meth:`FaultPort.region_write` (a plan without read rules serves reads with the
model's own method, and likewise for writes, so they cost nothing); the
interrupt sink and DMA backend the backend attaches are wrapped
(:mod:`vfiouser.devices.faults.signals`). Two things a port cannot do alone
need its backend: dropping the client (:class:`~vfiouser.devices.faults.Disconnect`,
raised from an access or a reply rule) and changing replies
(:meth:`FaultPort.reply_fault`, None without reply rules); the vfio-user
server does both, libvfio-user neither (it refuses such plans).

>>> from vfiouser.devices.idio16 import Idio16
>>> port = FaultPort(Idio16(), '[{"on": "read", "region": "bar2", "offset": 1, "do": {"xor": 255}, "count": 1}]')
>>> port.region_write(7, 0x18, (0xC000).to_bytes(4, "little")); port.region_write(7, 0x04, bytes([1, 0]))  # I/O on
>>> buf = bytearray(1)
>>> port.region_read(2, 1, buf); buf.hex()    # inputs are all low: 0x00, inverted once
'ff'
>>> port.region_read(2, 1, buf); buf.hex()
'00'
>>> print(port.faults.summary())    # doctest: +ELLIPSIS
fault plan (seed 0): 1 fault injected
  rule 0 (read xor): fired 1 of 2 matches  {"on": "read", ...}
"""

from __future__ import annotations

import time

from vfiouser.devices.port import DevicePort, DmaBackend, InterruptSink, as_port

from .injector import Disconnect, FaultInjector, InjectedFailure
from .plan import FaultPlanError, FaultRule, load_plan
from .shape import RegisterShapes
from .signals import FaultDma, FaultSink, Ticker

__all__ = ["FaultPort"]


class _AccessRule:
    """A read or write rule with its selectors resolved: region, inclusive offsets, and the bits
    it may change in register coordinates (``base`` is the register's first offset)."""

    __slots__ = ("rule", "region", "lo", "hi", "mask", "base")

    def __init__(self, rule: FaultRule, shapes: RegisterShapes | None) -> None:
        self.rule = rule
        self.region, self.lo, self.hi, self.mask, self.base = rule.region, None, None, None, None
        if rule.register is not None:
            region, self.lo, self.hi, self.mask = shapes.resolve(rule.register, rule.index)
            if rule.region is not None and rule.region != region:
                raise FaultPlanError(f"register {rule.register!r} is not in that region", rule.index, "region")
            self.region, self.base = region, self.lo
        elif rule.offsets is not None:
            self.lo, self.hi = rule.offsets

    def matches(self, index: int, offset: int, size: int) -> bool:
        if self.region is not None and index != self.region:
            return False
        if self.lo is not None and (offset + size - 1 < self.lo or offset > self.hi):
            return False
        return self.rule.size is None or self.rule.size == size

    def access_mask(self, offset: int, size: int) -> int:
        """The bits of an access at ``offset`` this rule may change."""
        full = (1 << 8 * size) - 1
        if self.mask is None:
            return full
        shift = 8 * (self.base - offset)
        return (self.mask << shift if shift >= 0 else self.mask >> -shift) & full

    def operand(self, offset: int, size: int) -> int:
        value = int(self.rule.operand)
        if self.base is None:
            return value & ((1 << 8 * size) - 1)
        shift = 8 * (self.base - offset)
        return (value << shift if shift >= 0 else value >> -shift) & ((1 << 8 * size) - 1)


class FaultPort(DevicePort):
    """``inner`` (a port, or a model) served with the faults of ``plan`` (anything
    :func:`~vfiouser.devices.faults.load_plan` takes), random choices seeded by ``seed``.
    ``faults`` is the :class:`~vfiouser.devices.faults.FaultInjector`: its summary, and the
    watcher a backend installs. Register names in the plan are resolved here (a name the model
    does not declare raises :class:`~vfiouser.devices.faults.FaultPlanError`)."""

    def __init__(self, inner, plan, *, seed: int = 0) -> None:
        self.inner = as_port(inner)
        self.plan = load_plan(plan)
        self.faults = FaultInjector(self.plan, seed)
        rules = self.plan.rules
        shapes = RegisterShapes(self.inner) if any(r.register or r.action == "random" for r in rules) else None
        self._shapes = shapes
        self._reads = tuple(_AccessRule(r, shapes) for r in rules if r.on == "read")
        self._writes = tuple(_AccessRule(r, shapes) for r in rules if r.on == "write")
        self._replies = {}
        for r in self.plan.on("reply"):
            self._replies.setdefault(r.command, []).append(r)
        if not self._reads:
            self.region_read = self.inner.region_read
        if not self._writes:
            self.region_write = self.inner.region_write
        if not self._replies:
            self.reply_fault = None
        self._sink: FaultSink | None = None
        self._ticker: Ticker | None = None

    # -- what the backend asks (the model's answers) ----------------------------------

    @property
    def regions(self):
        return self.inner.regions

    @property
    def irq_counts(self):
        return self.inner.irq_counts

    def batch(self):
        return self.inner.batch()

    def reset(self, reason) -> None:
        self.inner.reset(reason)

    def routes_changed(self) -> None:
        self.inner.routes_changed()

    def dma_allowed(self) -> bool:
        return self.inner.dma_allowed()

    def describe(self) -> str:
        return f"{self.inner.describe()} with a fault plan of {len(self.plan.rules)} rule(s)"

    @property
    def activity(self):
        return self.inner.activity

    def describe_access(self, index: int, offset: int, size: int, *, write: bool = False) -> str:
        return self.inner.describe_access(index, offset, size, write=write)

    # -- attach: interrupts and DMA go through the fault wrappers -------------------------

    def attach(self, sink: InterruptSink, dma: DmaBackend) -> None:
        self._sink = FaultSink(sink, self.faults, self.plan.on("irq"))
        self.inner.attach(self._sink, FaultDma(dma, self.faults, self.plan.on("dma")))
        timed = self.plan.on("time")
        if timed:
            self._ticker = Ticker(self._sink, self.faults, timed)

    def detach(self) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.stop()
        if self._sink is not None:
            self._sink.stop()
        self.inner.detach()

    # -- reads and writes ------------------------------------------------------------------

    def region_read(self, index: int, offset: int, data) -> None:
        matching = [a for a in self._reads if a.matches(index, offset, len(data))]
        for a in matching:
            if a.rule.action == "delay_ms" and self.faults.fires(a.rule):
                self._report(a.rule, index, offset, len(data))
                time.sleep(a.rule.operand / 1000)
            elif a.rule.action == "disconnect" and self.faults.fires(a.rule):
                self._report(a.rule, index, offset, len(data))
                raise Disconnect(f"fault plan rule {a.rule.index}: the device vanishes")
        self.inner.region_read(index, offset, data)
        for a in matching:
            if a.rule.action not in ("delay_ms", "disconnect") and self.faults.fires(a.rule):
                before = bytes(data)
                data[:] = self._changed(a, index, offset, before)
                self._report(a.rule, index, offset, len(data), before=before.hex(), after=bytes(data).hex())

    def region_write(self, index: int, offset: int, data) -> None:
        size = len(data)
        matching = [a for a in self._writes if a.matches(index, offset, size)]
        times = 1
        for a in matching:
            rule = a.rule
            if not self.faults.fires(rule):
                continue
            before = bytes(data)
            if rule.action == "disconnect":
                self._report(rule, index, offset, size, before=before.hex())
                raise Disconnect(f"fault plan rule {rule.index}: the device vanishes")
            if rule.action == "drop":
                self._report(rule, index, offset, size, before=before.hex(), after=None)
                return
            if rule.action == "delay_ms":
                self._report(rule, index, offset, size)
                time.sleep(rule.operand / 1000)
            elif rule.action == "duplicate":
                self._report(rule, index, offset, size, before=before.hex(), after=before.hex())
                times = 2
            else:
                data = self._changed(a, index, offset, before)
                self._report(rule, index, offset, size, before=before.hex(), after=data.hex())
        for _ in range(times):
            self.inner.region_write(index, offset, data)

    def _changed(self, a: _AccessRule, index: int, offset: int, data: bytes) -> bytes:
        size = len(data)
        value = int.from_bytes(data, "little")
        mask = a.access_mask(offset, size)
        action = a.rule.action
        if action == "random":
            shape = int.from_bytes(bytes(self._shapes.byte_masks(index, offset, size)), "little")
            mask &= shape
            value = (value & ~mask) | (self.faults.randbits(a.rule, 8 * size) & mask)
        else:
            operand = a.operand(offset, size)
            if action == "xor":
                value ^= operand & mask
            elif action == "and":
                value &= operand | ~mask
            elif action == "or":
                value |= operand & mask
            else:  # a value
                value = (value & ~mask) | (operand & mask)
        return value.to_bytes(size, "little")

    def _report(self, rule: FaultRule, index: int, offset: int, size: int, **fields) -> None:
        names = self.inner.describe_access(index, offset, size, write=rule.on == "write")
        if names:
            fields["names"] = names
        self.faults.report(rule, region=index, offset=offset, size=size, **fields)

    # -- replies (backends that can) ------------------------------------------------------------

    def reply_fault(self, command: str) -> str | None:
        """What the plan does to the reply to ``command`` (a vfio-user command name), called by
        the backend before it serves one: sleeps for a delay, raises
        :class:`~vfiouser.devices.faults.InjectedFailure` (answer with its errno) or
        :class:`~vfiouser.devices.faults.Disconnect`; returns ``"drop"`` when the request is to
        be served without a reply, else None. None instead of a method when the plan has no
        reply rules."""
        result = None
        for rule in self._replies.get(command, ()):
            if not self.faults.fires(rule):
                continue
            self.faults.report(rule, command=command)
            if rule.action == "delay_ms":
                time.sleep(rule.operand / 1000)
            elif rule.action == "fail":
                raise InjectedFailure(f"fault plan rule {rule.index}: {command} fails", errno=rule.errno or 5)
            elif rule.action == "disconnect":
                raise Disconnect(f"fault plan rule {rule.index}: the device vanishes")
            else:
                result = "drop"
        return result
