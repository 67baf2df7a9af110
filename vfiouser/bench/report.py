"""``docs/performance.md`` and its plot, from the bench's results.

Every renderer takes the results dictionary :func:`vfiouser.bench.run` builds
(plain data, the same as ``--json`` writes) and returns Markdown lines; a
section that did not run, failed or is not available says so instead of
showing numbers.
"""

from __future__ import annotations

import logging

from .placement import SHARED_CPU
from .storage_report import storage_section, storage_targets

__all__ = ["render_markdown", "write_plot", "targets", "versus_c_targets", "reference_rows", "dma_series",
           "versus_c_series", "TARGET_RATIO", "TARGET_PROCESSING_US",
           "TARGET_PIPELINED", "TARGET_CPU_VS_LOOP", "TARGET_TRAPPED_VS_C"]

log = logging.getLogger(__name__)

#: Trapped 4-byte read, Python server over pci-testdev (issue 5).
TARGET_RATIO = 7.1
#: Server processing of a small REGION_READ/REGION_WRITE, in process.
TARGET_PROCESSING_US = 3.0
#: Server processing of a small REGION_READ/WRITE of a register declared on the register layer,
#: over the hand-decoded register file's (issue 14).
TARGET_REGS_RATIO = 1.25
#: Pipelined small requests per second.
TARGET_PIPELINED = 200_000
#: Server CPU time per ping-pong message, ours over the minimal Python loop (C side by side).
TARGET_CPU_VS_LOOP = 1.3
#: Trapped 1-byte I/O read through QEMU, ours (default settings) over the C sample.
TARGET_TRAPPED_VS_C = 1.15
#: Figures quoted by the issue for this machine kind (not measured by this bench).
REFERENCE = {"floor_us": 10.2, "c_server_us": 65.8, "c_ratio": 6.45}

SECTION_TITLES = {
    "latency": "1. Trapped BAR access latency through QEMU",
    "mmap": "2. mmap-able BAR area (fast path)",
    "protocol": "3. Protocol cost without QEMU",
    "dma": "4. DMA bandwidth",
    "writemulti": "5. REGION_WRITE_MULTI under a burst of posted writes",
    "guest": "6. Guest boot and server memory",
    "versus-c": "7. Side by side with C: the idio16 on both engines, libvfio-user's sample and a minimal Python loop",
    "storage": "8. Storage: NVMe and virtio-blk next to QEMU's own",
}


# -- helpers --------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """A Markdown table; ``align`` is one character per column (``l`` or ``r``)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _us(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _holds(ok: bool | None) -> str:
    return "–" if ok is None else ("**yes**" if ok else "**no**")


def _status(results: dict, key: str) -> str | None:
    """Why a section has no numbers (``None`` if it has)."""
    section = results.get(key)
    if section is None:
        return "Not run (see `--only`)."
    if "error" in section:
        return f"Failed: {section['error']}"
    if "unavailable" in section:
        return f"Not available: {section['unavailable']}"
    return None


def _find(rows: list[dict], **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _access(row: dict) -> str:
    return f"{row['group']} {row['op']} {row['size']} B"


# -- targets ------------------------------------------------------------------------


def targets(results: dict) -> list[dict]:
    """The issue's targets: what was measured and whether each holds (``None``: not measured)."""
    out = []
    latency = results.get("latency") or {}
    for p in latency.get("passes", []):
        row = _find(p["rows"], group="memory BAR", op="read", size=4, target="python")
        out.append({
            "target": f"trapped 4-byte memory-BAR read ≤ {TARGET_RATIO}× pci-testdev ({p['label']})",
            "measured": f"{_us(row['ours']['median'])} µs vs {_us(row['floor']['median'])} µs = "
                        f"{_ratio(row['ratio'])}" if row else "–",
            "holds": row["ratio"] <= TARGET_RATIO if row else None,
        })
    if not latency.get("passes"):
        out.append({"target": f"trapped 4-byte memory-BAR read ≤ {TARGET_RATIO}× pci-testdev",
                    "measured": "not measured", "holds": None})
    proc = (results.get("protocol") or {}).get("processing")
    if proc:
        worst = max(proc["region_read_4"], proc["region_write_4"])
        out.append({"target": f"server processing ≤ {TARGET_PROCESSING_US:g} µs per small REGION_READ/WRITE",
                    "measured": f"read {_us(proc['region_read_4'])} µs, write {_us(proc['region_write_4'])} µs",
                    "holds": worst <= TARGET_PROCESSING_US})
        if "regs_region_read_4" in proc:
            ratio = max(proc["regs_region_read_4"] / proc["region_read_4"],
                        proc["regs_region_write_4"] / proc["region_write_4"])
            out.append({"target": f"register layer: server processing ≤ {TARGET_REGS_RATIO:g}× the hand-decoded "
                                  "register file's, per small REGION_READ/WRITE",
                        "measured": f"read {_us(proc['regs_region_read_4'])} µs, write "
                                    f"{_us(proc['regs_region_write_4'])} µs ({ratio:.2f}×)",
                        "holds": ratio <= TARGET_REGS_RATIO})
    else:
        out.append({"target": f"server processing ≤ {TARGET_PROCESSING_US:g} µs per small REGION_READ/WRITE",
                    "measured": "not measured", "holds": None})
    sockets = (results.get("protocol") or {}).get("socket") or []
    if sockets:
        for entry in sockets:
            rate = entry["pipelined"]["reads_per_s"]
            out.append({"target": f"≥ {TARGET_PIPELINED:,} pipelined small requests/s ({entry['placement']})",
                        "measured": f"{rate:,.0f} REGION_READ/s", "holds": rate >= TARGET_PIPELINED})
    else:
        out.append({"target": f"≥ {TARGET_PIPELINED:,} pipelined small requests/s", "measured": "not measured",
                    "holds": None})
    return out


def _vc_row(rows: list[dict], op: str, size: int) -> dict | None:
    return next((r for r in rows if r["op"] == op and r["size"] == size), None)


def versus_c_targets(results: dict) -> list[dict]:
    """The C side-by-side targets: what was measured and whether each holds (``None``: not measured)."""
    vc = results.get("versus-c") or {}
    wire = vc.get("wire") or {}
    trapped = vc.get("trapped") or {}
    out = []
    cpu_target = f"server CPU time per ping-pong message, ours ≤ {TARGET_CPU_VS_LOOP:g}× the minimal Python loop"
    for p in wire.get("passes", []):
        ours = (p["servers"].get("ours") or {}).get("ping_pong")
        loop = (p["servers"].get("loop") or {}).get("ping_pong")
        ok = bool(ours and loop and ours["cpu_us_per_msg"] and loop["cpu_us_per_msg"])
        ratio = ours["cpu_us_per_msg"] / loop["cpu_us_per_msg"] if ok else None
        out.append({"target": f"{cpu_target} ({p['label']})",
                    "measured": f"{_us(ours['cpu_us_per_msg'])} µs vs {_us(loop['cpu_us_per_msg'])} µs = "
                                f"{_ratio(ratio)}" if ok else "–",
                    "holds": ratio <= TARGET_CPU_VS_LOOP if ok else None})
    if not wire.get("passes"):
        out.append({"target": cpu_target, "measured": "not measured", "holds": None})
    read_target = f"trapped 1-byte I/O read through QEMU, ours ≤ {TARGET_TRAPPED_VS_C:g}× the C sample"
    poll_target = f"trapped 1-byte I/O read, ours with `--poll-us {vc.get('poll_us', 50)}` below the C sample's default"
    # Busy polling is to beat C "where a CPU is free" (issue 11): the server on its own CPU. Sharing
    # the harness's CPU, a spinning server only takes turns with QEMU; section 7 shows that figure.
    for name, key, test, where in ((read_target, "ours", lambda a, c: a / c <= TARGET_TRAPPED_VS_C, None),
                                   (poll_target, "poll", lambda a, c: a < c, SHARED_CPU)):
        for p in trapped.get("passes", []):
            if p["label"] == where:
                continue
            row = _vc_row(p["rows"], "read", 1)
            ok = bool(row and key in row and "c" in row)
            out.append({"target": f"{name} ({p['label']})",
                        "measured": f"{_us(row[key]['median'])} µs vs {_us(row['c']['median'])} µs = "
                                    f"{_ratio(row[key]['median'] / row['c']['median'])}" if ok else
                                    ("C sample not measured" if row else "–"),
                        "holds": test(row[key]["median"], row["c"]["median"]) if ok else None})
        if not trapped.get("passes"):
            out.append({"target": name, "measured": "not measured", "holds": None})
    return out


# -- sections -----------------------------------------------------------------------


def _header(results: dict) -> list[str]:
    s, m = results["settings"], results["machine"]
    lines = [
        "# Performance",
        "",
        f"Generated by `{s['command']}` on {m['date']} "
        f"({'quick run, ' if s['quick'] else ''}{s['duration_s']:.0f} s). "
        "Do not edit by hand: run `scripts/bench` (or `python -m vfiouser.bench`) again. "
        "These are numbers to track, not tests: nothing fails on them.",
        "",
        "## Machine",
        "",
    ]
    rows = [["CPU", m["cpu"]], ["cores", str(m["cores"])], ["kernel", m["kernel"]], ["Python", m["python"]],
            ["QEMU", f"{m['qemu']} (`{m['qemu_path']}`)"], ["accelerator", f"{m['accel_qtest']}; {m['accel_guest']}"],
            ["placement", s["placement"]], ["vfiouser", m["vfiouser"]], ["load average at start", m["loadavg"]]]
    lines += _table(["", ""], rows, "ll")
    return lines


def _targets_section(results: dict) -> list[str]:
    rows = [[t["target"], t["measured"], _holds(t["holds"])] for t in targets(results)]
    lines = ["## Targets", ""] + _table(["target (issue 5)", "measured", "holds"], rows, "llc")
    if _status(results, "versus-c") is None:
        vc = versus_c_targets(results)
        held = sum(1 for t in vc if t["holds"])
        lines += ["", f"Side by side with C (section 7): {held} of {len(vc)} targets hold "
                      f"({', '.join('yes' if t['holds'] else 'no' if t['holds'] is False else '–' for t in vc)})."]
    if _status(results, "storage") is None:
        st = storage_targets(results)
        rows = [[t["target"], t["measured"], _holds(t["holds"])] for t in st]
        lines += ["", f"Storage against QEMU's own devices (section 8, issue 15): {sum(1 for t in st if t['holds'])} "
                      f"of {len(st)} hold.", ""] + _table(["target (issue 15)", "measured", "holds"], rows, "llc")
    return lines


def _latency_rows(passes: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["access", "mode", "floor µs"]
    for p in passes:
        headers += [f"Python µs, {p['label']}", "× floor"]
    first = passes[0]["rows"]
    rows = []
    for i, row in enumerate(first):
        cells = [_access(row), row["mode"], _us(row["floor"]["median"])]
        for p in passes:
            r = p["rows"][i]
            text = f"{_us(r['ours']['median'])} (p90 {_us(r['ours']['p90'])})"
            if "sustained_us" in r:
                text += f"; sustained {_us(r['sustained_us'])}"
            cells += [text, _ratio(r["ratio"])]
        rows.append(cells)
    return headers, rows


def _unpinned_text(lat: dict) -> str:
    u = lat.get("unpinned_round_trip")
    if not u:
        return ""
    return (f"; unpinned (a fresh QEMU, the scheduler's placement) p10 {_us(u['p10'])} µs, median "
            f"{_us(u['median'])} µs, p90 {_us(u['p90'])} µs")


def _latency_section(results: dict) -> list[str]:
    lines = [f"## {SECTION_TITLES['latency']}", ""]
    status = _status(results, "latency")
    if status:
        return lines + [status]
    lat = results["latency"]
    lines += [
        "One QEMU (`-accel qtest`) holds QEMU's own `pci-testdev` (the floor: its BAR0 is 4 KiB of trapped MMIO, "
        "BAR1 256 bytes of trapped port I/O, both handled in QEMU's process) and the bench device "
        "(`vfiouser/bench/device.py`, a register file built with `vfiouser.devices.pci`) served by Python servers in their "
        "own processes. Each access is one qtest command from a lean synchronous client (blocking socket, no "
        "reader thread, `-qtest-log none`); floor and device are measured in alternating blocks after a warm-up. "
        "Figures are medians in µs per access (p90 in brackets); each ratio uses the floor measured alongside it.",
        "",
        f"Samples per figure: {lat['iterations']} (in {lat['rounds']} block{'s' if lat['rounds'] != 1 else ''}). "
        f"The qtest round trip alone (a 4-byte read of guest RAM, no device): "
        f"{_us(lat['qtest_round_trip']['median'])} µs pinned" + _unpinned_text(lat) + ".",
        "",
    ]
    headers, rows = _latency_rows(lat["passes"])
    lines += _table(headers, rows, "ll" + "r" * (len(headers) - 2))
    lines += [
        "",
        "* I/O BARs have no 8-byte accesses: x86 port I/O is at most 4 bytes.",
        "* *Posted* writes return to the vCPU once QEMU has queued the message, so their per-access figure is the "
        "issue cost; *sustained* is the block's total, including the read that waits for the server to catch up, "
        "per write.",
        "* *write_multiple not advertised*: QEMU 11.1.3's `VFIO_PROXY_USE_MULTI` flag value overlaps "
        "`FORCE_QUEUED`, so a server that advertises `write_multiple` (ours does by default) also has every "
        "message sent through QEMU's queue; these rows show what that costs.",
        "* *server busy-polls*: a server started with `poll_us=50` (`vfiouser serve --poll-us 50`) keeps "
        "polling its socket for 50 µs after each wake-up instead of sleeping at once, so a request that comes "
        "within that time is taken without waking the process. It costs CPU time; it pays off when the server has "
        "a CPU of its own. Off by default.",
        f"* Reference from the issue, not measured here: floor ≈ {REFERENCE['floor_us']} µs, libvfio-user C "
        f"server ≈ {REFERENCE['c_server_us']} µs ({REFERENCE['c_ratio']}×) per 4-byte read on this machine kind, "
        "placement unknown.",
    ]
    thr = lat.get("threaded")
    if thr:
        lean = _find(lat["passes"][0]["rows"], group="memory BAR", op="read", size=4, target="python")
        lines += ["", "Why a lean client: the same 4-byte memory read timed through `QtestMachine` (reader thread, "
                  "condition hand-off, qtest log written to a file), as the test-suite drives QEMU:", ""]
        trows = [["QtestMachine (threaded)", _us(thr["floor"]["median"]), _us(thr["ours"]["median"]),
                  _ratio(thr["ratio"])]]
        if lean:
            trows.insert(0, ["lean client (this table)", _us(lean["floor"]["median"]), _us(lean["ours"]["median"]),
                             _ratio(lean["ratio"])])
        lines += _table(["harness", "floor µs", "Python µs", "× floor"], trows)
        lines += ["", f"(Server placement for this comparison: {lat['passes'][0]['label']}.)"]
    return lines


def _mmap_section(results: dict) -> list[str]:
    lines = [f"## {SECTION_TITLES['mmap']}", ""]
    status = _status(results, "mmap")
    if status:
        return lines + [status]
    mm = results["mmap"]
    lines += [
        "The bench device with `MemoryBar(0x1000).share()` as BAR2: QEMU maps the memfd into the guest, so these "
        "accesses never reach the server. The floor is `pci-testdev`'s RAM-backed BAR2 (`membar=4096,"
        "membar-backed=on`). A device with any mmap-able region loses posted writes (QEMU 11.1.3 disables them "
        "device-wide), so its trapped BAR0 writes cost a round trip.",
        "",
    ]
    verify = mm.get("verify") or {}
    if verify.get("checked"):
        lines += [f"Check: a value written through the mapping reads back "
                  f"({'yes' if verify['readback_ok'] else 'NO'}); region accesses that reached the server for the "
                  f"shared BAR during 102 accesses: {verify['messages_for_shared_bar']}.", ""]
    headers, rows = _latency_rows(mm["passes"])
    lines += _table(headers, rows, "ll" + "r" * (len(headers) - 2))
    penalty = mm.get("penalty") or []
    if penalty:
        lines += ["", "The cost of losing posted writes (4-byte memory-BAR write, trapped):", ""]
        lines += _table(["placement", "device without mmap area (posted)", "sustained", "device with an mmap area "
                         "(non-posted)", "penalty"],
                        [[p["label"], f"{_us(p['posted_us'])} µs", f"{_us(p['posted_sustained_us'])} µs",
                          f"{_us(p['nonposted_us'])} µs", _ratio(p["nonposted_us"] / p["posted_sustained_us"])
                          + " sustained"] for p in penalty])
    return lines


def _protocol_section(results: dict) -> list[str]:
    lines = [f"## {SECTION_TITLES['protocol']}", ""]
    status = _status(results, "protocol")
    if status:
        return lines + [status]
    proto = results["protocol"]
    proc = proto["processing"]
    lines += [
        "Server processing, in process, no socket in the timed path: frames handed straight to the session's "
        "dispatcher (`Session._dispatch`, the seam between transport and session; replies queued, then dropped "
        "untimed). µs per message, median of 5 runs:",
        "",
    ]
    rows = [
        ["REGION_READ, 4 bytes, BAR0", _us(proc["region_read_4"])],
        ["REGION_WRITE, 4 bytes, BAR0 (with reply)", _us(proc["region_write_4"])],
        ["REGION_WRITE, 4 bytes, BAR0, posted (NO_REPLY)", _us(proc["region_write_4_posted"])],
        ["REGION_READ, 4 bytes, config space", _us(proc["config_read_4"])],
        ["REGION_WRITE_MULTI of 200 writes, per write", _us(proc["write_multi_200_per_write"])],
        ["of which the device model alone (`PciDevice.region_read`, 4 bytes)", _us(proc["model_region_read_4"])],
        ["`Session.on_readable` with 256 REGION_READs waiting (framing, dispatch, batched reply send), per message",
         _us(proc["on_readable_read_4_batch256"])],
    ]
    if "regs_region_read_4" in proc:
        rows += [
            ["REGION_READ, 4 bytes, BAR4: a register declared on the register layer", _us(proc["regs_region_read_4"])],
            ["REGION_WRITE, 4 bytes, BAR4 (with reply)", _us(proc["regs_region_write_4"])],
            ["REGION_WRITE, 4 bytes, BAR4, posted (NO_REPLY)", _us(proc["regs_region_write_4_posted"])],
            ["REGION_WRITE, 4 bytes, BAR4, a register with write-1-to-clear and read-write fields",
             _us(proc["regs_region_write_4_w1c"])],
            ["of which the device model alone (`PciDevice.region_read` of BAR4, 4 bytes)",
             _us(proc["regs_model_region_read_4"])],
        ]
    lines += _table(["message", "µs"], rows)
    lines += ["", "Over a socket, against a server in its own process (4-byte REGION_READ of BAR0):", ""]
    srows = []
    for entry in proto["socket"]:
        pp, pl = entry["ping_pong"], entry["pipelined"]
        srows.append([entry["placement"], f"{_us(pp['client']['median'])} (p90 {_us(pp['client']['p90'])})",
                      f"{_us(pp['raw']['median'])} (p90 {_us(pp['raw']['p90'])})", f"{pl['reads_per_s']:,.0f}",
                      f"{pl['posted_writes_per_s']:,.0f}"])
    lines += _table(["server placement", "ping-pong µs, `Client.region_read`", "ping-pong µs, raw socket",
                     "pipelined REGION_READ/s", "streamed posted REGION_WRITE/s"], srows)
    lines += ["", "`Client` waits for every reply (`request()`), so pipelining uses messages built with "
              "`vfiouser.protocol` on a raw socket, two batches of 256 requests in flight; posted writes are "
              "streamed and then one read waits for the server to finish them."]
    return lines


def _dma_section(results: dict) -> list[str]:
    lines = [f"## {SECTION_TITLES['dma']}", ""]
    status = _status(results, "dma")
    if status:
        return lines + [status]
    dma = results["dma"]
    lvu = dma.get("libvfio-user")
    lines += [
        "A model's `self.dma.read`/`write` on a worker-like thread (never the server loop), QEMU under qtest, the "
        "same model served by each engine in turn: ours (`vfiouser.server.Server`) and libvfio-user "
        "(`--backend libvfio-user`: the C library through ctypes). "
        "*mmap*: guest RAM is a shared memfd (`QtestMachine(memfd=True)`), the server copies in place (ours with a "
        "memory copy, libvfio-user with `vfu_sgl_read`/`vfu_sgl_write`). "
        "*message*: QEMU's default RAM, every transfer is DMA_READ/DMA_WRITE messages (reads in 32 KiB pieces). "
        "MB/s = 10⁶ bytes per second, size over the median transfer time; the data are checked once per size, and "
        "each mode checks that transfers go in place exactly when guest RAM is shared.",
        "",
        f"**C reference:** {dma.get('c_reference') or _DMA_NO_C}.",
        "",
    ]
    if lvu is None:
        lines += ["libvfio-user: not measured in this run.", ""]
    elif "unavailable" in lvu:
        lines += [f"**libvfio-user is not available, so no figures through it:** {lvu['unavailable']}", ""]
    elif "error" in lvu:
        lines += [f"**DMA through libvfio-user failed:** {lvu['error']}", ""]
    elif lvu.get("library"):
        lines += [f"libvfio-user: `{lvu['library']}`.", ""]
    for mode in ("mmap", "message"):
        ours_rows = {r["size"]: r for r in dma.get(mode) or []}
        lvu_rows = {r["size"]: r for r in (lvu or {}).get(mode) or []}
        rows = []
        for size in sorted(set(ours_rows) | set(lvu_rows)):
            a, b = ours_rows.get(size), lvu_rows.get(size)
            cells = [_size(size)]
            for op in ("read", "write"):
                key = f"{op}_MBps"
                cells += [_mbps(a, key), _mbps(b, key), _over(b, a, key)]
            rows.append(cells)
        lines += [f"*{mode}* mode (libvfio-user × ours compares bandwidths: above 1 is faster):", ""]
        lines += _table(["transfer", "read MB/s, ours", "read MB/s, libvfio-user", "libvfio-user × ours",
                         "write MB/s, ours", "write MB/s, libvfio-user", "libvfio-user × ours"], rows)
        lines += [""]
    return lines[:-1]


_DMA_NO_C = "not available: libvfio-user's C sample does no DMA"


def _mbps(row: dict | None, key: str) -> str:
    return "–" if not row or row.get(key) is None else f"{row[key]:,.0f}"


def _size(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def _writemulti_section(results: dict) -> list[str]:
    lines = [f"## {SECTION_TITLES['writemulti']}", ""]
    status = _status(results, "writemulti")
    if status:
        return lines + [status]
    wm = results["writemulti"]
    lines += [
        "qtest `memset` of 64 KiB over a memory BAR of the bench device: QEMU issues 8192 posted 8-byte writes. "
        "QEMU coalesces queued writes into REGION_WRITE_MULTI (≤ 200 each) only when more than 1024 messages "
        "wait in its queue and the server advertised `write_multiple`. Each burst runs with the server keeping up "
        f"(stall 0) and with the handler of the first write sleeping {wm['stall_ms']} ms (the server loop stalls). "
        "The server counts messages with a counting tracer (a small cost per message); *drain* is from the end of "
        "the stall (or the first write) to the last write handled.",
        "",
    ]
    rows = []
    for r in wm["runs"]:
        rows.append([
            "yes" if r["write_multiple"] else "no", f"{r['stall_ms']} ms", str(r["region_write_msgs"]),
            str(r["write_multi_msgs"]), str(r["writes_in_multi"]), f"{r['memset_s'] * 1000:.1f}",
            f"{r['total_s'] * 1000:.1f}",
            f"{r['drain_s'] * 1000:.1f}" if r["drain_s"] else "–",
            f"{r['drain_writes_per_s']:,.0f}" if r["drain_writes_per_s"] else "–",
            f"{r['drain_writes_per_s'] * 8 / 1e6:.2f}" if r["drain_writes_per_s"] else "–",
        ])
    lines += _table(["write_multiple advertised", "stall", "REGION_WRITE msgs", "WRITE_MULTI msgs",
                     "writes in WRITE_MULTI", "memset ms", "until drained ms", "drain ms", "drain writes/s",
                     "drain MB/s"], rows, "ll" + "r" * 8)
    lines += ["", *_writemulti_findings(wm["runs"])]
    return lines


def _writemulti_findings(runs: list[dict]) -> list[str]:
    out = []
    with_wm = [r for r in runs if r["write_multiple"]]
    without = [r for r in runs if not r["write_multiple"]]
    if with_wm:
        multi = sum(r["write_multi_msgs"] for r in with_wm)
        if multi:
            no_stall = [r for r in with_wm if not r["stall_ms"] and r["write_multi_msgs"]]
            text = (f"With `write_multiple` advertised QEMU sent {multi} REGION_WRITE_MULTI messages over "
                    f"{len(with_wm)} bursts")
            if no_stall:
                text += (", even without a stall: QEMU queues the 8192 writes faster than the Python server "
                         "drains them, so its queue passes 1024 on its own")
            out.append("* " + text + ".")
        else:
            out.append("* With `write_multiple` advertised QEMU sent no REGION_WRITE_MULTI in these bursts.")
    if without:
        out.append(f"* Without it, every write is its own REGION_WRITE "
                   f"({', '.join(str(r['region_write_msgs']) for r in without)} messages).")
    if with_wm and without:
        def rate(rs):
            vals = [r["drain_writes_per_s"] for r in rs if r["drain_writes_per_s"]]
            return max(vals) if vals else None

        a, b = rate(with_wm), rate(without)
        if a and b:
            out.append(f"* Best drain rate: {a:,.0f} writes/s with WRITE_MULTI against {b:,.0f} without "
                       f"({a / b:.1f}×).")
    return out


def _guest_section(results: dict) -> list[str]:
    lines = [f"## {SECTION_TITLES['guest']}", ""]
    status = _status(results, "guest")
    if status:
        return lines + [status]
    g = results["guest"]
    lines += [
        f"`vfiouser serve idio16` as its own process; Debian's kernel {g['kernel']} boots under "
        f"{g['accel'].upper()} (1 vCPU, 512 MiB, guest RAM a shared memfd), its init loads `gpio-pci-idio-16`, "
        "and the script reports once the driver is bound. Host wall-clock seconds from QEMU's start; the guest "
        "section runs unpinned.",
        "",
    ]
    rows = [["boot to init (modules loaded)", f"{g['init_s']:.2f} s"],
            [f"boot to driver ready (`{g['driver']}` bound)", f"{g['driver_ready_s']:.2f} s "
             f"(guest uptime {g['guest_uptime_s']:.2f} s)"]]
    if g.get("baseline"):
        rows.append(["same guest without the device, to its script", f"{g['baseline']['ready_s']:.2f} s"])
    rows += [["server RSS, idle (before QEMU attaches)", f"{g['rss_idle_kib'] / 1024:.1f} MiB"],
             ["server RSS, attached (driver bound)", f"{g['rss_attached_kib'] / 1024:.1f} MiB"],
             ["server RSS, after QEMU quit", f"{g['rss_after_kib'] / 1024:.1f} MiB"],
             ["server peak RSS (VmHWM)", f"{g['rss_peak_kib'] / 1024:.1f} MiB"]]
    lines += _table(["", ""], rows, "lr")
    return lines


def _cell(summary: dict | None) -> str:
    return "–" if not summary else f"{_us(summary['median'])} (p90 {_us(summary['p90'])})"


def _over(a: dict | None, b: dict | None, key: str = "median") -> str:
    if not a or not b or not a.get(key) or not b.get(key):
        return "–"
    return _ratio(a[key] / b[key])


def _part_status(part: dict | None) -> str | None:
    if part is None:
        return "Not run."
    if "error" in part:
        return f"Failed: {part['error']}"
    if "unavailable" in part:
        return f"Not available: {part['unavailable']}"
    return None


#: The figures of the reference table taken from the wire part: (figure, part of the entry, field)
_WIRE_FIGURES = (("ping-pong, µs per round trip", "ping_pong", "median"),
                 ("ping-pong, server CPU µs per message", "ping_pong", "cpu_us_per_msg"),
                 ("pipelined, REGION_READ/s", "pipelined", "rate"),
                 ("pipelined, server CPU µs per message", "pipelined", "cpu_us_per_msg"))


def reference_rows(vc: dict) -> list[dict]:
    """Every figure of the versus-c section against the C sample, per placement: dicts with
    ``placement``, ``figure``, ``c``, ``ours``, ``lvu`` (values, ``None`` if not measured) and
    ``ours_x_c``, ``lvu_x_c`` (ratios, ``None`` without both figures). For rates a ratio above
    1 is faster; for everything else it is slower or dearer."""
    out = []

    def add(placement: str, figure: str, values: dict) -> None:
        c = values.get("c")
        entry = {"placement": placement, "figure": figure, **values}
        for key in ("ours", "lvu"):
            v = values.get(key)
            entry[f"{key}_x_c"] = v / c if v is not None and c else None
        out.append(entry)

    trapped = vc.get("trapped") or {}
    for p in trapped.get("passes") or []:
        for r in p["rows"]:
            add(p["label"], f"trapped I/O {r['op']} {r['size']} B, µs",
                {k: (r.get(k) or {}).get("median") for k in ("c", "ours", "lvu")})
    wire = vc.get("wire") or {}
    for p in wire.get("passes") or []:
        for figure, kind, field in _WIRE_FIGURES:
            add(p["label"], figure,
                {k: ((p["servers"].get(k) or {}).get(kind) or {}).get(field) for k in ("c", "ours", "lvu")})
    return out


def _figure(value: float | None, figure: str) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if figure.endswith("/s") else _us(value)


def _versus_c_reference(vc: dict) -> list[str]:
    rows = reference_rows(vc)
    lines = ["### Against the C reference", ""]
    if not rows:
        return lines + ["Nothing measured (see the parts below)."]
    lines += ["Every figure of the two parts below, ours and ours through libvfio-user (`--backend libvfio-user`), "
              "as a ratio to libvfio-user's C sample measured alongside (× C: above 1 is slower or dearer, except "
              "for REGION_READ/s, where above 1 is faster). The C sample does no DMA: section 4 has no C reference.",
              ""]
    lines += _table(["server placement", "figure", "C", "ours", "× C", "ours through libvfio-user", "× C"],
                    [[r["placement"], r["figure"], _figure(r["c"], r["figure"]), _figure(r["ours"], r["figure"]),
                      _ratio(r["ours_x_c"]), _figure(r["lvu"], r["figure"]), _ratio(r["lvu_x_c"])] for r in rows],
                    "ll" + "r" * 5)
    return lines


def _versus_c_trapped(vc: dict) -> list[str]:
    part = vc.get("trapped")
    lines = ["### Trapped I/O through QEMU", ""]
    status = _part_status(part)
    if status:
        return lines + [status]
    lines += [
        "One QEMU (`-accel qtest`, the lean client of section 1) holds QEMU's own `pci-testdev` (the floor: its "
        "256-byte I/O BAR1, handled in QEMU's process, accessed at offset 0x10), our idio16 served by "
        "`vfiouser serve idio16` (default settings), the same through libvfio-user (`--backend libvfio-user`), "
        f"the same with `--poll-us {vc['poll_us']}`, and the C sample, each server in its own process. Each access "
        "is one qtest `in`/`out` on BAR2 of the card; I/O writes are not posted, so QEMU waits for every reply. "
        "All the devices are measured in alternating blocks after a "
        f"warm-up: {vc['iterations']} samples per figure in {vc['rounds']} blocks. µs per access, median (p90 in "
        "brackets); each ratio uses figures measured alongside.",
        "",
    ]
    for key, why in (part.get("missing") or {}).items():
        lines += [f"Not measured: {why}", ""]
    for p in part["passes"]:
        lines += [f"{p['label'][:1].upper()}{p['label'][1:]}:", ""]
        rows = []
        for r in p["rows"]:
            floor, c = r.get("floor"), r.get("c")
            cells = [f"I/O {r['op']} {r['size']} B (offset {r['offset']})", _us(floor["median"]), _cell(c),
                     _over(c, floor)]
            for key in ("ours", "lvu", "poll"):
                cells += [_cell(r.get(key)), _over(r.get(key), floor), _over(r.get(key), c)]
            rows.append(cells)
        lines += _table(["access (BAR2)", "floor µs", "C µs", "C × floor", "ours µs", "× floor", "× C",
                         "ours through libvfio-user µs", "× floor", "× C",
                         f"ours `--poll-us {vc['poll_us']}` µs", "× floor", "× C"], rows, "l" + "r" * 12)
        lines += [""]
    return lines[:-1]


def _versus_c_wire(vc: dict) -> list[str]:
    part = vc.get("wire")
    lines = ["### Without QEMU: ping-pong, pipelining and CPU time per message", ""]
    status = _part_status(part)
    if status:
        return lines + [status]
    hz = vc["tick_hz"]
    pp_budget, pl_budget = vc["budget"]["ping_pong"], vc["budget"]["pipelined"]
    ticks = [e[kind]["cpu_ticks"] for p in part["passes"] for e in p["servers"].values()
             for kind in ("ping_pong", "pipelined")]
    worst = 100.0 / min(ticks) if ticks and min(ticks) else None
    lines += [
        "A `Client` connects, negotiates and does `bring_up()`; then its socket is used raw and blocking. "
        "*Ping-pong*: one 1-byte REGION_READ of BAR2 offset 1 at a time (µs per round trip, median and p90). "
        "*Pipelined*: two batches of 256 such reads in flight (reads per second). The minimal Python loop "
        "(`vfiouser/bench/minimal.py`: blocking `recv_into`, one `struct` unpack per message, one `sendall` per "
        "receive, no checks) is what Python itself costs; the servers run one after the other (ours, ours through "
        "libvfio-user, C, the loop).",
        "",
        f"*Server CPU time* is the server process's `utime + stime` (every thread) from `/proc/PID/stat`, read "
        f"just before and just after the timed run, divided by the messages of the run. The kernel counts it in "
        f"clock ticks of 1/{hz} s, so each run sends at least {pp_budget['min_messages']:,} messages (pipelined: "
        f"{pl_budget['min_messages']:,}) and goes on until the server has used {pp_budget['min_ticks']} ticks "
        f"({pl_budget['min_ticks']}) or the run has lasted {pp_budget['max_s']:g} s ({pl_budget['max_s']:g} s); "
        "the ticks of each figure are given, and ±1 tick is "
        + (f"at most {worst:.1f}% of any figure here." if worst is not None else "the granularity."),
        "",
    ]
    for key, why in (part.get("missing") or {}).items():
        lines += [f"Not measured: {why}", ""]
    names = {"ours": "ours", "lvu": "ours through libvfio-user", "c": "C", "loop": "minimal loop"}
    pp_rows, pl_rows = [], []
    for p in part["passes"]:
        servers = p["servers"]
        c, loop = servers.get("c"), servers.get("loop")
        for key in ("ours", "lvu", "c", "loop"):
            e = servers.get(key)
            if not e:
                continue
            pp, pl = e["ping_pong"], e["pipelined"]
            cpp, lpp = (c or {}).get("ping_pong"), (loop or {}).get("ping_pong")
            cpl, lpl = (c or {}).get("pipelined"), (loop or {}).get("pipelined")
            pp_rows.append([p["label"], names[key], _cell(pp), _over(pp, cpp), _over(pp, lpp),
                            _us(pp["cpu_us_per_msg"]), _over(pp, cpp, "cpu_us_per_msg"),
                            _over(pp, lpp, "cpu_us_per_msg"), f"{pp['messages']:,} ({pp['cpu_ticks']} ticks)"])
            pl_rows.append([p["label"], names[key], f"{pl['rate']:,.0f}", _over(pl, cpl, "rate"),
                            _over(pl, lpl, "rate"), _us(pl["cpu_us_per_msg"]), _over(pl, cpl, "cpu_us_per_msg"),
                            _over(pl, lpl, "cpu_us_per_msg"), f"{pl['messages']:,} ({pl['cpu_ticks']} ticks)"])
    lines += ["Ping-pong:", ""]
    lines += _table(["server placement", "server", "µs per round trip", "× C", "× loop", "server CPU µs per message",
                     "× C", "× loop", "messages (server CPU ticks)"], pp_rows, "ll" + "r" * 7)
    lines += ["", "Pipelined (× C and × loop compare rates: above 1 is faster):", ""]
    lines += _table(["server placement", "server", "REGION_READ/s", "× C", "× loop", "server CPU µs per message",
                     "× C", "× loop", "messages (server CPU ticks)"], pl_rows, "ll" + "r" * 7)
    loop_costs = []
    for p in part["passes"]:
        loop = p["servers"].get("loop")
        if loop and loop["ping_pong"]["cpu_us_per_msg"] and loop["pipelined"]["cpu_us_per_msg"]:
            loop_costs.append(f"{_us(loop['ping_pong']['cpu_us_per_msg'])} µs against "
                              f"{_us(loop['pipelined']['cpu_us_per_msg'])} µs ({p['label']})")
    if loop_costs:
        lines += ["", "The minimal loop's own CPU time per message, ping-pong against pipelined: "
                  + "; ".join(loop_costs) + ". The difference is what one message costs when each message is a "
                  "wake-up (the kernel's way into and out of a blocking receive, dearer on a CPU of its own, as measured "
                  "here), not Python work; every server's ping-pong figure carries it alike."]
    return lines


def _versus_c_section(results: dict) -> list[str]:
    lines = [f"## {SECTION_TITLES['versus-c']}", ""]
    status = _status(results, "versus-c")
    if status:
        return lines + [status]
    vc = results["versus-c"]
    sample = vc.get("sample") or {}
    library = vc.get("library")
    lines += [
        "Servers of the same card, the ACCES PCI-IDIO-16 (a 256-byte I/O BAR2; offset 1 reads inputs, "
        "offset 0 takes outputs), each in its own process and started as a user starts it: ours "
        "(`vfiouser serve idio16 --socket S`), the same Python model served through libvfio-user "
        "(`vfiouser serve idio16 --socket S --backend libvfio-user`, the C library through ctypes, the library the C "
        "sample was built with), libvfio-user's C sample (`gpio-pci-idio-16 S`, release build by "
        "`scripts/get-libvfio-user`), and, without QEMU, a minimal Python loop. **The C sample is the reference**: "
        "every figure of ours and of ours through libvfio-user is given as a ratio to it. "
        f"Section time: {vc['duration_s']:.0f} s.",
        "",
    ]
    if sample.get("path"):
        lines += [f"C sample: `{sample['path']}`.", ""]
    else:
        lines += [f"**The C sample is not available, so no C figures:** {sample.get('unavailable', 'not found')}. "
                  "`scripts/bench` builds it with `scripts/get-libvfio-user`.", ""]
    if library is None:
        lines += ["Ours through libvfio-user: not measured in this run.", ""]
    elif library.get("path"):
        lines += [f"libvfio-user (for `--backend libvfio-user`): `{library['path']}`.", ""]
    else:
        lines += [f"**libvfio-user is not available, so nothing through it:** "
                  f"{library.get('unavailable', 'not found')}.", ""]
    checklist = versus_c_targets(results)
    lines += ["Targets:", ""]
    lines += _table(["target", "measured", "holds"],
                    [[t["target"], t["measured"], _holds(t["holds"])] for t in checklist], "llc")
    lines += ["", *_versus_c_reference(vc), "", *_versus_c_trapped(vc), "", *_versus_c_wire(vc), ""]
    lines += [
        "* The C library does not advertise `write_multiple`, so neither does ours through libvfio-user; ours does "
        "by default, and with QEMU 11.1.3 that also sends every message through QEMU's queue (section 1, "
        "*write_multiple not advertised*). The targets use default settings on both sides.",
        "* Ours through libvfio-user runs the same Python model as ours; libvfio-user reads, checks and answers "
        "each message, calling the model through ctypes callbacks, one `vfu_run_ctx` per message after a `poll` "
        "and a peek at the socket (`vfiouser/libvfio_user/server.py`). Against C it shows what the Python model "
        "and the crossing into it cost; against ours, what each engine's way around the model costs.",
        "* libvfio-user reads each message with two system calls (`recvmsg` for the header, `recv` for the body) "
        "and answers with one `sendmsg`; ours reads whatever has arrived with one `recvmsg` and sends the "
        "replies of a wake-up together (one system call each way per wake-up, however many messages).",
        "* Ours serves these messages in its C loop, which runs each register access's *shortcut* itself "
        "(`vfiouser/devices/shortcut.py`): for the idio16's input register a wake-up calls two Python functions, "
        "both the model's (its read hook and the property it reads). A 2- or 4-byte access at offset 4 reaches "
        "two or three of the card's 8-bit registers: its shortcut runs each register's part in turn.",
        *_poll_note(vc),
        "* Like every figure in this report, these are single runs on a shared VM: compare ratios taken in the same "
        "run, and re-run before reading much into a few percent.",
    ]
    return lines


def _poll_note(vc: dict) -> list[str]:
    """Why busy polling is a target only where the server has a CPU of its own, with the other figure."""
    shared = next((p for p in (vc.get("trapped") or {}).get("passes", []) if p["label"] == SHARED_CPU), None)
    row = _vc_row(shared["rows"], "read", 1) if shared else None
    figure = ""
    if row and "poll" in row and "c" in row and "ours" in row:
        figure = (f" Here, sharing the harness's CPU, a trapped 1-byte read took {_us(row['poll']['median'])} µs "
                  f"polling, {_us(row['ours']['median'])} µs by default and {_us(row['c']['median'])} µs for C "
                  f"({_ratio(row['poll']['median'] / row['c']['median'])} C).")
    return ["* Busy polling (`--poll-us`) pays where the server has a CPU of its own: a request that arrives "
            "within the window is taken without waking the server, which on this VM costs tens of µs. Its price is "
            "that CPU, spent spinning for the window after every wake-up. Sharing a CPU with QEMU, the spinning "
            "server can only take turns with it (it yields on every turn of the loop), so there it saves little; "
            "the polling target is therefore the own-CPU one, as the issue puts it (\"where a CPU is free\")."
            + figure]


def _added_cost(results: dict) -> list[str]:
    """What the server adds to a trapped 4-byte read, per placement (µs over the floor)."""
    out = []
    for p in (results.get("latency") or {}).get("passes", []):
        row = _find(p["rows"], group="memory BAR", op="read", size=4, target="python")
        if row:
            out.append(f"+{_us(row['ours']['median'] - row['floor']['median'])} µs with the {p['label']}")
    return out


def _guest_meaning(results: dict) -> list[str]:
    g = results.get("guest") or {}
    if "driver_ready_s" not in g:
        return []
    text = f"* The guest boot ({g['driver_ready_s']:.2f} s to a bound driver) is mostly the kernel under TCG"
    if g.get("baseline"):
        text += (f"; the same guest without the device reaches its script in {g['baseline']['ready_s']:.2f} s, so "
                 f"the device, its module and the driver's probe add about "
                 f"{g['driver_ready_s'] - g['baseline']['ready_s']:.2f} s")
    text += (". The server's memory hardly moves while QEMU is attached: the idio16 does no DMA, and guest RAM "
             "mapped for DMA counts only once touched.")
    return [text]


def _meaning(results: dict) -> list[str]:
    added = _added_cost(results)
    rtt = (results.get("latency") or {}).get("qtest_round_trip")
    proc = (results.get("protocol") or {}).get("processing")
    lat = results.get("latency") or {}
    first = ("* Every latency in sections 1 and 2 includes the qtest round trip (test process → QEMU → test "
             "process)")
    first += f", {_us(rtt['median'])} µs here" if rtt else ""
    first += ", which is nearly all of the floor"
    floor_row = _find(lat["passes"][0]["rows"], group="memory BAR", op="read", size=4) if lat.get("passes") else None
    if floor_row and rtt:
        first += (f" (`pci-testdev`'s 4-byte read costs {_us(floor_row['floor']['median'] - rtt['median'])} µs "
                  "more than a read of guest RAM)")
    first += (". So the ratio is a ratio of round trips, and the useful figure is the difference: what a guest pays "
              "on top of an in-QEMU device for each trapped access")
    first += f" ({' and '.join(added)} for a 4-byte read)." if added else "."
    first += " For the same reason the mmap area measures exactly at the floor: it is a plain memory access inside QEMU."
    second = ("* On these 2-core VMs, waking a process on the other core costs tens of µs (the idle vCPU has to be "
              "woken by the hypervisor)")
    second += (f", far more than the Python server's own work per message ({_us(proc['region_read_4'])} µs, "
               "section 3)") if proc else ""
    second += (". Each trapped access crosses between QEMU and the server twice, so the server's placement changes "
               "the trapped latency more than any code path does")
    u = lat.get("unpinned_round_trip")
    if u:
        second += (f", and unpinned figures vary with the scheduler's choices (the unpinned qtest round trip of "
                   f"section 1 spans {_us(u['p10'])} to {_us(u['p90'])} µs from p10 to p90; while this bench was "
                   "written, whole unpinned runs measured either about 13 or about 45 µs)")
    second += (". The bench pins the harness and the servers; the server-on-its-own-CPU column is the conservative "
               "one.")
    polling = []
    for p in lat.get("passes", []):
        plain = _find(p["rows"], group="memory BAR", op="read", size=4, target="python")
        polled = _find(p["rows"], group="memory BAR", op="read", size=4, target="poll")
        if plain and polled:
            polling.append(f"{_us(plain['ours']['median'])} → {_us(polled['ours']['median'])} µs "
                           f"({_ratio(polled['ratio'])}) with the {p['label']}")
    third = []
    if polling:
        third = ["* Busy polling (`--poll-us 50`) saves the server's wake-up when requests come within 50 µs of "
                 "each other, as a driver's accesses do: a trapped 4-byte read goes " + "; ".join(polling) + ". It "
                 "spends the server's CPU time on it, which is why it is an option and not the default."]
    return [
        "## What these numbers mean",
        "",
        first,
        second,
        *third,
        "* Posted writes hide the server from the vCPU as long as the server keeps up; section 5 shows what "
        "happens when it does not, and section 2 what losing them costs.",
        f"* The reference figures (floor {REFERENCE['floor_us']} µs, libvfio-user C server {REFERENCE['c_server_us']} "
        "µs) come from the issue and are not measured in this run, with an unknown placement; this run's floor "
        "differs from the issue's, so compare ratios, and only loosely.",
        "* DMA in mmap mode is a memory copy in the server process, repeated over the same cache-hot buffers; "
        "message mode is bounded by round trips through QEMU's main loop (a DMA_READ answers at most 32 KiB, a "
        "DMA_WRITE carries up to 1 MiB), on either engine: through libvfio-user the model's requests are ours "
        "(`vfiouser/libvfio_user/memory.py`), sent on the socket libvfio-user serves.",
        *_guest_meaning(results),
        "* Single runs on a shared VM: expect a few percent of noise, more on p90. Re-run before drawing "
        "conclusions from small differences.",
    ]


def render_markdown(results: dict) -> str:
    """The whole ``docs/performance.md``."""
    parts = [_header(results), _targets_section(results), _latency_section(results), _mmap_section(results),
             _protocol_section(results), _dma_section(results), _writemulti_section(results),
             _guest_section(results), _versus_c_section(results), storage_section(results), _meaning(results)]
    plot = results.get("plot")
    figure = [f"![trapped latency and DMA bandwidth]({plot})", ""] if plot else \
        [f"(No plot: {results.get('plot_error', 'not written')}.)", ""]
    lines: list[str] = []
    for i, part in enumerate(parts):
        lines += part + [""]
        if i == 1:
            lines += figure
    return "\n".join(lines).rstrip() + "\n"


# -- plot -------------------------------------------------------------------------------


class PlotUnavailable(RuntimeError):
    """matplotlib cannot be imported."""


def _latency_panel(ax, results: dict) -> None:
    passes = (results.get("latency") or {}).get("passes") or []
    mm = (results.get("mmap") or {}).get("passes") or []
    if not passes:
        ax.text(0.5, 0.5, "latency section not run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    picks = [("I/O BAR read 4 B", passes, dict(group="I/O BAR", op="read", size=4, target="python")),
             ("I/O BAR write 4 B", passes, dict(group="I/O BAR", op="write", size=4, target="python")),
             ("mem read 4 B", passes, dict(group="memory BAR", op="read", size=4, target="python")),
             ("mem write 4 B, posted", passes, dict(group="memory BAR", op="write", size=4, target="python")),
             ("mem write 4 B, non-posted", passes, dict(group="memory BAR", op="write", size=4, target="nonposted")),
             ("mem write 4 B, dev. with mmap", mm, dict(group="memory BAR", op="write", size=4, target="mmapdev")),
             ("mmap area read 4 B", mm, dict(group="mmap area", op="read", size=4))]
    labels, floor, series = [], [], [[] for _ in passes]
    for label, source, match in picks:
        if not source:
            continue
        first = _find(source[0]["rows"], **match)
        if first is None:
            continue
        labels.append(label)
        floor.append(first["floor"]["median"])
        for i in range(len(passes)):
            r = _find(source[i]["rows"], **match) if i < len(source) else None
            series[i].append(r["ours"]["median"] if r else 0.0)
    n = len(series) + 1
    height = 0.8 / n
    ys = list(range(len(labels)))
    ax.barh([y - 0.4 + height / 2 for y in ys], floor, height, label="pci-testdev (floor)", color="#888888")
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c"]
    for i, values in enumerate(series):
        ax.barh([y - 0.4 + height * (i + 1.5) for y in ys], values, height,
                label=f"Python, {passes[i]['label']}", color=colours[i % len(colours)])
    for container in ax.containers:
        ax.bar_label(container, fmt="%.0f", fontsize=7, padding=2)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("µs per access (median, through qtest)")
    ax.set_title("Trapped BAR access latency")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(series) + 1, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)


def dma_series(results: dict) -> list[dict]:
    """The lines of the DMA panel: dicts with ``label``, ``fmt`` (marker and line style),
    ``color``, ``sizes`` and ``MBps``; ours first, then libvfio-user's when it was measured."""
    dma = results.get("dma") or {}
    engines = [("ours", dma, "#1f77b4"), ("libvfio-user", dma.get("libvfio-user") or {}, "#ff7f0e")]
    out = []
    for name, source, colour in engines:
        for mode, line in (("mmap", "-"), ("message", "--")):
            rows = source.get(mode) or []
            for op, marker in (("read", "o"), ("write", "s")):
                if rows:
                    out.append({"label": f"{name}, {mode}, {op}", "fmt": marker + line, "color": colour,
                                "sizes": [r["size"] for r in rows], "MBps": [r[f"{op}_MBps"] for r in rows]})
    return out


def _dma_panel(ax, results: dict) -> None:
    series = dma_series(results)
    if not series:
        ax.text(0.5, 0.5, "DMA section not run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    sizes: set[int] = set()
    for line in series:
        sizes.update(line["sizes"])
        ax.plot(line["sizes"], line["MBps"], line["fmt"], color=line["color"], label=line["label"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(sizes))
    ax.set_xticklabels([_size(x) for x in sorted(sizes)])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("transfer size")
    ax.set_ylabel("MB/s")
    ax.set_title("DMA bandwidth (no C reference: the C sample does no DMA)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=7, frameon=False)
    ax.grid(alpha=0.3, which="both")


def versus_c_series(results: dict) -> tuple[list[str], list[dict]]:
    """The bars of the versus-C panel (trapped 1-byte I/O read): the placements, and per
    device a dict with ``key``, ``label``, ``color`` and ``values`` (µs, one per placement,
    ``0.0`` where not measured). The C sample, the reference, comes first after the floor."""
    vc = results.get("versus-c") or {}
    passes = (vc.get("trapped") or {}).get("passes") or []
    series = [{"key": key, "label": label, "color": colour, "values": []} for key, label, colour in (
        ("floor", "pci-testdev (floor)", "#888888"), ("c", "C sample (reference)", "#2ca02c"),
        ("ours", "ours", "#1f77b4"), ("lvu", "ours through libvfio-user", "#ff7f0e"),
        ("poll", f"ours, --poll-us {vc.get('poll_us', 50)}", "#9467bd"))]
    labels = []
    for p in passes:
        row = _vc_row(p["rows"], "read", 1)
        if row is None:
            continue
        labels.append(p["label"].replace("server on ", "server on\n"))
        for entry in series:
            entry["values"].append(row[entry["key"]]["median"] if entry["key"] in row else 0.0)
    return labels, series


def _versus_c_panel(ax, results: dict) -> None:
    """Trapped 1-byte I/O read per placement: floor, C sample, ours on both engines, ours busy-polling."""
    labels, series = versus_c_series(results)
    n = len(series)
    height = 0.8 / n
    ys = list(range(len(labels)))
    for i, entry in enumerate(series):
        ax.barh([y - 0.4 + height * (i + 0.5) for y in ys], entry["values"], height, label=entry["label"],
                color=entry["color"])
    for container in ax.containers:
        ax.bar_label(container, fmt="%.0f", fontsize=7, padding=2)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("µs per access (median, through qtest)")
    ax.set_title("idio16: trapped 1-byte I/O read, ours (both engines) vs C")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)


def write_plot(results: dict, path: str) -> None:
    """Save the figure; :class:`PlotUnavailable` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(f"matplotlib is not installed ({exc}); install the extra: "
                              "pip install -e '.[bench]'") from exc
    with_c = bool(((results.get("versus-c") or {}).get("trapped") or {}).get("passes"))
    if with_c:
        fig, (left, right, third) = plt.subplots(1, 3, figsize=(20, 6.2), gridspec_kw={"width_ratios": [1.4, 1, 0.9]})
        _versus_c_panel(third, results)
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6.2), gridspec_kw={"width_ratios": [1.4, 1]})
    _latency_panel(left, results)
    _dma_panel(right, results)
    m = results.get("machine", {})
    fig.suptitle(f"vfiouser bench, {m.get('date', '')}: {m.get('cpu', '')}, {m.get('cores', '?')} cores, "
                 f"{m.get('qemu', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("plot written to %s", path)
