"""A PCI 16550A UART, register-compatible with QEMU's ``pci-serial``.

Identity
    vendor 0x1b36 (Red Hat, QEMU), device 0x0002, revision 1, class 0x070002
    (serial controller, 16550-compatible), subsystem 1af4:1100, INTA. Linux's
    built-in 8250_pci driver binds to it and detects a 16550A.

BAR0: 8-byte I/O BAR, one 16550A: byte registers; offsets 0 and 1 are banked
on LCR.DLAB (the divisor latch), and offset 2 reads IIR but writes FCR. This
table is ``SERIAL_REGS.markdown()``, checked by tests/test_regs_models.py:

| offset | register | bits | access | reset | description |
| --- | --- | --- | --- | --- | --- |
| 0x00 | dll | 7:0 | RW | 0xc | divisor latch, low byte (115200 / divisor baud); when lcr.dlab == 1 |
| 0x00 | rbr | 7:0 | RO | 0x0 | receiver buffer: the next received byte; when lcr.dlab == 0 |
| 0x00 | thr | 7:0 | WO | 0x0 | transmitter holding register: the byte to send; when lcr.dlab == 0 |
| 0x01 | dlm | 7:0 | RW | 0x0 | divisor latch, high byte; when lcr.dlab == 1 |
| 0x01 | ier | 7:0 | RW | 0x0 | interrupt enables; when lcr.dlab == 0 |
|  | .msi | 3 | RW | 0x0 | modem status |
|  | .rlsi | 2 | RW | 0x0 | receiver line status |
|  | .thri | 1 | RW | 0x0 | transmitter holding register empty |
|  | .rdi | 0 | RW | 0x0 | received data available (and character timeout) |
| 0x02 | fcr | 7:0 | WO | 0x0 | FIFO control |
|  | .trigger | 7:6 | WO | 0x0 | receive trigger level: 1, 4, 8 or 14 bytes |
|  | .dma | 3 | WO | 0x0 | DMA mode (no effect) |
|  | .xfr | 2 | WCLR (WO) | 0x0 | 1: empty the transmit FIFO |
|  | .rfr | 1 | WCLR (WO) | 0x0 | 1: empty the receive FIFO |
|  | .fe | 0 | WO | 0x0 | FIFOs on (switching empties them) |
| 0x02 | iir | 7:0 | RO | 0x1 | interrupt identification: the highest pending interrupt |
|  | .fifos | 7:6 | RO | 0x0 | 3 while the FIFOs are on |
|  | .id | 3:0 | RO | 0x1 | 1: none; 6 line status, 4 data, 0xc timeout, 2 THR empty, 0 modem |
| 0x03 | lcr | 7:0 | RW | 0x0 | line control |
|  | .dlab | 7 | RW | 0x0 | divisor latch access: offsets 0-1 are the divisor |
|  | .brk | 6 | RW | 0x0 | break |
|  | .stick | 5 | RW | 0x0 | stick parity |
|  | .eps | 4 | RW | 0x0 | even parity |
|  | .pen | 3 | RW | 0x0 | parity |
|  | .stb | 2 | RW | 0x0 | two stop bits |
|  | .wls | 1:0 | RW | 0x0 | word length - 5 |
| 0x04 | mcr | 7:0 | RW | 0x8 | modem control |
|  | .loop | 4 | RW | 0x0 | loopback: transmitted bytes come back, outputs drive the modem inputs |
|  | .out2 | 3 | RW | 0x1 |  |
|  | .out1 | 2 | RW | 0x0 |  |
|  | .rts | 1 | RW | 0x0 |  |
|  | .dtr | 0 | RW | 0x0 |  |
| 0x05 | lsr | 7:0 | RO | 0x60 | line status |
|  | .fifo_err | 7 | RO | 0x0 | error in the receive FIFO (never) |
|  | .temt | 6 | RO | 0x1 | transmitter empty |
|  | .thre | 5 | RO | 0x1 | THR empty |
|  | .bi | 4 | RO, RC | 0x0 | break |
|  | .fe | 3 | RO | 0x0 | framing error (never) |
|  | .pe | 2 | RO | 0x0 | parity error (never) |
|  | .oe | 1 | RO, RC | 0x0 | overrun |
|  | .dr | 0 | RO | 0x0 | data ready |
| 0x06 | msr | 7:0 | RO | 0xb0 | modem status; reading clears the change bits (in loopback: the modem outputs, nothing cleared) |
|  | .dcd | 7 | RO | 0x1 |  |
|  | .ri | 6 | RO | 0x0 |  |
|  | .dsr | 5 | RO | 0x1 |  |
|  | .cts | 4 | RO | 0x1 |  |
|  | .ddcd | 3 | RO | 0x0 |  |
|  | .teri | 2 | RO | 0x0 |  |
|  | .ddsr | 1 | RO | 0x0 |  |
|  | .dcts | 0 | RO | 0x0 |  |
| 0x07 | scr | 7:0 | RW | 0x0 | scratch |

Interrupts (INTx, level: asserted while IIR shows one, as QEMU does, OUT2
not gating), by priority: line status (overrun, break), received data (FIFO at
its trigger level), character timeout (data below the trigger level, unread for
four character times), THR empty (after a byte has gone, or when THR-empty
interrupts are enabled while it is empty; reading IIR or writing THR clears
it), modem status change. Loopback (MCR bit 4) sends transmitted bytes back to
the receiver and wires DTR/RTS/OUT1/OUT2 to DSR/CTS/RI/DCD.

Host side (``backend`` parameter)
    ``none`` (default): output is dropped, nothing arrives.
    ``unix:PATH``: a UNIX socket the server listens on; a program that connects
    (e.g. ``socat - UNIX-CONNECT:PATH``) is the other end of the line, one at a
    time. ``stdio``: the server's standard input and output.
    From Python: :meth:`PciSerial.host_input` and ``output_callback``.

Flow: bytes from the host wait in a bounded buffer and move into the 16-byte
receive FIFO as the guest reads, so nothing is lost however fast the host
sends. Transmitted bytes go to a bounded queue drained towards the host; while
it is full THR stays busy, like a real transmitter at line speed.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import threading
from collections import deque

from vfiouser.devices.errors import DefinitionError
from vfiouser.devices.pci import INTA, IoBar, PciDevice
from vfiouser.devices.regs import RCLR, RO, WCLR, WO, Field, Register, RegisterMap, after_read, before_write, \
    on_read, on_write, when

__all__ = ["PciSerial", "SerialBackendError", "SERIAL_REGS"]

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NO_INT, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_CTI = 0x01, 0x00, 0x02, 0x04, 0x06, 0x0C
IIR_FIFO_ENABLED = 0xC0
FCR_FE, FCR_RFR, FCR_XFR = 0x01, 0x02, 0x04
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_BI, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x10, 0x20, 0x40
LSR_INT_ANY = 0x1E
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MSR_ANY_DELTA = 0x0F

FIFO_SIZE = 16
TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}
BAUD_BASE = 115200
#: Bytes from the host that may wait for the guest (beyond that the host's writes block).
HOST_BUFFER = 64 * 1024
#: Bytes for the host that may wait before THR reports busy.
TX_QUEUE = 16 * 1024


_DLAB0, _DLAB1 = when("lcr.dlab", 0), when("lcr.dlab", 1)

SERIAL_REGS = RegisterMap([
    Register("rbr", 0, 8, sw=RO, bank=_DLAB0, doc="receiver buffer: the next received byte"),
    Register("thr", 0, 8, sw=WO, bank=_DLAB0, doc="transmitter holding register: the byte to send"),
    Register("dll", 0, 8, bank=_DLAB1, reset=12, doc="divisor latch, low byte (115200 / divisor baud)"),
    Register("ier", 1, 8, [
        Field("rdi", 0, doc="received data available (and character timeout)"),
        Field("thri", 1, doc="transmitter holding register empty"),
        Field("rlsi", 2, doc="receiver line status"),
        Field("msi", 3, doc="modem status"),
    ], bank=_DLAB0, doc="interrupt enables"),
    Register("dlm", 1, 8, bank=_DLAB1, doc="divisor latch, high byte"),
    Register("iir", 2, 8, [
        Field("id", (3, 0), sw=RO, reset=1, doc="1: none; 6 line status, 4 data, 0xc timeout, 2 THR empty, 0 modem"),
        Field("fifos", (7, 6), sw=RO, doc="3 while the FIFOs are on"),
    ], doc="interrupt identification: the highest pending interrupt"),
    Register("fcr", 2, 8, [
        Field("fe", 0, sw=WO, doc="FIFOs on (switching empties them)"),
        Field("rfr", 1, sw=WO, onwrite=WCLR, doc="1: empty the receive FIFO"),
        Field("xfr", 2, sw=WO, onwrite=WCLR, doc="1: empty the transmit FIFO"),
        Field("dma", 3, sw=WO, doc="DMA mode (no effect)"),
        Field("trigger", (7, 6), sw=WO, doc="receive trigger level: 1, 4, 8 or 14 bytes"),
    ], doc="FIFO control"),
    Register("lcr", 3, 8, [
        Field("wls", (1, 0), doc="word length - 5"),
        Field("stb", 2, doc="two stop bits"),
        Field("pen", 3, doc="parity"),
        Field("eps", 4, doc="even parity"),
        Field("stick", 5, doc="stick parity"),
        Field("brk", 6, doc="break"),
        Field("dlab", 7, doc="divisor latch access: offsets 0-1 are the divisor"),
    ], doc="line control"),
    Register("mcr", 4, 8, [
        Field("dtr", 0), Field("rts", 1), Field("out1", 2), Field("out2", 3, reset=1),
        Field("loop", 4, doc="loopback: transmitted bytes come back, outputs drive the modem inputs"),
    ], doc="modem control"),
    Register("lsr", 5, 8, [
        Field("dr", 0, sw=RO, doc="data ready"),
        Field("oe", 1, sw=RO, onread=RCLR, doc="overrun"),
        Field("pe", 2, sw=RO, doc="parity error (never)"),
        Field("fe", 3, sw=RO, doc="framing error (never)"),
        Field("bi", 4, sw=RO, onread=RCLR, doc="break"),
        Field("thre", 5, sw=RO, reset=1, doc="THR empty"),
        Field("temt", 6, sw=RO, reset=1, doc="transmitter empty"),
        Field("fifo_err", 7, sw=RO, doc="error in the receive FIFO (never)"),
    ], doc="line status"),
    Register("msr", 6, 8, [
        Field("dcts", 0, sw=RO), Field("ddsr", 1, sw=RO), Field("teri", 2, sw=RO), Field("ddcd", 3, sw=RO),
        Field("cts", 4, sw=RO, reset=1), Field("dsr", 5, sw=RO, reset=1), Field("ri", 6, sw=RO),
        Field("dcd", 7, sw=RO, reset=1),
    ], doc="modem status; reading clears the change bits (in loopback: the modem outputs, nothing cleared)"),
    Register("scr", 7, 8, doc="scratch"),
], name="16550A")



def _register_value(name: str, doc: str) -> property:
    """A model attribute that is a register's storage (``self.lsr |= LSR_DR`` changes LSR)."""
    def get(self) -> int:
        return getattr(self.regs, name).value

    def put(self, value: int) -> None:
        getattr(self.regs, name).value = value

    return property(get, put, doc=doc)


class SerialBackendError(DefinitionError):
    """An unknown or unusable ``backend`` parameter."""


class PciSerial(PciDevice):
    """QEMU's pci-serial: one 16550A behind an 8-byte I/O BAR0 (see the module docstring).
    ``backend``: where the UART's bytes go on the host (none, stdio or unix:PATH)."""

    vendor_id = 0x1B36
    device_id = 0x0002
    revision = 1
    class_code = 0x070002
    subsystem_vendor_id = 0x1AF4
    subsystem_id = 0x1100
    interrupt_pin = INTA

    def __init__(self, backend: str = "none") -> None:
        super().__init__()
        self.regs = SERIAL_REGS.instantiate(self)
        self.add_bar(0, IoBar(8)).map(self.regs)
        self.rx_fifo: deque[int] = deque()
        self.tx_queue: deque[int] = deque()
        self._host_in: deque[int] = deque()
        self._host_space = threading.Condition(self.lock)
        self._tx_ready = threading.Condition(self.lock)
        #: Called (outside the device lock) with each chunk of bytes the guest sent, if set.
        self.output_callback = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._closed = False
        self.reset()
        self._writer = threading.Thread(target=self._drain_tx, name="pci-serial-tx", daemon=True)
        self._writer.start()
        self._backend_name = backend
        self._attach_backend(backend)

    # -- reset -------------------------------------------------------------------------

    ier = _register_value("ier", "Interrupt enables.")
    iir = _register_value("iir", "Interrupt identification.")
    fcr = _register_value("fcr", "FIFO control, as last written.")
    lcr = _register_value("lcr", "Line control.")
    mcr = _register_value("mcr", "Modem control.")
    lsr = _register_value("lsr", "Line status.")
    msr = _register_value("msr", "Modem status.")

    @property
    def divider(self) -> int:
        """The baud-rate divisor (DLM:DLL)."""
        return self.regs.dlm.value << 8 | self.regs.dll.value

    def reset(self) -> None:
        self.regs.reset()
        self.rx_trigger = 1
        self.thr_ipending = False
        self.timeout_ipending = False
        self._loop = False
        self.rx_fifo.clear()
        self.tx_queue.clear()
        self._timeout_generation = 0
        self._update_irq()

    # -- interrupt logic (QEMU's serial_update_irq) -------------------------------------

    def _update_irq(self) -> None:
        iir = IIR_NO_INT
        if self.ier & IER_RLSI and self.lsr & LSR_INT_ANY:
            iir = IIR_RLSI
        elif self.ier & IER_RDI and self.timeout_ipending:
            iir = IIR_CTI
        elif self.ier & IER_RDI and self.lsr & LSR_DR and (not self.fcr & FCR_FE or len(self.rx_fifo) >= self.rx_trigger):
            iir = IIR_RDI
        elif self.ier & IER_THRI and self.thr_ipending:
            iir = IIR_THRI
        elif self.ier & IER_MSI and self.msr & MSR_ANY_DELTA:
            iir = IIR_MSI
        self.iir = iir | (self.iir & 0xF0)
        self.set_intx(iir != IIR_NO_INT)

    def _char_time(self) -> float:
        data_bits = (self.lcr & 0x03) + 5
        frame = 1 + data_bits + (2 if self.lcr & 0x04 else 1) + (1 if self.lcr & 0x08 else 0)
        return frame * max(self.divider, 1) / BAUD_BASE

    def _arm_timeout(self) -> None:
        """Character timeout: data below the trigger level, unread for four character times."""
        self._timeout_generation += 1
        self.defer(self._timeout_expired, self._timeout_generation, delay=4 * self._char_time())

    def _timeout_expired(self, generation: int) -> None:
        with self.lock:
            if generation == self._timeout_generation and self.rx_fifo:
                self.timeout_ipending = True
                self._update_irq()

    # -- register behaviour --------------------------------------------------------------

    @on_read("rbr")
    def _receive_buffer(self, reg) -> int:
        value = self.rx_fifo.popleft() if self.rx_fifo else 0
        self.timeout_ipending = False
        if not self.rx_fifo:
            self.lsr &= ~(LSR_DR | LSR_BI)
        self._refill_rx()  # the next host byte moves in (sets DR again)
        if self.rx_fifo and self.fcr & FCR_FE:
            self._arm_timeout()
        self._update_irq()
        return value

    @on_write("thr")
    def _send(self, reg, value: int) -> None:
        self.thr_ipending = False
        self.lsr &= ~(LSR_THRE | LSR_TEMT)
        self._transmit(value)

    @on_write("ier")
    def _enables_written(self, reg, value: int) -> None:
        if self.lsr & LSR_THRE:
            self.thr_ipending = True
        self._update_irq()

    @after_read("iir")
    def _identification_read(self, reg, value: int) -> None:
        if value & 0x0F == IIR_THRI:  # reading IIR acknowledges a THR-empty interrupt
            self.thr_ipending = False
            self._update_irq()

    @before_write("fcr")
    def _fifo_control(self, reg, value: int) -> int | None:
        if value == reg.value:
            return None
        if (value ^ reg.value) & FCR_FE:
            value |= FCR_XFR | FCR_RFR  # switching FIFOs on or off empties them
        return value

    @on_write("fcr")
    def _fifo_control_written(self, reg, value: int) -> None:
        if value & FCR_FE:
            self.iir |= IIR_FIFO_ENABLED
            self.rx_trigger = TRIGGER_LEVELS[value & 0xC0]
        else:
            self.iir &= ~IIR_FIFO_ENABLED
        if value & FCR_RFR:
            self.rx_fifo.clear()
            self.timeout_ipending = False
            self.lsr &= ~(LSR_DR | LSR_BI)
            self._refill_rx()  # with the new FIFO setting
        # FCR_XFR: bytes already handed to the host are gone; nothing waits in THR.
        self._update_irq()

    @on_write("mcr")
    def _modem_control(self, reg, value: int) -> None:
        was_loop, self._loop = self._loop, bool(self.mcr & MCR_LOOP)
        if was_loop and not self._loop:
            self._refill_rx()
            self._update_irq()

    @after_read("lsr")
    def _line_status_read(self, reg, value: int) -> None:
        if value & (LSR_BI | LSR_OE):  # cleared by the read (clear-on-read fields)
            self._update_irq()

    @on_read("msr")
    def _modem_status(self, reg) -> int | None:
        if self.mcr & MCR_LOOP:  # outputs wired back: OUT2->DCD, OUT1->RI, RTS->CTS, DTR->DSR
            return (self.mcr & 0x0C) << 4 | (self.mcr & MCR_RTS) << 3 | (self.mcr & MCR_DTR) << 5
        return None

    @after_read("msr")
    def _modem_status_read(self, reg, value: int) -> None:
        if not self.mcr & MCR_LOOP and self.msr & MSR_ANY_DELTA:
            self.msr &= 0xF0
            self._update_irq()

    # -- transmit --------------------------------------------------------------------------

    def _transmit(self, byte: int) -> None:
        if self.mcr & MCR_LOOP:
            self._receive_bytes([byte])
        else:
            self.tx_queue.append(byte)
            self._tx_ready.notify()
        if len(self.tx_queue) < TX_QUEUE:
            self._tx_done()
        # else: THR stays busy until the writer thread makes room

    def _tx_done(self) -> None:
        self.lsr |= LSR_THRE | LSR_TEMT
        self.thr_ipending = True
        self._update_irq()

    def _drain_tx(self) -> None:
        while True:
            with self.lock:
                while not self.tx_queue and not self._closed:
                    self._tx_ready.wait()
                if self._closed:
                    return
                was_full = len(self.tx_queue) >= TX_QUEUE
                chunk = bytes(self.tx_queue)
                self.tx_queue.clear()
                if was_full:
                    self._tx_done()
            self.bytes_sent += len(chunk)
            callback = self.output_callback
            if callback is not None:
                try:
                    callback(chunk)
                except Exception:
                    self.log.exception("serial output callback failed; output dropped")

    # -- receive ---------------------------------------------------------------------------

    def host_input(self, data: bytes, timeout: float | None = None) -> None:
        """Bytes arriving from the host side of the line. Blocks while the host buffer is full."""
        with self.lock:
            for byte in data:
                while len(self._host_in) >= HOST_BUFFER:
                    if not self._host_space.wait(timeout):
                        raise TimeoutError("the guest does not read the serial line")
                self._host_in.append(byte)
            self.bytes_received += len(data)
            if not self.mcr & MCR_LOOP:
                self._refill_rx()
                self._update_irq()

    def _refill_rx(self) -> None:
        """Move host bytes into the receive FIFO while there is room (not in loopback)."""
        if self.mcr & MCR_LOOP or not self._host_in:
            return
        room = (FIFO_SIZE - len(self.rx_fifo)) if self.fcr & FCR_FE else (0 if self.lsr & LSR_DR else 1)
        if room <= 0:
            return
        take = [self._host_in.popleft() for _ in range(min(room, len(self._host_in)))]
        self._host_space.notify_all()
        self._receive_bytes(take)

    def _receive_bytes(self, data) -> None:
        if self.fcr & FCR_FE:
            for byte in data:
                if len(self.rx_fifo) < FIFO_SIZE:
                    self.rx_fifo.append(byte)
                else:
                    self.lsr |= LSR_OE
            self._arm_timeout()
        else:
            if self.lsr & LSR_DR:
                self.lsr |= LSR_OE
            self.rx_fifo.clear()
            self.rx_fifo.append(data[-1])
        self.lsr |= LSR_DR
        self._update_irq()

    # -- host backends --------------------------------------------------------------------

    def _attach_backend(self, spec: str) -> None:
        if spec in ("none", ""):
            return
        if spec == "stdio":
            out = sys.stdout.buffer

            def write_stdout(chunk: bytes) -> None:
                out.write(chunk)
                out.flush()

            self.output_callback = write_stdout
            threading.Thread(target=self._pump_from, args=(sys.stdin.buffer.raw.read,), name="pci-serial-stdin",
                             daemon=True).start()
            return
        if spec.startswith("unix:"):
            self._listen_unix(spec[len("unix:"):])
            return
        raise SerialBackendError(f"unknown serial backend {spec!r} (none, stdio, unix:PATH)")

    def _pump_from(self, read) -> None:
        while not self._closed:
            try:
                chunk = read(4096)
            except (OSError, ValueError):
                return
            if not chunk:
                return
            self.host_input(chunk)

    def _listen_unix(self, path: str) -> None:
        if not path:
            raise SerialBackendError("unix: needs a socket path")
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(1)
        self.host_socket_path = path
        self._listener = listener
        self._peer: socket.socket | None = None

        def send(chunk: bytes) -> None:
            peer = self._peer
            if peer is not None:
                try:
                    peer.sendall(chunk)
                except OSError:
                    pass  # the other end went away: the line drops bytes, like a real one

        self.output_callback = send

        def accept_loop() -> None:
            while not self._closed:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                self.log.info("host end connected to %s", path)
                self._peer = conn
                self._pump_from(conn.recv)
                self._peer = None
                conn.close()
                self.log.info("host end disconnected from %s", path)

        threading.Thread(target=accept_loop, name="pci-serial-unix", daemon=True).start()

    def close(self) -> None:
        """Stop the host-side threads and remove a ``unix:`` socket."""
        with self.lock:
            self._closed = True
            self._tx_ready.notify_all()
            self._host_space.notify_all()
        listener = getattr(self, "_listener", None)
        if listener is not None:
            listener.close()
            try:
                os.unlink(self.host_socket_path)
            except OSError:
                pass
