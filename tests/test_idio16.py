"""The idio16 model, register by register, as the gpio-pci-idio-16 driver uses it."""

import pytest

from vfiouser.devices.idio16 import Idio16
from vfiouser.devices.port import ResetReason

from .conftest import RecordingSink, served


def inb(dev, port):
    buf = bytearray(1)
    dev.port.region_read(2, port, buf)
    return buf[0]


def outb(dev, port, value):
    dev.port.region_write(2, port, bytes([value]))


@pytest.fixture
def dev():
    d = Idio16()
    d.sink = RecordingSink()
    served(d, d.sink)
    return d


def test_identity_and_bar():
    d = Idio16()
    assert (d.vendor_id, d.device_id, d.interrupt_pin) == (0x494F, 0x0DC8, 1)
    (bar2,) = [r for r in d.regions() if r.size and r.kind == "io"]
    assert bar2.index == 2 and bar2.size == 256


def test_outputs_written_and_read_back(dev):
    outb(dev, 0, 0xA5)
    outb(dev, 4, 0x3C)
    assert dev.outputs == 0x3CA5
    assert inb(dev, 0) == 0xA5 and inb(dev, 4) == 0x3C


def test_inputs_driven_from_the_host(dev):
    dev.set_inputs(0x8001)
    assert inb(dev, 1) == 0x01 and inb(dev, 5) == 0x80
    dev.set_input(3, True)
    dev.set_inputs(0, mask=0x8000)
    assert dev.inputs == 0x0009
    with pytest.raises(ValueError):
        dev.set_input(16, True)


def test_multi_byte_access_reads_consecutive_ports(dev):
    outb(dev, 0, 0x11)
    dev.set_inputs(0x0022)
    buf = bytearray(2)
    dev.port.region_read(2, 0, buf)
    assert bytes(buf) == b"\x11\x22"


def test_ports_beyond_eight_are_unclaimed(dev):
    assert inb(dev, 8) == 0xFF and inb(dev, 0xFF) == 0xFF
    outb(dev, 0x10, 0x55)  # dropped, no error
    assert dev.outputs == 0


def test_interrupt_on_input_change(dev):
    outb(dev, 1, 0)  # the driver clears, then reads 2 to enable
    inb(dev, 2)
    assert dev.irq_enabled and dev.sink.levels == []
    dev.set_input(9, True)
    assert dev.sink.levels == [True]
    assert inb(dev, 6) == 0b110  # group 1 changed, pending
    outb(dev, 1, 0)  # clear interrupt
    assert dev.sink.levels == [True, False] and inb(dev, 6) == 0


def test_no_interrupt_while_disabled(dev):
    inb(dev, 2)
    outb(dev, 2, 0)  # disable
    dev.set_inputs(0xFFFF)
    assert dev.sink.levels == [] and inb(dev, 6) == 0


def test_disabling_lowers_a_pending_interrupt(dev):
    inb(dev, 2)
    dev.set_input(0, True)
    outb(dev, 2, 0)
    assert dev.sink.levels == [True, False]


def test_filters_register(dev):
    assert dev.filters_active
    outb(dev, 3, 0)
    assert not dev.filters_active


def test_loopback_wires_outputs_to_inputs():
    d = Idio16(loopback=True)
    sink = RecordingSink()
    served(d, sink)
    inb(d, 2)
    outb(d, 0, 0x0F)
    assert inb(d, 1) == 0x0F and sink.levels == [True] and inb(d, 6) == 0b101
    d.set_input(7, True)  # the host can drive a line high too
    assert inb(d, 1) == 0x8F


def test_reset_state(dev):
    outb(dev, 0, 0xFF)
    inb(dev, 2)
    dev.set_input(0, True)
    outb(dev, 3, 0)
    dev.port.reset(ResetReason.CLIENT_REQUEST)
    assert (dev.outputs, dev.irq_enabled, dev.status, dev.filters_active) == (0, False, 0, True)
    assert dev.inputs == 1  # the outside world is not reset
    assert dev.sink.levels[-1] is False
