"""The least a Python vfio-user server can do: a reference for what Python itself costs.

``python -m vfiouser.bench.minimal SOCKET`` serves one client after another on
``SOCKET`` with a deliberately minimal loop: a blocking ``recv_into``, one
``struct`` unpack per message (header and region access together), the replies
of one receive joined into one ``sendall``. No generality: it answers

* VERSION with a fixed reply (protocol 0.0, ``max_msg_fds`` 0, 1 MiB transfers),
* REGION_READ and REGION_WRITE of the idio16's BAR2 (region 2): reads of offset
  0 and 4 return the outputs as last written at 0 and 4, reads of offset 1 and 5
  the inputs (all low); writes of offset 0 and 4 set the outputs; anything else
  in any region reads as zeros and takes writes, which is all a client's
  ``bring_up()`` needs (it then finds no BAR to place),
* every other command with an ENOSYS error reply.

It checks nothing (sizes, regions, bounds, state): the benchmark compares the
CPU time per message of the real server with this loop's
(:mod:`vfiouser.bench.versus_c`). It imports nothing from the package, so its
start-up and its loop are plain Python.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

__all__ = ["serve_connection", "serve", "VERSION_REPLY_JSON"]

#: header (msg_id, cmd, msg_size, flags, error_no) and region access (offset, region, count)
ACCESS = struct.Struct("<HHIIIQII")
HEADER = struct.Struct("<HHIII")
VERSION, REGION_READ, REGION_WRITE = 1, 9, 10
REPLY, NO_REPLY, ERROR = 0x1, 0x10, 0x20
ENOSYS = 38
BAR2 = 2
VERSION_REPLY_JSON = json.dumps({"capabilities": {"max_msg_fds": 0, "max_data_xfer_size": 1 << 20}},
                                separators=(",", ":")).encode() + b"\0"
_VERSION_BODY = struct.pack("<HH", 0, 0) + VERSION_REPLY_JSON


def serve_connection(conn: socket.socket) -> None:
    """Serve ``conn`` until its peer closes it."""
    regs = bytearray(8)  # BAR2 ports 0-7: outputs at 0 and 4, inputs (low) at 1 and 5
    buf = bytearray((1 << 16) + 32)  # 32 spare bytes: a 16-byte message at the end still unpacks as 32
    view = memoryview(buf)[: 1 << 16]
    have = 0
    recv_into, send = conn.recv_into, conn.sendall
    unpack, pack, hpack = ACCESS.unpack_from, ACCESS.pack, HEADER.pack
    while True:
        n = recv_into(view[have:])
        if not n:
            return
        have += n
        pos = 0
        out = []
        while have - pos >= 16:
            msg_id, cmd, size, flags, _, offset, region, count = unpack(buf, pos)
            if have - pos < size:
                break
            if cmd == REGION_READ:
                data = regs[offset:offset + count] if region == BAR2 else b""
                out.append(pack(msg_id, cmd, 32 + count, REPLY, 0, offset, region, count) + data.ljust(count, b"\0"))
            elif cmd == REGION_WRITE:
                if region == BAR2 and (offset == 0 or offset == 4):
                    regs[offset] = buf[pos + 32]
                if not flags & NO_REPLY:
                    out.append(pack(msg_id, cmd, 32, REPLY, 0, offset, region, count))
            elif cmd == VERSION:
                out.append(hpack(msg_id, cmd, 16 + len(_VERSION_BODY), REPLY, 0) + _VERSION_BODY)
            elif not flags & NO_REPLY:
                out.append(hpack(msg_id, cmd, 16, REPLY | ERROR, ENOSYS))
            pos += size if size >= 16 else have - pos  # a nonsensical size: drop what is here
        if out:
            send(b"".join(out))
        if pos:
            have -= pos
            buf[:have] = buf[pos:pos + have]


def serve(path: str) -> None:
    """Listen on ``path`` and serve one client after another, for ever."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            serve_connection(conn)
        except OSError:
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    try:
        serve(sys.argv[1])
    except KeyboardInterrupt:
        pass
