"""Device DMA through the server, in both modes, and every error path.

The Python client plays QEMU: it maps guest memory (with an fd: mmap mode;
without: DMA_READ/DMA_WRITE messages that it serves from a bytearray). The
test thread plays the device's worker (DMA needs neither the device lock nor
the server loop).
"""

import contextlib
import errno
import mmap
import os
import threading
import time

import pytest

from vfiouser.devices.pci import (
    DmaAborted,
    DmaBusMasterDisabled,
    DmaError,
    DmaPermissionError,
    DmaUnavailable,
    DmaUnmapped,
    DmaWouldDeadlock,
)
from vfiouser.client import Client
from vfiouser.protocol import DMA_ACCESS, Command

from .probe import ProbeDevice


class GuestMemory:
    """Guest RAM as the client serves it for DMA messages; counts the messages."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.mem = base, bytearray(size)
        self.requests: list[tuple[int, int, int]] = []
        self.fail_with: int | None = None

    def __call__(self, cmd, addr, count, data):
        self.requests.append((cmd, addr, count))
        if self.fail_with:
            raise OSError(self.fail_with, "injected")
        off = addr - self.base
        if cmd == Command.DMA_READ:
            return bytes(self.mem[off : off + count])
        self.mem[off : off + count] = data
        return None


def session_dma(server):
    """The DMA backend the served session handed the device, whichever engine serves."""
    session = server.session
    return session.requester if hasattr(session, "requester") else session.memory


def serve_client(client: Client, stop: contextlib.ExitStack) -> None:
    """Answer the server's DMA requests on a thread until ``stop`` closes (the client's
    own :meth:`Client.serving`, which also routes replies to whichever thread waits)."""
    stop.enter_context(client.serving())


@pytest.fixture
def setup(serve, backend):
    dev = ProbeDevice()
    server = serve(dev, backend=backend)
    guest = GuestMemory(0x10000, 0x10000)
    client = Client.connect(server.path, dma_handler=guest)
    client.bring_up()  # BARs decoded, bus master on, as firmware and a driver leave them
    stop = contextlib.ExitStack()
    yield dev, server, client, guest, stop
    stop.close()
    client.close()


def test_message_mode_read_and_write(setup):
    dev, _, client, guest, stop = setup
    client.dma_map(0x10000, 0x10000, 3)
    guest.mem[0x100:0x105] = b"hello"
    serve_client(client, stop)
    assert dev.dma.read(0x10100, 5) == b"hello"
    dev.dma.write(0x10200, b"world")
    assert guest.mem[0x200:0x205] == b"world"
    assert [(c, a, n) for c, a, n in guest.requests] == [
        (Command.DMA_READ, 0x10100, 5), (Command.DMA_WRITE, 0x10200, 5)]


def test_message_mode_is_chunked_to_the_clients_max_data_xfer_size(serve):
    dev = ProbeDevice()
    server = serve(dev)
    guest = GuestMemory(0, 0x10000)
    caps = {"capabilities": {"max_data_xfer_size": 4096, "max_msg_fds": 16}}
    stop = contextlib.ExitStack()
    with Client.connect(server.path, caps=caps, dma_handler=guest) as client:
        client.bring_up()
        client.dma_map(0, 0x10000, 3)
        serve_client(client, stop)
        payload = os.urandom(10000)
        dev.dma.write(0x100, payload)
        assert bytes(guest.mem[0x100:0x100 + 10000]) == payload
        assert dev.dma.read(0x100, 10000) == payload
        assert [n for _, _, n in guest.requests] == [4096, 4096, 1808] * 2  # the client's own limit
        stop.close()


def test_mmap_mode_accesses_guest_memory_in_place(setup):
    dev, _, client, guest, _ = setup
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x20000)
    client.dma_map(0x100000, 0x20000, 3, fd=fd)
    with mmap.mmap(fd, 0x20000) as ram:
        ram[0x40:0x44] = b"abcd"
        assert dev.dma.read(0x100040, 4) == b"abcd"
        dev.dma.write_u32(0x100080, 0xCAFEF00D)
        assert ram[0x80:0x84] == (0xCAFEF00D).to_bytes(4, "little")
    os.close(fd)
    assert guest.requests == []  # no message needed


def test_transfer_spanning_adjacent_maps_of_both_kinds(setup):
    """QEMU splits RAM around 0xc0000; a buffer may straddle two maps."""
    dev, _, client, guest, stop = setup
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x10000)
    client.dma_map(0x0, 0x10000, 3, fd=fd)  # [0, 0x10000) mmap
    client.dma_map(0x10000, 0x10000, 3)  # [0x10000, 0x20000) messages
    serve_client(client, stop)
    dev.dma.write(0xFFF8, b"0123456789abcdef")
    with mmap.mmap(fd, 0x10000) as ram:
        assert ram[0xFFF8:] == b"01234567"
    assert guest.mem[:8] == b"89abcdef"
    assert dev.dma.read(0xFFF8, 16) == b"0123456789abcdef"
    assert dev.dma.read_sg([(0xFFFC, 2), (0x10002, 2)]) == b"45ab"
    dev.dma.write_sg([(0x10100, 2), (0x10200, 1)], b"xyz")
    assert guest.mem[0x100:0x102] == b"xy" and guest.mem[0x200:0x201] == b"z"
    with pytest.raises(ValueError):
        dev.dma.write_sg([(0x10100, 2)], b"xyz")
    os.close(fd)


def test_unmapped_and_permission_errors(setup):
    dev, _, client, _, _ = setup
    client.dma_map(0x10000, 0x1000, 1)  # read-only
    with pytest.raises(DmaUnmapped) as exc:
        dev.dma.read(0x20000, 4)
    assert (exc.value.addr, exc.value.size) == (0x20000, 4)
    with pytest.raises(DmaUnmapped):
        dev.dma.read(0x10FFE, 4)  # runs past the map
    with pytest.raises(DmaPermissionError):
        dev.dma.write(0x10000, b"x")
    with pytest.raises(DmaUnmapped):
        dev.dma.read(-1, 4)


def test_no_client_means_unavailable():
    dev = ProbeDevice()
    dev.config.set_word(0x04, 0x0004)
    with pytest.raises(DmaUnavailable):
        dev.dma.read(0, 4)


def test_no_dma_without_bus_mastering(setup):
    dev, _, client, _, _ = setup
    client.dma_map(0x10000, 0x1000, 3)
    client.config_write(0x04, 0x0003, 2)  # bus mastering off
    with pytest.raises(DmaBusMasterDisabled):
        dev.dma.read(0x10000, 4)


def test_client_error_reply_aborts(setup):
    dev, _, client, guest, stop = setup
    client.dma_map(0x10000, 0x10000, 3)
    guest.fail_with = errno.EFAULT
    serve_client(client, stop)
    with pytest.raises(DmaAborted, match="EFAULT"):
        dev.dma.read(0x10000, 4)


def test_client_that_does_not_answer_times_out(setup):
    dev, server, client, _, _ = setup
    client.dma_map(0x10000, 0x10000, 3)
    session_dma(server).timeout = 0.2
    with pytest.raises(DmaAborted, match="no reply"):
        dev.dma.read(0x10000, 4)  # nobody serves the client's side


def test_dma_with_the_device_lock_held_is_refused(setup):
    dev, _, client, _, _ = setup
    client.dma_map(0x10000, 0x10000, 3)
    with dev.lock:
        with pytest.raises(DmaWouldDeadlock):
            dev.dma.read(0x10000, 4)


def test_dma_from_a_register_handler_is_refused(serve):
    """A handler runs in the server loop with the device lock held: DMA there must not hang."""
    from vfiouser.iomgr import DeviceIo

    seen = []

    class Eager(DeviceIo):
        def __init__(self, dev):
            self.dev = dev

        def write(self, base, offset, data):
            try:
                self.dev.dma.read(0x10000, 4)
            except DmaWouldDeadlock as exc:
                seen.append(exc)

    dev = ProbeDevice()
    dev.bars[0].unmap(0x800)
    dev.bars[0].map(Eager(dev), 0x800, 0x10)
    server = serve(dev)
    with Client.connect(server.path) as client:
        client.bring_up()
        client.dma_map(0x10000, 0x10000, 3)
        client.region_write(0, 0x800, b"\x01")
    assert len(seen) == 1


def test_deferred_work_runs_after_the_reply_and_may_do_dma(serve):
    """The documented pattern: a register write defers a task; the task does message DMA."""
    from vfiouser.iomgr import DeviceIo

    done = threading.Event()
    result = []

    class Doorbell(DeviceIo):
        def __init__(self, dev):
            self.dev = dev

        def write(self, base, offset, data):
            self.dev.defer(self.copy)

        def copy(self):
            result.append(self.dev.dma.read(0x10000, 4))
            self.dev.dma.write(0x10010, result[-1][::-1])
            done.set()

    dev = ProbeDevice()
    dev.bars[0].unmap(0x800)
    dev.bars[0].map(Doorbell(dev), 0x800, 0x10)
    server = serve(dev)
    guest = GuestMemory(0x10000, 0x1000)
    guest.mem[:4] = b"\x01\x02\x03\x04"
    with Client.connect(server.path, dma_handler=guest) as client:
        client.bring_up()
        client.dma_map(0x10000, 0x1000, 3)
        client.region_write(0, 0x800, b"\x01")  # synchronous write: the reply comes first
        stop = contextlib.ExitStack()
        serve_client(client, stop)
        assert done.wait(5)
        stop.close()
    assert result == [b"\x01\x02\x03\x04"] and guest.mem[0x10:0x14] == b"\x04\x03\x02\x01"


def test_a_message_transfer_survives_the_client_unmapping_and_mapping_again(setup):
    """QEMU unmaps and maps RAM again whenever its memory layout changes (SeaBIOS does it while it
    drives a virtio disk), and answers a DMA_READ from its own view of guest memory: the answer
    decides, not the unmap, and the transfer's next messages go to the range mapped again."""
    dev, server, client, guest, _ = setup
    client.dma_map(0x10000, 0x10000, 3)
    data = os.urandom(0x10000)
    guest.mem[0:0x10000] = data  # 64 KiB: two DMA_READs of 32 KiB, one before the remap, one after
    got, errors = [], []

    def device():
        try:
            got.append(dev.dma.read(0x10000, 0x10000))
        except DmaError as exc:
            errors.append(exc)

    t = threading.Thread(target=device)
    t.start()
    msg = client.receive(timeout=2)  # the server's first DMA_READ arrives...
    assert msg.cmd == Command.DMA_READ
    client.dma_unmap(0x10000, 0x10000)  # ...and the client's layout changes before it answers
    client.dma_map(0x10000, 0x10000, 3)
    client.serve_request(msg)
    msg = client.receive(timeout=2)
    assert msg.cmd == Command.DMA_READ and bytes(msg.payload[:DMA_ACCESS.size]) == DMA_ACCESS.pack(0x18000, 0x8000)
    client.serve_request(msg)
    t.join(5)
    assert not errors and got == [data]
    assert client.config_read(0) == 0xBEEF1234


def test_a_message_transfer_stops_where_the_range_stays_unmapped(setup):
    """Unmapped and not mapped again: the answer to the message already sent is taken, and the
    transfer fails before its next message (the client removed the memory)."""
    dev, server, client, guest, _ = setup
    client.dma_map(0x10000, 0x10000, 3)
    errors = []

    def device():
        try:
            dev.dma.read(0x10000, 0x10000)  # two messages
        except DmaAborted as exc:
            errors.append(exc)

    t = threading.Thread(target=device)
    t.start()
    msg = client.receive(timeout=2)
    started = time.monotonic()
    client.dma_unmap(0x10000, 0x10000)  # the unmap does not wait for the message
    assert time.monotonic() - started < 0.5
    client.serve_request(msg)
    t.join(5)
    assert errors and "unmapped during the transfer" in str(errors[0])
    assert client.config_read(0) == 0xBEEF1234


def test_disconnect_fails_waiting_dma_and_later_dma(setup):
    dev, server, client, _, _ = setup
    client.dma_map(0x10000, 0x10000, 3)
    errors = []

    def device():
        try:
            dev.dma.read(0x10000, 4)
        except (DmaUnavailable, DmaAborted) as exc:
            errors.append(exc)

    t = threading.Thread(target=device)
    t.start()
    assert client.receive(timeout=2).cmd == Command.DMA_READ
    client.close()
    t.join(5)
    assert errors and isinstance(errors[0], DmaUnavailable)
    assert server.wait_idle(5)
    with pytest.raises(DmaUnavailable):
        dev.dma.read(0x10000, 4)


def test_unmap_waits_for_an_in_place_copy(setup, backend):
    """An mmap-mode copy in flight keeps its mapping alive until it is done."""
    dev, server, client, _, _ = setup
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x100000)
    client.dma_map(0, 0x100000, 3, fd=fd)
    os.close(fd)
    if backend == "libvfio-user":  # a copy holds the context's memory lock while libvfio-user copies
        lock = server.context.memory_lock
        lock.acquire()
        mapped, done = (lambda: session_dma(server).in_place(0, 0x1000, False)), lock.release
    else:  # a copy pins the pieces it copies
        pieces = server.session.dma_maps.acquire(0, 0x1000, write=False)
        mapped, done = (lambda: pieces[0][0].mem is not None), (lambda: server.session.dma_maps.release(pieces))
    unmapped = threading.Event()

    def unmap():
        client.dma_unmap(0, 0x100000)
        unmapped.set()

    t = threading.Thread(target=unmap)
    t.start()
    time.sleep(0.2)
    assert not unmapped.is_set() and mapped()
    done()
    t.join(5)
    assert unmapped.is_set() and not mapped()


def test_unmap_of_another_map_does_not_stall_the_server(setup):
    """A message transfer spanning two maps waits on the first; unmapping the second must not
    block the server loop (the only reader of the socket) until the transfer gives up."""
    dev, server, client, guest, _ = setup
    client.dma_map(0x10000, 0x1000, 3)
    client.dma_map(0x11000, 0x1000, 3)
    errors = []

    def device():
        try:
            dev.dma.read(0x10FF0, 0x20)
        except (DmaAborted, DmaUnmapped) as exc:
            errors.append(exc)

    t = threading.Thread(target=device)
    t.start()
    msg = client.receive(timeout=2)
    assert msg.cmd == Command.DMA_READ  # the first piece waits for us
    started = time.monotonic()
    client.dma_unmap(0x11000, 0x1000)
    assert time.monotonic() - started < 0.5
    client.serve_request(msg)  # answer the first piece: the second is gone
    t.join(5)
    assert errors and "unmapped during the transfer" in str(errors[0])
    assert client.config_read(0) == 0xBEEF1234


def test_bus_master_turned_off_mid_transfer_stops_it(serve):
    """A message-mode read of three chunks; the driver turns bus mastering off after the first
    DMA_READ: no other is sent."""
    from vfiouser.requester import DMA_READ_CHUNK

    dev = ProbeDevice()
    server = serve(dev)
    guest = GuestMemory(0x10000, 0x20000)
    with Client.connect(server.path, dma_handler=guest) as client:
        client.bring_up()
        client.dma_map(0x10000, 0x20000, 3)
        errors = []

        def device():
            try:
                dev.dma.read(0x10000, 3 * DMA_READ_CHUNK)
            except DmaBusMasterDisabled as exc:
                errors.append(exc)

        t = threading.Thread(target=device)
        t.start()
        first = client.receive(timeout=2)
        assert first.cmd == Command.DMA_READ
        client.config_write(0x04, 0x0003, 2)  # bus mastering off (decoding stays on)
        client.serve_request(first)
        t.join(5)
        assert errors and len(guest.requests) == 1 and guest.requests[0][2] == DMA_READ_CHUNK


def test_bus_semantics_read_zeros_and_drop_writes_where_nothing_is_mapped(setup):
    """read_available/write_available behave as QEMU's pci_dma_read/write: the reachable parts of
    the range move, unmapped or protected parts read 0 and swallow writes."""
    dev, _, client, guest, stop = setup
    fd = os.memfd_create("rom", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x1000)
    os.pwrite(fd, b"R" * 0x1000, 0)
    client.dma_map(0x10000, 0x1000, 3)  # [0x10000, 0x11000) RW, messages
    client.dma_map(0x11000, 0x1000, 1, fd=fd)  # [0x11000, 0x12000) read-only, in place
    guest.mem[0xF00:0x1000] = b"M" * 0x100
    serve_client(client, stop)
    data = dev.dma.read_available(0xFF00, 0x1200)  # hole, RW map, RO map
    assert data == bytes(0x100) + bytes(0xF00) + b"M" * 0x100 + b"R" * 0x100
    assert dev.dma.read_available(0x11F00, 0x200) == b"R" * 0x100 + bytes(0x100)  # RO map, hole
    written = dev.dma.write_available(0x10F80, b"w" * 0x100)
    assert written == 0x80 and guest.mem[0xF80:0x1000] == b"w" * 0x80
    assert os.pread(fd, 0x80, 0) == b"R" * 0x80
    assert dev.dma.write_available(0x20000, b"x") == 0
    client.config_write(0x04, 0x0003, 2)  # bus mastering off
    with pytest.raises(DmaBusMasterDisabled):  # no bus master is not "nothing mapped"
        dev.dma.read_available(0x10000, 4)
    os.close(fd)


def test_dma_on_a_closed_session_is_unavailable_not_unmapped(setup):
    """A worker that raced a disconnect gets DmaUnavailable, never a guest-address error."""
    dev, server, client, _, _ = setup
    client.dma_map(0x10000, 0x10000, 3)
    dma = session_dma(server)
    client.close()
    assert server.wait_idle(5)
    for call in (lambda: dma.read(0x10000, 4, may_wait=True), lambda: dma.write(0x10000, b"x", may_wait=True),
                 lambda: dma.mapped(0x10000, 4, False)):
        with pytest.raises(DmaUnavailable):
            call()


def test_edu_dma_into_a_read_only_map_completes_and_writes_the_rest(serve):
    """A transfer that meets a read-only map finishes (RUN clears, IRQ raised), writes what is
    writable, and the engine takes the next command: it never wedges."""
    from vfiouser.devices.edu import Edu

    dev = Edu(dma_delay_ms=0)
    server = serve(dev)
    guest = GuestMemory(0x1000, 0x1000)  # [0x1000, 0x2000) RW, messages

    def reg(c, off, value=None):
        if value is None:
            return int.from_bytes(c.region_read(0, off, 8), "little")
        c.region_write(0, off, value.to_bytes(8, "little"))

    def run_dma(c, src, dst, count, cmd):
        for off, value in ((0x80, src), (0x88, dst), (0x90, count), (0x98, cmd)):
            reg(c, off, value)
        deadline = time.monotonic() + 5
        while reg(c, 0x98) & 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        return reg(c, 0x98)

    with Client.connect(server.path, dma_handler=guest) as c:
        c.bring_up()
        fd = os.memfd_create("rom", os.MFD_CLOEXEC)
        os.ftruncate(fd, 0x1000)
        c.dma_map(0x1000, 0x1000, 3)
        c.dma_map(0x2000, 0x1000, 1, fd=fd)  # read-only, adjacent
        # no serve_client thread: the client answers DMA requests while it waits for its replies
        guest.mem[0x800:0x1000] = bytes(range(256)) * 8
        assert run_dma(c, 0x1800, 0x40000, 0x1000, 0x1) == 0  # RAM -> buffer, half from the RO map
        guest.mem[0x800:0x1000] = b"\xee" * 0x800
        assert run_dma(c, 0x40000, 0x1800, 0x1000, 0x7) == 0x6  # buffer -> RAM across into the RO map
        assert guest.mem[0x800:0x1000] == bytes(range(256)) * 8
        assert os.pread(fd, 0x800, 0) == bytes(0x800)
        assert int.from_bytes(c.region_read(0, 0x24, 4), "little") == 0x100  # completion IRQ
        assert run_dma(c, 0x40000, 0x1000, 0x10, 0x1 | 0x2) == 0x2  # the engine still works
        assert guest.mem[:0x10] == bytes(range(16))
        os.close(fd)


def test_a_task_that_outlives_a_power_cycle_cannot_touch_the_next_vm(serve, monkeypatch):
    """A deferred task still running when its client left (past the reset's wait) resumes while
    the next client is attached: its DMA and its interrupts are refused, not sent to the new VM."""
    import vfiouser.devices.pci.device as device_module

    monkeypatch.setattr(device_module, "COLD_RESET_WAIT", 0.1)
    dev = ProbeDevice()
    server = serve(dev)
    started, release, outcome = threading.Event(), threading.Event(), []

    def stuck_then_late():
        started.set()
        release.wait(5)
        try:
            dev.dma.write(0x0, b"OLD-VM-DATA")
        except DmaUnavailable as exc:
            outcome.append(exc)
        dev.set_intx(True)
        outcome.append("after")

    with Client.connect(server.path) as first:
        first.bring_up()
        dev.defer(stuck_then_late)
        assert started.wait(5)  # running (a task not started yet would simply be dropped)
    assert server.wait_idle(5)
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x1000)
    with Client.connect(server.path) as second:
        second.bring_up()
        second.dma_map(0, 0x1000, 3, fd=os.dup(fd))
        release.set()
        assert dev.worker.wait_idle(5)
        assert isinstance(outcome[0], DmaUnavailable) and outcome[1] == "after"
        assert os.pread(fd, 11, 0) == bytes(11) and not dev.intx_level
    os.close(fd)


def test_write_available_from_a_handler_moves_nothing_when_part_needs_a_message(setup):
    dev, _, client, guest, _ = setup
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x1000)
    client.dma_map(0x10000, 0x1000, 3, fd=fd)  # in place
    client.dma_map(0x11000, 0x1000, 3)  # messages
    with dev.lock:  # as in a handler
        assert dev.dma.in_place(0x10000, 0x10) and not dev.dma.in_place(0x10FF0, 0x20)
        dev.dma.write(0x10000, b"handler")  # all in place: allowed
        with pytest.raises(DmaWouldDeadlock):
            dev.dma.write_available(0x10FF0, b"x" * 0x20)
    assert os.pread(fd, 7, 0) == b"handler" and os.pread(fd, 0x10, 0xFF0) == bytes(0x10)
    assert guest.requests == []
    os.close(fd)


def test_a_client_serving_dma_on_a_thread_never_loses_a_reply(setup):
    """The client answers the device's DMA on one thread while another makes requests: a
    reply read by either thread reaches the one that waits for it (this raced before)."""
    dev, _, client, guest, stop = setup
    client.dma_map(0x10000, 0x10000, 3)
    serve_client(client, stop)
    done, moved = threading.Event(), []

    def device():
        while not done.is_set():
            moved.append(dev.dma.read(0x10000, 16))

    t = threading.Thread(target=device)
    t.start()
    try:
        for _ in range(300):
            assert client.config_read(0) == 0xBEEF1234
    finally:
        done.set()
        t.join(5)
    assert len(moved) > 10 and len(guest.requests) == len(moved)


# -- scatter-gather lists and zero-copy loans (storage models move hundreds of pages a command) --


def _ram(client, base=0x100000, size=0x20000):
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    client.dma_map(base, size, 3, fd=os.dup(fd))
    ram = mmap.mmap(fd, size)
    os.close(fd)
    return ram


SEGMENTS = [(0x100000 + 0x3000, 0x1000), (0x100000 + 0x1000, 0x800), (0x100000 + 0x8100, 0x300)]


def test_scatter_gather_in_place_moves_every_segment_in_order_without_a_message(setup):
    dev, _, client, guest, _ = setup
    ram = _ram(client)
    payload = os.urandom(0x1B00)
    dev.dma.write_sg(SEGMENTS, payload)
    assert ram[0x3000:0x4000] + ram[0x1000:0x1800] + ram[0x8100:0x8400] == payload
    assert dev.dma.read_sg(SEGMENTS) == payload
    assert guest.requests == []
    ram.close()


def test_scatter_gather_falls_back_to_messages_for_memory_that_is_not_in_place(setup):
    dev, _, client, guest, stop = setup
    ram = _ram(client)
    client.dma_map(0x10000, 0x10000, 3)  # message-only
    serve_client(client, stop)
    segments = [(0x100000, 0x100), (0x10100, 0x100)]
    payload = os.urandom(0x200)
    dev.dma.write_sg(segments, payload)
    assert ram[0:0x100] == payload[:0x100] and guest.mem[0x100:0x200] == payload[0x100:]
    assert dev.dma.read_sg(segments) == payload
    assert [(c, a, n) for c, a, n in guest.requests] == [(Command.DMA_WRITE, 0x10100, 0x100),
                                                         (Command.DMA_READ, 0x10100, 0x100)]
    ram.close()


def test_write_with_lends_guest_memory_itself_and_takes_it_back(setup):
    dev, _, client, guest, _ = setup
    ram = _ram(client)
    kept = []

    def fill(views):
        kept.extend(views)
        assert [len(v) for v in views] == [0x1000, 0x800, 0x300]
        for i, view in enumerate(views):
            view[:] = bytes([i + 1]) * len(view)
        return "done"

    assert dev.dma.write_with(SEGMENTS, fill) == "done"
    assert ram[0x3000:0x4000] == b"\1" * 0x1000 and ram[0x8100:0x8400] == b"\3" * 0x300
    with pytest.raises(ValueError):  # the loan ended: a model cannot keep guest memory
        kept[0][0] = 9
    assert guest.requests == []
    ram.close()


def test_read_with_lends_read_only_views(setup):
    dev, _, client, _, _ = setup
    ram = _ram(client)
    ram[0x3000:0x3004] = b"abcd"
    seen = []

    def consume(views):
        seen.append(bytes(views[0][:4]))
        with pytest.raises(TypeError):
            views[0][0] = 0  # guest memory lent for reading is not writable
        return sum(len(v) for v in views)

    assert dev.dma.read_with(SEGMENTS, consume) == 0x1B00 and seen == [b"abcd"]
    ram.close()


def test_loans_need_the_client_only_where_memory_is_not_in_place(setup):
    """Without an fd the views are scratch buffers moved by messages, before (read) or after
    (write) the callback; the model sees the same thing."""
    dev, _, client, guest, stop = setup
    client.dma_map(0x10000, 0x10000, 3)
    serve_client(client, stop)
    guest.mem[0x2000:0x2003] = b"xyz"
    assert dev.dma.read_with([(0x12000, 3)], lambda views: bytes(views[0])) == b"xyz"
    dev.dma.write_with([(0x13000, 2), (0x15000, 2)], lambda views: [v.__setitem__(slice(None), b"hi") for v in views])
    assert guest.mem[0x3000:0x3002] == b"hi" and guest.mem[0x5000:0x5002] == b"hi"


def test_loans_from_a_handler_are_refused_before_the_callback_when_messages_are_needed(setup):
    dev, _, client, _, _ = setup
    client.dma_map(0x10000, 0x10000, 3)
    called = []
    with dev.lock, pytest.raises(DmaWouldDeadlock):
        dev.dma.read_with([(0x10000, 16)], called.append)
    assert called == []


def test_unmap_waits_for_a_loan_to_end(setup):
    dev, _, client, _, _ = setup
    ram = _ram(client)
    inside, release = threading.Event(), threading.Event()

    def fill(views):
        inside.set()
        release.wait(5)
        views[0][:4] = b"late"

    worker = threading.Thread(target=dev.dma.write_with, args=([(0x100000, 4)], fill))
    worker.start()
    assert inside.wait(5)
    unmapping = threading.Thread(target=client.dma_unmap, args=(0x100000, 0x20000))
    unmapping.start()
    time.sleep(0.2)
    assert unmapping.is_alive(), "the unmap did not wait for the loan"
    release.set()
    worker.join(5)
    unmapping.join(5)
    assert ram[0:4] == b"late"
    ram.close()
