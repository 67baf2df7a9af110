"""Interrupts and DMA through a fault plan: wrappers of what a backend attaches to a port.

* :class:`FaultSink` wraps the backend's :class:`~vfiouser.devices.port.InterruptSink`:
  ``irq`` rules drop, delay or duplicate the interrupts the model raises (an
  INTx rule matches assertions: a dropped one leaves the line low; a delayed one
  rises later only if the model still asserts it).
* :class:`FaultDma` wraps the :class:`~vfiouser.devices.port.DmaBackend`: ``dma``
  rules make a transfer fail (the model sees :class:`~vfiouser.devices.pci.dma.DmaAborted`),
  corrupt its data (a read returns flipped bits; a write stores them), delay it,
  or drop a write.
* :class:`Ticker` runs ``time`` rules: a spurious interrupt every so many ms.

A dropped MSI or MSI-X counts as sent for the model (it must not hold it for a
later route: that would deliver it after all).
"""

from __future__ import annotations

import threading
import time

from vfiouser.devices.pci.dma import DmaAborted
from vfiouser.devices.port import DmaBackend, InterruptSink

from .injector import FaultInjector
from .plan import FaultRule

__all__ = ["FaultSink", "FaultDma", "Ticker"]


class FaultSink(InterruptSink):
    """``inner`` with ``rules`` (``on: irq``) applied (see the module docstring)."""

    def __init__(self, inner: InterruptSink, faults: FaultInjector, rules: tuple[FaultRule, ...]) -> None:
        self.inner = inner
        self.faults = faults
        self.rules = rules
        #: the INTx level the model asked for last
        self.level = False
        self._timers: set[threading.Timer] = set()
        self._lock = threading.Lock()
        self._stopped = False

    def _later(self, delay_ms: float, fn, *args) -> None:
        def run() -> None:
            with self._lock:
                self._timers.discard(timer)
                if self._stopped:
                    return
            fn(*args)

        timer = threading.Timer(delay_ms / 1000, run)
        timer.daemon = True
        with self._lock:
            if self._stopped:
                return
            self._timers.add(timer)
        timer.start()

    def stop(self) -> None:
        """The client is gone: delayed interrupts are not delivered."""
        with self._lock:
            self._stopped = True
            timers, self._timers = self._timers, set()
        for timer in timers:
            timer.cancel()

    def _action(self, kind: str, vector: int | None) -> FaultRule | None:
        """The first rule that fires for this interrupt (every matching rule counts a match)."""
        chosen = None
        for rule in self.rules:
            if rule.kind not in (None, kind) or (rule.vector is not None and rule.vector != vector):
                continue
            if self.faults.fires(rule) and chosen is None:
                chosen = rule
                fields = {"kind": kind} | ({"vector": vector} if vector is not None else {"level": True})
                self.faults.report(rule, **fields)
        return chosen

    def intx(self, asserted: bool) -> None:
        self.level = bool(asserted)
        rule = self._action("intx", None) if asserted and self.rules else None
        if rule is None:
            self.inner.intx(asserted)
        elif rule.action == "delay_ms":
            self._later(rule.operand, self._delayed_intx)
        elif rule.action == "duplicate":  # a second edge: up, down, up
            self.inner.intx(True)
            self.inner.intx(False)
            self.inner.intx(True)
        # drop: the line stays as it was

    def _delayed_intx(self) -> None:
        if self.level:
            self.inner.intx(True)

    def _vector(self, kind: str, send, vector: int) -> bool:
        rule = self._action(kind, vector) if self.rules else None
        if rule is None:
            return send(vector)
        if rule.action == "delay_ms":
            self._later(rule.operand, send, vector)
        elif rule.action == "duplicate":
            send(vector)
            return send(vector)
        return True

    def msi(self, vector: int) -> bool:
        return self._vector("msi", self.inner.msi, vector)

    def msix(self, vector: int) -> bool:
        return self._vector("msix", self.inner.msix, vector)

    def spurious(self, kind: str, vector: int | None) -> None:
        """An interrupt the model did not raise: an INTx pulse (only while the model's line is
        low, so its own assertion is never cut short), or an MSI/MSI-X vector."""
        if kind == "intx":
            if not self.level:
                self.inner.intx(True)
                if not self.level:
                    self.inner.intx(False)
        elif kind == "msi":
            self.inner.msi(vector)
        else:
            self.inner.msix(vector)


class FaultDma(DmaBackend):
    """``inner`` with ``rules`` (``on: dma``) applied (see the module docstring)."""

    def __init__(self, inner: DmaBackend, faults: FaultInjector, rules: tuple[FaultRule, ...]) -> None:
        self.inner = inner
        self.faults = faults
        self.rules = rules

    def _fired(self, op: str, addr: int, size: int) -> list[FaultRule]:
        out = []
        for rule in self.rules:
            if rule.op not in (None, op) or (rule.size is not None and rule.size != size):
                continue
            if rule.addrs is not None and (addr + size - 1 < rule.addrs[0] or addr > rule.addrs[1]):
                continue
            if self.faults.fires(rule):
                self.faults.report(rule, op=op, addr=addr, size=size)
                out.append(rule)
        return out

    def _corrupt(self, rule: FaultRule, data: bytes) -> bytes:
        if not data:
            return data
        out = bytearray(data)
        out[self.faults.randrange(rule, len(out))] ^= 1 + self.faults.randrange(rule, 255)
        return bytes(out)

    def _before(self, rules: list[FaultRule], addr: int, size: int) -> None:
        for rule in rules:
            if rule.action == "fail":
                raise DmaAborted(f"fault plan rule {rule.index}: the transfer fails", addr, size)
            if rule.action == "delay_ms":
                time.sleep(rule.operand / 1000)

    def read(self, addr: int, size: int, *, may_wait: bool) -> bytes:
        rules = self._fired("read", addr, size) if self.rules else ()
        self._before(rules, addr, size)
        data = self.inner.read(addr, size, may_wait=may_wait)
        for rule in rules:
            if rule.action == "corrupt":
                data = self._corrupt(rule, data)
        return data

    def write(self, addr: int, data: bytes, *, may_wait: bool) -> None:
        rules = self._fired("write", addr, len(data)) if self.rules else ()
        self._before(rules, addr, len(data))
        for rule in rules:
            if rule.action == "drop":
                return
            if rule.action == "corrupt":
                data = self._corrupt(rule, data)
        self.inner.write(addr, data, may_wait=may_wait)

    def mapped(self, addr: int, size: int, write: bool) -> list[tuple[int, int]]:
        return self.inner.mapped(addr, size, write)

    def in_place(self, addr: int, size: int, write: bool) -> bool:
        return self.inner.in_place(addr, size, write)


class Ticker:
    """Runs ``time`` rules on one thread while a client is attached: each rule fires every
    ``every_ms`` from ``after_ms`` on (its ``count``, ``after`` and ``probability`` apply)."""

    def __init__(self, sink: FaultSink, faults: FaultInjector, rules: tuple[FaultRule, ...]) -> None:
        self.sink, self.faults, self.rules = sink, faults, rules
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vfiouser-faults", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        due = [start + (r.after_ms + r.every_ms) / 1000 for r in self.rules]
        while not self._stop.is_set():
            now = time.monotonic()
            for i, rule in enumerate(self.rules):
                if now >= due[i]:
                    due[i] += rule.every_ms / 1000
                    if due[i] < now:  # fell behind (a loaded machine): no burst to catch up
                        due[i] = now + rule.every_ms / 1000
                    if self.faults.fires(rule):
                        self.faults.report(rule, kind=rule.kind,
                                           **({"vector": rule.vector} if rule.vector is not None else {}))
                        try:
                            self.sink.spurious(rule.kind, rule.vector)
                        except Exception:  # the client went away under us
                            pass
            self._stop.wait(max(0.0, min(due) - time.monotonic()))

    def stop(self) -> None:
        """Stop firing (before the port detaches)."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
