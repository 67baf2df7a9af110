"""Fault injection (vfiouser.devices.faults) without QEMU: plans are checked when loaded, each kind
of rule does what docs/hardening.md says on both backends, the same seed gives the same faults,
and every fault is logged, traced and counted."""

import json
import logging
import os
import subprocess
import sys

import pytest

from vfiouser.backends import make_server
from vfiouser.client import Client
from vfiouser.devices.edu import Edu
from vfiouser.devices.faults import FaultPlanError, FaultPort, load_plan
from vfiouser.devices.idio16 import Idio16
from vfiouser.errors import ConnectionClosed, VfioUserError
from vfiouser.protocol import Command
from vfiouser.server import serve_in_thread


# -- plans --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rules, rule, field, says", [
    ([{"on": "reed", "do": "drop"}], 0, "on", "'reed' is not one of read, write"),
    ([{"on": "read", "region": "bar2", "do": "random"}, {"on": "read", "region": "bar2", "offset": "0x30-0x20",
                                                         "do": "random"}], 1, "offset", "ends before it starts"),
    ([{"on": "read", "region": "bar2", "offset": 1, "do": "drop"}], 0, "do", "does not apply to read rules"),
    ([{"on": "write", "region": "bar2", "offset": 1, "do": {"xor": "ff"}}], 0, "do.xor", "is not a number"),
    ([{"on": "irq", "kind": "nmi", "do": "drop"}], 0, "kind", "'nmi' is not one of intx, msi, msix"),
    ([{"on": "read", "region": "bar2", "do": "random", "probability": 2}], 0, "probability", "between 0 and 1"),
    ([{"on": "read", "region": "bar2", "do": "random", "cuont": 1}], 0, "cuont", "unknown for read rules"),
    ([{"on": "reply", "do": "fail"}], 0, "command", "name the command"),
    ([{"on": "reply", "command": "REGION_RAED", "do": "fail"}], 0, "command", "not a vfio-user command"),
    ([{"on": "time", "kind": "intx", "do": "spurious"}], 0, "every_ms", "every_ms above 0"),
    ([{"on": "read", "offset": 4, "do": "random"}], 0, "region", "give the region too"),
    ([{"on": "dma", "do": "drop"}], 0, "op", "only a DMA write can be dropped"),
    ([{"on": "read", "region": "bar2"}], 0, "do", "missing"),
])
def test_a_bad_rule_is_refused_naming_the_rule_and_the_field(rules, rule, field, says):
    with pytest.raises(FaultPlanError) as info:
        load_plan(rules)
    assert info.value.rule == rule and info.value.field == field
    assert f"rule {rule}, field {field!r}" in str(info.value) and says in str(info.value)
    assert isinstance(info.value, VfioUserError)


def test_a_plan_loads_from_json_text_or_a_file_and_a_bad_file_says_so(tmp_path):
    text = '[{"on": "write", "region": "bar2", "offset": "0x0-0x3", "do": "drop", "after": 2}]'
    (tmp_path / "plan.json").write_text(text)
    for source in (text, str(tmp_path / "plan.json"), json.loads(text)):
        (rule,) = load_plan(source).rules
        assert (rule.on, rule.region, rule.offsets, rule.action, rule.after) == ("write", 2, (0, 3), "drop", 2)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(FaultPlanError, match="not JSON"):
        load_plan(str(tmp_path / "bad.json"))
    with pytest.raises(FaultPlanError, match="cannot read"):
        load_plan(str(tmp_path / "missing.json"))


def test_a_register_the_model_does_not_declare_is_refused_when_the_port_is_built():
    with pytest.raises(FaultPlanError, match=r"rule 0, field 'register': the model has no register .*'in99'"):
        FaultPort(Idio16(), [{"on": "read", "register": "in99", "do": "random"}])


# -- reads and writes, by offset and by name ----------------------------------------------------


def idio16_port(plan, **kwargs):
    port = FaultPort(Idio16(**kwargs), plan, seed=7)
    port.region_write(7, 0x18, (0xC000).to_bytes(4, "little"))
    port.region_write(7, 0x04, bytes([1, 0]))
    return port


def read(port, offset, size=1):
    buf = bytearray(size)
    port.region_read(2, offset, buf)
    return int.from_bytes(buf, "little")


def test_when_rules_count_after_and_probability_decide_which_matches_fault():
    port = idio16_port([{"on": "read", "region": "bar2", "offset": 1, "do": 0x77, "after": 2, "count": 2}])
    assert [read(port, 1) for _ in range(6)] == [0, 0, 0x77, 0x77, 0, 0]
    (counts,) = port.faults.summary().rules
    assert (counts.matched, counts.fired) == (6, 2)
    half = idio16_port([{"on": "read", "region": "bar2", "offset": 1, "do": 1, "probability": 0.5}])
    values = [read(half, 1) for _ in range(200)]
    assert 60 < sum(values) < 140


def test_value_and_mask_actions_on_a_field_change_only_its_bits():
    port = idio16_port([{"on": "read", "register": "in0_7", "do": {"or": 0xF0}},
                        {"on": "write", "register": "out0_7", "do": {"and": 0x0F}}], loopback=True)
    port.region_write(2, 0, bytes([0xA5]))      # lands as 0x05
    assert port.inner.device.outputs & 0xFF == 0x05
    assert read(port, 1) == 0xF5                # inputs (looped back) 0x05, OR 0xf0
    assert read(port, 0, 2) == 0xF505           # a 2-byte read reaches in0_7 too: only its byte changes


def test_random_reads_fill_defined_fields_only_and_the_seed_decides_them():
    from vfiouser.devices.regs import Field, Register, RegisterMap
    from vfiouser.devices.pci import IoBar, PciDevice

    regs = RegisterMap([Register("ctl", 0, 16, [Field("mode", (3, 0)), Field("go", 8)], doc="two fields")])

    class Dev(PciDevice):
        vendor_id, device_id = 0x1234, 0x5678

        def __init__(self):
            super().__init__()
            self.regs = regs.instantiate(self)
            self.add_bar(0, IoBar(0x10)).map(self.regs, 0, 2)

    def values(seed):
        port = FaultPort(Dev(), [{"on": "read", "region": "bar0", "do": "random"}], seed=seed)
        port.region_write(7, 0x10, (0xC000).to_bytes(4, "little"))
        port.region_write(7, 0x04, bytes([1, 0]))
        out = []
        for _ in range(64):
            buf = bytearray(2)
            port.region_read(0, 0, buf)
            out.append(int.from_bytes(buf, "little"))
        return out

    first = values(1)
    assert all(v & ~0x010F == 0 for v in first)         # reserved bits read as the model reads them: 0
    assert {v & 0x0F for v in first} > {0} and {v & 0x100 for v in first} == {0, 0x100}
    assert values(1) == first and values(2) != first


def test_drop_and_duplicate_writes_and_delayed_reads():
    port = idio16_port([{"on": "write", "region": "bar2", "offset": 4, "do": "drop"},
                        {"on": "write", "region": "bar2", "offset": 3, "do": "duplicate", "count": 1},
                        {"on": "read", "region": "bar2", "offset": 5, "do": {"delay_ms": 1}}])
    port.region_write(2, 0, bytes([0x11]))
    port.region_write(2, 4, bytes([0x22]))
    assert port.inner.device.outputs == 0x0011
    port.region_write(2, 3, bytes([0]))
    assert read(port, 5) == 0
    assert [r.fired for r in port.faults.summary().rules] == [1, 1, 1]


def test_without_read_or_write_rules_the_port_serves_the_models_own_methods():
    port = FaultPort(Idio16(), [{"on": "irq", "do": "drop"}])
    assert port.region_read == port.inner.region_read and port.region_write == port.inner.region_write
    assert port.reply_fault is None


# -- interrupts and DMA, through a served device (both backends) --------------------------------


def test_irq_rules_drop_then_duplicate_msi(vfiouser_device, backend):
    dev = vfiouser_device(Edu, backend=backend, dma_delay_ms=0,
                          faults=[{"on": "irq", "kind": "msi", "do": "drop", "count": 1}])
    dev.enable_msi()
    dev.bar(0).write(0x60, 4, 1)
    dev.bar(0).write(0x64, 4, 1)
    dev.bar(0).write(0x60, 4, 2)
    assert dev.irqs.wait("msi") == 1       # the first never came, the second did
    (counts,) = dev.server.port.faults.summary().rules
    assert (counts.matched, counts.fired) == (2, 1)


def test_a_delayed_intx_comes_later_and_a_dropped_one_never(vfiouser_device):
    dev = vfiouser_device(Edu, dma_delay_ms=0, faults=[{"on": "irq", "kind": "intx", "do": {"delay_ms": 50},
                                                        "count": 1}])
    dev.bar(0).write(0x60, 4, 1)
    dev.irqs.wait("intx")                  # it comes, after the delay
    assert dev.server.port.faults.summary().total == 1


@pytest.mark.parametrize("action", ["fail", "corrupt"])
def test_dma_rules_fail_or_corrupt_what_the_model_reads(vfiouser_device, action):
    dev = vfiouser_device(Edu, dma_delay_ms=0, faults=[{"on": "dma", "op": "read", "do": action}])
    data = bytes(range(1, 65))
    dev.memory.write(0x1000, data)
    regs = dev.bar(0)
    regs.write(0x80, 8, 0x1000)
    regs.write(0x88, 8, 0x40000)
    regs.write(0x90, 8, len(data))
    regs.write(0x98, 4, 1 | 4)
    dev.irqs.wait("intx")
    regs.write(0x64, 4, 0x100)
    regs.write(0x80, 8, 0x40000)           # and back to RAM (DMA writes: no rule)
    regs.write(0x88, 8, 0x2000)
    regs.write(0x98, 4, 1 | 2 | 4)
    dev.irqs.wait("intx")
    got = dev.memory.read(0x2000, len(data))
    if action == "fail":
        assert got == bytes(len(data))     # edu reads zeros when its DMA fails
    else:
        assert sum(a != b for a, b in zip(got, data)) == 1


# -- replies and a device that vanishes (our engine) --------------------------------------------


def test_reply_rules_fail_and_drop_and_disconnect_drops_the_client(sockdir):
    plan = [{"on": "reply", "command": "DEVICE_GET_IRQ_INFO", "do": "fail", "errno": 16, "count": 1},
            {"on": "reply", "command": "DEVICE_RESET", "do": "drop"},
            {"on": "read", "region": "config", "offset": 0x2C, "do": "disconnect"}]
    with serve_in_thread(Idio16(), os.path.join(sockdir, "d.sock"), faults=plan) as server:
        with Client.connect(server.path, timeout=2) as c:
            with pytest.raises(VfioUserError) as info:
                c.request(Command.DEVICE_GET_IRQ_INFO, bytes(16))
            assert info.value.errno == 16
            with pytest.raises(Exception, match="no reply to DEVICE_RESET"):
                c.request(Command.DEVICE_RESET, b"", timeout=0.5)
        with Client.connect(server.path, timeout=2) as c:
            assert c.config_read(0x00, 2) == 0x494F
            with pytest.raises((ConnectionClosed, OSError, TimeoutError)):
                c.config_read(0x2C, 2)
        assert server.wait_idle(5)
        assert [r.fired for r in server.port.faults.summary().rules] == [1, 1, 1]


def test_libvfio_user_refuses_a_plan_it_cannot_serve(sockdir, libvfio_user_library):
    with pytest.raises(FaultPlanError, match="rule 0, field 'on': the libvfio-user backend cannot change replies"):
        make_server(Idio16(), os.path.join(sockdir, "d.sock"), backend="libvfio-user",
                    faults=[{"on": "reply", "command": "REGION_READ", "do": "fail"}])


# -- visibility ---------------------------------------------------------------------------------


def test_every_fault_is_logged_with_v_and_recorded_in_the_trace(vfiouser_device, caplog, tmp_path):
    from vfiouser.trace import Tracer, load_events

    caplog.set_level(logging.DEBUG, logger="vfiouser.observe")
    trace_path = tmp_path / "t.jsonl"
    tracer = Tracer(open(trace_path, "w"))
    plan = [{"on": "read", "region": "bar2", "offset": 1, "size": 1, "do": {"xor": 255}, "count": 1}]
    with serve_in_thread(Idio16(), os.path.join(tmp_path, "d.sock"), faults=plan, tracer=tracer) as server:
        with Client.connect(server.path, timeout=2) as c:
            c.bring_up()
            bar2 = c.region_read(2, 1, 1)
        server.wait_idle(5)
    tracer.close()
    assert bar2 == b"\xff"
    lines = [r.getMessage() for r in caplog.records if "FAULT" in r.getMessage()]
    assert len(lines) == 1 and "FAULT rule 0: read BAR2+0x1 (1 byte) idio16.in0_7 xor 0xff: 0x00 -> 0xff" in lines[0]
    (event,) = [e for e in load_events(str(trace_path)) if e["dir"] == "fault"]
    assert (event["rule"], event["region"], event["offset"], event["before"], event["after"]) == (0, 2, 1, "00", "ff")


def test_the_cli_refuses_a_bad_plan_and_logs_the_summary_at_exit(tmp_path):
    (tmp_path / "bad.json").write_text('[{"on": "read", "region": "bar7", "do": "random"}]')
    sock = str(tmp_path / "s.sock")
    out = subprocess.run([sys.executable, "-m", "vfiouser", "serve", "idio16", "-s", sock, "--faults",
                          str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "rule 0, field 'region'" in out.stderr


@pytest.mark.parametrize("fast_loop", [True, False], ids=["c-loop", "python-fast-path"])
def test_faults_apply_on_the_fast_paths_and_disconnect_ends_the_c_loop(sockdir, fast_loop):
    """Unobserved, a session serves region accesses by the C loop (or the dispatcher's fast path):
    they call the fault port's methods as well."""
    from vfiouser import fastpath

    if fast_loop and not fastpath.wanted():
        pytest.fail("the C loop is not built (or VFIOUSER_PURE_PYTHON is set): this test needs it")
    dev = Idio16()
    dev.set_inputs(0x0F)
    plan = [{"on": "read", "region": "bar2", "offset": 1, "do": {"xor": 255}, "count": 1},
            {"on": "write", "region": "bar2", "offset": 0, "do": "drop"},
            {"on": "read", "region": "bar2", "offset": 7, "do": "disconnect"}]
    with serve_in_thread(dev, os.path.join(sockdir, "d.sock"), faults=plan, fast_loop=fast_loop) as server:
        with Client.connect(server.path, timeout=2) as c:
            c.bring_up()
            assert server.session.dispatcher.fast and server.fast_loop == fast_loop
            assert [c.region_read(2, 1, 1) for _ in range(2)] == [b"\xf0", b"\x0f"]
            c.region_write(2, 0, b"\x33")
            assert dev.outputs == 0
            with pytest.raises((ConnectionClosed, OSError, TimeoutError)):
                c.region_read(2, 7, 1)
        assert server.wait_idle(5)
    assert [r.fired for r in server.port.faults.summary().rules] == [1, 1, 1]
