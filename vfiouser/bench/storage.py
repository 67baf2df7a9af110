"""Storage: our NVMe and virtio-blk next to QEMU's own, same guest, same job, same image.

For each device kind (``nvme``, ``virtio-blk``) and each implementation
(QEMU's own ``-device nvme`` / ``virtio-blk-pci`` on a ``-drive`` of the
image, and ours: ``vfiouser serve nvme|virtio-blk --param file=IMAGE`` in its
own process, attached with ``vfio-user-pci``), a Debian guest (TCG, one vCPU,
guest RAM a shared memfd, as the test-suite boots it) runs the same jobs with
``iojob`` (``vfiouser/bench/iojob.c``, built here with the host's gcc,
static and freestanding):

* ``seqread`` / ``seqwrite``: 1 MiB requests, sequential, wrapping at the end;
* ``randread``: 4 KiB requests at random 4 KiB-aligned offsets;

all with ``O_DIRECT`` and one request in flight, for a fixed time each. The
image is a file of random bytes in memory, the same for every run: on tmpfs
(``/dev/shm``) where there is one, since a VM's host may reclaim an ordinary
file's page cache between jobs and turn some of them into disk reads for
either side; otherwise in the temporary folder. QEMU's drive uses its default
cache mode, writeback (the page cache), as ours does. The guest waits for the host's go before each job, so the host can
read the CPU time the server process and QEMU used for exactly that job; CPU
time per I/O is that divided by the job's requests.

Implementations alternate (QEMU's, ours, QEMU's, ...) for ``rounds`` rounds,
and each figure is the median over the rounds, so a slow minute of a shared
machine hits both. The ratio is ours over QEMU's (higher is better; the goal
is at least 0.5 on every job).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from ..testing.guest import READY_MARKER, Guest, GuestAssets

__all__ = ["run", "JOBS", "KINDS", "build_iojob", "IojobUnavailable"]

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
#: (job name, request size)
JOBS = (("seqread", 1 << 20), ("seqwrite", 1 << 20), ("randread", 4096))
#: device kind -> (QEMU's own -device, our built-in device name, guest module, guest block device)
KINDS = {
    "nvme": ("nvme,drive=d0,serial=bench,addr=04.0", "nvme", "nvme", "/dev/nvme0n1"),
    "virtio-blk": ("virtio-blk-pci,drive=d0,addr=04.0", "virtio-blk", "virtio_blk", "/dev/vda"),
}
#: Where the image goes if it exists (tmpfs: it stays in memory; see the module docstring).
IMAGE_DIR = "/dev/shm"
_RESULT = re.compile(r"^iojob (\S+) (\d+) ops=(\d+) bytes=(\d+) ns=(\d+)$")


class IojobUnavailable(RuntimeError):
    """The guest's job tool cannot be built here (no gcc)."""


def build_iojob(directory: str) -> bytes:
    """``iojob.c`` built static and freestanding with the host's gcc; the binary's bytes."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise IojobUnavailable("gcc is needed to build the guest's iojob tool")
    out = os.path.join(directory, "iojob")
    subprocess.run([gcc, "-O2", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin", "-fno-stack-protector",
                    "-fno-pie", "-no-pie", "-o", out, os.path.join(HERE, "iojob.c")], check=True)
    with open(out, "rb") as f:
        return f.read()


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _make_image(path: str, size: int) -> None:
    """A file of random bytes (so neither side reads holes), written once."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)


class _Server:
    """``vfiouser serve KIND --param file=IMAGE`` in its own process."""

    def __init__(self, kind: str, image: str, directory: str) -> None:
        sock = os.path.join(directory, f"{kind}.sock")
        self.log_path = os.path.join(directory, f"{kind}-server.log")
        with open(self.log_path, "wb") as errlog:
            self.proc = subprocess.Popen([sys.executable, "-m", "vfiouser", "serve", kind, "--socket", sock,
                                          "--param", f"file={image}"],
                                         stdout=subprocess.PIPE, stderr=errlog, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("-device '"):
            self.stop()
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                raise RuntimeError(f"vfiouser serve {kind} did not start: {line!r}\n{f.read()[-2000:]}")
        self.device_json = line[len("-device '") : -1].replace("}}", '},"addr":"04.0"}')

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def _script(device: str, seconds: int) -> str:
    lines = ["exec 3< /dev/ttyS0", "echo JOBS-READY"]
    for name, size in JOBS:
        lines += ["read _ <&3", f"iojob {device} {name} {size} {seconds} || echo IOJOB-FAILED"]
    return "\n".join(lines) + "\n"


def _run_guest(assets: GuestAssets, kind: str, impl: str, image: str, iojob: bytes, seconds: int,
               directory: str) -> dict:
    """One boot: every job once; throughput, IOPS and CPU per request of the server and of QEMU."""
    own, ours, module, device = KINDS[kind]
    server = _Server(ours, image, directory) if impl == "ours" else None
    try:
        if server is not None:
            devices, extra = [server.device_json], []
        else:
            devices, extra = [own], ["-drive", f"file={image},format=raw,if=none,id=d0"]
        with Guest(assets, _script(device, seconds), devices=devices, modules=[module], extra_args=extra,
                   files={"bin/iojob": iojob}) as guest:
            guest.expect(READY_MARKER, timeout=120)
            guest.expect(r"^JOBS-READY$", timeout=120)
            jobs = {}
            for name, size in JOBS:
                cpu0 = _cpu_seconds(server.proc.pid) if server else None
                qemu0 = _cpu_seconds(guest.proc.pid)
                guest.send("\n")
                match = guest.expect(r"^(iojob \S+ \d+ ops=\d+ bytes=\d+ ns=\d+|IOJOB-FAILED)$", timeout=seconds + 120)
                qemu1 = _cpu_seconds(guest.proc.pid)
                cpu1 = _cpu_seconds(server.proc.pid) if server else None
                parsed = _RESULT.match(match.group(1))
                if parsed is None:
                    raise RuntimeError(f"{kind} ({impl}): {name} failed in the guest:\n{guest.tail()}")
                ops, nbytes, ns = int(parsed.group(3)), int(parsed.group(4)), int(parsed.group(5))
                jobs[name] = {"ops": ops, "MBps": nbytes / ns * 1e3, "iops": ops / ns * 1e9,
                              "qemu_cpu_us": (qemu1 - qemu0) / ops * 1e6,
                              "server_cpu_us": (cpu1 - cpu0) / ops * 1e6 if server else None}
            result = guest.wait(60)
        if result.exit_code != 0:
            raise RuntimeError(f"{kind} ({impl}): the guest script failed:\n{result.console[-2000:]}")
        return jobs
    finally:
        if server is not None:
            server.stop()


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def run(*, kinds=tuple(KINDS), seconds: int = 3, rounds: int = 2, image_mib: int = 256) -> dict:
    """Both implementations of each device kind, every job, ``rounds`` alternating boots each."""
    assets = GuestAssets.find()
    directory = tempfile.mkdtemp(prefix="vfu-storage-")
    memory = tempfile.mkdtemp(prefix="vfu-storage-", dir=IMAGE_DIR) if os.path.isdir(IMAGE_DIR) else directory
    try:
        iojob = build_iojob(directory)
        image = os.path.join(memory, "disk.img")
        _make_image(image, image_mib << 20)
        out: dict = {"seconds": seconds, "rounds": rounds, "image_mib": image_mib, "kinds": {},
                     "image_on": "tmpfs" if memory != directory else "the temporary folder's file system"}
        for kind in kinds:
            samples: dict[str, dict[str, list]] = {"qemu": {}, "ours": {}}
            started = time.monotonic()
            for _ in range(rounds):
                for impl in ("qemu", "ours"):
                    for name, row in _run_guest(assets, kind, impl, image, iojob, seconds, directory).items():
                        samples[impl].setdefault(name, []).append(row)
            jobs = []
            for name, size in JOBS:
                row = {"job": name, "size": size}
                for impl in ("qemu", "ours"):
                    runs = samples[impl][name]
                    row[impl] = {key: _median(runs, key) for key in ("MBps", "iops", "qemu_cpu_us", "server_cpu_us")}
                    row[impl]["runs"] = runs
                row["ratio"] = row["ours"]["iops"] / row["qemu"]["iops"] if row["qemu"]["iops"] else None
                jobs.append(row)
                log.info("%s %s: QEMU's %.0f MB/s %.0f IOPS, ours %.0f MB/s %.0f IOPS (%.2fx), server CPU %.0f µs "
                         "per I/O", kind, name, row["qemu"]["MBps"], row["qemu"]["iops"], row["ours"]["MBps"],
                         row["ours"]["iops"], row["ratio"] or 0, row["ours"]["server_cpu_us"] or 0)
            out["kinds"][kind] = {"jobs": jobs, "duration_s": time.monotonic() - started}
        out["kernel"] = assets.version
        return out
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(memory, ignore_errors=True)
