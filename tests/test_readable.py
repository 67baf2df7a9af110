"""The readable form of messages and device events (vfiouser.readable), one case per kind of line."""

import errno

import pytest

from vfiouser import readable
from vfiouser.protocol import HEADER, REGION_ACCESS, Command, IrqIndex, IrqSetFlags, Layout, MsgFlags, MsgType

REPLY = int(MsgType.REPLY)


def msg(msg_id, cmd, payload=b"", flags=0, err=0):
    return HEADER.pack(msg_id, cmd, 16 + len(payload), flags, err) + payload


def test_region_accesses_name_the_region_and_show_values_as_numbers():
    read = msg(4, Command.REGION_READ, REGION_ACCESS.pack(0x30, 6, 2))
    assert readable.exchange(read, msg(4, Command.REGION_READ, REGION_ACCESS.pack(0x30, 6, 2) + b"\xaa\x55", REPLY)) \
        == "#4 read  ROM    +0x030 [2] -> 0x55aa"
    big = bytes(range(40))
    long_read = msg(5, Command.REGION_READ, REGION_ACCESS.pack(0, 2, 40))
    assert readable.exchange(long_read, msg(5, Command.REGION_READ, REGION_ACCESS.pack(0, 2, 40) + big, REPLY)) == \
        "#5 read  BAR2   +0x000 [40] -> 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f ... (40 bytes)"
    posted = msg(6, Command.REGION_WRITE, REGION_ACCESS.pack(8, 0, 8) + (1 << 40).to_bytes(8, "little"),
                 MsgFlags.NO_REPLY)
    assert readable.exchange(posted, None, names="doorbell") == \
        "#6 write BAR0   +0x008 [8] doorbell <- 0x0000010000000000 (posted)"
    refused = msg(7, Command.REGION_READ, REGION_ACCESS.pack(0, 9, 4))
    assert readable.exchange(refused, msg(7, Command.REGION_READ, flags=REPLY | MsgFlags.ERROR, err=errno.EINVAL)) \
        == "#7 read  region 9 +0x000 [4] -> error EINVAL"
    assert readable.request_line(read) == "#4 read  ROM    +0x030 [2]"
    assert readable.category(read) == "rom" and readable.category(posted) == "bar0"


def test_setup_messages_summarise_request_and_reply():
    info = msg(1, Command.DEVICE_GET_INFO, Layout.DEVICE_INFO.pack(16, 0, 0, 0))
    info_reply = msg(1, Command.DEVICE_GET_INFO, Layout.DEVICE_INFO.pack(16, 3, 9, 5), REPLY)
    assert readable.exchange(info, info_reply) == "#1 GET_INFO -> PCI/reset, 9 regions, 5 interrupt indexes"
    region = msg(2, Command.DEVICE_GET_REGION_INFO, Layout.REGION_INFO.pack(32, 0, 2, 0, 0, 0))
    region_reply = msg(2, Command.DEVICE_GET_REGION_INFO, Layout.REGION_INFO.pack(32, 7, 2, 0, 0x1000, 0), REPLY)
    assert readable.exchange(region, region_reply, reply_nfds=1) == \
        "#2 GET_REGION_INFO BAR2 -> 0x1000 bytes read/write/mmap, +1 fd"
    absent = msg(2, Command.DEVICE_GET_REGION_INFO, Layout.REGION_INFO.pack(32, 0, 8, 0, 0, 0), REPLY)
    assert readable.exchange(region, absent).endswith("-> absent")
    irq = msg(3, Command.DEVICE_GET_IRQ_INFO, Layout.IRQ_INFO.pack(16, 0, 2, 0))
    assert readable.exchange(irq, msg(3, Command.DEVICE_GET_IRQ_INFO, Layout.IRQ_INFO.pack(16, 1, 2, 8), REPLY)) \
        == "#3 GET_IRQ_INFO MSI-X -> 8 vectors"
    dma_map = msg(4, Command.DMA_MAP, Layout.DMA_MAP.pack(32, 3, 0x1000, 0x100000, 0x2000))
    assert readable.exchange(dma_map, msg(4, Command.DMA_MAP, flags=REPLY), nfds=1) == \
        "#4 DMA_MAP 0x100000 +0x2000 read/write, fd at 0x1000 -> ok"
    unmap = msg(5, Command.DMA_UNMAP, Layout.DMA_UNMAP.pack(24, 0, 0x100000, 0x2000))
    assert readable.exchange(unmap, msg(5, Command.DMA_UNMAP, flags=REPLY | MsgFlags.ERROR, err=errno.ENOENT)) == \
        "#5 DMA_UNMAP 0x100000 +0x2000 -> error ENOENT"
    assert readable.exchange(msg(6, Command.DEVICE_RESET), msg(6, Command.DEVICE_RESET, flags=REPLY)) == \
        "#6 DEVICE_RESET -> ok"
    assert readable.category(dma_map) == "dma" and readable.category(irq) == "irq" and readable.category(info) \
        == "setup"


@pytest.mark.parametrize("flags, index, start, count, nfds, data, text", [
    (IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, IrqIndex.MSIX, 0, 4, 4, b"",
     "SET_IRQS MSI-X 0-3 trigger eventfds"),
    (IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, IrqIndex.MSIX, 2, 1, 0, b"",
     "SET_IRQS MSI-X 2 trigger (no eventfd)"),
    (IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, IrqIndex.INTX, 0, 1, 0, b"", "SET_IRQS INTx 0 unmask"),
    (IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_MASK, IrqIndex.MSI, 0, 2, 0, b"\x01\x00", "SET_IRQS MSI 0-1 mask (bool)"),
    (IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, IrqIndex.MSI, 0, 0, 0, b"", "SET_IRQS MSI disable"),
])
def test_set_irqs_lines(flags, index, start, count, nfds, data, text):
    request = msg(9, Command.DEVICE_SET_IRQS, Layout.IRQ_SET.pack(20 + len(data), flags, index, start, count) + data)
    assert readable.exchange(request, msg(9, Command.DEVICE_SET_IRQS, flags=REPLY), nfds=nfds) == f"#9 {text} -> ok"


def test_write_multi_and_messages_too_short_to_summarise():
    entries = b"".join(Layout.WRITE_MULTI_ENTRY.pack(4 * i, 0, 4, (i + 1).to_bytes(8, "little")) for i in range(6))
    multi = msg(3, Command.REGION_WRITE_MULTI, Layout.WRITE_MULTI_COUNT.pack(6) + entries, MsgFlags.NO_REPLY)
    assert readable.exchange(multi, None) == ("#3 WRITE_MULTI BAR0 +0x000 [4] <- 0x00000001; BAR0 +0x004 [4] <- "
                                              "0x00000002; BAR0 +0x008 [4] <- 0x00000003; BAR0 +0x00c [4] <- "
                                              "0x00000004, ... (6 writes) (posted)")
    short = msg(4, Command.DMA_MAP, b"\x01\x02")
    assert readable.exchange(short, None) == "#4 DMA_MAP undecodable (StreamError) payload=0102(2)"
    assert readable.exchange(msg(5, 99, b"\xff"), None) == "#5 CMD_99 payload=ff(1)"


def test_event_lines():
    line = readable.event_line
    assert line({"dir": "irq", "kind": "intx", "level": True, "sent": False}) == \
        "IRQ INTx asserted (masked: waits for the client's unmask)"
    assert line({"dir": "irq", "kind": "intx", "level": False, "sent": False}) == "IRQ INTx deasserted"
    assert line({"dir": "irq", "kind": "msix", "vector": 3, "sent": False}) == \
        "IRQ MSI-X vector 3 held (no route from the client yet, or masked)"
    assert line({"dir": "dma", "op": "write", "addr": 0x2000, "size": 2, "data": "abcd", "how": "in place"}) == \
        "DMA write 0x2000 +0x2 in place: ab cd"
    assert line({"dir": "dma", "op": "read", "addr": 0x10, "size": 8, "error": "DmaUnmapped: not mapped"}) == \
        "DMA read  0x10 +0x8 failed: DmaUnmapped: not mapped"
    assert line({"dir": "task", "event": "finish", "name": "Dev.work", "error": "ValueError: bad"}) == \
        "task Dev.work finished, raised ValueError: bad"
    assert readable.event_category({"dir": "task"}) == "task" and readable.event_category({"dir": "lock"}) == "setup"


def test_filters():
    assert readable.Filter().everything
    wanted = readable.Filter(only=["bars,irq"], hide=["bar2"])
    assert wanted.allows("bar0") and wanted.allows("irq") and not wanted.allows("bar2")
    assert not wanted.allows("config") and not wanted.everything
    with pytest.raises(readable.UnknownCategory, match="unknown category 'bar6': choose from bar0"):
        readable.Filter(only=["bar6"])
