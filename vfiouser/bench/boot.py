"""Guest boot-to-driver-ready time and the server's resident memory.

``vfiouser serve idio16`` runs as its own process (the command line, as a user
runs it). A Debian guest (:class:`vfiouser.testing.guest.Guest`, TCG here) boots with
the card attached; its init loads ``gpio-pci-idio-16`` and the script reports
as soon as the driver is bound. Times are host wall-clock seconds from QEMU's
start. The server's RSS (``VmRSS`` from /proc) is read before QEMU attaches,
while the guest's driver holds the device, and after QEMU has gone; ``VmHWM``
is its peak. A guest without the device gives the baseline boot.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time

from ..testing.guest import READY_MARKER, Guest, GuestAssets, default_accel
from .child import rss_kib

__all__ = ["run"]

log = logging.getLogger(__name__)

SCRIPT = r"""
d=/sys/bus/pci/devices/0000:00:04.0
n=0
while [ ! -e $d/driver ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n + 1)); done
echo "DRIVER-READY $(basename "$(readlink $d/driver)") uptime=$(cut -d' ' -f1 /proc/uptime)"
read _
"""

BASELINE = r"""
echo "BASELINE-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
"""


def _start_server(path: str, log_path: str) -> tuple[subprocess.Popen, str]:
    errlog = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vfiouser", "serve", "idio16", "--socket", path],
                            stdout=subprocess.PIPE, stderr=errlog, text=True)
    errlog.close()
    line = proc.stdout.readline().strip()
    if not line.startswith("-device '"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"vfiouser serve idio16 did not start: {line!r}")
    return proc, line[len("-device '") : -1]


def _stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


def _boot_with_device(assets: GuestAssets, device_json: str, server_pid: int) -> dict:
    spec = device_json.replace("}}", '},"addr":"04.0"}')
    with Guest(assets, SCRIPT, devices=[spec], modules=["gpio-pci-idio-16"]) as guest:
        guest.expect(READY_MARKER, timeout=120)
        t_init = time.monotonic() - guest.started
        match = guest.expect(r"DRIVER-READY (\S+) uptime=([\d.]+)", timeout=60)
        t_driver = time.monotonic() - guest.started
        rss_attached = rss_kib(server_pid)
        guest.send("\n")
        result = guest.wait(60)
    if result.exit_code != 0:
        raise RuntimeError(f"the guest script failed ({result.exit_code}):\n{result.console[-2000:]}")
    return {"init_s": t_init, "driver_ready_s": t_driver, "driver": match.group(1),
            "guest_uptime_s": float(match.group(2)), "rss_attached_kib": rss_attached["VmRSS"],
            "accel": guest.accel}


def _boot_baseline(assets: GuestAssets) -> dict:
    with Guest(assets, BASELINE) as guest:
        match = guest.expect(r"BASELINE-READY uptime=([\d.]+)", timeout=120)
        t_ready = time.monotonic() - guest.started
        guest.wait(60)
    return {"ready_s": t_ready, "guest_uptime_s": float(match.group(1))}


def run(*, baseline: bool = True) -> dict:
    """Boot time with the idio16 (and without any device, if ``baseline``) and the server's RSS."""
    assets = GuestAssets.find()
    directory = tempfile.mkdtemp(prefix="vfu-boot-")
    path = os.path.join(directory, "idio16.sock")
    proc, device_json = _start_server(path, os.path.join(directory, "server.log"))
    try:
        time.sleep(0.5)
        idle = rss_kib(proc.pid)
        result = _boot_with_device(assets, device_json, proc.pid)
        time.sleep(0.5)
        after = rss_kib(proc.pid)
        result.update({"kernel": assets.version, "rss_idle_kib": idle["VmRSS"], "rss_after_kib": after["VmRSS"],
                       "rss_peak_kib": after["VmHWM"], "accel": result.get("accel") or default_accel()})
    finally:
        _stop_server(proc)
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)
    log.info("guest: init %.2f s, driver %s ready %.2f s; server RSS idle %d KiB, attached %d KiB",
             result["init_s"], result["driver"], result["driver_ready_s"], result["rss_idle_kib"],
             result["rss_attached_kib"])
    if baseline:
        result["baseline"] = _boot_baseline(assets)
        log.info("guest without the device: ready %.2f s", result["baseline"]["ready_s"])
    return result
