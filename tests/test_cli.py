"""The ``vfiouser`` command, run as a real subprocess."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

from vfiouser.client import Client

VFIOUSER = [sys.executable, "-m", "vfiouser"]


def start(args, **kwargs):
    proc = subprocess.Popen(VFIOUSER + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    line = proc.stdout.readline()
    return proc, line


def stop(proc, sig=signal.SIGTERM):
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=10)
    return proc.returncode, err


def test_serve_prints_the_qemu_device_line_and_listens_0600(sockdir):
    path = os.path.join(sockdir, "gpio.sock")
    proc, line = start(["serve", "idio16", "--socket", path])
    try:
        assert line.startswith("-device '") and line.rstrip().endswith("'")
        spec = json.loads(line.strip()[len("-device '") : -1])
        assert spec == {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": path}}
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with Client.connect(path) as c:
            assert c.config_read(0) == 0x0DC8494F
    finally:
        code, err = stop(proc)
    assert code == 0 and not os.path.exists(path), err
    assert "SIGTERM: shutting down" in err


def test_sigint_stops_cleanly(sockdir):
    path = os.path.join(sockdir, "s.sock")
    proc, _ = start(["serve", "idio16", "-s", path])
    code, err = stop(proc, signal.SIGINT)
    assert code == 0 and not os.path.exists(path), err


def test_stale_socket_is_removed(sockdir):
    path = os.path.join(sockdir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # a socket file nobody listens on
    proc, line = start(["serve", "idio16", "--socket", path])
    try:
        assert line.startswith("-device")
        with Client.connect(path) as c:
            c.get_info()
    finally:
        stop(proc)


def test_refuses_a_live_socket_and_a_regular_file(sockdir):
    path = os.path.join(sockdir, "live.sock")
    proc, _ = start(["serve", "idio16", "--socket", path])
    try:
        second = subprocess.run(VFIOUSER + ["serve", "idio16", "--socket", path], capture_output=True, text=True,
                                timeout=20)
        assert second.returncode == 1 and "in use by a running server" in second.stderr
    finally:
        stop(proc)
    regular = os.path.join(sockdir, "file")
    open(regular, "w").close()
    third = subprocess.run(VFIOUSER + ["serve", "idio16", "--socket", regular], capture_output=True, text=True,
                           timeout=20)
    assert third.returncode == 1 and "not a socket" in third.stderr and os.path.exists(regular)


def test_params_and_device_paths(sockdir):
    path = os.path.join(sockdir, "p.sock")
    proc, line = start(["serve", "tests.probe:ProbeDevice", "--socket", path], cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))))
    try:
        with Client.connect(path) as c:
            assert c.config_read(0) == 0xBEEF1234
    finally:
        stop(proc)
    proc, line = start(["serve", "idio16", "--socket", path, "--param", "loopback=on"])
    try:
        with Client.connect(path) as c:
            c.bring_up()
            c.region_read(2, 2, 1)
            c.region_write(2, 0, b"\x81")
            assert c.region_read(2, 1, 1) == b"\x81"  # outputs wired to inputs
    finally:
        stop(proc)


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "nosuch", "--socket", "X"], "unknown device 'nosuch'"),
        (["serve", "idio16", "--socket", "X", "--param", "loopback"], "expected key=value"),
        (["serve", "idio16", "--socket", "X", "--param", "colour=red"], "no parameter 'colour'"),
        (["serve", "idio16", "--socket", "X", "--poll-us", "-5"], "-5 is outside 0..1000000"),
        (["serve", "idio16", "--socket", "X", "--poll-us", "soon"], "'soon' is not a number"),
    ],
)
def test_bad_arguments(args, message):
    result = subprocess.run(VFIOUSER + args, capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and message in result.stderr


def test_poll_us_server_answers(sockdir):
    path = os.path.join(sockdir, "p.sock")
    proc, _ = start(["serve", "idio16", "--socket", path, "--poll-us", "50"])
    try:
        with Client.connect(path) as c:
            c.bring_up()
            c.region_write(2, 0, b"\x5a")
            assert c.region_read(2, 0, 1) == b"\x5a"
    finally:
        stop(proc)


def test_very_verbose_logs_raw_decoded_messages(sockdir):
    path = os.path.join(sockdir, "v.sock")
    proc, _ = start(["serve", "idio16", "--socket", path, "-vv"])
    try:
        with Client.connect(path) as c:
            c.bring_up()
            c.region_write(2, 0, b"\x01")
            msg_id = c.next_id() - 1
    finally:
        _, err = stop(proc)
    assert f"<<< REGION_WRITE #{msg_id} command offset=0 region=2 count=1 data=01(1)" in err
    assert f">>> REGION_WRITE #{msg_id} reply offset=0 region=2 count=1" in err


def test_trace_file(sockdir):
    from vfiouser.trace import load

    path, trace = os.path.join(sockdir, "t.sock"), os.path.join(sockdir, "trace.jsonl")
    proc, _ = start(["serve", "idio16", "--socket", path, "--trace", trace])
    try:
        with Client.connect(path) as c:
            c.get_info()
    finally:
        stop(proc)
    messages = list(load(trace))
    assert [(m.dir, m.header[1]) for m in messages] == [("in", 1), ("out", 1), ("in", 4), ("out", 4)]


def test_devices_lists_builtins():
    result = subprocess.run(VFIOUSER + ["devices"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and "idio16" in result.stdout and "494f:0dc8" in result.stdout


def test_version():
    from vfiouser import __version__

    result = subprocess.run(VFIOUSER + ["--version"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and result.stdout.strip() == f"vfiouser {__version__}"


def test_devices_lists_each_parameter_with_type_default_and_help():
    result = subprocess.run(VFIOUSER + ["devices"], capture_output=True, text=True, timeout=20)
    lines = result.stdout.splitlines()
    edu = lines.index(next(line for line in lines if line.startswith("edu ")))
    assert "1234:11e8" in lines[edu]
    assert lines[edu + 1].split() == ["--param", "dma_mask:", "int", "=", "0xfffffff", "RAM-side", "address", "mask"]
    assert "--param dma_delay_ms: int = 100" in lines[edu + 2]
    assert "--param loopback: bool = off" in result.stdout and "wire outputs 0-15 to inputs 0-15" in result.stdout


LATCH = '''
from vfiouser.devices.pci import IoBar, PciDevice

class Latch(PciDevice):
    """A latch whose reset value is a parameter."""
    vendor_id, device_id = 0x1234, 0x0042

    def __init__(self, start=7, wide=False, label="latch"):
        """:param start: the value the latch reads after reset"""
        super().__init__()
        self.value, self.wide, self.label = start, wide, label
        self.add_bar(0, IoBar(16)).map(self, 0, 2)

    def pio_read(self, base, offset, data):
        data[0] = self.value + 100 * (type(self.wide) is bool and self.wide) if offset == 0 else len(self.label)

    def pio_write(self, base, offset, data):
        self.value = data[0]
'''


def test_a_model_served_from_its_file_with_parameters_typed_by_their_defaults(tmp_path, sockdir):
    """``path.py:Class`` works from anywhere, and un-annotated parameters take their default's type."""
    (tmp_path / "latch.py").write_text(LATCH)
    listed = subprocess.run(VFIOUSER + ["devices", "./latch.py:Latch"], capture_output=True, text=True, timeout=20,
                            cwd=tmp_path)
    assert "--param start: int = 7" in listed.stdout and "the value the latch reads after reset" in listed.stdout
    assert "--param wide: bool = off" in listed.stdout and "--param label: str = latch" in listed.stdout
    path = os.path.join(sockdir, "latch.sock")
    proc, line = start(["serve", str(tmp_path / "latch.py") + ":Latch", "-s", path, "-p", "start=0x11",
                        "-p", "wide=on", "-p", "label=abc"], cwd="/")
    try:
        assert line.startswith("-device"), proc.stderr.read()
        with Client.connect(path) as c:
            assert c.config_read(0) == 0x00421234
            c.bring_up()
            assert c.region_read(0, 0, 1) == bytes([0x11 + 100])  # an int and a bool, not strings
            assert c.region_read(0, 1, 1) == b"\x03"
    finally:
        stop(proc)


@pytest.mark.parametrize(
    "spec, source, message",
    [
        ("./missing.py:Latch", None, "./missing.py: no such file (give path/to/file.py:Class, or package.module:Class)"),
        ("./latch.py:Lath", LATCH, "./latch.py has no 'Lath'; device classes there: Latch"),
        ("./latch.py:Latch", "import os\nraise RuntimeError('no board attached')\n",
         "importing ./latch.py failed: RuntimeError: no board attached (./latch.py:2)"),
        ("./latch.py:Latch", "def broken(:\n", "importing ./latch.py failed: SyntaxError: invalid syntax"),
        ("latchmod:Latch", None, "cannot import 'latchmod': no module 'latchmod' on the path; run vfiouser from "
                                 "the folder that holds latchmod.py (or latchmod/), or give the file: "
                                 "path/to/latchmod.py:Latch"),
        ("./latch.py:Latch --param start=seven", LATCH, "parameter start: 'seven' is not an integer"),
        ("./latch.py:Latch --param wide=maybe", LATCH, "parameter wide: 'maybe' is not on/off (use on, off"),
        ("./latch.py:Latch --param size=1", LATCH, "has no parameter 'size' (its parameters: start, wide, label;"),
    ],
)
def test_a_model_that_cannot_be_loaded_is_one_line_that_says_what_to_do(tmp_path, spec, source, message):
    if source is not None:
        (tmp_path / "latch.py").write_text(source)
    args = spec.split()
    result = subprocess.run(VFIOUSER + ["serve", args[0], "-s", str(tmp_path / "s.sock"), *args[1:]],
                            capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_required_parameter_left_out_is_named(tmp_path):
    (tmp_path / "need.py").write_text(LATCH.replace("start=7", "start"))
    result = subprocess.run(VFIOUSER + ["serve", "need.py:Latch", "-s", str(tmp_path / "s.sock")],
                            capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert result.returncode == 2 and "need.py:Latch needs --param start=VALUE" in result.stderr


def test_paths_that_cannot_work_are_refused_with_the_fix(tmp_path):
    def serve(*args):
        return subprocess.run(VFIOUSER + ["serve", "idio16", *args], capture_output=True, text=True, timeout=20)

    long_path = "/tmp/" + "s" * 110 + ".sock"
    result = serve("-s", long_path)
    assert result.returncode == 1 and f"is {len(long_path)} bytes and AF_UNIX allows at most 107" in result.stderr
    result = serve("-s", str(tmp_path / "no" / "such.sock"))
    assert result.returncode == 1 and f"its folder {tmp_path / 'no'} does not exist: create it" in result.stderr
    result = serve("-s", str(tmp_path / "s.sock"), "--trace", str(tmp_path / "none" / "t.jsonl"))
    assert result.returncode == 2 and f"--trace {tmp_path / 'none' / 't.jsonl'}: the folder {tmp_path / 'none'} " \
                                      f"does not exist; create it (mkdir -p {tmp_path / 'none'})" in result.stderr
    assert not os.path.exists(tmp_path / "s.sock")


def test_the_parameters_section_of_writing_a_device_shows_what_devices_prints():
    page = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                             "writing-a-device.md")).read()
    shown = page.split("$ vfiouser devices idio16\n", 1)[1].split("$ vfiouser serve", 1)[0]
    result = subprocess.run(VFIOUSER + ["devices", "idio16"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and result.stdout == shown
