"""A PCI 16550A UART, register-compatible with QEMU's ``pci-serial``.

Identity
    vendor 0x1b36 (Red Hat, QEMU), device 0x0002, revision 1, class 0x070002
    (serial controller, 16550-compatible), subsystem 1af4:1100, INTA. Linux's
    built-in 8250_pci driver binds to it and detects a 16550A.

BAR0: 8-byte I/O BAR, one 16550A (byte registers; DLAB = LCR bit 7)

    ======  ===========================  ===================================
    offset  read                         write
    ======  ===========================  ===================================
    0       RBR: next received byte      THR: byte to send
            (DLAB: divisor low)          (DLAB: divisor low)
    1       IER: interrupt enables       IER (bits 0-3: RX data, THR empty,
            (DLAB: divisor high)         line status, modem status)
    2       IIR: highest pending         FCR: FIFO enable, clear RX/TX FIFO,
            interrupt; bits 7-6 set      RX trigger level (1/4/8/14 bytes)
            when FIFOs are on
    3       LCR                          LCR (word length etc.; bit 7 DLAB)
    4       MCR                          MCR: DTR, RTS, OUT1, OUT2, LOOP
    5       LSR: data ready, overrun,    ignored
            THR empty, transmitter empty
    6       MSR: CTS, DSR, RI, DCD and   ignored
            their change bits
    7       SCR: scratch                 SCR
    ======  ===========================  ===================================

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

__all__ = ["PciSerial", "SerialBackendError"]

# Register offsets.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
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
        self.add_bar(0, IoBar(8)).map(self)
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

    def reset(self) -> None:
        self.ier = 0
        self.iir = IIR_NO_INT
        self.lcr = 0
        self.mcr = MCR_OUT2
        self.lsr = LSR_TEMT | LSR_THRE
        self.msr = MSR_DCD | MSR_DSR | MSR_CTS
        self.scr = 0
        self.fcr = 0
        self.divider = 12
        self.rx_trigger = 1
        self.thr_ipending = False
        self.timeout_ipending = False
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

    # -- BAR0 ------------------------------------------------------------------------------

    def pio_read(self, base, offset, data) -> None:
        for i in range(len(data)):
            data[i] = self._read(offset + i)

    def pio_write(self, base, offset, data) -> None:
        for i, value in enumerate(data):
            self._write(offset + i, value)

    def _read(self, reg: int) -> int:
        if reg == RBR:
            if self.lcr & LCR_DLAB:
                return self.divider & 0xFF
            value = self.rx_fifo.popleft() if self.rx_fifo else 0
            self.timeout_ipending = False
            if not self.rx_fifo:
                self.lsr &= ~(LSR_DR | LSR_BI)
            self._refill_rx()  # the next host byte moves in (sets DR again)
            if self.rx_fifo and self.fcr & FCR_FE:
                self._arm_timeout()
            self._update_irq()
            return value
        if reg == IER:
            return (self.divider >> 8) & 0xFF if self.lcr & LCR_DLAB else self.ier
        if reg == IIR:
            value = self.iir
            if value & 0x0F == IIR_THRI:
                self.thr_ipending = False
                self._update_irq()
            return value
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            value = self.lsr
            if self.lsr & (LSR_BI | LSR_OE):
                self.lsr &= ~(LSR_BI | LSR_OE)
                self._update_irq()
            return value
        if reg == MSR:
            if self.mcr & MCR_LOOP:  # outputs wired back: OUT2->DCD, OUT1->RI, RTS->CTS, DTR->DSR
                return (self.mcr & 0x0C) << 4 | (self.mcr & MCR_RTS) << 3 | (self.mcr & MCR_DTR) << 5
            value = self.msr
            if self.msr & MSR_ANY_DELTA:
                self.msr &= 0xF0
                self._update_irq()
            return value
        return self.scr  # SCR

    def _write(self, reg: int, value: int) -> None:
        if reg == THR:
            if self.lcr & LCR_DLAB:
                self.divider = self.divider & 0xFF00 | value
                return
            self.thr_ipending = False
            self.lsr &= ~(LSR_THRE | LSR_TEMT)
            self._transmit(value)
        elif reg == IER:
            if self.lcr & LCR_DLAB:
                self.divider = self.divider & 0x00FF | value << 8
                return
            self.ier = value & 0x0F
            if self.lsr & LSR_THRE:
                self.thr_ipending = True
            self._update_irq()
        elif reg == FCR:
            if value == self.fcr:
                return
            if (value ^ self.fcr) & FCR_FE:
                value |= FCR_XFR | FCR_RFR  # switching FIFOs on or off empties them
            self.fcr = value & 0xC9
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
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            was_loop = self.mcr & MCR_LOOP
            self.mcr = value & 0x1F
            if was_loop and not self.mcr & MCR_LOOP:
                self._refill_rx()
                self._update_irq()
        elif reg == SCR:
            self.scr = value

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
