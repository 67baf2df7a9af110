"""What gets installed, and under which names.

Everything installs under ``vfiouser`` (the repository's ``devices/`` and
``iomgr/`` folders become ``vfiouser.devices`` and ``vfiouser.iomgr``), so a
user's project with its own ``devices`` or ``iomgr`` package works beside it;
the device framework never loads the protocol engine; and every docstring
example runs, under the module's installed name.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.machinery
import inspect
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest

import vfiouser

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: repository folder -> installed package name
FOLDERS = {"vfiouser": "vfiouser", "devices": "vfiouser.devices", "iomgr": "vfiouser.iomgr"}


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(vfiouser.__path__, "vfiouser."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


def test_every_package_folder_is_installed_under_vfiouser():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    assert found == set(config["packages"])
    assert mapping == {"vfiouser.devices": "devices", "vfiouser.iomgr": "iomgr"}


@pytest.mark.parametrize("folder", ["devices", "iomgr"])
def test_lower_layers_never_import_the_protocol_engine(folder):
    """``devices/`` imports only itself and ``vfiouser.iomgr``; ``iomgr/`` only itself."""
    allowed = {"devices": ("vfiouser.devices", "vfiouser.iomgr"), "iomgr": ("vfiouser.iomgr",)}[folder]
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in ("devices", "iomgr"), f"{path}: imports {name!r} by its repository folder name"
                if top == "vfiouser":
                    assert name.startswith(allowed), f"{path}: imports {name} (only {allowed} allowed)"


def test_a_device_model_loads_without_the_protocol_engine():
    code = ("import sys, vfiouser.devices.edu, vfiouser.devices.virtio.rng; "
            "print(sorted(m for m in sys.modules if m.startswith('vfiouser.') "
            "and not m.startswith(('vfiouser.devices', 'vfiouser.iomgr'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", _modules())
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    folder_import = re.compile(r"^\s*>>> (from|import) (devices|iomgr)\b", re.M)
    compiled = (mod.__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    source = mod.__doc__ or "" if compiled else inspect.getsource(mod)  # a C extension has its docstring only
    assert mod.__doc__, f"{module} has no docstring"
    assert not folder_import.search(source), f"{module}: an example imports by folder name"
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(mod, module):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module} failed (output above)"


def test_a_project_with_its_own_devices_and_iomgr_packages(tmp_path):
    """A user's project that has ``devices/`` and ``iomgr/`` packages of its own (common names)
    imports both them and vfiouser, and ``vfiouser devices`` / ``vfiouser serve mod:Class`` work
    from its root."""
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "__init__.py").write_text("OURS = 'the project devices'\n")
    (tmp_path / "iomgr").mkdir()
    (tmp_path / "iomgr" / "__init__.py").write_text("OURS = 'the project iomgr'\n")
    (tmp_path / "latch.py").write_text(textwrap.dedent("""
        from vfiouser.devices.pci import INTA, IoBar, PciDevice
        import devices

        class Latch(PciDevice):
            vendor_id, device_id = 0x1234, 0x0001
            interrupt_pin = INTA

            def __init__(self):
                super().__init__()
                self.value = 0
                self.add_bar(0, IoBar(16)).map(self, 0, 1)

            def pio_read(self, base, offset, data):
                data[0] = self.value

            def pio_write(self, base, offset, data):
                self.value = data[0]
        """))
    (tmp_path / "test_mine.py").write_text(textwrap.dedent("""
        import devices, iomgr
        import vfiouser.devices, vfiouser.iomgr
        from vfiouser.devices.pci import PciDevice
        from latch import Latch

        def test_both_are_there():
            assert devices.OURS == 'the project devices' and iomgr.OURS == 'the project iomgr'
            assert 'edu' in vfiouser.devices.BUILTIN_DEVICES
            assert isinstance(Latch(), PciDevice)
        """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    vfiouser_cmd = [os.path.join(os.path.dirname(sys.executable), "vfiouser")]  # the installed command
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    listed = subprocess.run([*vfiouser_cmd, "devices"], **run)
    assert listed.returncode == 0, listed.stderr
    assert "edu" in listed.stdout and "idio16" in listed.stdout

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mine.py"], **run)
    assert tests.returncode == 0, tests.stdout + tests.stderr

    sock = tmp_path / "latch.sock"
    server = subprocess.Popen([*vfiouser_cmd, "serve", "latch:Latch", "--socket", str(sock)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("-device "), server.stderr.read() if server.poll() is not None else line
        from vfiouser.client import Client

        with Client.connect(str(sock)) as client:
            client.bring_up()
            client.region_write(0, 0, b"\x5a")
            assert client.region_read(0, 0, 1) == b"\x5a"
    finally:
        server.terminate()
        server.wait(10)
        server.stdout.close()
        server.stderr.close()
