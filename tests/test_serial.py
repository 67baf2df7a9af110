"""The 16550A model register by register, as Linux's 8250 driver probes and drives it."""

import os
import socket
import subprocess
import sys
import time

import pytest

from vfiouser.client import Client
from vfiouser.devices.port import ResetReason
from vfiouser.devices.serial import PciSerial, SerialBackendError

from vfiouser.devices.pci.firmware import bring_up

from .conftest import RecordingSink, served


def inb(dev, reg):
    buf = bytearray(1)
    dev.port.region_read(0, reg, buf)
    return buf[0]


def outb(dev, reg, value):
    dev.port.region_write(0, reg, bytes([value]))


@pytest.fixture
def uart():
    dev = PciSerial()
    dev.sink = RecordingSink()
    served(dev, dev.sink)
    out = bytearray()
    dev.output_callback = out.extend
    dev.out = out
    yield dev
    dev.close()


def test_identity():
    dev = PciSerial()
    assert (dev.vendor_id, dev.device_id, dev.class_code, dev.interrupt_pin) == (0x1B36, 0x0002, 0x070002, 1)
    (bar,) = [r for r in dev.regions() if r.size and r.kind == "io"]
    assert bar.kind == "io" and bar.size == 8 and bar.index == 0
    dev.close()


def test_reset_values(uart):
    assert [inb(uart, r) for r in range(1, 8)] == [0x00, 0x01, 0x00, 0x08, 0x60, 0xB0, 0x00]


def test_8250_autoconfig_probes(uart):
    """What serial8250's autoconfig checks before it says 16550A."""
    outb(uart, 7, 0xA5)
    assert inb(uart, 7) == 0xA5  # scratch
    outb(uart, 1, 0x00)
    assert inb(uart, 1) & 0x0F == 0
    outb(uart, 1, 0xFF)
    assert inb(uart, 1) == 0x0F  # only the four enable bits exist (no UUE bit 6)
    outb(uart, 1, 0)
    outb(uart, 4, 0x10 | 0x0A)  # loopback, RTS, OUT2
    assert inb(uart, 6) & 0xF0 == 0x90  # CTS and DCD follow
    outb(uart, 4, 0x08)
    outb(uart, 2, 0x01)  # enable FIFOs
    assert inb(uart, 2) >> 6 == 3  # FIFOs work: a 16550A
    outb(uart, 2, 0x01 | 0x20)  # the 64-byte FIFO bit of a 16750 must not show
    assert inb(uart, 2) & 0x20 == 0
    outb(uart, 3, 0x80)  # DLAB: the divisor
    outb(uart, 0, 0x01)
    outb(uart, 1, 0x00)
    assert (inb(uart, 0), inb(uart, 1)) == (0x01, 0x00)
    outb(uart, 3, 0x03)


def test_transmit_and_thr_empty_interrupt(uart):
    outb(uart, 1, 0x02)  # THR-empty interrupts on: THR is empty, so one is pending at once
    assert uart.sink.levels[-1] is True and inb(uart, 2) & 0x0F == 0x02
    assert uart.sink.levels[-1] is False and inb(uart, 2) & 0x0F == 0x01  # reading IIR cleared it
    outb(uart, 0, ord("h"))
    outb(uart, 0, ord("i"))
    assert inb(uart, 5) & 0x60 == 0x60
    assert uart.worker.wait_idle() and _wait(lambda: bytes(uart.out) == b"hi")


def _wait(cond, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_receive_fifo_trigger_and_timeout(uart):
    outb(uart, 2, 0x81)  # FIFOs, trigger at 8 bytes
    outb(uart, 1, 0x01)  # RX interrupts
    uart.host_input(b"abc")  # below the trigger: only the character timeout interrupts
    assert inb(uart, 5) & 0x01
    assert _wait(lambda: uart.timeout_ipending)
    assert inb(uart, 2) & 0x0F == 0x0C
    assert bytes(inb(uart, 0) for _ in range(3)) == b"abc" and not inb(uart, 5) & 0x01
    uart.host_input(bytes(range(20)))  # 16 in the FIFO at once: data-available interrupt
    assert inb(uart, 2) & 0x0F == 0x04
    got = bytes(inb(uart, 0) for _ in range(20))  # the rest moves in as the guest reads
    assert got == bytes(range(20)) and not inb(uart, 5) & 0x01


def test_host_input_waits_for_the_guest():
    """The host buffer is bounded: a writer that outpaces the guest blocks rather than loses data."""
    from vfiouser.devices import serial

    dev = PciSerial()
    served(dev)
    outb(dev, 2, 0x01)
    with pytest.raises(TimeoutError):
        dev.host_input(bytes(serial.HOST_BUFFER + serial.FIFO_SIZE + 1), timeout=0.2)
    dev.close()


def test_loopback(uart):
    outb(uart, 2, 0x01)
    outb(uart, 4, 0x10 | 0x01 | 0x04)  # loop, DTR, OUT1
    assert inb(uart, 6) & 0xF0 == 0x20 | 0x40  # DSR, RI
    outb(uart, 0, 0x5A)
    assert inb(uart, 5) & 0x01 and inb(uart, 0) == 0x5A
    uart.host_input(b"x")  # the line is disconnected in loopback
    assert not inb(uart, 5) & 0x01
    outb(uart, 4, 0x08)  # leave loopback: the waiting byte arrives
    assert inb(uart, 0) == ord("x")
    for _ in range(17):  # overrun in loopback: 17 bytes into a 16-byte FIFO
        outb(uart, 4, 0x18)
        outb(uart, 0, 1)
    assert inb(uart, 5) & 0x02 and not inb(uart, 5) & 0x02  # OE, cleared by reading LSR


def test_non_fifo_mode_holds_one_byte(uart):
    uart.host_input(b"12")
    assert inb(uart, 0) == ord("1") and inb(uart, 0) == ord("2") and not inb(uart, 5) & 1


def test_unknown_backend():
    with pytest.raises(SerialBackendError):
        PciSerial(backend="tcp:1234")


def test_unix_socket_backend(sockdir):
    path = os.path.join(sockdir, "line")
    dev = PciSerial(backend=f"unix:{path}")
    served(dev)
    try:
        outb(dev, 2, 0x01)
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.connect(path)
        assert _wait(lambda: dev._peer is not None)
        host.sendall(b"ping")
        assert _wait(lambda: inb(dev, 5) & 1)
        assert bytes(inb(dev, 0) for _ in range(4)) == b"ping"
        for ch in b"pong":
            outb(dev, 0, ch)
        host.settimeout(2)
        assert host.recv(4) == b"pong"
        host.close()
    finally:
        dev.close()
    assert not os.path.exists(path)


def test_stdio_backend_through_the_cli(sockdir):
    """vfiouser serve pci-serial --param backend=stdio: the line is the server's stdin/stdout."""
    path = os.path.join(sockdir, "uart.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vfiouser", "serve", "pci-serial", "--socket", path,
                             "--param", "backend=stdio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().startswith(b"-device")
        with Client.connect(path) as c:
            c.bring_up()
            c.region_write(0, 2, b"\x01")
            for ch in b"out":
                c.region_write(0, 0, bytes([ch]))
            assert proc.stdout.read(3) == b"out"
            proc.stdin.write(b"in")
            proc.stdin.flush()
            deadline = time.monotonic() + 2
            while not c.region_read(0, 5, 1)[0] & 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert c.region_read(0, 0, 1) + c.region_read(0, 0, 1) == b"in"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_reset_drops_pending_state(uart):
    outb(uart, 2, 0x01)
    uart.host_input(b"zz")
    outb(uart, 1, 0x0F)
    uart.port.reset(ResetReason.CLIENT_REQUEST)
    bring_up(uart.port)  # a reset leaves the BAR unprogrammed, as firmware finds it
    assert [inb(uart, r) for r in (1, 2, 5)] == [0x00, 0x01, 0x60] and uart.sink.levels[-1] is False
