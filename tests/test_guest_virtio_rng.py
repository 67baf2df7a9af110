"""A real Linux guest uses the Python virtio entropy device: virtio_pci binds, virtio_rng feeds /dev/hwrng.

The model's stream is reproducible (seeded), so the test knows every byte it
produced: what the guest reads from /dev/hwrng must be exactly a run of that
stream (the kernel takes a few bytes at registration, so the run need not start
at 0). Unloading and reloading virtio_rng resets the device through its status
register and sets the queue up again. Guest RAM shared (in-place DMA) and not
shared (DMA_READ/DMA_WRITE messages) are both exercised.
"""

import re

import pytest

from vfiouser.devices.virtio import VirtioRng, entropy_stream

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

SEED = 1024
SCRIPT = r"""
set -e
basename "$(readlink /sys/bus/pci/devices/0000:00:04.0/driver)"
basename "$(readlink /sys/bus/virtio/devices/virtio0/driver)"
echo "rng $(cat /sys/class/misc/hw_random/rng_current)"
echo "msix vectors $(ls /sys/bus/pci/devices/0000:00:04.0/msi_irqs | wc -w)"
dump() { dd if=/dev/hwrng bs=512 count=8 2>/dev/null | od -An -tx1 -v | tr -d ' \n'; echo; }
echo "READ1 $(dump)"
rmmod virtio_rng
insmod /lib/modules/virtio_rng.ko
echo "READ2 $(dump)"
echo "irqs $(awk '$NF == "virtio0-input" {print $2}' /proc/interrupts)"
"""


def runs_in_stream(data: bytes, produced: int) -> int:
    """Where ``data`` sits in the model's stream (``-1`` if it is not a run of it)."""
    return entropy_stream(SEED, produced).find(data)


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd-ram", "default-ram"])
def test_virtio_rng_feeds_dev_hwrng(linux_guest, memfd, backend):
    dev = VirtioRng(seed=SEED)
    g = linux_guest(SCRIPT, devices=[dev], modules=["virtio-rng"], memfd=memfd, backend=backend,
                    append="rng_core.default_quality=0")  # no kernel thread competing for the bytes
    assert g.expect(r"^virtio-pci$") and g.expect(r"^virtio_rng$")
    assert g.expect(r"^rng virtio_rng\.0$")
    assert int(g.expect(r"msix vectors (\d+)").group(1)) == 2  # config + the queue: MSI-X in use
    first = bytes.fromhex(g.expect(r"READ1 ([0-9a-f]+)").group(1))
    second = bytes.fromhex(g.expect(r"READ2 ([0-9a-f]+)").group(1))
    irqs = int(g.expect(r"irqs (\d+)").group(1))
    result = g.wait(60)
    assert result.exit_code == 0
    assert len(first) == len(second) == 4096
    at1, at2 = runs_in_stream(first, dev.produced), runs_in_stream(second, dev.produced)
    assert at1 >= 0 and at2 >= at1 + 4096, (at1, at2, dev.produced)
    assert irqs > 0
    assert not re.search(r"virtio.*(error|fail)", result.console, re.I)
