"""Stock Linux drivers against devices that misbehave by plan (docs/hardening.md): what each
driver does is pinned from the console.

* virtio_rng, its used-buffer interrupts (MSI-X vector 1) delayed, then one dropped: reads
  wait out the delays; after the lost interrupt every reader of /dev/hwrng hangs (killable),
  and only reloading the driver brings the device back.
* 8250 (16550A), its line-status register reading error bits (OE, PE, FE, BI) on top of the
  truth: the driver counts a break and an overrun for every character, loops 256 times per
  interrupt (BI keeps its receive loop going), and the bytes the host sends never reach the
  reader; transmitting still works.
* gpio-pci-idio-16 under a stream of spurious INTx: the kernel counts them as unhandled on
  the line (``/proc/irq/N/spurious``), logs nothing and the GPIO keeps working (far from the
  99,900-of-100,000 mark that disables a line).

None oopses, WARNs or BUGs.
"""

import os
import re
import socket
import threading

import pytest

from vfiouser.devices.idio16 import Idio16
from vfiouser.devices.serial import PciSerial
from vfiouser.devices.virtio import VirtioRng

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

KERNEL_TROUBLE = re.compile(r"Oops|BUG:|WARNING:|Call Trace|hung_task|blocked for more than|nobody cared")

RNG_SCRIPT = r"""
echo "rng $(cat /sys/class/misc/hw_random/rng_current)"
i=0
while [ $i -lt 30 ] && timeout 3 dd if=/dev/hwrng of=/dev/null bs=16 count=1 2>/dev/null; do i=$((i + 1)); done
echo "READS BEFORE THE HANG $i"
timeout 3 dd if=/dev/hwrng of=/dev/null bs=16 count=1 2>/dev/null; echo "AGAIN $?"
rmmod virtio_rng
insmod /lib/modules/virtio_rng.ko
echo "AFTER RELOAD $(timeout 10 dd if=/dev/hwrng bs=16 count=1 2>/dev/null | wc -c) BYTES"
"""
RNG_PLAN = [{"on": "irq", "kind": "msix", "vector": 1, "do": {"delay_ms": 300}, "count": 3},
            {"on": "irq", "kind": "msix", "vector": 1, "do": "drop", "after": 3, "count": 1}]


def test_virtio_rng_waits_out_delayed_interrupts_and_hangs_its_readers_after_a_lost_one(linux_guest):
    g = linux_guest(RNG_SCRIPT, devices=[VirtioRng(seed=1)], modules=["virtio-rng"], faults=RNG_PLAN,
                    append="rng_core.default_quality=0")  # no kernel thread reading meanwhile
    assert g.expect(r"^rng virtio_rng\.0$")
    reads = int(g.expect(r"READS BEFORE THE HANG (\d+)").group(1))
    assert 0 < reads < 30                           # the delayed ones were waited for; then a read hung
    assert g.expect(r"AGAIN (\d+)").group(1) == "143"  # still hung: timeout had to kill the next reader
    assert g.expect(r"AFTER RELOAD (\d+) BYTES").group(1) == "16"
    result = g.wait(60)
    assert result.exit_code == 0 and not KERNEL_TROUBLE.search(result.console)
    delayed, dropped = g.servers[0].port.faults.summary().rules
    assert delayed.fired == 3 and dropped.fired == 1


SERIAL_SCRIPT = r"""
name=$(dmesg | sed -n 's/.*0000:00:04.0: \(ttyS[0-9]*\) at.*/\1/p')
exec 3<>/dev/$name
stty raw -echo 115200 <&3
echo "READY"
echo "RX BYTES $(timeout 5 dd bs=1 count=5 <&3 2>/dev/null | wc -c)"
echo "ping" >&3
grep -E "^1:" /proc/tty/driver/serial
"""


def test_8250_takes_a_garbage_line_status_for_breaks_and_overruns(linux_guest, sockdir):
    line = os.path.join(sockdir, "line")
    dev = PciSerial(backend=f"unix:{line}")
    received = bytearray()
    try:
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.connect(line)
        threading.Thread(target=lambda: [received.extend(c) for c in iter(lambda: host.recv(4096), b"")],
                         daemon=True).start()
        g = linux_guest(SERIAL_SCRIPT, devices=[dev],
                        faults=[{"on": "read", "register": "lsr", "do": {"or": 0x1E}}])
        g.expect("READY")
        host.sendall(b"hello")
        assert g.expect(r"RX BYTES (\d+)").group(1) == "0"
        counts = g.expect(r"uart:16550A .* tx:(\d+) rx:(\d+) brk:(\d+) oe:(\d+)")
        result = g.wait(60)
        host.close()
    finally:
        dev.close()
    tx, rx, brk, oe = map(int, counts.groups())
    assert tx == 5 and rx > 0 and rx % 256 == 0 and brk == oe == rx
    assert b"ping\n" in bytes(received)
    assert result.exit_code == 0 and not KERNEL_TROUBLE.search(result.console)


IDIO16_SCRIPT = r"""
irq=$(awk '/0000:00:04.0/ {sub(":", "", $1); print $1}' /proc/interrupts)
echo "FIRST $(awk '/unhandled/ {print $2}' /proc/irq/$irq/spurious)"
sleep 1
echo "THEN $(awk '/unhandled/ {print $2}' /proc/irq/$irq/spurious)"
G=/sys/class/gpio
echo $(cat $G/gpiochip*/base) > $G/export
echo 1 > $G/OUT0/value
echo "OUT0 SET"
read _
"""


def test_gpio_pci_idio_16_shrugs_off_spurious_intx(linux_guest):
    g = linux_guest(IDIO16_SCRIPT, devices=[Idio16], modules=["gpio-pci-idio-16"],
                    faults=[{"on": "time", "kind": "intx", "every_ms": 20, "do": "spurious"}])
    first = int(g.expect(r"FIRST (\d+)").group(1))
    then = int(g.expect(r"THEN (\d+)").group(1))
    assert then > first
    g.expect("OUT0 SET")
    assert g.models[0].outputs == 1          # while the guest runs: a VM that goes resets the device
    g.send("\n")
    result = g.wait(60)
    assert result.exit_code == 0 and not KERNEL_TROUBLE.search(result.console)
    assert g.servers[0].port.faults.summary().total > then
