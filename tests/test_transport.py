"""Framing and fd passing on a real AF_UNIX socketpair."""

import array
import os
import select
import socket

import pytest

from vfiouser.errors import ConnectionClosed, FramingError
from vfiouser.protocol import HEADER
from vfiouser.transport import Transport


def msg(msg_id, cmd=9, payload=b"", flags=0):
    return HEADER.pack(msg_id, cmd, 16 + len(payload), flags, 0) + payload


def send_with_fds(sock, data, fds):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    assert sock.sendmsg([data], anc) == len(data)


def receive_all(transport, want, timeout=2.0):
    frames = []
    while len(frames) < want:
        r, _, _ = select.select([transport.sock], [], [], timeout)
        assert r, f"only {len(frames)} of {want} frames arrived"
        frames += [f._replace(payload=bytes(f.payload) if f.payload is not None else None)
                   for f in transport.receive()]
    return frames


def inode(fd):
    return os.fstat(fd).st_ino


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    t = Transport(b, max_msg_size=4096)
    yield a, t
    a.close()
    t.close()


def test_many_messages_in_one_read(pair):
    peer, t = pair
    peer.sendall(b"".join(msg(i, payload=bytes([i]) * i) for i in range(10)))
    frames = receive_all(t, 10)
    assert [f.msg_id for f in frames] == list(range(10))
    assert [f.payload for f in frames] == [bytes([i]) * i for i in range(10)]


def test_message_split_across_reads(pair):
    peer, t = pair
    data = msg(1, payload=b"x" * 100)
    peer.sendall(data[:5])
    assert t.receive() == []
    peer.sendall(data[5:50])
    select.select([t.sock], [], [], 1)
    assert t.receive() == []
    peer.sendall(data[50:])
    (frame,) = receive_all(t, 1)
    assert frame.payload == b"x" * 100


def test_fds_go_to_the_message_they_were_sent_with(pair, no_fd_leak):
    """Three sends in a row (no fds, 2 fds, 1 fd): each message gets its own fds back."""
    peer, t = pair
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    send_with_fds(peer, msg(1), [])
    send_with_fds(peer, msg(2, payload=b"ab"), [r1, w1])
    send_with_fds(peer, msg(3), [r2])
    frames = receive_all(t, 3)
    assert [len(f.fds) for f in frames] == [0, 2, 1]
    assert [inode(fd) for fd in frames[1].fds] == [inode(r1), inode(w1)]
    assert inode(frames[2].fds[0]) == inode(r2)
    for fd in frames[1].fds + frames[2].fds + [r1, w1, r2, w2]:
        os.close(fd)


def test_fds_of_a_message_that_arrives_in_pieces(pair, no_fd_leak):
    peer, t = pair
    r, w = os.pipe()
    data = msg(5, payload=b"y" * 3000)
    send_with_fds(peer, data[:20], [r])  # header + a little, fds attached
    select.select([t.sock], [], [], 1)
    assert t.receive() == []
    peer.sendall(data[20:])
    (frame,) = receive_all(t, 1)
    assert len(frame.fds) == 1 and inode(frame.fds[0]) == inode(r)
    for fd in frame.fds + [r, w]:
        os.close(fd)


def test_fds_sent_mid_message_are_closed(pair, no_fd_leak):
    """A peer that attaches fds to bytes in the middle of a message: they are not given to anyone."""
    peer, t = pair
    r, w = os.pipe()
    data = msg(6, payload=b"z" * 64) + msg(7)
    peer.sendall(data[:30])
    select.select([t.sock], [], [], 1)
    assert t.receive() == []
    send_with_fds(peer, data[30:80], [r])  # no message starts in these bytes
    frames = receive_all(t, 1)
    assert frames[0].msg_id == 6 and frames[0].fds == []
    peer.sendall(data[80:])
    frames = receive_all(t, 1)
    assert frames[0].msg_id == 7 and frames[0].fds == []
    os.close(r)
    os.close(w)


def test_oversized_message_is_reported_and_nothing_after_it_is_read(pair):
    peer, t = pair
    big = msg(8, payload=b"b" * 10000)
    peer.sendall(msg(7, payload=b"before") + big + msg(9, payload=b"ok"))
    frames = receive_all(t, 2)
    assert frames[0].msg_id == 7 and frames[0].payload == b"before"
    assert frames[1].msg_id == 8 and frames[1].payload is None and frames[1].msg_size == 10016
    assert t.abandoned
    with pytest.raises(ConnectionClosed):
        t.receive()


def test_header_smaller_than_itself_cannot_be_framed(pair):
    peer, t = pair
    peer.sendall(HEADER.pack(1, 9, 8, 0, 0))
    select.select([t.sock], [], [], 1)
    with pytest.raises(FramingError) as exc:
        t.receive()
    assert exc.value.raw == HEADER.pack(1, 9, 8, 0, 0)


def test_end_of_stream(pair):
    peer, t = pair
    peer.close()
    select.select([t.sock], [], [], 1)
    with pytest.raises(ConnectionClosed):
        t.receive()


def test_close_closes_fds_not_handed_over(no_fd_leak):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    t = Transport(b)
    r, w = os.pipe()
    data = msg(1, payload=b"q" * 100)
    send_with_fds(a, data[:20], [r])  # incomplete message holds the fd
    select.select([t.sock], [], [], 1)
    assert t.receive() == []
    t.close()
    a.close()
    os.close(r)
    os.close(w)


def test_send_large_buffers_and_fds():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    t = Transport(a)
    peer = Transport(b, max_msg_size=4 << 20)
    r, w = os.pipe()
    payload = os.urandom(2 << 20)
    import threading

    th = threading.Thread(target=t.send, args=([HEADER.pack(1, 10, 16 + len(payload), 0, 0), payload], [r]))
    th.start()
    (frame,) = receive_all(peer, 1, timeout=5)
    th.join()
    assert frame.payload == payload and len(frame.fds) == 1
    for fd in frame.fds + [r, w]:
        os.close(fd)
    t.close()
    peer.close()


class ShortWriter:
    """A socket whose first send takes only ``first`` bytes (as a full AF_UNIX socket may)."""

    def __init__(self, first: int) -> None:
        self.first, self.out = first, bytearray()

    def setblocking(self, flag):
        pass

    def _take(self, data: bytes) -> int:
        n = min(len(data), self.first) if self.first is not None else len(data)
        self.first = None
        self.out += data[:n]
        return n

    def send(self, data, flags=0):
        return self._take(memoryview(data).tobytes())

    def sendmsg(self, buffers, anc=(), flags=0):
        return self._take(b"".join(memoryview(b).tobytes() for b in buffers))


@pytest.mark.parametrize("shape", ["single", "list", "with fds"])
def test_partial_send_of_a_wide_memoryview_is_finished(shape):
    """``len()`` of a memoryview of 4-byte items counts items: a first send that takes
    exactly that many bytes must not pass for the whole message."""
    words = memoryview(array.array("I", range(1024)))  # 4096 bytes, 1024 items
    sock = ShortWriter(first=len(words) + (16 if shape != "single" else 0))
    t = Transport(sock)
    if shape == "single":
        t.send(words)
    else:
        t.send([b"h" * 16, words], [0] if shape == "with fds" else ())
    assert bytes(sock.out).endswith(words.tobytes())
    assert len(sock.out) == words.nbytes + (16 if shape != "single" else 0)
