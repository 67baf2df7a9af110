"""A real Linux guest drives the idio16 with its own gpio-pci-idio-16 driver.

The guest exports all 32 lines through sysfs (the driver names them OUT0-15 and
IIN0-15). The test plays the world outside the card: it checks the outputs the
guest sets and drives the inputs the guest reads. With edge detection requested
on all 16 inputs (the driver shares one status bit between them: requesting only
some oopses 6.12, see the reference), an input change reaches the guest as one
INTx interrupt and an edge event on every line.
"""

import pytest

from vfiouser.devices.idio16 import Idio16

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

SCRIPT = r"""
set -e
G=/sys/class/gpio
[ "$(cat /sys/bus/pci/devices/0000:00:04.0/vendor)" = 0x494f ]
basename "$(readlink /sys/bus/pci/devices/0000:00:04.0/driver)"
base=$(cat $G/gpiochip*/base)
echo "gpiochip $(cat $G/gpiochip*/label) $(cat $G/gpiochip*/ngpio) lines"
for i in $(seq 0 31); do echo $((base + i)) > $G/export; done
echo 1 > $G/OUT0/value
echo 1 > $G/OUT9/value
echo 1 > $G/OUT15/value
echo 0 > $G/OUT15/value
echo "OUTPUTS SET"
read _
echo "IIN3=$(cat $G/IIN3/value) IIN12=$(cat $G/IIN12/value)"
for i in $(seq 0 15); do echo both > $G/IIN$i/edge; done
irqs() { awk '/0000:00:04.0/ && $NF != "gpiolib" {print $2}' /proc/interrupts; }
edges() { awk '$NF == "gpiolib" && $4 == 21 {print $2}' /proc/interrupts; }
echo "ARMED intx=$(irqs) edges=$(edges)"
n=0
while [ "$(edges)" = 0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "EDGE intx=$(irqs) edges=$(edges) IIN5=$(cat $G/IIN5/value)"
"""


def test_gpio_pci_idio_16_drives_the_model(linux_guest, backend):
    g = linux_guest(SCRIPT, devices=[Idio16], modules=["gpio-pci-idio-16"], backend=backend)
    dev = g.models[0]  # served in slot 4
    assert g.expect(r"^pci-idio-16$")
    assert g.expect(r"gpiochip 0000:00:04.0 32 lines")
    g.expect("OUTPUTS SET")
    assert dev.outputs == (1 << 0) | (1 << 9)  # OUT15 went up and down again
    dev.set_inputs((1 << 3) | (1 << 12))
    g.send("\n")
    assert g.expect(r"IIN3=1 IIN12=1")
    armed = g.expect(r"ARMED intx=(\d+) edges=(\d+)")
    assert armed.groups() == ("0", "0")
    dev.set_input(5, True)  # a change on the host side
    edge = g.expect(r"EDGE intx=(\d+) edges=(\d+) IIN5=(\d)")
    assert int(edge.group(1)) >= 1 and int(edge.group(2)) >= 1 and edge.group(3) == "1"
    result = g.wait(60)
    assert result.exit_code == 0, result.console
