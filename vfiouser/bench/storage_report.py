"""The storage section of ``docs/performance.md``: our NVMe and virtio-blk next to QEMU's own.

:func:`storage_section` renders what :func:`vfiouser.bench.storage.run` measured;
:func:`storage_targets` checks the issue's goal (at least half of QEMU's own
device on every job). Both take the bench's whole results dictionary.
"""

from __future__ import annotations

__all__ = ["storage_section", "storage_targets", "TARGET_STORAGE_RATIO", "TITLE"]

#: Ours over QEMU's own device, every job, both devices (issue 15).
TARGET_STORAGE_RATIO = 0.5
TITLE = "8. Storage: NVMe and virtio-blk next to QEMU's own"
_NAMES = {"seqread": "sequential read, 1 MiB", "seqwrite": "sequential write, 1 MiB", "randread": "random read, 4 KiB"}


def _status(results: dict) -> str | None:
    section = results.get("storage")
    if section is None:
        return "Not run (see `--only`)."
    if "error" in section:
        return f"Failed: {section['error']}"
    if "unavailable" in section:
        return f"Not available: {section['unavailable']}"
    return None


def _throughput(side: dict, job: str) -> str:
    if job == "randread":
        return f"{side['iops']:,.0f} IOPS"
    return f"{side['MBps']:,.0f} MB/s"


def storage_targets(results: dict) -> list[dict]:
    """One target per device and job: ours at least :data:`TARGET_STORAGE_RATIO` of QEMU's own."""
    if _status(results) is not None:
        return [{"target": f"storage: ours ≥ {TARGET_STORAGE_RATIO}× QEMU's own device on every job",
                 "measured": "not measured", "holds": None}]
    out = []
    for kind, entry in results["storage"]["kinds"].items():
        for row in entry["jobs"]:
            ratio = row["ratio"]
            out.append({"target": f"{kind}, {_NAMES[row['job']]}: ours ≥ {TARGET_STORAGE_RATIO}× QEMU's own",
                        "measured": f"{_throughput(row['ours'], row['job'])} vs "
                                    f"{_throughput(row['qemu'], row['job'])} = {ratio:.2f}×",
                        "holds": ratio >= TARGET_STORAGE_RATIO})
    return out


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "| --- |" + " ---: |" * (len(headers) - 1),
            *["| " + " | ".join(r) + " |" for r in rows]]


def storage_section(results: dict) -> list[str]:
    """The section's Markdown lines."""
    lines = [f"## {TITLE}", ""]
    status = _status(results)
    if status:
        return lines + [status]
    st = results["storage"]
    lines += [
        f"The same guest (Debian's kernel {st['kernel']}, TCG, one vCPU, guest RAM a shared memfd) runs the same "
        f"jobs against QEMU's own device (`-device nvme` / `virtio-blk-pci` on `-drive "
        f"file=IMAGE,format=raw`, QEMU's default cache) and against ours (`vfiouser serve nvme|virtio-blk "
        f"--param file=IMAGE`, its own process, `vfio-user-pci`), on one {st['image_mib']} MiB image of random "
        f"bytes on {st.get('image_on', 'the host')} (in memory, so no job reads the disk). Each job: `O_DIRECT`, one request in flight, {st['seconds']} s "
        f"(`vfiouser/bench/iojob.c`). Implementations alternate, {st['rounds']} boots each; figures are medians. "
        "*Server CPU* is the CPU time of our server process per request; *QEMU CPU* is QEMU's (all its threads, "
        "the TCG vCPU included) for the same job. Unpinned, as a user runs them.",
        "",
    ]
    rows = []
    for kind, entry in st["kinds"].items():
        for row in entry["jobs"]:
            q, o = row["qemu"], row["ours"]
            rows.append([kind, _NAMES[row["job"]], _throughput(q, row["job"]), _throughput(o, row["job"]),
                         f"{row['ratio']:.2f}×", f"{o['server_cpu_us']:,.0f} µs",
                         f"{q['qemu_cpu_us']:,.0f} / {o['qemu_cpu_us']:,.0f} µs"])
    lines += _table(["device", "job", "QEMU's own", "ours", "ours / QEMU's", "server CPU per request",
                     "QEMU CPU per request (QEMU's / ours)"], rows)
    lines += ["", *_where_the_time_goes(st)]
    return lines


def _where_the_time_goes(st: dict) -> list[str]:
    randread = [(kind, row) for kind, entry in st["kinds"].items() for row in entry["jobs"] if row["job"] == "randread"]
    cpu = ", ".join(f"{kind} {row['ours']['server_cpu_us']:,.0f} µs" for kind, row in randread)
    return [
        "Where the time goes (see `docs/storage.md` for the path of one request):",
        "",
        "* A 4 KiB request costs the guest one trapped doorbell write (a posted REGION_WRITE: the vCPU does not "
        "wait), and the server one wake-up, a handful of in-place copies of ring entries, one `preadv` straight "
        "into the guest's buffer and one eventfd write for the MSI-X vector; QEMU's main loop then injects the "
        "interrupt. NVMe's completion-queue head doorbell costs no message: the controller offers shadow "
        "doorbells, which Linux uses. Our server's CPU time per random read: " + (cpu or "–") + ".",
        "* On a 2-core machine the server and QEMU share the CPUs: the server's CPU time per request is "
        "latency at one request in flight, and a wake-up on the other core costs tens of µs. QEMU's own device "
        "pays its own hops (vCPU → main loop → thread pool → main loop), but in C.",
        "* What would take it further: fewer Python calls per request (ring entries read and written through "
        "one loan of guest memory per kick instead of a DMA call each), virtio-blk's large requests run in "
        "parallel as NVMe's do (two I/O threads overlap the two halves of a 1 MiB request that Linux splits, "
        "as QEMU's thread pool does), ioeventfd-style "
        "doorbells (QEMU 11.1.3 does not ask for GET_REGION_IO_FDS), and busy polling (`--poll-us`) for a server "
        "with a CPU of its own.",
    ]
