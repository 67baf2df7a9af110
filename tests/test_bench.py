"""The benchmark suite's code works: its cheapest section runs and the report has its shape.

These check structure only. No assertion here is about speed: the bench's
figures are numbers to track (docs/performance.md), never pass/fail criteria.
"""

import json

import pytest

from vfiouser.bench import SECTIONS, main
from vfiouser.bench.device import BURST_BYTES, STALL_MS, BenchDevice
from vfiouser.bench.report import render_markdown, targets
from vfiouser.bench.wire import server_processing
from vfiouser.client import Client

PROCESSING_KEYS = {"region_read_4", "region_write_4", "region_write_4_posted", "config_read_4",
                   "write_multi_200_per_write", "model_region_read_4", "on_readable_read_4_batch256"}


def test_server_processing_measures_every_message_kind():
    result = server_processing(200, repeats=1)
    assert set(result) == PROCESSING_KEYS
    assert all(isinstance(v, float) and v > 0 for v in result.values())


def test_bench_device_registers_and_counters(serve):
    dev = BenchDevice()
    server = serve(dev)
    with Client.connect(server.path) as c:
        c.bring_up()
        c.region_write(0, 0x10, b"\x01\x02\x03\x04")
        assert c.region_read(0, 0x10, 4) == b"\x01\x02\x03\x04"
        c.region_write(1, 0x10, b"\x55")
        assert c.region_read(1, 0x10, 1) == b"\x55"
        c.region_write(0, STALL_MS, (0).to_bytes(4, "little"))
        c.region_write(3, 0x100, b"\xaa" * 8, posted=True)
        assert int.from_bytes(c.region_read(0, BURST_BYTES, 8), "little") == 8
    assert dev.burst.writes == 1 and dev.region_accesses[3] == 1


def test_bench_device_mmap_area(serve):
    dev = BenchDevice(mmap=True)
    server = serve(dev)
    with Client.connect(server.path) as c:
        assert c.get_region_info(2).fd is not None
        c.bring_up()
        c.region_write(2, 0x10, b"\x07")
    assert dev.shared is not None and len(dev.shared) == 0x1000 and dev.shared[0x10] == 7


@pytest.fixture(scope="module")
def quick_protocol_run(tmp_path_factory):
    """``python -m vfiouser.bench --quick --only protocol``, once: (results, report text)."""
    tmp = tmp_path_factory.mktemp("bench")
    out, raw = tmp / "perf.md", tmp / "perf.json"
    code = main(["--quick", "--only", "protocol", "--no-pin", "--no-plot", "--out", str(out), "--json", str(raw)])
    assert code == 0
    return json.loads(raw.read_text()), out.read_text()


def test_quick_protocol_section_writes_a_report(quick_protocol_run):
    results, text = quick_protocol_run
    assert set(results["protocol"]["processing"]) == PROCESSING_KEYS
    (socket_entry,) = results["protocol"]["socket"]
    assert socket_entry["pipelined"]["reads_per_s"] > 0
    assert socket_entry["ping_pong"]["raw"]["n"] > 0
    assert text.startswith("# Performance\n")
    for heading in ("## Machine", "## Targets", "## 3. Protocol cost without QEMU", "## What these numbers mean"):
        assert heading in text
    assert text.count("Not run (see `--only`).") == len(SECTIONS) - 1
    assert "plot disabled" in text
    holds = {t["target"].split(" ")[0]: t["holds"] for t in targets(results)}
    assert holds["trapped"] is None  # not measured in this run


def test_report_says_why_a_section_has_no_numbers(quick_protocol_run):
    results = dict(quick_protocol_run[0])
    results["mmap"] = {"unavailable": "vfiouser.devices.pci.MemoryBar.share() does not exist yet"}
    results["dma"] = {"error": "RuntimeError: boom"}
    text = render_markdown(results)
    assert "Not available: vfiouser.devices.pci.MemoryBar.share() does not exist yet" in text
    assert "Failed: RuntimeError: boom" in text
