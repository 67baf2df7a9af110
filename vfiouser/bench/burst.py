"""REGION_WRITE_MULTI: what QEMU does with a burst of small posted writes.

QEMU 11.1.3 coalesces queued posted writes of at most 8 bytes into
REGION_WRITE_MULTI messages (up to 200 writes each) only when more than 1024
messages wait in its send queue, that is, when the server falls behind, and
only if the server advertised ``write_multiple`` (or ``x-send-queued=on``).
A flag bug (``VFIO_PROXY_USE_MULTI`` overlaps ``FORCE_QUEUED``, see the
reference notes) also makes ``write_multiple`` send *every* message through
QEMU's queue.

The bench memsets 64 KiB of the bench device's BAR3 (QEMU turns it into 8192
posted 8-byte writes), once with the server keeping up and once with the first
write's handler stalling the server, against a server that advertises
``write_multiple`` and one that does not. The server counts the messages it
receives per command (a counting tracer, :class:`~.child.MessageCounter`) and the
device when each write arrived; a read of the device after the memset waits
until the server has handled every write before it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

from .child import ChildServer, ServeSpec
from .device import BURST_BAR_SIZE, BURST_BYTES, STALL_MS
from .qtest import LeanQtest

__all__ = ["run"]

log = logging.getLogger(__name__)

SLOTS = {True: 4, False: 6}
BASES = {True: 0xE000_0000, False: 0xE010_0000}


def _program(vm: LeanQtest, slot: int, base: int) -> None:
    vm.cfg_write(slot, 0x10, base)
    vm.cfg_write(slot, 0x1C, base + 0x1_0000)
    vm.cfg_write(slot, 0x04, 0x0002, 2)


def _burst(vm: LeanQtest, server: ChildServer, base: int, stall_ms: int) -> dict:
    """One 64 KiB memset of BAR3, the server stalling ``stall_ms`` on its first write."""
    server.reset()
    vm.cmd(f"writel {base + STALL_MS:#x} {stall_ms:#x}")
    vm.value(f"readl {base + STALL_MS:#x}")  # the stall is armed before the burst starts
    t0 = time.monotonic()
    vm.cmd(f"memset {base + 0x1_0000:#x} {BURST_BAR_SIZE:#x} 0x5a")
    t_issued = time.monotonic()
    written = vm.value(f"readq {base + BURST_BYTES:#x}")
    t_done = time.monotonic()
    stats = server.stats()
    burst, messages = stats["burst"], stats["messages"]
    counts = messages["counts"]
    drain_from = burst["stall_end"] or burst["first_write"]
    drain_s = (burst["last_write"] - drain_from) if burst["last_write"] and drain_from else None
    writes_after = burst["writes"] - (1 if burst["stall_end"] else 0)
    row = {
        "stall_ms": stall_ms,
        "bytes": written,
        "device_writes": burst["writes"],
        "region_write_msgs": counts.get("REGION_WRITE", 0) - 1,  # minus the STALL_MS register write
        "write_multi_msgs": counts.get("REGION_WRITE_MULTI", 0),
        "writes_in_multi": messages["multi_writes"],
        "memset_s": t_issued - t0,
        "total_s": t_done - t0,
        "drain_s": drain_s,
        "drain_writes_per_s": writes_after / drain_s if drain_s else None,
    }
    if written != BURST_BAR_SIZE:
        raise RuntimeError(f"the device saw {written} of the {BURST_BAR_SIZE} bytes written")
    return row


def run(*, stall_ms: int = 500, server_cpus=None) -> dict:
    """The four bursts (see the module docstring)."""
    directory = tempfile.mkdtemp(prefix="vfu-burst-")
    servers: dict[bool, ChildServer] = {}
    result: dict = {"stall_ms": stall_ms, "runs": []}
    try:
        for wm in (True, False):
            servers[wm] = ChildServer(ServeSpec(os.path.join(directory, f"wm{int(wm)}.sock"), write_multiple=wm,
                                                count_messages=True, cpus=server_cpus))
        devices = [servers[wm].qemu_device_json(addr=f"{SLOTS[wm]:02x}.0") for wm in (True, False)]
        with LeanQtest(devices) as vm:
            for wm in (True, False):
                _program(vm, SLOTS[wm], BASES[wm])
            for wm in (True, False):
                for stall in (0, stall_ms):
                    row = _burst(vm, servers[wm], BASES[wm], stall)
                    row["write_multiple"] = wm
                    log.info("burst write_multiple=%s stall %d ms: %d REGION_WRITE, %d WRITE_MULTI (%d writes), "
                             "total %.3f s", wm, stall, row["region_write_msgs"], row["write_multi_msgs"],
                             row["writes_in_multi"], row["total_s"])
                    result["runs"].append(row)
    finally:
        for server in servers.values():
            server.close()
        try:
            os.rmdir(directory)
        except OSError:
            pass
    return result
