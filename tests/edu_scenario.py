"""One qtest script, run against QEMU's own ``edu`` and against the Python ``Edu`` over vfio-user.

:func:`run` drives a :class:`~vfiouser.testing.qemu.QtestMachine` whose slot 4 holds an
edu (either kind) and returns a *transcript*: a list of ``(step, observation)``
pairs. Two transcripts are equal when a guest could not tell the devices apart.

Interrupts are observed at the IOAPIC (``irq_intercept_in ioapic``; slot 4
INTA is GSI 20) and recorded per step as the line's raise/lower events. One
difference is QEMU's, not the device's: for any vfio PCI device QEMU "EOIs"
INTx on every BAR access (it lowers the line, unmasks, and the device
re-asserts if its interrupt is still pending). Within a step that accesses the
BAR, a ``lower`` immediately followed by a ``raise`` is that glitch and is
removed; steps that only touch config space are compared raw.

Timing is not compared: QEMU's edu finishes a DMA transfer when the test steps
its virtual clock, the Python edu after ``dma_delay_ms`` of real time; both are
awaited the way a driver would, by polling the command register.
"""

from __future__ import annotations

import time

SLOT = 4
GSI = 20
BAR = 0xE000_0000
RAM_PATTERN = 0x0010_0000  # guest RAM used as DMA source
RAM_OUT = 0x0020_0000  # guest RAM DMA destination
MSI_ADDR = 0x0000_7000  # MSI messages are pointed at guest RAM so the test can see them
POLL_LIMIT = 5.0


class Recorder:
    def __init__(self, vm) -> None:
        self.vm = vm
        self.transcript: list[tuple[str, object]] = []

    def note(self, step: str, value) -> None:
        self.transcript.append((step, value))

    def events(self, quiet: float = 0.1, limit: float = 2.0) -> list[str]:
        """GSI-20 events until the line has been quiet for ``quiet`` seconds."""
        got: list[str] = []
        deadline = time.monotonic() + limit
        last = time.monotonic()
        while time.monotonic() < deadline:
            with self.vm._cond:
                while self.vm.irq_events:
                    kind, num = self.vm.irq_events.popleft()
                    if num == GSI:
                        got.append(kind)
                        last = time.monotonic()
            if time.monotonic() - last >= quiet:
                break
            time.sleep(0.01)
        return got

    def step(self, name: str, action, *, bar: bool = True):
        """Run ``action``, record its result and the interrupt events it caused."""
        result = action()
        if result is not None:
            self.note(name, result)
        events = self.events()
        if bar:
            events = _drop_eoi_glitches(events)
        self.note(name + " irq", events)
        return result


def _drop_eoi_glitches(events: list[str]) -> list[str]:
    """Remove each ``lower`` immediately followed by ``raise`` (QEMU's vfio EOI on a BAR access)."""
    out: list[str] = []
    for kind in events:
        if kind == "raise" and out and out[-1] == "lower":
            out.pop()
            continue
        out.append(kind)
    return out


def _poll(vm, offset: int, mask: int) -> int:
    """Read BAR0+offset until ``value & mask`` is 0 (as a driver waits); return the final value."""
    deadline = time.monotonic() + POLL_LIMIT
    while True:
        value = vm.readl(BAR + offset)
        if not value & mask or time.monotonic() > deadline:
            return value
        time.sleep(0.002)


def _dma(vm, src: int, dst: int, count: int, cmd: int) -> int:
    """Program a transfer, step QEMU's clock past the edu timer, wait for completion; return cmd."""
    vm.writeq(BAR + 0x80, src)
    vm.writeq(BAR + 0x88, dst)
    vm.writeq(BAR + 0x90, count)
    vm.writeq(BAR + 0x98, cmd)
    vm.clock_step(100_000_000)
    _poll(vm, 0x98, 0x1)
    return vm.readq(BAR + 0x98)


def _msi_word(vm) -> int:
    """The MSI message word in guest RAM (waits a little: the message may follow the access)."""
    deadline = time.monotonic() + 1.0
    while True:
        value = int.from_bytes(vm.memread(MSI_ADDR, 4), "little")
        if value or time.monotonic() > deadline:
            vm.memwrite(MSI_ADDR, bytes(4))
            return value
        time.sleep(0.01)


def run(vm) -> list[tuple[str, object]]:
    r = Recorder(vm)
    cfg = vm.pci_cfg_read
    vm.irq_intercept_in("ioapic")

    # -- config space ---------------------------------------------------------
    r.note("config dwords", [cfg(SLOT, off) for off in range(0, 0x50, 4)])
    masks = {}
    for off, size in ((0x04, 2), (0x0C, 1), (0x0D, 1), (0x10, 4), (0x3C, 1), (0x42, 2), (0x44, 4), (0x48, 4),
                      (0x4C, 2), (0x50, 4), (0xF0, 4)):
        old = cfg(SLOT, off, size)
        vm.pci_cfg_write(SLOT, off, (1 << (8 * size)) - 1, size)
        masks[hex(off)] = hex(cfg(SLOT, off, size))
        vm.pci_cfg_write(SLOT, off, old, size)
    r.note("config write masks", masks)
    vm.pci_cfg_write(SLOT, 0x42, 0x0070, 2)  # MME beyond MMC with MSI off
    r.note("msi control after MME write", hex(cfg(SLOT, 0x42, 2)))
    vm.pci_cfg_write(SLOT, 0x42, 0x0000, 2)
    vm.pci_cfg_write(SLOT, 0x80, 0xA5A5A5A5)  # device-specific config: scratch
    r.note("scratch config", hex(cfg(SLOT, 0x80)))

    # -- BAR0 -----------------------------------------------------------------
    vm.pci_cfg_write(SLOT, 0x10, BAR)
    vm.pci_cfg_write(SLOT, 0x04, 0x0006, 2)  # memory + bus master
    reads = {}
    for name, fn, off in (
        ("readl ident", vm.readl, 0x00), ("readq ident", vm.readq, 0x00), ("readb ident", vm.readb, 0x00),
        ("readw ident", vm.readw, 0x00), ("readl +1", vm.readl, 0x01), ("readq 0x81", vm.readq, 0x81),
        ("readl 0x0c", vm.readl, 0x0C), ("readl 0x28", vm.readl, 0x28), ("readl raise", vm.readl, 0x60),
        ("readl ack", vm.readl, 0x64), ("readl 0x84", vm.readl, 0x84), ("readl 0x100", vm.readl, 0x100),
        ("readl buffer", vm.readl, 0x40000), ("readq buffer", vm.readq, 0x40000), ("readl end", vm.readl, 0xFFFFC),
        ("readq 0x88", vm.readq, 0x88),
    ):
        reads[name] = hex(fn(BAR + off))
    r.note("mmio reads", reads)
    vm.writel(BAR + 0x04, 0x12345678)
    r.note("liveness", hex(vm.readl(BAR + 0x04)))
    vm.writeb(BAR + 0x04, 0x00)  # too narrow: ignored
    vm.writeq(BAR + 0x00, 0x1)  # 8 bytes below 0x80: ignored
    r.note("liveness after narrow/wide writes", hex(vm.readl(BAR + 0x04)))
    vm.writel(BAR + 0x20, 0xFFFFFFFF)
    r.note("status after all-ones", hex(vm.readl(BAR + 0x20)))
    vm.writel(BAR + 0x20, 0x0000007F)
    r.note("status after 0x7f", hex(vm.readl(BAR + 0x20)))

    # -- factorial ------------------------------------------------------------
    facts = {}
    for n in (0, 1, 5, 12, 13, 20, 33, 34, 100):
        vm.writel(BAR + 0x08, n)
        _poll(vm, 0x20, 0x1)
        facts[n] = hex(vm.readl(BAR + 0x08))
    r.note("factorials", facts)
    vm.writeq(BAR + 0x04, 0x0000000511111111)  # split into 0x04 and 0x08: starts 5!
    _poll(vm, 0x20, 0x1)
    r.note("writeq at 0x04", (hex(vm.readl(BAR + 0x04)), hex(vm.readl(BAR + 0x08))))

    # -- INTx -----------------------------------------------------------------
    r.step("raise 0x1234", lambda: vm.writel(BAR + 0x60, 0x1234))
    r.step("irq status", lambda: hex(vm.readl(BAR + 0x24)))
    r.step("ack 0x1230", lambda: vm.writel(BAR + 0x64, 0x1230))
    r.step("irq status after partial ack", lambda: hex(vm.readl(BAR + 0x24)))
    r.step("intx disable", lambda: vm.pci_cfg_write(SLOT, 0x04, 0x0406, 2), bar=False)
    r.step("status register with intx disabled", lambda: hex(cfg(SLOT, 0x06, 2)), bar=False)
    r.step("intx enable", lambda: vm.pci_cfg_write(SLOT, 0x04, 0x0006, 2), bar=False)
    r.step("ack 0x4", lambda: vm.writel(BAR + 0x64, 0x4))
    r.step("raise 0 while idle", lambda: vm.writel(BAR + 0x60, 0))
    vm.writel(BAR + 0x20, 0x80)
    r.step("factorial with irq", lambda: vm.writel(BAR + 0x08, 6))
    r.step("factorial irq status", lambda: (_poll(vm, 0x20, 0x1), hex(vm.readl(BAR + 0x24)))[1])
    r.step("ack factorial", lambda: vm.writel(BAR + 0x64, 0x1))
    vm.writel(BAR + 0x20, 0x00)

    # -- DMA --------------------------------------------------------------------
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(256))
    vm.memwrite(RAM_PATTERN, pattern)
    vm.memwrite(RAM_OUT, b"\xee" * 512)
    vm.writel(BAR + 0x98, 0x6)  # no start bit: ignored
    r.note("cmd write without start", hex(vm.readq(BAR + 0x98)))
    r.step("dma ram->buffer", lambda: hex(_dma(vm, RAM_PATTERN, 0x40000, 256, 0x5)))
    r.step("dma irq status", lambda: hex(vm.readl(BAR + 0x24)))
    r.step("ack dma", lambda: vm.writel(BAR + 0x64, 0x100))
    r.step("dma buffer->ram", lambda: hex(_dma(vm, 0x40080, RAM_OUT + 0x10, 128, 0x3)))
    r.note("ram after dma", vm.memread(RAM_OUT, 256).hex())
    r.step("dma clamped address", lambda: hex(_dma(vm, 0x40000, 0x1000_0000 | (RAM_OUT + 0x100), 16, 0x3)))
    r.note("ram at clamped address", vm.memread(RAM_OUT + 0x100, 32).hex())
    r.step("dma out of range", lambda: hex(_dma(vm, 0x40FF0, RAM_OUT + 0x180, 0x20, 0x7)))
    r.note("ram untouched by bad range", vm.memread(RAM_OUT + 0x180, 32).hex())
    r.step("ack bad-range irq", lambda: vm.writel(BAR + 0x64, 0x100))
    r.step("dma empty at the end", lambda: hex(_dma(vm, 0x41000, RAM_OUT + 0x1C0, 0, 0x3)))
    # The RAM side clamped on the source too: 256 MiB + RAM_PATTERN reads RAM_PATTERN.
    r.step("dma clamped source", lambda: hex(_dma(vm, 0x1000_0000 | RAM_PATTERN, 0x40C00, 64, 0x1)))
    r.step("dma clamped source back out", lambda: hex(_dma(vm, 0x40C00, RAM_OUT + 0x400, 64, 0x3)))
    r.note("buffer from clamped source", vm.memread(RAM_OUT + 0x400, 64).hex())
    # Buffer -> RAM across 0xc0000: QEMU maps [0, 0xc0000) writable and the BIOS shadow above it
    # read-only; the bus writes the RAM half and drops the rest.
    vm.memwrite(0xBF800, b"\xee" * 0x800)
    rom_before = vm.memread(0xC0000, 0x800)
    r.step("dma across a read-only map", lambda: hex(_dma(vm, 0x40000, 0xBF800, 0x1000, 0x3)))
    r.note("ram below the read-only map", vm.memread(0xBF800, 0x800).hex())
    r.note("read-only map unchanged", vm.memread(0xC0000, 0x800) == rom_before)
    # RAM -> buffer across the same edge: both halves are readable.
    r.step("dma from across a read-only map", lambda: hex(_dma(vm, 0xBFFF0, 0x40E00, 0x20, 0x1)))
    r.step("dma edge bytes back out", lambda: hex(_dma(vm, 0x40E00, RAM_OUT + 0x480, 0x20, 0x3)))
    r.note("buffer from across the edge", vm.memread(RAM_OUT + 0x480, 0x20).hex())
    vm.writel(BAR + 0x80, 0x9)  # 4-byte write: upper half cleared
    vm.writeq(BAR + 0x88, 0x1_2345_6789)
    r.note("dma registers", (hex(vm.readq(BAR + 0x80)), hex(vm.readq(BAR + 0x88)), hex(vm.readl(BAR + 0x8C))))
    vm.writeq(BAR + 0x90, 4)
    vm.writeq(BAR + 0x80, RAM_PATTERN)
    vm.writeq(BAR + 0x88, 0x40800)
    vm.writeq(BAR + 0x98, 0x1)
    vm.writeq(BAR + 0x80, 0xDEAD)  # ignored while the transfer runs
    vm.clock_step(100_000_000)
    _poll(vm, 0x98, 0x1)
    r.note("src after write during transfer", hex(vm.readq(BAR + 0x80)))
    vm.pci_cfg_write(SLOT, 0x04, 0x0002, 2)  # bus mastering off
    r.step("dma without bus mastering", lambda: hex(_dma(vm, RAM_PATTERN, 0x40000, 16, 0x1)))
    vm.pci_cfg_write(SLOT, 0x04, 0x0006, 2)
    r.step("dma buffer back out", lambda: hex(_dma(vm, 0x40000, RAM_OUT + 0x1E0, 16, 0x3)))
    r.note("zeros from the no-bus-master transfer", vm.memread(RAM_OUT + 0x1E0, 16).hex())

    # -- MSI ----------------------------------------------------------------------
    vm.memwrite(MSI_ADDR, bytes(4))
    r.step("raise before msi", lambda: vm.writel(BAR + 0x60, 0x8))
    vm.pci_cfg_write(SLOT, 0x44, MSI_ADDR)
    vm.pci_cfg_write(SLOT, 0x48, 0)
    vm.pci_cfg_write(SLOT, 0x4C, 0xABCD, 2)
    r.step("msi enable", lambda: vm.pci_cfg_write(SLOT, 0x42, 0x0001, 2), bar=False)
    r.note("status register after msi enable", hex(cfg(SLOT, 0x06, 2)))
    r.step("raise with msi", lambda: vm.writel(BAR + 0x60, 0x10))
    r.note("msi message", hex(_msi_word(vm)))
    r.step("dma with msi", lambda: hex(_dma(vm, 0x40000, RAM_OUT + 0x200, 8, 0x7)))
    r.note("msi message after dma", hex(_msi_word(vm)))
    r.step("ack all with msi", lambda: vm.writel(BAR + 0x64, 0xFFFFFFFF))
    r.note("no message on ack", hex(_msi_word(vm)))
    vm.writel(BAR + 0x60, 0x20)
    r.note("msi message again", hex(_msi_word(vm)))
    r.step("msi disable", lambda: vm.pci_cfg_write(SLOT, 0x42, 0x0000, 2), bar=False)
    r.step("raise after msi disable", lambda: vm.writel(BAR + 0x60, 0x40))
    r.step("ack after msi", lambda: vm.writel(BAR + 0x64, 0xFFFFFFFF))

    # -- reset ------------------------------------------------------------------
    vm.writel(BAR + 0x04, 0x0F0F0F0F)
    vm.writel(BAR + 0x60, 0x30)
    vm.writel(BAR + 0x20, 0x80)
    r.events()
    r.step("system reset", vm.system_reset, bar=False)
    time.sleep(0.3)
    r.note("config after reset", [hex(cfg(SLOT, off)) for off in (0x04, 0x10, 0x3C, 0x40, 0x44, 0x4C, 0x80)])
    vm.pci_cfg_write(SLOT, 0x10, BAR)
    vm.pci_cfg_write(SLOT, 0x04, 0x0006, 2)
    r.note("registers after reset", [hex(vm.readl(BAR + off)) for off in (0x04, 0x08, 0x20, 0x24, 0x98)])
    r.step("raise after reset", lambda: vm.writel(BAR + 0x60, 0x1))
    r.step("ack after reset", lambda: vm.writel(BAR + 0x64, 0xFFFFFFFF))
    r.step("dma after reset keeps its buffer", lambda: hex(_dma(vm, 0x40000, RAM_OUT + 0x300, 32, 0x3)))
    r.note("buffer after reset", vm.memread(RAM_OUT + 0x300, 32).hex())
    return r.transcript
