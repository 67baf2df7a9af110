"""A real Linux guest uses the Python 16550A through its built-in 8250 driver.

The host end of the line is the UART's UNIX-socket backend, as a user would
connect to it. 64 KiB of random bytes go each way through a raw tty, driven by
interrupts, and must arrive intact.
"""

import os
import random
import socket
import threading
import time

import pytest

from vfiouser.devices.serial import PciSerial

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

SIZE = 64 * 1024

SCRIPT = r"""
set -e
dmesg | grep "0000:00:04.0: ttyS"
name=$(dmesg | sed -n 's/.*0000:00:04.0: \(ttyS[0-9]*\) at.*/\1/p')
tty=/dev/$name
irq() { awk -v n=$name '$NF == n {print $2}' /proc/interrupts; }
exec 3<>$tty                   # keep the port open: closing it would flush the FIFOs
stty raw -echo 115200 <&3
head -c 65536 <&3 > /tmp/rx &
reader=$!
echo "RX READY irq=$(irq)"
wait $reader
if cmp /tmp/rx /rxdata; then echo "RX OK irq=$(irq)"; else echo "RX BAD $(wc -c < /tmp/rx) irq=$(irq)"; fi
cat /txdata >&3
echo "TX DONE irq=$(irq)"
grep -E "^1:" /proc/tty/driver/serial
"""


def test_8250_moves_64k_each_way(linux_guest, sockdir, backend):
    rng = random.Random(20261124)
    to_guest = rng.randbytes(SIZE)
    from_guest = rng.randbytes(SIZE)
    line = os.path.join(sockdir, "line")
    dev = PciSerial(backend=f"unix:{line}")
    received = bytearray()
    try:
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.connect(line)

        def collect():
            while chunk := host.recv(65536):
                received.extend(chunk)

        threading.Thread(target=collect, daemon=True).start()
        g = linux_guest(SCRIPT, devices=[dev], backend=backend, files={"rxdata": to_guest, "txdata": from_guest})
        probe = g.expect(r"0000:00:04.0: ttyS\d+ at I/O 0x[0-9a-f]+ \(irq = (\d+), base_baud = 115200\) is a 16550A")
        assert int(probe.group(1)) != 0  # a real interrupt line: the 8250 driver does not poll
        ready = g.expect(r"RX READY irq=(\d+)")
        host.sendall(to_guest)
        rx = g.expect(r"RX (OK|BAD.*) irq=(\d+)", timeout=90)
        assert rx.group(1) == "OK", rx.group(0)
        tx = g.expect(r"TX DONE irq=(\d+)", timeout=90)
        assert g.expect(r"uart:16550A .* tx:65536 rx:65536")
        deadline = time.monotonic() + 10
        while len(received) < SIZE and time.monotonic() < deadline:
            time.sleep(0.05)
        result = g.wait(30)
        host.close()
    finally:
        dev.close()
    assert result.exit_code == 0
    assert bytes(received) == from_guest
    # Interrupt-driven both ways. (The 8250 handler keeps reading while the FIFO refills, up to
    # 512 passes of 256 characters, so a few interrupts can carry all 64 KiB.)
    assert int(rx.group(2)) > int(ready.group(1)) and int(tx.group(1)) > int(rx.group(2))
