"""The benchmark suite's code works: its cheapest section runs and the report has its shape.

These check structure only. No assertion here is about speed: the bench's
figures are numbers to track (docs/performance.md), never pass/fail criteria.
"""

import json
import os
import socket
import threading
import time

import pytest

from vfiouser.bench import SECTIONS, _parser, dmabw, main, versus_c
from vfiouser.bench.device import BURST_BYTES, REGS_STATUS, STALL_MS, BenchDevice
from vfiouser.bench.minimal import serve_connection
from vfiouser.bench.report import (TARGET_CPU_VS_LOOP, TARGET_TRAPPED_VS_C, dma_series, reference_rows,
                                   render_markdown, targets, versus_c_series, versus_c_targets)
from vfiouser.bench.wire import _recv_exact, server_processing
from vfiouser.client import Client
from vfiouser.errors import ErrorReply
from vfiouser.protocol import HEADER

PROCESSING_KEYS = {"region_read_4", "region_write_4", "region_write_4_posted", "config_read_4",
                   "write_multi_200_per_write", "model_region_read_4", "on_readable_read_4_batch256",
                   "regs_region_read_4", "regs_region_write_4", "regs_region_write_4_posted",
                   "regs_region_write_4_w1c", "regs_model_region_read_4"}


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
        c.region_write(4, 0x10, b"\x05\x06\x07\x08")  # BAR4: the register layer's register file
        assert c.region_read(4, 0x10, 4) == b"\x05\x06\x07\x08"
        c.region_write(4, REGS_STATUS, b"\x00\x02")  # mode 2
        dev.block.reg("status").set("events", 0b11)
        c.region_write(4, REGS_STATUS, b"\x01\x02")  # write 1 to clear event 0
        assert c.region_read(4, REGS_STATUS, 2) == b"\x02\x02"
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


# -- versus-c: our idio16 next to libvfio-user's C sample and a minimal Python loop ----------------


@pytest.fixture
def minimal_client():
    """A Client on one end of a socketpair, the minimal loop serving the other on a thread."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    thread = threading.Thread(target=serve_connection, args=(theirs,), daemon=True)
    thread.start()
    client = Client(ours)
    yield client
    client.close()
    thread.join(5)
    theirs.close()
    assert not thread.is_alive()


def test_minimal_loop_answers_what_the_ping_pong_client_needs(minimal_client):
    c = minimal_client
    c.negotiate()
    assert c.server_caps["max_data_xfer_size"] == 1 << 20
    assert c.bring_up() == {}  # no BAR to place: config space reads as zeros
    assert c.region_read(2, 1, 1) == b"\x00"  # inputs
    c.region_write(2, 0, b"\x5a")  # outputs
    assert c.region_read(2, 0, 1) == b"\x5a"
    c.region_write(2, 4, b"\xa5", posted=True)
    assert c.region_read(2, 4, 4) == b"\xa5\x00\x00\x00"
    with pytest.raises(ErrorReply) as err:
        c.get_info()
    assert err.value.errno == 38  # ENOSYS: any other command
    with pytest.raises(ErrorReply):
        c.reset()  # a message of a bare header
    assert c.region_read(2, 1, 1) == b"\x00"  # and it goes on


def test_minimal_loop_answers_raw_ping_pong_and_pipelined_requests(minimal_client):
    c = minimal_client
    c.negotiate()
    sock = c.transport.sock
    sock.setblocking(True)
    sock.settimeout(5)
    msg = versus_c._read_msg(7)
    for _ in range(3):
        sock.sendall(msg)
        versus_c._check_reply(_recv_exact(sock, versus_c.REPLY_SIZE), "loop")
    sock.sendall(b"".join(versus_c._read_msg(i) for i in range(256)))  # one batch, split as the kernel likes
    replies = _recv_exact(sock, versus_c.REPLY_SIZE * 256)
    for i in range(256):
        reply = replies[i * versus_c.REPLY_SIZE:(i + 1) * versus_c.REPLY_SIZE]
        versus_c._check_reply(reply, "loop")
        assert HEADER.unpack_from(reply)[0] == i


def test_cpu_ticks_agree_with_the_kernel():
    assert versus_c.stat_ticks("123 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15") == 11 + 12
    before, times_before = versus_c.cpu_ticks(os.getpid()), os.times()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.1:
        pass
    after, times_after = versus_c.cpu_ticks(os.getpid()), os.times()
    used = round((times_after.user + times_after.system - times_before.user - times_before.system)
                 * versus_c.TICK_HZ)
    assert abs((after - before) - used) <= 2
    assert after - before >= 0.05 * versus_c.TICK_HZ


def test_find_sample_says_why_it_has_none(tmp_path):
    lib = tmp_path / "build" / "lib" / "libvfio-user.so.0"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    env = {"VFIOUSER_LIBVFIO_USER": str(lib)}
    with pytest.raises(versus_c.SampleUnavailable, match="no executable gpio-pci-idio-16"):
        versus_c.find_sample(str(tmp_path), env)
    sample = tmp_path / "build" / "samples" / "gpio-pci-idio-16"
    sample.parent.mkdir()
    sample.write_text("#!/bin/sh\n")
    sample.chmod(0o755)
    assert versus_c.find_sample(str(tmp_path), env) == str(sample)
    with pytest.raises(versus_c.SampleUnavailable, match="could not build"):
        versus_c.find_sample(str(tmp_path), {**env, "VFIOUSER_LIBVFIO_USER_ERROR": "could not build"})
    with pytest.raises(versus_c.SampleUnavailable, match="does not exist"):
        versus_c.find_sample(str(tmp_path), {})  # no scripts/get-libvfio-user in this root
    script = tmp_path / "scripts" / "get-libvfio-user"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(versus_c.SampleUnavailable, match="exit status 3.*no compiler here"):
        versus_c.find_sample(str(tmp_path), {})
    script.write_text(f"#!/bin/sh\necho {lib}\n")
    assert versus_c.find_sample(str(tmp_path), {}) == str(sample)
    assert versus_c.find_built_library(str(tmp_path), {}) == str(lib)  # what `--backend libvfio-user` gets
    assert versus_c.sample_next_to(str(lib)) == str(sample)
    with pytest.raises(versus_c.SampleUnavailable, match="no libvfio-user library at .*gone.so"):
        versus_c.find_built_library(str(tmp_path), {"VFIOUSER_LIBVFIO_USER": str(tmp_path / "gone.so")})


def test_ping_pong_and_pipelined_against_server_processes(sockdir):
    budget = versus_c.CpuBudget(min_messages=300, min_ticks=0, max_s=0.0)
    for key in ("loop", "ours"):
        server = versus_c.ServerProcess.start(key, sockdir)
        try:
            server.pin(sorted(os.sched_getaffinity(0)))
            pp = versus_c.ping_pong(server, budget, warmup=10, chunk=100)
            pl = versus_c.pipelined(server, budget, batch=64, chunk=2)
        finally:
            server.close()
        assert pp["n"] == pp["messages"] >= 300 and pp["median"] > 0 and pp["cpu_ticks"] >= 0
        assert pl["messages"] >= 300 and pl["messages"] % 64 == 0 and pl["rate"] > 0
        assert not os.path.exists(server.path)


def test_ping_pong_and_pipelined_through_libvfio_user(libvfio_user_library, sockdir):
    """Our idio16 served by `vfiouser serve --backend libvfio-user`, given the library through
    $VFIOUSER_LIBVFIO_USER in its environment."""
    budget = versus_c.CpuBudget(min_messages=300, min_ticks=0, max_s=0.0)
    server = versus_c.ServerProcess.start("lvu", sockdir, library=libvfio_user_library)
    try:
        assert server.argv[-2:] == ["--backend", "libvfio-user"]
        pp = versus_c.ping_pong(server, budget, warmup=10, chunk=100)  # checks every reply's shape
        pl = versus_c.pipelined(server, budget, batch=64, chunk=2)
        log = server.output()
    finally:
        server.close()
    assert "through libvfio-user" in log and libvfio_user_library in log  # the library it was given
    assert pp["n"] == pp["messages"] >= 300 and pp["median"] > 0
    assert pl["messages"] >= 300 and pl["messages"] % 64 == 0 and pl["rate"] > 0


def test_a_libvfio_user_server_that_cannot_start_is_reported_missing(sockdir):
    gone = os.path.join(sockdir, "no-such-libvfio-user.so.0")
    servers = versus_c._Servers(["ours", "lvu"], None, gone)
    try:
        assert list(servers.servers) == ["ours"]
        assert set(servers.missing) == {"lvu"}
        assert servers.missing["lvu"].startswith("our idio16 through libvfio-user did not start: ")
        assert "exited with status 1" in servers.missing["lvu"] and gone in servers.missing["lvu"]
    finally:
        servers.close()
    with pytest.raises(versus_c.SampleUnavailable):
        versus_c.ServerProcess.start("lvu", sockdir)  # no library: nothing to start
    quiet = versus_c._Servers(["loop", "lvu", "c"], None, None)  # the section says why, once
    try:
        assert list(quiet.servers) == ["loop"] and quiet.missing == {}
    finally:
        quiet.close()


@pytest.mark.qemu
def test_trapped_rig_measures_every_case_on_every_server(qemu_binary, monkeypatch, tmp_path):
    """Our idio16 (and the C sample when scripts/test built it) through QEMU: structure only."""
    monkeypatch.setenv("QEMU", qemu_binary)
    keys = ["ours", "poll"]
    sample = None
    if os.environ.get("VFIOUSER_LIBVFIO_USER"):
        sample = versus_c.find_sample(str(tmp_path))
        keys.append("c")
    servers = versus_c._Servers(keys, sample)
    try:
        assert set(servers.servers) == set(keys), servers.missing
        rig = versus_c.TrappedRig(servers.servers)  # checks that each answers through BAR2
        try:
            rows = versus_c.trapped(rig, iterations=20, rounds=2, warmup=5)
        finally:
            rig.close()
    finally:
        servers.close()
    assert [(r["op"], r["size"]) for r in rows] == [(c.op, c.size) for c in versus_c.CASES]
    for row in rows:
        assert {"floor", *keys} <= set(row)
        assert all(row[k]["n"] == 20 for k in ("floor", *keys))


@pytest.mark.qemu
def test_trapped_rig_with_the_libvfio_user_backend_and_the_c_sample(qemu_binary, libvfio_user_library, monkeypatch):
    """Ours through libvfio-user and the C sample built with the same library, in one QEMU."""
    monkeypatch.setenv("QEMU", qemu_binary)
    sample = versus_c.sample_next_to(libvfio_user_library)
    servers = versus_c._Servers(["ours", "lvu", "c"], sample, libvfio_user_library)
    try:
        assert list(servers.servers) == ["ours", "lvu", "c"], servers.missing
        rig = versus_c._trapped_rig(servers)  # checks that each answers through BAR2
        try:
            assert rig.keys == ["floor", "ours", "lvu", "c"] and servers.missing == {}
            rows = versus_c.trapped(rig, iterations=10, rounds=2, warmup=2)
        finally:
            rig.close()
    finally:
        servers.close()
    assert len(rows) == len(versus_c.CASES)
    assert all(row[k]["n"] == 10 for row in rows for k in ("floor", "ours", "lvu", "c"))


@pytest.mark.qemu
def test_trapped_rig_leaves_out_a_server_qemu_cannot_use(qemu_binary, monkeypatch):
    """In the C sample's slot, a server QEMU cannot realize a device from (the minimal loop
    answers DEVICE_GET_INFO with ENOSYS): measured without it, and the reason kept."""
    monkeypatch.setenv("QEMU", qemu_binary)
    servers = versus_c._Servers(["ours"], None)
    try:
        servers.servers["c"] = versus_c.ServerProcess.start("loop", servers.dir)
        rig = versus_c._trapped_rig(servers)
        try:
            assert rig.keys == ["floor", "ours"]
        finally:
            rig.close()
        assert list(servers.servers) == ["ours"]
        assert servers.missing["c"].startswith("QEMU could not use the C sample: ")
    finally:
        servers.close()


# -- DMA bandwidth on both engines -----------------------------------------------------------


def test_dma_says_why_libvfio_user_is_not_measured(monkeypatch, tmp_path):
    monkeypatch.setenv("VFIOUSER_LIBVFIO_USER_ERROR", "scripts/get-libvfio-user failed")
    with pytest.raises(dmabw.LibraryUnavailable, match="scripts/get-libvfio-user failed"):
        dmabw.libvfio_user_library()
    monkeypatch.delenv("VFIOUSER_LIBVFIO_USER_ERROR")
    monkeypatch.setenv("VFIOUSER_LIBVFIO_USER", str(tmp_path / "gone.so.0"))
    with pytest.raises(dmabw.LibraryUnavailable, match="gone.so.0.*not a file"):
        dmabw.libvfio_user_library()
    lib = tmp_path / "libvfio-user.so.0"
    lib.write_bytes(b"")
    monkeypatch.setenv("VFIOUSER_LIBVFIO_USER", str(lib))
    assert dmabw.libvfio_user_library() == str(lib)
    assert "does no DMA" in dmabw.C_REFERENCE


def _check_dma_rows(rows, sizes):
    assert [r["size"] for r in rows] == list(sizes)
    assert all(r["read_MBps"] > 0 and r["write_MBps"] > 0 and r["read"]["n"] >= 1 for r in rows)


@pytest.mark.qemu
def test_dma_section_measures_both_engines(qemu_binary, libvfio_user_library, monkeypatch):
    """Each engine moves the right bytes in both modes, in place exactly with shared guest RAM
    (dmabw checks both and raises otherwise)."""
    monkeypatch.setenv("QEMU", qemu_binary)
    monkeypatch.setenv("VFIOUSER_LIBVFIO_USER", libvfio_user_library)
    sizes = (4096, 64 << 10)
    result = dmabw.run(sizes=sizes, min_reps=1, min_seconds=0.0)
    assert result["c_reference"] == dmabw.C_REFERENCE
    lvu = result["libvfio-user"]
    assert lvu.get("library") == libvfio_user_library and "error" not in lvu, lvu
    for mode, _ in dmabw.MODES:
        _check_dma_rows(result[mode], sizes)
        _check_dma_rows(lvu[mode], sizes)


@pytest.mark.qemu
def test_dma_section_measures_ours_without_libvfio_user(qemu_binary, monkeypatch):
    monkeypatch.setenv("QEMU", qemu_binary)
    monkeypatch.setenv("VFIOUSER_LIBVFIO_USER_ERROR", "no compiler here")
    result = dmabw.run(sizes=(4096,), min_reps=1, min_seconds=0.0)
    assert result["libvfio-user"] == {"unavailable": "no compiler here"}
    for mode, _ in dmabw.MODES:
        _check_dma_rows(result[mode], (4096,))


def _summary(median: float) -> dict:
    return {"n": 100, "median": median, "p90": median * 1.2, "mean": median, "min": median / 2, "p10": median * 0.9}


def _fake_versus_c(*, with_c: bool = True, with_lvu: bool = True) -> dict:
    lvu_of = {70.0: 80.0, 72.0: 90.0, 40.0: 45.0}  # ours -> ours through libvfio-user

    def row(op, size, offset, ours, c, poll):
        r = {"op": op, "size": size, "offset": offset, "floor": _summary(14.0), "ours": _summary(ours),
             "poll": _summary(poll)}
        if with_lvu:
            r["lvu"] = _summary(lvu_of[ours])
        if with_c:
            r["c"] = _summary(c)
        return r

    def wire_entry(pp_us, cpu_us, rate, pl_cpu):
        return {"ping_pong": {**_summary(pp_us), "messages": 20000, "cpu_ticks": 200, "wall_s": 1.0,
                              "cpu_us_per_msg": cpu_us, "cpu_share": 0.5},
                "pipelined": {"rate": rate, "batch": 256, "messages": 100096, "cpu_ticks": 100, "wall_s": 0.5,
                              "cpu_us_per_msg": pl_cpu, "cpu_share": 1.0}}

    trapped_passes = [
        {"label": "server on its own CPU", "rows": [row("read", 1, 1, 70.0, 65.0, 36.0),
                                                    row("write", 4, 4, 72.0, 66.0, 37.0)]},
        {"label": "server on the harness CPU", "rows": [row("read", 1, 1, 40.0, 30.0, 38.0)]},
    ]
    servers = {"ours": wire_entry(50.0, 13.0, 400_000, 2.0), "loop": wire_entry(45.0, 10.0, 900_000, 0.9)}
    if with_lvu:
        servers["lvu"] = wire_entry(60.0, 20.0, 20_000, 40.0)
    if with_c:
        servers["c"] = wire_entry(48.0, 6.0, 200_000, 4.0)
    return {
        "tick_hz": 100, "iterations": 6000, "rounds": 6, "poll_us": 50, "duration_s": 42.0,
        "budget": {"ping_pong": {"min_messages": 20000, "min_ticks": 200, "max_s": 4.0},
                   "pipelined": {"min_messages": 100000, "min_ticks": 100, "max_s": 2.0}},
        "sample": {"path": "/x/samples/gpio-pci-idio-16"} if with_c else
                  {"path": None, "unavailable": "scripts/get-libvfio-user failed (exit status 1): no meson"},
        "library": {"path": "/x/lib/libvfio-user.so.0"} if with_lvu else
                   {"path": None, "unavailable": "scripts/get-libvfio-user failed (exit status 1): no meson"},
        "trapped": {"passes": trapped_passes, "missing": {}},
        "wire": {"passes": [{"label": "server on its own CPU", "servers": servers}], "missing": {}},
    }


def test_report_renders_the_versus_c_section(quick_protocol_run):
    results = dict(quick_protocol_run[0])
    results["versus-c"] = _fake_versus_c()
    checklist = versus_c_targets(results)
    assert [t["holds"] for t in checklist] == [
        13.0 / 10.0 <= TARGET_CPU_VS_LOOP,  # CPU per ping-pong message vs the loop (own CPU)
        70.0 / 65.0 <= TARGET_TRAPPED_VS_C, 40.0 / 30.0 <= TARGET_TRAPPED_VS_C,  # trapped read vs C, 2 placements
        True,  # --poll-us 50 below C where the server has its own CPU: 36 < 65 (the harness-CPU 38 vs 30 is no target)
    ]
    assert all("harness CPU" not in t["target"] for t in checklist if "poll" in t["target"])
    text = render_markdown(results)
    assert "## 7. Side by side with C" in text
    for needle in ("### Trapped I/O through QEMU", "### Without QEMU: ping-pong, pipelining and CPU time per message",
                   "`/proc/PID/stat`", "| I/O read 1 B (offset 1) | 14.0 | 65.0 (p90 78.0) | 4.64× | 70.0 (p90 84.0) |",
                   "| server on its own CPU | ours | 50.0 (p90 60.0) | 1.04× | 1.11× | 13.0 | 2.17× | 1.30× |",
                   "20,000 (200 ticks)", "±1 tick is at most 1.0% of any figure here",
                   "Side by side with C (section 7): 3 of 4 targets hold",
                   "a trapped 1-byte read took 38.0 µs polling"):
        assert needle in text, needle
    assert text.count("**yes**") >= 3 and "**no**" in text


def test_report_compares_ours_through_libvfio_user_with_c(quick_protocol_run):
    results = dict(quick_protocol_run[0])
    vc = results["versus-c"] = _fake_versus_c()
    text = render_markdown(results)
    for needle in (
        "libvfio-user (for `--backend libvfio-user`): `/x/lib/libvfio-user.so.0`.",
        # trapped: ours (70 µs: 5.00× floor, 1.08× C), then ours through libvfio-user (80 µs)
        "| 70.0 (p90 84.0) | 5.00× | 1.08× | 80.0 (p90 96.0) | 5.71× | 1.23× | 36.0 (p90 43.2) |",
        "| ours through libvfio-user µs | × floor | × C |",
        # wire: ratios to C and to the loop of every figure
        "| server on its own CPU | ours through libvfio-user | 60.0 (p90 72.0) | 1.25× | 1.33× | 20.0 | 3.33× "
        "| 2.00× |",
        "| server on its own CPU | ours through libvfio-user | 20,000 | 0.10× | 0.02× | 40.0 | 10.00× | 44.44× |",
        # the reference table
        "### Against the C reference",
        "| server on its own CPU | trapped I/O read 1 B, µs | 65.0 | 70.0 | 1.08× | 80.0 | 1.23× |",
        "| server on the harness CPU | trapped I/O read 1 B, µs | 30.0 | 40.0 | 1.33× | 45.0 | 1.50× |",
        "| server on its own CPU | pipelined, REGION_READ/s | 200,000 | 400,000 | 2.00× | 20,000 | 0.10× |",
        "| server on its own CPU | ping-pong, server CPU µs per message | 6.00 | 13.0 | 2.17× | 20.0 | 3.33× |",
    ):
        assert needle in text, needle
    # the targets checklist is the same with the new server
    assert "Side by side with C (section 7): 3 of 4 targets hold" in text
    rows = reference_rows(vc)
    assert len(rows) == 3 + 4  # 2 + 1 trapped cases, 4 wire figures
    own = rows[0]
    assert (own["c"], own["ours"], own["lvu"]) == (65.0, 70.0, 80.0)
    assert own["ours_x_c"] == pytest.approx(70 / 65) and own["lvu_x_c"] == pytest.approx(80 / 65)
    labels, series = versus_c_series(results)
    assert labels == ["server on\nits own CPU", "server on\nthe harness CPU"]
    assert [(e["key"], e["values"]) for e in series] == [
        ("floor", [14.0, 14.0]), ("c", [65.0, 30.0]), ("ours", [70.0, 40.0]), ("lvu", [80.0, 45.0]),
        ("poll", [36.0, 38.0])]


def test_report_says_when_libvfio_user_is_missing(quick_protocol_run):
    results = dict(quick_protocol_run[0])
    vc = results["versus-c"] = _fake_versus_c(with_c=False, with_lvu=False)
    text = render_markdown(results)
    assert ("**libvfio-user is not available, so nothing through it:** scripts/get-libvfio-user failed "
            "(exit status 1): no meson.") in text
    assert "| server on its own CPU | trapped I/O read 1 B, µs | – | 70.0 | – | – | – |" in text
    assert all(r["lvu"] is None and r["lvu_x_c"] is None and r["ours_x_c"] is None for r in reference_rows(vc))
    assert "ours through libvfio-user |" not in text.split("### Without QEMU")[1]  # no row of it
    assert [e["values"] for e in versus_c_series(results)[1] if e["key"] == "lvu"] == [[0.0, 0.0]]
    started_but_failed = _fake_versus_c(with_lvu=False)
    started_but_failed["trapped"]["missing"] = {"lvu": "our idio16 through libvfio-user did not start: boom"}
    results["versus-c"] = started_but_failed
    assert "Not measured: our idio16 through libvfio-user did not start: boom" in render_markdown(results)


def _dma_row(size: int, read: float, write: float) -> dict:
    return {"size": size, "read": _summary(size / read), "write": _summary(size / write), "read_MBps": read,
            "write_MBps": write}


def _fake_dma(lvu: dict) -> dict:
    return {"c_reference": dmabw.C_REFERENCE,
            "mmap": [_dma_row(4096, 100.0, 200.0), _dma_row(1 << 20, 9000.0, 18000.0)],
            "message": [_dma_row(4096, 10.0, 20.0), _dma_row(1 << 20, 100.0, 300.0)],
            "libvfio-user": lvu}


def test_report_shows_dma_on_both_engines(quick_protocol_run):
    results = dict(quick_protocol_run[0])
    results["dma"] = _fake_dma({"library": "/x/lib/libvfio-user.so.0",
                                "mmap": [_dma_row(4096, 50.0, 300.0), _dma_row(1 << 20, 4500.0, 36000.0)],
                                "message": [_dma_row(4096, 10.0, 10.0), _dma_row(1 << 20, 50.0, 600.0)]})
    text = render_markdown(results)
    section = text.split("## 4. DMA bandwidth")[1].split("## 5.")[0]
    for needle in ("**C reference:** not available: libvfio-user's C gpio-pci-idio-16 sample does no DMA",
                   "libvfio-user: `/x/lib/libvfio-user.so.0`.",
                   "*mmap* mode", "*message* mode",
                   "| 4 KiB | 100 | 50 | 0.50× | 200 | 300 | 1.50× |",
                   "| 1 MiB | 9,000 | 4,500 | 0.50× | 18,000 | 36,000 | 2.00× |",
                   "| 1 MiB | 100 | 50 | 0.50× | 300 | 600 | 2.00× |"):
        assert needle in section, needle
    lines = dma_series(results)
    assert [line["label"] for line in lines] == [f"{engine}, {mode}, {op}" for engine in ("ours", "libvfio-user")
                                                 for mode in ("mmap", "message") for op in ("read", "write")]
    assert lines[4]["MBps"] == [50.0, 4500.0] and lines[4]["sizes"] == [4096, 1 << 20]


def test_report_says_why_dma_has_no_libvfio_user_figures(quick_protocol_run):
    results = dict(quick_protocol_run[0])
    results["dma"] = _fake_dma({"unavailable": "libvfio-user is not built"})
    text = render_markdown(results)
    assert "**libvfio-user is not available, so no figures through it:** libvfio-user is not built" in text
    assert "| 4 KiB | 100 | – | – | 200 | – | – |" in text
    assert [line["label"].split(",")[0] for line in dma_series(results)] == ["ours"] * 4
    results["dma"] = _fake_dma({"library": "/x/lib/libvfio-user.so.0", "error": "DmaCheckFailed: boom"})
    assert "**DMA through libvfio-user failed:** DmaCheckFailed: boom" in render_markdown(results)


def test_report_says_when_the_c_sample_is_missing(quick_protocol_run):
    results = dict(quick_protocol_run[0])
    results["versus-c"] = _fake_versus_c(with_c=False)
    text = render_markdown(results)
    assert "The C sample is not available, so no C figures:** scripts/get-libvfio-user failed" in text
    holds = [t["holds"] for t in versus_c_targets(results)]
    assert holds[0] is not None and holds[1:] == [None] * 3  # 2 trapped placements, polling on its own CPU
    results["versus-c"] = {"unavailable": "no QEMU"}
    assert "Not available: no QEMU" in render_markdown(results)
    assert all(t["holds"] is None for t in versus_c_targets(results))


def test_versus_c_can_be_run_alone():
    args = _parser().parse_args(["--quick", "--only", "versus-c"])
    assert args.only == ["versus-c"] and "versus-c" in SECTIONS


# -- storage: our NVMe and virtio-blk next to QEMU's own ---------------------------------------------


def _fake_storage() -> dict:
    def side(mbps, iops, server):
        return {"MBps": mbps, "iops": iops, "qemu_cpu_us": 300.0, "server_cpu_us": server, "runs": []}

    jobs = [{"job": "seqread", "size": 1 << 20, "qemu": side(900, 860, None), "ours": side(540, 515, 400),
             "ratio": 515 / 860},
            {"job": "seqwrite", "size": 1 << 20, "qemu": side(700, 668, None), "ours": side(300, 286, 800),
             "ratio": 286 / 668},
            {"job": "randread", "size": 4096, "qemu": side(9, 2200, None), "ours": side(5, 1300, 180),
             "ratio": 1300 / 2200}]
    return {"seconds": 4, "rounds": 3, "image_mib": 256, "kernel": "6.12.0-test", "kinds": {"nvme": {"jobs": jobs}}}


def test_report_renders_the_storage_section_and_its_targets(quick_protocol_run):
    from vfiouser.bench.storage_report import TARGET_STORAGE_RATIO, storage_targets

    results = dict(quick_protocol_run[0])
    results["storage"] = _fake_storage()
    checks = storage_targets(results)
    assert [t["holds"] for t in checks] == [515 / 860 >= TARGET_STORAGE_RATIO, False, True]
    text = render_markdown(results)
    for needle in ("## 8. Storage: NVMe and virtio-blk next to QEMU's own",
                   "| nvme | random read, 4 KiB | 2,200 IOPS | 1,300 IOPS | 0.59× | 180 µs | 300 / 300 µs |",
                   "| nvme | sequential write, 1 MiB | 700 MB/s | 300 MB/s | 0.43× | 800 µs |",
                   "Storage against QEMU's own devices (section 8, issue 15): 2 of 3 hold.",
                   "Where the time goes"):
        assert needle in text, needle
    results["storage"] = {"unavailable": "gcc is needed to build the guest's iojob tool"}
    assert "Not available: gcc is needed" in render_markdown(results)
    assert [t["holds"] for t in storage_targets(results)] == [None]


def test_the_guest_job_tool_builds_and_runs_on_a_host_file(tmp_path):
    """iojob is what the storage section runs in the guest: freestanding, one line of results."""
    import subprocess

    from vfiouser.bench.storage import build_iojob

    binary = tmp_path / "iojob"
    binary.write_bytes(build_iojob(str(tmp_path)))
    binary.chmod(0o755)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)  # the tool opens with O_DIRECT, as in the guest
    os.close(fd)
    for mode, block in (("seqwrite", 1 << 20), ("randread", 4096), ("seqread", 1 << 20)):
        out = subprocess.run([str(binary), str(disk), mode, str(block), "1"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        fields = dict(f.split("=") for f in out.stdout.split()[3:])
        assert out.stdout.startswith(f"iojob {mode} {block} ") and int(fields["ops"]) > 0
        assert int(fields["bytes"]) == int(fields["ops"]) * block and int(fields["ns"]) >= 10**9
    assert disk.read_bytes()[512:520] != bytes(8)  # seqwrite stored its pattern
    bad = subprocess.run([str(binary), str(disk), "sideways", "4096", "1"], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown mode" in bad.stderr


def test_storage_can_be_run_alone():
    args = _parser().parse_args(["--quick", "--only", "storage"])
    assert args.only == ["storage"] and SECTIONS[-1] == "storage"
