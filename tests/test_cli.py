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


def test_verbose_logs_decoded_messages(sockdir):
    path = os.path.join(sockdir, "v.sock")
    proc, _ = start(["serve", "idio16", "--socket", path, "-v"])
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
