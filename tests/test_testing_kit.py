"""The testing kit as a device author meets it: the installed wheel's plugin, the docs' examples,
``vfiouser guest``, and the handles' edges (errors that say what to do).

The clean-install test builds the wheel, installs it into a fresh virtual environment outside
the repository and runs docs/testing.md's test files there, with only the documented API: edu
and the page's own model, with INTx, MSI, MSI-X and DMA, in-process, under qtest and in a guest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from vfiouser.devices.edu import Edu
from vfiouser.devices.idio16 import Idio16
from vfiouser.errors import UsageError
from vfiouser.testing import GuestMemory, InterruptNotRaised, ServedDevice
from vfiouser.testing.memory import GuestMemoryError
from vfiouser.testing.qtest import intx_gsi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "testing.md")
_MARKED = re.compile(r"^<!-- kit-(file|test|command):? ?(.*?) ?-->\n```[a-z]*\n(.*?)^```$", re.M | re.S)


def page_blocks() -> list[tuple[str, str, str]]:
    """``(kind, name, body)`` of every block docs/testing.md marks for the kit's tests."""
    with open(PAGE) as f:
        return _MARKED.findall(f.read())


def write_page_files(directory) -> dict[str, str]:
    """The page's files (blocks with the same name concatenated in order) written to ``directory``."""
    files: dict[str, str] = {}
    for kind, name, body in page_blocks():
        if kind in ("file", "test"):
            files[name] = files.get(name, "") + body
    for name, body in files.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(body)
    return files


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(cmd, **kwargs)


# -- the installed wheel, outside the repository ------------------------------------------------


def _has_setuptools() -> bool:
    """Whether this interpreter can build the wheel itself: the setuptools pyproject.toml asks
    for (>= 64), and wheel."""
    try:
        import setuptools
        import wheel  # noqa: F401
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 64


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory):
    """The built wheel installed (with pytest) into a new virtual environment; its python."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    listed = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True).stdout.split("\n")
    for rel in filter(None, listed):
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), src / rel)
    in_place = ["--no-build-isolation"] if _has_setuptools() else []  # saves installing setuptools
    built = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *in_place, "-w", str(base / "dist"), str(src)])
    assert built.returncode == 0, built.stderr
    (wheel,) = (base / "dist").glob("vfiouser-*.whl")
    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # bootstrapping pip is slow
    python = str(venv / "bin" / "python")
    installed = run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--disable-pip-version-check",
                     str(wheel), "pytest"])
    assert installed.returncode == 0, installed.stderr
    return python


def test_the_wheel_ships_the_plugin_and_its_fixtures(clean_venv, tmp_path):
    found = run([clean_venv, "-c", "import vfiouser, vfiouser.testing.fetch as f; print(vfiouser.__file__); "
                 "print(f.provision_script('get-qemu'), f.provision_script('get-guest'))"], cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    module, scripts = found.stdout.splitlines()
    assert module.startswith(os.path.dirname(os.path.dirname(clean_venv)))  # the venv's, not the checkout's
    assert all(os.path.isfile(p) for p in scripts.split())  # the provisioning scripts ship too
    listed = run([clean_venv, "-m", "pytest", "--fixtures", "-v", "-p", "no:cacheprovider"], cwd=tmp_path)
    text = listed.stdout
    for fixture, doc in (("vfiouser_device", "Serve a device model in-process"),
                         ("qemu_qtest", "real QEMU under the qtest accelerator"),
                         ("linux_guest", "Boot the Debian guest")):
        assert re.search(rf"^{fixture} -- .*vfiouser/testing/plugin\.py", text, re.M), text
        assert doc in text


@pytest.mark.qemu
@pytest.mark.guest
def test_the_docs_test_files_pass_in_a_clean_install(clean_venv, tmp_path, qemu_binary, guest_assets):
    files = write_page_files(tmp_path)
    tests = sorted(name for name in files if name.startswith("test_"))
    assert tests == ["test_edu.py", "test_in_a_guest.py", "test_mydevice.py", "test_through_qemu.py"]
    env = dict(os.environ, QEMU=qemu_binary, VFIOUSER_GUEST=os.path.dirname(guest_assets.kernel),
               VFIOUSER_REQUIRE_QEMU="1")
    result = run([clean_venv, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *tests], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert re.match(r"^9 passed in ", summary), summary  # nothing skipped, nothing deselected


# -- vfiouser guest ---------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.guest
def test_vfiouser_guest_runs_the_documented_command_and_exits_with_the_script_status(
        tmp_path, qemu_binary, guest_assets):
    write_page_files(tmp_path)
    (tmp_path / "notes.txt").write_text("notes from the host\n")
    (command,) = [body.strip() for kind, _, body in page_blocks() if kind == "command"]
    argv = command.split()
    assert argv[:2] == ["vfiouser", "guest"]
    vfiouser = os.path.join(os.path.dirname(sys.executable), "vfiouser")
    env = dict(os.environ, QEMU=qemu_binary, VFIOUSER_GUEST=os.path.dirname(guest_assets.kernel))
    result = run([vfiouser, *argv[1:]], cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "vendor 0x494f bound to pci-idio-16" in result.stdout.splitlines()
    assert "notes from the host" in result.stdout.splitlines()
    assert "Idio16 at 00:04.0" in result.stderr and guest_assets.version in result.stderr


def test_vfiouser_guest_names_a_bad_device_or_file_before_booting(tmp_path):
    vfiouser = os.path.join(os.path.dirname(sys.executable), "vfiouser")
    bad = run([vfiouser, "guest", "no-such-device", "--run", "x.sh"], cwd=tmp_path)
    assert bad.returncode == 2 and "unknown device 'no-such-device'" in bad.stderr
    missing = run([vfiouser, "guest", "idio16", "--file", "absent.bin"], cwd=tmp_path)
    assert missing.returncode == 2 and "absent.bin is not a file" in missing.stderr


# -- the in-process handle ----------------------------------------------------------------------


def test_a_device_by_name_with_parameters_on_both_backends(vfiouser_device, backend):
    dev = vfiouser_device("edu", backend=backend, dma_delay_ms=0)
    assert isinstance(dev.model, Edu) and dev.model.dma_delay == 0
    assert dev.config.read(0x00, 4) == 0x11E81234
    assert dev.bar(0).address is not None and dev.bar(0).read(0x00, 4) == 0x010000ED


def test_reset_brings_the_device_back_with_intx(vfiouser_device):
    dev = vfiouser_device(Edu, dma_delay_ms=0)
    dev.enable_msi()
    dev.bar(0).write(0x60, 4, 1)
    dev.irqs.wait("msi")
    dev.reset()
    assert dev.irqs.mode == "intx" and not dev.model.msi_enabled()
    dev.bar(0).write(0x60, 4, 1)  # MSI is off after the reset: the interrupt comes as INTx
    dev.irqs.wait("intx")


def test_the_handles_refuse_what_cannot_be_done(vfiouser_device):
    dev = vfiouser_device(Idio16)
    with pytest.raises(UsageError, match=r"no MSI-X capability \(add it with add_msix\(\)\)"):
        dev.enable_msix()
    with pytest.raises(UsageError, match="1, 2, 4 or 8 bytes"):
        dev.bar(2).read(0, 3)
    with pytest.raises(UsageError, match="use 0-5"):
        dev.bar(7)
    with pytest.raises(UsageError, match="pass its class instead"):
        vfiouser_device(Idio16(), loopback=True)
    with pytest.raises(UsageError, match="dma='shared'"):
        ServedDevice(Idio16, dma="shared")
    with pytest.raises(GuestMemoryError, match=r"outside guest RAM \[0x0, 0x1000000\)"):
        dev.memory.write((16 << 20) - 2, b"abcd")
    with pytest.raises(UsageError, match="use one of intx, msi, msix"):
        dev.irqs.wait("nmi")
    with pytest.raises(InterruptNotRaised, match="msi vector 0 has no eventfd"):
        dev.irqs.wait("msi")


def test_dma_outside_guest_ram_fails_the_transfer_not_the_test(vfiouser_device):
    """edu's DMA from beyond the 16 MiB of RAM: message mode answers EFAULT, the model's bus reads
    zeros, and the engine still finishes and interrupts."""
    dev = vfiouser_device(Edu, dma="message", dma_delay_ms=0)
    regs = dev.bar(0)
    regs.write(0x80, 8, 0x0100_0000)  # just past the end of guest RAM
    regs.write(0x88, 8, 0x40000)
    regs.write(0x90, 8, 16)
    regs.write(0x98, 4, 1 | 4)
    dev.irqs.wait("intx")
    assert regs.read(0x98, 4) & 1 == 0


def test_guest_memory_is_whole_pages():
    with pytest.raises(GuestMemoryError, match="whole pages"):
        GuestMemory(1000)


def test_q35_interrupt_routing_is_named_not_guessed():
    assert [intx_gsi(slot, 1) for slot in (4, 5, 6, 7, 8)] == [20, 21, 22, 23, 20]
    with pytest.raises(UsageError, match="slots 1-24"):
        intx_gsi(31, 1)


def test_without_qemu_the_fixtures_skip_saying_why_and_fail_when_qemu_is_required(tmp_path):
    (tmp_path / "test_needs_qemu.py").write_text(
        "def test_qtest(qemu_qtest):\n    qemu_qtest('idio16')\n\n"
        "def test_guest(linux_guest):\n    linux_guest('true')\n\n"
        "def test_in_process(vfiouser_device):\n    assert vfiouser_device('idio16').bar(2).read(0, 1) == 0\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "VFIOUSER_REQUIRE_QEMU")}
    env["QEMU"] = str(tmp_path / "no-qemu-here")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_needs_qemu.py"]
    lenient = run(cmd, cwd=tmp_path, env=env)
    assert lenient.returncode == 0, lenient.stdout
    assert "1 passed, 2 skipped" in lenient.stdout
    assert "no-qemu-here does not run or has no vfio-user-pci device" in lenient.stdout
    assert "set VFIOUSER_REQUIRE_QEMU=1 to make this an error" in lenient.stdout
    strict = run(cmd, cwd=tmp_path, env=dict(env, CI="true"))
    assert strict.returncode == 1 and "2 failed, 1 passed" in strict.stdout, strict.stdout
    assert "a QEMU with vfio-user-pci is required ($VFIOUSER_REQUIRE_QEMU=1 or $CI)" in strict.stdout
