"""Fault injection: a device that misbehaves on purpose, reproducibly, to harden guest drivers.

A fault plan (:func:`load_plan`: a JSON list of rules) is applied by a
:class:`FaultPort` wrapped around a model's port, between the backend and the
model, so it works for every model and every backend without touching model
code: reads that return other values (or seeded random ones shaped by the
register map), writes that never land, interrupts dropped, delayed, duplicated
or spurious, DMA that fails or is corrupted, replies delayed, failed or
dropped, a device that vanishes. Every fault is reported (``-v``, the trace)
and counted (:meth:`FaultInjector.summary`). ``docs/hardening.md`` is the guide.

>>> from vfiouser.devices.idio16 import Idio16
>>> port = FaultPort(Idio16(), [{"on": "write", "region": "bar2", "offset": 0, "do": "drop"}])
>>> port.region_write(7, 0x18, (0xC000).to_bytes(4, "little")); port.region_write(7, 0x04, b"\\x01\\x00")
>>> port.region_write(2, 0, b"\\x5a"); buf = bytearray(1); port.region_read(2, 0, buf); buf.hex()
'00'
"""

from .injector import Disconnect, FaultInjector, FaultSummary, FaultWatcher, InjectedFailure, RuleCount, fault_line
from .plan import COMMANDS, FaultPlan, FaultPlanError, FaultRule, load_plan
from .port import FaultPort

__all__ = ["FaultPort", "FaultPlan", "FaultRule", "FaultPlanError", "load_plan", "FaultInjector", "FaultSummary",
           "RuleCount", "FaultWatcher", "Disconnect", "InjectedFailure", "fault_line", "COMMANDS"]
