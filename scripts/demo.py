"""The demo behind scripts/demo.

1. Starts ``vfiouser serve idio16 --param loopback=on -v`` (the real command).
2. Starts QEMU with the printed ``-device`` argument, under the qtest
   accelerator, and plays firmware and the gpio-pci-idio-16 driver on it:
   enumerate, size and place BAR2, light the outputs one by one, read the
   looped-back inputs, take an interrupt on an input change.
3. Shows the server's decoded traffic for BAR2 (region 2) as it happens, and
   that the server outlives QEMU.
"""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vfiouser.qemu import QtestMachine  # noqa: E402

SLOT, IO, GSI = 4, 0xC000, 20
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def step(text: str) -> None:
    print(f"\n{BOLD}{text}{RESET}", flush=True)
    time.sleep(0.05)


def guest(text: str) -> None:
    print(f"  guest: {text}", flush=True)


def show_server(stream) -> None:
    """Print the server's INFO lines and its decoded BAR2 traffic."""
    for line in stream:
        line = line.rstrip()
        interesting = (" INFO: " in line or "region=2" in line or "SET_IRQS" in line) and "DMA" not in line
        if interesting:
            print(f"  {DIM}server| {line.split(' ', 1)[1]}{RESET}", flush=True)


def main() -> int:
    sockdir = tempfile.mkdtemp(prefix="vfiouser-demo-")
    sock = os.path.join(sockdir, "idio16.sock")
    step("1. Serve the ACCES PCI-IDIO-16 model, outputs looped back to inputs")
    cmd = [sys.executable, "-m", "vfiouser", "serve", "idio16", "--socket", sock, "--param", "loopback=on", "-v"]
    print("  $ vfiouser " + " ".join(cmd[3:]))
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    device_arg = server.stdout.readline().strip()
    print(f"  QEMU argument printed by the server: {device_arg}")
    threading.Thread(target=show_server, args=(server.stderr,), daemon=True).start()
    spec = device_arg[len("-device '") : -1].replace("}}", '},"addr":"04.0"}')
    try:
        step("2. Start QEMU (q35, qtest accelerator) with -device vfio-user-pci")
        with QtestMachine([spec]) as vm:
            print(f"  {vm.qemu}")
            time.sleep(0.2)
            step("3. Firmware: enumerate 00:04.0 and place BAR2")
            vendor, device = vm.pci_cfg_read(SLOT, 0, 2), vm.pci_cfg_read(SLOT, 2, 2)
            guest(f"config space says {vendor:04x}:{device:04x}")
            size, is_io = vm.pci_bar_size(SLOT, 2)
            guest(f"BAR2 is a {size}-byte {'I/O' if is_io else 'memory'} BAR; placing it at port {IO:#x}")
            vm.pci_cfg_write(SLOT, 0x18, IO)
            vm.pci_cfg_write(SLOT, 0x04, 0x0001, 2)
            time.sleep(0.2)
            step("4. Driver: disable the IRQ, then walk a 1 along the 16 outputs")
            vm.outb(IO + 2, 0)
            for line in range(16):
                port, bit = (IO, line) if line < 8 else (IO + 4, line - 8)
                vm.outb(IO, 0)
                vm.outb(IO + 4, 0)
                vm.outb(port, 1 << bit)
                inputs = vm.inb(IO + 1) | vm.inb(IO + 5) << 8
                guest(f"OUT{line:<2} on -> inputs read {inputs:016b}")
            time.sleep(0.2)
            step("5. Driver: enable the interrupt; an input change raises INTx (IOAPIC GSI 20)")
            vm.irq_intercept_in("ioapic")
            vm.outb(IO + 1, 0)
            vm.inb(IO + 2)
            vm.outb(IO, 0xFF)
            if vm.wait_irq("raise", GSI):
                guest("IRQ 20 raised")
            guest(f"interrupt status register: {vm.inb(IO + 6):#04x}")
            vm.outb(IO + 1, 0)
            guest("interrupt cleared")
            time.sleep(0.3)
        step("6. QEMU quit; the server keeps serving the next QEMU")
        time.sleep(0.3)
        print(f"  server still running: {server.poll() is None}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
        time.sleep(0.1)
    print(f"\n{BOLD}Done.{RESET} Try it yourself:\n  .venv/bin/vfiouser serve idio16 --socket /tmp/idio16.sock -v")
    return 0


if __name__ == "__main__":
    sys.exit(main())
