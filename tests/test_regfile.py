"""A SystemRDL file served with no Python (``vfiouser serve regfile``), against the real QEMU.

The file is the worked example of ``docs/systemrdl.md`` (``docs/examples/demo.rdl``), so
the page's example runs here. QEMU drives BAR0 as a driver would (qtest); the
host side drives ``hw``-writable fields through the model's Python API.
"""

import os
import subprocess
import sys

import pytest

from vfiouser.devices import DeviceLoadError, make_device
from vfiouser.devices.regfile import RegfileDevice
from vfiouser.devices.regs.rdl import RdlError, RdlUnsupported, load_rdl
from vfiouser.qemu import QtestMachine

from .conftest import RecordingSink, served

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "docs", "examples", "demo.rdl")
SLOT = 4
GSI = 20
BAR0 = 0xE000_0000
IDENT, CTRL, IRQ_STATUS, IRQ_ENABLE, EVENTS, SCRATCH = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x20


def bring_up_bar0(vm):
    vm.pci_cfg_write(SLOT, 0x10, BAR0)
    vm.pci_cfg_write(SLOT, 0x04, 0x0006, 2)  # memory decoding, bus master


def check_sw_semantics(vm):
    """What SystemRDL says each field of demo.rdl does, seen from the guest's side."""
    assert vm.pci_cfg_read(SLOT, 0x00) == 0x11FF1234
    assert vm.pci_bar_size(SLOT, 0) == (4096, False)
    bring_up_bar0(vm)
    # RO with a reset value: writes change nothing.
    assert vm.readl(BAR0 + IDENT) == 0x52444C31
    vm.writel(BAR0 + IDENT, 0)
    assert vm.readl(BAR0 + IDENT) == 0x52444C31
    # RW fields with reset values; bits no field covers read 0 and ignore writes.
    assert vm.readl(BAR0 + CTRL) == 5 << 1
    vm.writel(BAR0 + CTRL, 0xFFFF_FFFF)
    assert vm.readl(BAR0 + CTRL) == 0x10F  # enable, mode 7, request (write 1 to set)
    # Write-1-to-set: writing 0 leaves the request set.
    vm.writel(BAR0 + CTRL, 0x0001)
    assert vm.readl(BAR0 + CTRL) == 0x101
    # Write-1-to-clear: error's reset value is 1; writing 0 keeps it, writing 1 clears it.
    assert vm.readl(BAR0 + IRQ_STATUS) == 0b10
    vm.writel(BAR0 + IRQ_STATUS, 0b01)
    assert vm.readl(BAR0 + IRQ_STATUS) == 0b10
    vm.writel(BAR0 + IRQ_STATUS, 0b10)
    assert vm.readl(BAR0 + IRQ_STATUS) == 0
    # Clear-on-read: the reset value 3 reads once.
    assert vm.readl(BAR0 + EVENTS) == 3
    assert vm.readl(BAR0 + EVENTS) == 0
    # An array of registers, and byte-wide accesses reach their own lanes.
    assert [vm.readl(BAR0 + SCRATCH + 4 * i) for i in range(2)] == [0xDEADBEEF, 0xDEADBEEF]
    vm.writeb(BAR0 + SCRATCH + 5, 0x12)
    assert vm.readl(BAR0 + SCRATCH + 4) == 0xDEAD12EF and vm.readl(BAR0 + SCRATCH) == 0xDEADBEEF
    assert vm.readw(BAR0 + SCRATCH + 6) == 0xDEAD
    # Past the registers, inside the BAR: zeros, writes ignored.
    vm.writel(BAR0 + 0x800, 0x1234)
    assert vm.readl(BAR0 + 0x800) == 0


def test_the_command_says_what_is_wrong_with_a_description(sockdir, tmp_path):
    bad = tmp_path / "onewrite.rdl"
    bad.write_text("addrmap a { reg { field { sw=w1; } f[0:0] = 0; } once @0x0; };")
    result = subprocess.run([sys.executable, "-m", "vfiouser", "serve", "regfile", "--socket",
                             os.path.join(sockdir, "r.sock"), "--param", f"rdl={bad}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "a.once.f: sw=w1 (write-once) is not supported" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.qemu
def test_vfiouser_serve_regfile_behaves_as_the_systemrdl_says(qemu_binary, sockdir):
    path = os.path.join(sockdir, "rdl.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vfiouser", "serve", "regfile", "--socket", path,
                             "--param", f"rdl={DEMO}", "--param", "vendor_id=0x1234", "--param", "device_id=0x11ff"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("-device '"), proc.stderr.read() if proc.poll() is not None else line
        device_json = line.strip()[len("-device '"):-1].replace('"socket"', f'"addr":"{SLOT:02x}.0","socket"')
        with QtestMachine([device_json], qemu=qemu_binary) as vm:
            check_sw_semantics(vm)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


@pytest.mark.qemu
def test_a_host_side_hw_write_to_an_interrupt_field_raises_intx(qemu_binary, serve):
    dev = make_device("regfile", {"rdl": DEMO})
    server = serve(dev)
    with QtestMachine([server.qemu_device_json(addr=f"{SLOT:02x}.0")], qemu=qemu_binary) as vm:
        bring_up_bar0(vm)
        vm.irq_intercept_in("ioapic")
        vm.writel(BAR0 + IRQ_STATUS, 0b11)  # the reset value's error bit (not enabled) cleared
        assert vm.readl(BAR0 + IRQ_STATUS) == 0  # (a read waits for the posted write)
        dev.hw_write("irq_status.done", 1)  # the host served a request: done is enabled
        assert vm.wait_irq("raise", GSI), vm.irq_events
        assert vm.readl(BAR0 + IRQ_STATUS) == 0b01
        assert dev.intx_level and dev.config.get_word(0x06) & 0x08  # the status register's interrupt bit
        vm.writel(BAR0 + IRQ_STATUS, 0b01)  # the driver acknowledges: write 1 to clear
        assert vm.wait_irq("lower", GSI), vm.irq_events
        assert not dev.intx_level
        # A disabled source does not interrupt; enabling it while set does.
        dev.hw_write("irq_status.error", 1)
        assert not dev.intx_level
        vm.writel(BAR0 + IRQ_ENABLE, 0b11)
        assert vm.wait_irq("raise", GSI), vm.irq_events
        # The host counts events; the driver's read clears the count.
        dev.hw_write("event_count.events", 7)
        assert vm.readl(BAR0 + EVENTS) == 7 and vm.readl(BAR0 + EVENTS) == 0


def test_hw_access_rules_and_msi():
    dev = RegfileDevice(DEMO)
    sink = RecordingSink()
    port = served(dev, sink)
    with pytest.raises(Exception, match="not writable by hardware"):
        dev.hw_write("ctrl.enable", 1)  # hw=r
    with pytest.raises(Exception, match="not readable by hardware"):
        dev.hw_read("ident.id")  # hw=na
    assert dev.hw_read("ctrl.mode") == 5
    # MSI on: each rising edge of the interrupt OR is one message on vector 0.
    msi = dev.msi.offset
    port.region_write(7, msi + 2, (1).to_bytes(2, "little"))  # MSI enable
    port.region_write(0, IRQ_STATUS, (0b10).to_bytes(4, "little"))
    dev.hw_write("irq_status.done", 1)
    dev.hw_write("irq_status.done", 1)  # still high: no new edge
    assert sink.msi_sent == [0]
    port.region_write(0, IRQ_STATUS, (0b01).to_bytes(4, "little"))
    dev.hw_write("irq_status.done", 1)
    assert sink.msi_sent == [0, 0]
    # MSI off while the line is high: INTx takes the level; on again: one message for it.
    port.region_write(7, msi + 2, (0).to_bytes(2, "little"))
    assert dev.intx_level and sink.levels[-1] is True
    port.region_write(7, msi + 2, (1).to_bytes(2, "little"))
    assert sink.msi_sent == [0, 0, 0] and not dev.intx_level


def test_regfile_errors_are_clear(tmp_path):
    with pytest.raises(DeviceLoadError, match="regfile needs a SystemRDL file: --param rdl=PATH"):
        make_device("regfile", {})
    bad = tmp_path / "bad.rdl"
    bad.write_text("addrmap a { reg { field { sw=rw; } f[0:0] = 0; } r @0x0 }")  # missing ';'
    with pytest.raises(RdlError, match="does not compile"):
        load_rdl(bad)
    counter = tmp_path / "counter.rdl"
    counter.write_text("addrmap a { reg { field { sw=r; hw=r; counter; } c[7:0] = 0; } cnt @0x0; };")
    with pytest.raises(RdlUnsupported, match=r"a\.cnt\.c: property 'counter' is not supported"):
        load_rdl(counter)
    edge = tmp_path / "edge.rdl"
    edge.write_text("addrmap a { reg { field { sw=rw; hw=w; onwrite=woclr; posedge intr; } f[0:0] = 0; } st @0x0; };")
    with pytest.raises(RdlUnsupported, match="posedge interrupt"):
        load_rdl(edge)
    with pytest.raises(RdlError, match="no SystemRDL file"):
        load_rdl(tmp_path / "missing.rdl")


def test_ip_xact_comes_in_through_peakrdls_importer(tmp_path):
    from systemrdl import RDLCompiler
    from peakrdl_ipxact import IPXACTExporter

    compiler = RDLCompiler()
    compiler.compile_file(DEMO)
    xml = tmp_path / "demo.xml"
    IPXACTExporter().export(compiler.elaborate().top, str(xml))  # the demo, as IP-XACT
    regs = load_rdl(xml).instantiate()
    block = "demo_dev."  # the IP-XACT address block is a register file of the top map
    assert regs.hw_read(block + "ctrl.mode") == 5
    assert regs.reg(block + "scratch[1]").offset == 0x24
    regs.write(0, IRQ_STATUS, (0b10).to_bytes(4, "little"))  # write 1 to clear
    buf = bytearray(4)
    regs.read(0, IRQ_STATUS, buf)
    assert buf == bytes(4)
    regs.read(0, EVENTS, buf)
    assert int.from_bytes(buf, "little") == 3
    regs.read(0, EVENTS, buf)  # clear on read
    assert buf == bytes(4)
