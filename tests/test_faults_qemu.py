"""Fault plans through the real QEMU (qtest): the issue's acceptance check on both backends, and
a faulted session recorded by ``vfiouser serve --faults --trace`` that ``vfiouser replay`` reproduces
with the same plan and seed."""

import logging
import os
import re
import signal
import subprocess
import sys

import pytest

from vfiouser.devices.idio16 import Idio16
from vfiouser.testing.qemu import QtestMachine
from vfiouser.trace import load_events

pytestmark = pytest.mark.qemu

SLOT = 4
IO_BASE = 0xC000
#: the issue's rules: the first read of the inputs 0-7 port inverted, writes to outputs 0-7 dropped
PLAN = [{"on": "read", "region": "bar2", "offset": 1, "size": 1, "do": {"xor": 255}, "count": 1},
        {"on": "write", "region": "bar2", "offset": 0, "do": "drop"}]
#: the same two rules and read fuzzing of inputs 8-15: docs/hardening.md's plan
DOCS_PLAN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "examples",
                         "idio16-faults.json")


def test_a_read_is_inverted_once_and_a_dropped_write_never_lands(qemu_qtest, backend, caplog):
    caplog.set_level(logging.DEBUG, logger="vfiouser.observe")            # -v: our engine's readable log
    caplog.set_level(logging.DEBUG, logger="vfiouser.devices.faults")     # -v: faults a backend does not log
    dev = Idio16()
    dev.set_inputs(0x1234)
    vm = qemu_qtest(dev, backend=backend, faults=PLAN)
    gpio = vm.device
    assert gpio.bars == {2: IO_BASE}
    assert [vm.machine.inb(IO_BASE + 1) for _ in range(3)] == [0x34 ^ 0xFF, 0x34, 0x34]
    vm.machine.outb(IO_BASE + 0, 0xA5)
    vm.machine.outb(IO_BASE + 4, 0x3C)          # outputs 8-15: no rule
    assert dev.outputs == 0x3C00 and vm.machine.inb(IO_BASE + 0) == 0x00
    read_rule, write_rule = gpio.server.port.faults.summary().rules
    assert (read_rule.matched, read_rule.fired) == (3, 1)
    assert write_rule.fired == 1
    logged = [re.search(r"FAULT .*", r.getMessage()).group(0) for r in caplog.records if "FAULT" in r.getMessage()]
    assert logged == ["FAULT rule 0: read BAR2+0x1 (1 byte) idio16.in0_7 xor 0xff: 0x34 -> 0xcb",
                      "FAULT rule 1: write BAR2+0x0 (1 byte) idio16.out0_7 drop: 0xa5 -> dropped"]


def test_a_faulted_cli_session_is_traced_and_replays_with_the_same_plan(qemu_binary, sockdir, tmp_path):
    """docs/hardening.md's commands, with its plan."""
    plan_path, trace_path = DOCS_PLAN, tmp_path / "run.jsonl"
    sock = os.path.join(sockdir, "idio16.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vfiouser", "serve", "idio16", "-s", sock, "--param",
                             "loopback=on", "--faults", str(plan_path), "--seed", "42", "--trace", str(trace_path),
                             "-v", "--only", "bar2,fault"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        spec = proc.stdout.readline().strip()[len("-device '"):-1]
        with QtestMachine([spec.replace("}}", '},"addr":"04.0"}')], qemu=qemu_binary) as vm:
            vm.pci_cfg_write(SLOT, 0x18, IO_BASE)
            vm.pci_cfg_write(SLOT, 0x04, 0x0001, 2)
            vm.outb(IO_BASE + 4, 0x5A)             # outputs 8-15, looped back to inputs 8-15
            vm.outb(IO_BASE + 0, 0x77)             # dropped
            assert [vm.inb(IO_BASE + 1) for _ in range(2)] == [0xFF, 0x00]
            fuzzed = [vm.inb(IO_BASE + 5) for _ in range(4)]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "fault plan (seed 42): 6 faults injected" in err and "rule 1 (write drop): fired 1 of 1 match" in err
    faults = [e for e in load_events(str(trace_path)) if e["dir"] == "fault"]
    assert [(f["rule"], f["do"]) for f in faults] == [(1, "drop"), (0, "xor")] + [(2, "random")] * 4
    assert faults[1]["before"] == "00" and faults[1]["after"] == "ff"
    assert [int(f["after"], 16) for f in faults[2:]] == fuzzed
    with open(os.path.join(os.path.dirname(DOCS_PLAN), "..", "hardening.md")) as f:
        documented = re.findall(r"(FAULT rule .*)", f.read())
    logged = re.findall(r"(FAULT rule .*)", err)
    assert len(documented) == 3 and all(line in logged for line in documented)   # the page shows this run
    shown = subprocess.run([sys.executable, "-m", "vfiouser", "trace", "show", str(trace_path), "--only", "fault"],
                           capture_output=True, text=True, timeout=60).stdout
    assert re.findall(r"(FAULT rule .*)", shown) == logged

    def replay(*extra):
        return subprocess.run([sys.executable, "-m", "vfiouser", "replay", str(trace_path), "idio16", "--param",
                               "loopback=on", *extra], capture_output=True, text=True, timeout=120)

    same = replay("--faults", str(plan_path), "--seed", "42")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "the model matches the recording" in same.stdout
    other_seed = replay("--faults", str(plan_path), "--seed", "43")
    assert other_seed.returncode == 1 and "the model differs from the recording" in other_seed.stdout
    none = replay()
    assert none.returncode == 2 and "recorded with a fault plan" in none.stderr
