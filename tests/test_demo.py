"""The README's demo (scripts/demo.py) works: a guest boots with the three devices and drives them."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.guest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_to_the_end(guest_assets, qemu_binary):
    env = dict(os.environ, QEMU=qemu_binary)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "driver pci-idio-16" in out and "driver serial" in out and "driver virtio-pci" in out, out
    assert out.count("gpio| outputs ") == 16, out  # the light walked across all 16 outputs
    assert "inputs read by the guest: 0xa5c3" in out, out
    assert "the entropy device handed out" in out and "handed out 0 bytes" not in out, out
