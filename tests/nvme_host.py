"""Just enough of an NVMe host driver, over the Python vfio-user client, for the model's tests.

Guest RAM is a buffer the test owns: a memfd the client maps for DMA (the
server copies in place) or a bytearray the client serves through DMA_READ and
DMA_WRITE messages (``message=True``). The host lays queues out in it as
Linux's driver does, rings doorbells with posted writes and polls the
completion queues' phase tags, so tests see exactly what the controller wrote.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time

from vfiouser.client import Client
from vfiouser.devices.nvme.spec import AdminOpcode, Command, NvmOpcode, decode_completion
from vfiouser.protocol import Command as Msg, IrqIndex, IrqSetFlags

from .conftest import eventfd, fired

RAM, RAM_SIZE = 0x1000_0000, 0x40_0000
PAGE = 4096
ASQ, ACQ = 0x0000, 0x1000  # offsets in RAM
IDENTIFY_BUF = 0x2000
QUEUES = 0x1_0000  # I/O queues from here, 8 KiB per pair
DATA = 0x10_0000  # data buffers from here
PRP_LISTS = 0x8_0000
CAP, VS, INTMS, INTMC, CC, CSTS, AQA, ASQ_REG, ACQ_REG = 0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C, 0x24, 0x28, 0x30
CC_ENABLE = 1 | 6 << 16 | 4 << 20  # EN, IOSQES 6, IOCQES 4


class NvmeHost:
    """A host driver for one controller (see the module docstring)."""

    def __init__(self, client: Client, *, message: bool = False, msix: bool = True) -> None:
        self.c = client
        self.message = message
        if message:
            self.ram = bytearray(RAM_SIZE)
            client.dma_handler = self._serve_dma
            client.dma_map(RAM, RAM_SIZE, 3)
            self._fd = None
        else:
            self._fd = os.memfd_create("nvme-host-ram", os.MFD_CLOEXEC)
            os.ftruncate(self._fd, RAM_SIZE)
            self.ram = mmap.mmap(self._fd, RAM_SIZE)
            client.dma_map(RAM, RAM_SIZE, 3, fd=os.dup(self._fd))
        self.vector_fds: list[int] = []
        if msix:
            self._enable_msix()
        self.queues: dict[int, dict] = {}
        self.cid = 0

    def _serve_dma(self, cmd, addr, count, data):
        off = addr - RAM
        if off < 0 or off + count > RAM_SIZE:
            raise OSError(14, "outside guest RAM")
        if cmd == Msg.DMA_READ:
            return bytes(self.ram[off : off + count])
        self.ram[off : off + count] = data
        return None

    def close(self) -> None:
        for fd in self.vector_fds:
            os.close(fd)
        if self._fd is not None:
            self.ram.close()
            os.close(self._fd)

    # -- registers ---------------------------------------------------------------------------

    def reg(self, offset: int, size: int = 4) -> int:
        return int.from_bytes(self.c.region_read(0, offset, size), "little")

    def set_reg(self, offset: int, value: int, size: int = 4) -> None:
        self.c.region_write(0, offset, value.to_bytes(size, "little"))

    def _enable_msix(self) -> None:
        pos = self.c.config_read(0x34, 1)
        while pos and self.c.config_read(pos, 1) != 0x11:
            pos = self.c.config_read(pos + 1, 1)
        count = (self.c.config_read(pos + 2, 2) & 0x7FF) + 1
        self.c.config_write(pos + 2, 0x8000, 2)  # MSI-X enable
        self.vector_fds = [eventfd() for _ in range(count)]
        self.c.set_irqs(IrqIndex.MSIX, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 0, count,
                        fds=self.vector_fds)

    def interrupts(self, vector: int, timeout: float = 2.0) -> int:
        """How many times ``vector`` fired since the last call (waiting up to ``timeout`` for one:
        the controller signals after it posted, so a completion can be seen first)."""
        return fired(self.vector_fds[vector], timeout)

    # -- memory ------------------------------------------------------------------------------

    def poke(self, offset: int, data: bytes) -> None:
        self.ram[offset : offset + len(data)] = data

    def peek(self, offset: int, size: int) -> bytes:
        return bytes(self.ram[offset : offset + size])

    # -- bring-up ----------------------------------------------------------------------------

    def enable(self, admin_entries: int = 32) -> None:
        self.set_reg(CC, 0)
        self.wait_csts(1, 0)
        self.set_reg(AQA, (admin_entries - 1) | (admin_entries - 1) << 16)
        self.set_reg(ASQ_REG, RAM + ASQ, 8)
        self.set_reg(ACQ_REG, RAM + ACQ, 8)
        self.poke(ASQ, bytes(PAGE))
        self.poke(ACQ, bytes(PAGE))
        self.queues[0] = dict(sq=ASQ, cq=ACQ, sq_size=admin_entries, cq_size=admin_entries, tail=0, head=0, phase=1)
        self.set_reg(CC, CC_ENABLE)
        self.wait_csts(1, 1)

    def wait_csts(self, mask: int, value: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            csts = self.reg(CSTS)
            if csts & mask == value:
                return csts
            if time.monotonic() > deadline:
                raise TimeoutError(f"CSTS {csts:#x}: & {mask:#x} never became {value:#x}")
            time.sleep(0.002)

    # -- commands ----------------------------------------------------------------------------

    def submit(self, qid: int, cmd: Command, *, ring: bool = True) -> int:
        """Write ``cmd`` at the SQ's tail (its CID replaced by a fresh one) and ring the doorbell."""
        q = self.queues[qid]
        self.cid = (self.cid + 1) & 0xFFFF
        raw = bytearray(cmd.encode())
        struct.pack_into("<H", raw, 2, self.cid)
        self.poke(q["sq"] + 64 * q["tail"], bytes(raw))
        q["tail"] = (q["tail"] + 1) % q["sq_size"]
        if ring:
            self.ring_sq(qid)
        return self.cid

    def ring_sq(self, qid: int) -> None:
        self.c.region_write(0, 0x1000 + 8 * qid, self.queues[qid]["tail"].to_bytes(4, "little"), posted=True)

    def reap(self, qid: int, timeout: float = 5.0, *, ring: bool = True) -> tuple[int, int, int, int]:
        """Wait for the next completion on ``qid``'s CQ: ``(cid, status, dw0, sqhd)``."""
        q = self.queues[qid]
        addr = q["cq"] + 16 * q["head"]
        deadline = time.monotonic() + timeout
        while True:
            dw0, sqhd, sqid, cid, status, phase = decode_completion(self.peek(addr, 16))
            if phase == q["phase"]:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no completion on queue {qid} (CSTS {self.reg(CSTS):#x})")
            time.sleep(0.001)
        assert sqid == qid, f"completion for SQ {sqid} on queue {qid}'s CQ"
        q["head"] = (q["head"] + 1) % q["cq_size"]
        if q["head"] == 0:
            q["phase"] ^= 1
        if ring:
            self.ring_cq(qid)
        return cid, status, dw0, sqhd

    def ring_cq(self, qid: int) -> None:
        """Tell the controller how far the host consumed ``qid``'s CQ (its head doorbell)."""
        self.c.region_write(0, 0x1004 + 8 * qid, self.queues[qid]["head"].to_bytes(4, "little"), posted=True)

    def nothing_posted(self, qid: int, wait: float = 0.2) -> bool:
        """No completion appears on ``qid``'s CQ within ``wait`` seconds."""
        q = self.queues[qid]
        time.sleep(wait)
        return decode_completion(self.peek(q["cq"] + 16 * q["head"], 16))[5] != q["phase"]

    def run(self, qid: int, cmd: Command, timeout: float = 5.0) -> tuple[int, int]:
        """Submit and wait: ``(status, dw0)``."""
        cid = self.submit(qid, cmd)
        got, status, dw0, _ = self.reap(qid, timeout)
        assert got == cid, f"completion for CID {got}, expected {cid}"
        return status, dw0

    def admin(self, opcode: int, *, nsid: int = 0, prp1: int = 0, prp2: int = 0, cdw10: int = 0, cdw11: int = 0,
              cdw12: int = 0, cdw13: int = 0) -> tuple[int, int]:
        return self.run(0, Command(opcode, 0, 0, nsid, prp1, prp2, cdw10, cdw11, cdw12, cdw13, 0, 0))

    def identify(self, cns: int, nsid: int = 0) -> tuple[int, bytes]:
        self.poke(IDENTIFY_BUF, bytes(PAGE))
        status, _ = self.admin(AdminOpcode.IDENTIFY, nsid=nsid, prp1=RAM + IDENTIFY_BUF, cdw10=cns)
        return status, self.peek(IDENTIFY_BUF, PAGE)

    def create_io_queues(self, qid: int = 1, entries: int = 64, vector: int = 1) -> None:
        base = QUEUES + 0x2000 * (qid - 1)
        sq, cq = base, base + 0x1000
        self.poke(sq, bytes(PAGE))
        self.poke(cq, bytes(PAGE))
        status, _ = self.admin(AdminOpcode.CREATE_IO_CQ, prp1=RAM + cq, cdw10=qid | (entries - 1) << 16,
                               cdw11=0x3 | vector << 16)
        assert status == 0, f"create CQ {qid}: status {status:#x}"
        status, _ = self.admin(AdminOpcode.CREATE_IO_SQ, prp1=RAM + sq, cdw10=qid | (entries - 1) << 16,
                               cdw11=0x1 | qid << 16)
        assert status == 0, f"create SQ {qid}: status {status:#x}"
        self.queues[qid] = dict(sq=sq, cq=cq, sq_size=entries, cq_size=entries, tail=0, head=0, phase=1)

    def bring_up(self, queues: int = 1) -> None:
        """What Linux does at probe, in short: enable, number of queues, I/O queue pairs."""
        self.enable()
        status, _ = self.admin(AdminOpcode.SET_FEATURES, cdw10=0x07, cdw11=(queues - 1) | (queues - 1) << 16)
        assert status == 0
        for qid in range(1, queues + 1):
            self.create_io_queues(qid, vector=qid)

    # -- I/O ---------------------------------------------------------------------------------

    def prps(self, offset: int, length: int, *, scatter: bool = False) -> tuple[int, int]:
        """PRP1 and PRP2 for a buffer at RAM offset ``offset`` (page aligned), ``length`` bytes;
        with ``scatter`` the list names every other page, so the buffer is not contiguous."""
        pages = [offset + PAGE * (2 * i if scatter else i) for i in range((length + PAGE - 1) // PAGE)]
        if len(pages) == 1:
            return RAM + pages[0], 0
        if len(pages) == 2:
            return RAM + pages[0], RAM + pages[1]
        entries = struct.pack(f"<{len(pages) - 1}Q", *(RAM + p for p in pages[1:]))
        self.poke(PRP_LISTS, entries)
        return RAM + pages[0], RAM + PRP_LISTS

    def io(self, opcode: int, slba: int, blocks: int, buf: int = DATA, *, qid: int = 1, block: int = 512,
           fua: bool = False, scatter: bool = False, nsid: int = 1) -> tuple[int, int]:
        prp1, prp2 = self.prps(buf, blocks * block, scatter=scatter) if blocks else (0, 0)
        cdw12 = (blocks - 1) & 0xFFFF | (1 << 30 if fua else 0)
        return self.run(qid, Command(opcode, 0, 0, nsid, prp1, prp2, slba & 0xFFFF_FFFF, slba >> 32, cdw12, 0, 0, 0))

    def read(self, slba: int, blocks: int, **kw) -> tuple[int, int]:
        return self.io(NvmOpcode.READ, slba, blocks, **kw)

    def write(self, slba: int, blocks: int, **kw) -> tuple[int, int]:
        return self.io(NvmOpcode.WRITE, slba, blocks, **kw)


@contextlib.contextmanager
def nvme_host(server, *, message: bool = False, msix: bool = True):
    """A connected client with firmware's bring-up done and an :class:`NvmeHost` on it."""
    with Client.connect(server.path) as c:
        c.bring_up()
        host = NvmeHost(c, message=message, msix=msix)
        try:
            if message:
                with c.serving():
                    yield host
            else:
                yield host
        finally:
            host.close()
