"""A real Linux guest writes the Python ivshmem-plain's BAR2 through sysfs; the host file holds the data.

No Linux driver binds to ivshmem-plain (uio_ivshmem is out of tree), so the
guest does what user-space programs do: enables the device and maps
``/sys/bus/pci/devices/.../resource2`` with ``shmpoke`` (tests/guest/shmpoke.c,
built here without a C library). BAR2 is the host file QEMU mapped into the
guest: what the guest stores appears in the file and what the host writes to
the file the guest reads, without a single message reaching the server for it.
"""

import os
import shutil
import subprocess

import pytest

import vfiouser.bench
from vfiouser.devices.ivshmem import Ivshmem

from .conftest import real_parts_required

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = r"""
set -e
D=/sys/bus/pci/devices/0000:00:04.0
echo "id $(cat $D/vendor):$(cat $D/device) class $(cat $D/class)"
echo 1 > $D/enable
R=$D/resource2
echo "bar2 $(stat -c %s $R) bytes"
echo "HOST SAYS: $(shmpoke $R read 0x800 19)"
shmpoke $R write 0x100 "written by the guest"
shmpoke $R fill 0x10000 0x10000 0x5a
echo "READBACK: $(shmpoke $R read 0x100 20)"
echo GUEST DONE
read _
echo "HOST AGAIN: $(shmpoke $R read 0x900 13)"
"""


@pytest.fixture(scope="module")
def shmpoke(tmp_path_factory):
    """tests/guest/shmpoke.c, built static and freestanding for the guest."""
    gcc = shutil.which("gcc")
    if gcc is None:
        if real_parts_required():
            pytest.fail("gcc is needed to build the guest's shmpoke tool", pytrace=False)
        pytest.skip("gcc is needed to build the guest's shmpoke tool")
    out = tmp_path_factory.mktemp("shmpoke") / "shmpoke"
    subprocess.run([gcc, "-Os", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin", "-fno-stack-protector",
                    "-fno-pie", "-no-pie", "-I", os.path.dirname(vfiouser.bench.__file__),  # freestanding.h
                    "-o", str(out), os.path.join(HERE, "guest", "shmpoke.c")], check=True)
    return out  # a host path: linux_guest copies it into the guest


def test_guest_writes_bar2_and_the_host_file_holds_it(linux_guest, tmp_path, shmpoke, backend):
    shm = tmp_path / "ivshmem"
    with open(shm, "wb") as f:
        f.truncate(1 << 20)
        f.seek(0x800)
        f.write(b"hello from the host")
    dev = Ivshmem(file=str(shm))
    (shared_io,) = [h for _, _, h in dev.bar2.mappings]
    trapped = []
    shared_io.read = lambda base, offset, data: trapped.append(("read", offset))
    shared_io.write = lambda base, offset, data: trapped.append(("write", offset))
    g = linux_guest(SCRIPT, devices=[dev], files={"/bin/shmpoke": shmpoke}, backend=backend)
    assert g.expect(r"^id 0x1af4:0x1110 class 0x050000$")
    assert g.expect(r"^bar2 1048576 bytes$")
    assert g.expect(r"^HOST SAYS: hello from the host$")
    assert g.expect(r"^READBACK: written by the guest$")
    g.expect(r"^GUEST DONE$")
    data = shm.read_bytes()
    assert data[0x100:0x114] == b"written by the guest"
    assert data[0x10000:0x20000] == b"\x5a" * 0x10000
    assert data[0x20000:0x20010] == bytes(16)
    with open(shm, "r+b") as f:  # any host process can write it
        os.pwrite(f.fileno(), b"second round!", 0x900)
    g.send("\n")
    assert g.expect(r"^HOST AGAIN: second round!$")
    result = g.wait(60)
    assert result.exit_code == 0
    assert trapped == [], "guest accesses to BAR2 reached the server; they must go to the mapped file"
