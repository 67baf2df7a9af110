"""Where the bench's processes run.

On the 2-core VMs this bench was written on, waking a process on the *other*
core costs 30-40 µs (the idle vCPU has to be woken by the hypervisor), against
about 1 µs on the same core, and the scheduler's choice varies from run to run:
the same qtest round trip measures either ~13 µs or ~45 µs. Figures taken
unpinned are therefore bimodal. By default the bench pins the harness (this
process and the QEMUs it starts, which inherit it) to the first CPU and every
bench server to the second, and reports this in the machine description;
``--no-pin`` leaves placement to the scheduler.
"""

from __future__ import annotations

import logging
import os

__all__ = ["Placement", "OWN_CPU", "SHARED_CPU"]

log = logging.getLogger(__name__)


#: the labels of the two server placements (the report's targets tell them apart)
OWN_CPU = "server on its own CPU"
SHARED_CPU = "server on the harness CPU"


class Placement:
    """The CPU sets of the harness and of the servers (``None``: not pinned)."""

    def __init__(self, pin: bool = True) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.original = set(cpus)
        if pin and len(cpus) >= 2:
            self.harness: set[int] | None = {cpus[0]}
            self.server: set[int] | None = {cpus[1]}
        elif pin and cpus:
            self.harness = self.server = {cpus[0]}
        else:
            self.harness = self.server = None

    @property
    def pinned(self) -> bool:
        return self.harness is not None

    def apply_harness(self) -> None:
        """Pin this process (and so every process it starts from now on)."""
        if self.harness is not None:
            os.sched_setaffinity(0, self.harness)

    def pin_server(self, pid: int = 0) -> None:
        """Pin a server process (or, with ``pid`` 0, the calling thread)."""
        if self.server is not None:
            os.sched_setaffinity(pid, self.server)

    def release(self) -> None:
        """Undo :meth:`apply_harness` for this process."""
        os.sched_setaffinity(0, self.original)

    def describe(self) -> str:
        if not self.pinned:
            return "not pinned (scheduler's choice)"
        return (f"harness (bench client and QEMU) on CPU {','.join(map(str, sorted(self.harness)))}, "
                f"servers on CPU {','.join(map(str, sorted(self.server)))}")
