"""The two protocol engines side by side: where they answer alike, and where (and how) they differ.

Each case sends the same message to the same model served by each backend and
records the outcome: ``ok``, an errno name, ``no reply`` or a short note. The
expected outcomes are pinned here per backend, and ``docs/backends.md`` shows
the same table (a test checks that the page and this list agree), so the
differences a user meets on the wire are documented where they are tested.
Whatever the outcome, the session must go on answering afterwards.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from vfiouser.client import Client
from vfiouser.errors import ErrorReply
from vfiouser.protocol import REGION_ACCESS, Command, IrqIndex, IrqSetFlags, Layout, Version

from .conftest import eventfd
from .probe import ProbeDevice

DOC = Path(__file__).resolve().parent.parent / "docs" / "backends.md"
F = IrqSetFlags


def outcome(c: Client, cmd: int, payload: bytes = b"", *, fds=()) -> str:
    try:
        c.request(cmd, payload, fds=fds)
    except ErrorReply as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"


def _dma_map(addr: int, size: int, flags: int = 3) -> bytes:
    return Layout.DMA_MAP.pack(32, flags, 0, addr, size)


def _dma_unmap(addr: int, size: int, flags: int = 0) -> bytes:
    return Layout.DMA_UNMAP.pack(24, flags, addr, size)


def _write_multi(c: Client) -> str:
    entry = Layout.WRITE_MULTI_ENTRY.pack(0x100, 0, 1, b"\x07".ljust(8, b"\0"))
    return outcome(c, Command.REGION_WRITE_MULTI, Layout.WRITE_MULTI_COUNT.pack(1) + entry)


def _overlapping_map(c: Client) -> str:
    c.dma_map(0x10000, 0x10000)
    return outcome(c, Command.DMA_MAP, _dma_map(0x18000, 0x10000))


def _unmap_part(c: Client) -> str:
    c.dma_map(0x10000, 0x10000)
    return outcome(c, Command.DMA_UNMAP, _dma_unmap(0x10000, 0x8000))


def _version_caps(c: Client) -> str:
    return "write_multiple" if c.server_caps.get("write_multiple") else "no write_multiple"


def _msi_irq_info(c: Client) -> str:
    flags, _ = c.get_irq_info(IrqIndex.MSI)
    return "EVENTFD|NORESIZE" if flags & 0x8 else "EVENTFD"


def _resample_fd(c: Client) -> str:
    """INTx unmask by a resample eventfd (what QEMU does under KVM): does a write to it re-signal
    a level that is still high?"""
    trigger, resample = eventfd(), eventfd()
    try:
        c.set_irqs(IrqIndex.INTX, F.DATA_EVENTFD | F.ACTION_TRIGGER, 0, 1, fds=[trigger])
        c.set_irqs(IrqIndex.INTX, F.DATA_EVENTFD | F.ACTION_UNMASK, 0, 1, fds=[resample])
        c.region_write(0, 0x800, b"\x01")  # the probe raises INTx
        first = _fired(trigger)
        os.eventfd_write(resample, 1)
        again = _fired(trigger)
        return "re-signalled" if first and again else "ignored" if first else "never signalled"
    finally:
        os.close(trigger)
        os.close(resample)


def _fired(fd: int) -> int:
    import select

    if not select.select([fd], [], [], 1.0)[0]:
        return 0
    return os.eventfd_read(fd)


def _second_client(c: Client, path: str) -> str:
    second = Client.connect(path, negotiate=False)
    try:
        msg_id = second.send(Command.VERSION, Version.build(dict(major=0, minor=0, json="{}")))
        reply = second.receive(timeout=0.5)
        if reply is None:
            return "no reply (queued until the first leaves)"
        return errno.errorcode.get(reply.error_no, "?") if reply.is_error and reply.msg_id == msg_id else "ok"
    finally:
        second.close()


#: name -> (how, {backend: expected outcome})
CASES = {
    "REGION_READ past the end of a BAR": (
        lambda c, p: outcome(c, Command.REGION_READ, REGION_ACCESS.pack(0xFFE, 0, 4)),
        {"vfiouser": "EINVAL", "libvfio-user": "EINVAL"}),
    "REGION_READ of 0 bytes": (
        lambda c, p: outcome(c, Command.REGION_READ, REGION_ACCESS.pack(0, 0, 0)),
        {"vfiouser": "EINVAL", "libvfio-user": "ok"}),
    "REGION_READ over max_data_xfer_size": (
        lambda c, p: outcome(c, Command.REGION_READ, REGION_ACCESS.pack(0, 4, (1 << 20) + 1)),
        {"vfiouser": "E2BIG", "libvfio-user": "EINVAL"}),
    "REGION_WRITE to the ROM": (
        lambda c, p: outcome(c, Command.REGION_WRITE, REGION_ACCESS.pack(0, 6, 1) + b"\x00"),
        {"vfiouser": "EACCES", "libvfio-user": "EACCES"}),
    "REGION_WRITE whose count does not match its data": (
        lambda c, p: outcome(c, Command.REGION_WRITE, REGION_ACCESS.pack(0, 0, 4) + b"\x01\x02"),
        {"vfiouser": "EINVAL", "libvfio-user": "EINVAL"}),
    "a model that raises": (
        lambda c, p: outcome(c, Command.REGION_READ, REGION_ACCESS.pack(0x808, 0, 4)),
        {"vfiouser": "EIO", "libvfio-user": "EIO"}),
    "REGION_WRITE_MULTI": (lambda c, p: _write_multi(c), {"vfiouser": "ok", "libvfio-user": "EINVAL"}),
    "VERSION reply": (lambda c, p: _version_caps(c), {"vfiouser": "write_multiple", "libvfio-user": "no write_multiple"}),
    "DEVICE_RESET with a payload": (lambda c, p: outcome(c, Command.DEVICE_RESET, b"\x00"),
                                    {"vfiouser": "EINVAL", "libvfio-user": "ok"}),
    "unknown command (99)": (lambda c, p: outcome(c, 99), {"vfiouser": "ENOSYS", "libvfio-user": "EINVAL"}),
    "DMA_MAP overlapping a map": (lambda c, p: _overlapping_map(c), {"vfiouser": "EEXIST", "libvfio-user": "EINVAL"}),
    "DMA_UNMAP of part of a map": (lambda c, p: _unmap_part(c), {"vfiouser": "ENOENT", "libvfio-user": "ENOENT"}),
    "GET_IRQ_INFO flags of MSI": (lambda c, p: _msi_irq_info(c), {"vfiouser": "EVENTFD|NORESIZE",
                                                                    "libvfio-user": "EVENTFD"}),
    "INTx resample eventfd": (lambda c, p: _resample_fd(c), {"vfiouser": "re-signalled", "libvfio-user": "ignored"}),
    "a second client while one is served": (
        lambda c, p: _second_client(c, p),
        {"vfiouser": "EBUSY", "libvfio-user": "no reply (queued until the first leaves)"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_both_backends_answer_as_documented(serve, backend, case):
    server = serve(ProbeDevice(), backend=backend)
    how, expected = CASES[case]
    with Client.connect(server.path) as c:
        c.bring_up()
        assert how(c, server.path) == expected[backend]
        assert c.config_read(0) == 0xBEEF1234  # the session goes on


def test_the_backends_page_shows_this_table():
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| (.+?) \| (.+?) \| (.+?) \|$", line)
        if m and m.group(1) in CASES:
            rows[m.group(1)] = {"vfiouser": m.group(2).strip("`"), "libvfio-user": m.group(3).strip("`")}
    assert rows == {name: expected for name, (_, expected) in CASES.items()}


def test_the_backends_page_example_runs(libvfio_user_library, sockdir):
    """The Python example of docs/backends.md, as written (its socket moved to a private directory)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    code = blocks[0].replace("/tmp/edu.sock", os.path.join(sockdir, "edu.sock"))
    exec(compile(code, str(DOC), "exec"), {})
    assert not os.path.exists(os.path.join(sockdir, "edu.sock"))  # close() removed the socket
