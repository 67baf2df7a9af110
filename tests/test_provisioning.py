"""The provisioning scripts take the Debian archive from the machine, never from the repository.

They ship inside the package (vfiouser/testing/provision/), so an installed vfiouser can fetch
QEMU and the guest (``python -m vfiouser.testing.fetch``, ``vfiouser guest``); scripts/get-qemu
and scripts/get-guest run them from a checkout."""

import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIB = ROOT / "vfiouser" / "testing" / "provision" / "private-apt.sh"


def mirror(etc: pathlib.Path, env_mirror: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VFIOUSER_DEBIAN_MIRROR"}
    env["VFIOUSER_APT_ETC"] = str(etc)
    if env_mirror is not None:
        env["VFIOUSER_DEBIAN_MIRROR"] = env_mirror
    return subprocess.run(["bash", "-c", f". {LIB}; debian_mirror"], env=env, capture_output=True, text=True)


@pytest.fixture
def etc(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    return tmp_path


def test_deb822_sources_give_the_main_archive_not_security(etc):
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: trixie-security\nComponents: main\n\n"
        "Types: deb deb-src\n# a comment line\nURIs: http://mirror.example/debian/ http://other.example/debian\n"
        "Suites: trixie trixie-updates\nComponents: main\n")
    out = mirror(etc)
    assert out.returncode == 0 and out.stdout.strip() == "http://mirror.example/debian"


def test_one_line_sources_with_options(etc):
    (etc / "sources.list").write_text("# deb http://commented.example/debian trixie main\n"
                                      "deb-src http://src.example/debian trixie main\n"
                                      "deb [arch=amd64 signed-by=/k.gpg] https://m.example/debian bookworm main\n")
    out = mirror(etc)
    assert out.returncode == 0 and out.stdout.strip() == "https://m.example/debian"


def test_the_environment_wins(etc):
    (etc / "sources.list").write_text("deb http://m.example/debian trixie main\n")
    assert mirror(etc, "http://env.example/debian/").stdout.strip() == "http://env.example/debian"


def test_no_archive_is_a_clear_error(etc):
    (etc / "sources.list").write_text("deb https://packages.example/apt stable main\n")  # not a Debian archive
    out = mirror(etc)
    assert out.returncode != 0 and "VFIOUSER_DEBIAN_MIRROR" in out.stderr and out.stdout == ""


def test_no_mirror_host_is_written_in_the_repository():
    tracked = subprocess.run(["git", "ls-files", "scripts", "vfiouser/testing/provision"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert "vfiouser/testing/provision/get-guest" in tracked
    pattern = re.compile(r"https?://[^ \"']+/debian([/ \"']|$)", re.M)
    hits = [path for path in tracked if pattern.search((ROOT / path).read_text(errors="replace"))]
    assert hits == []
