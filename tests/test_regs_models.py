"""The built-in models on the register layer: their datasheet tables are their declarations,
and logs name the registers an access reaches."""

import logging
import re
import os

import pytest

from vfiouser.client import Client
from vfiouser.devices import edu, idio16, serial
from vfiouser.devices.edu import Edu
from vfiouser.devices.serial import PciSerial
from vfiouser.devices.virtio import pci as virtio_pci
from vfiouser.server import serve_in_thread

from .conftest import served


@pytest.mark.parametrize("module, regmap", [
    (idio16, idio16.IDIO16_REGS),
    (edu, edu.EDU_REGS),
    (serial, serial.SERIAL_REGS),
    (virtio_pci, virtio_pci.COMMON_CFG_REGS),
], ids=["idio16", "edu", "16550A", "virtio-common"])
def test_the_docstring_table_is_the_declaration(module, regmap):
    table = regmap.markdown()
    assert table in module.__doc__, (
        f"{module.__name__}'s register table differs from its declaration; paste this into its docstring:\n{table}")


def test_register_names_follow_banks_and_directions():
    dev = PciSerial()
    port = served(dev)
    assert port.describe_access(0, 0, 1) == "16550A.rbr"
    assert port.describe_access(0, 0, 1, write=True) == "16550A.thr"
    assert port.describe_access(0, 2, 1, write=True) == "16550A.fcr (fe, rfr, xfr, dma, trigger)"
    port.region_write(0, 3, b"\x80")  # DLAB
    assert port.describe_access(0, 0, 2) == "16550A.dll, dlm"
    assert port.describe_access(7, 0, 4) == "vendor_id, device_id"  # config space: the framework names it
    dev.close()


def test_verbose_log_names_edu_registers(sockdir, caplog):
    with caplog.at_level(logging.DEBUG):
        with serve_in_thread(Edu(), os.path.join(sockdir, "edu.sock")) as server:
            with Client.connect(server.path) as c:
                c.bring_up()
                c.region_write(0, 0x20, (0x80).to_bytes(4, "little"))
                assert c.region_read(0, 0x20, 4) == (0x80).to_bytes(4, "little")
                c.region_read(0, 0x80, 4)
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.search(r"write BAR0 +\+0x020 \[4\] edu\.status \(computing, irq_fact\) <- 0x00000080", line)
               for line in lines), lines
    assert any(re.search(r"read  BAR0 +\+0x080 \[4\] edu\.dma_src -> ", line) for line in lines), lines
