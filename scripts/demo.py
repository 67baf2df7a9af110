"""The demo behind scripts/demo: a real Linux guest drives three Python devices.

* ``idio16`` at 00:04.0: the GPIO card, bound by Linux's gpio-pci-idio-16 driver;
* ``pci-serial`` at 00:05.0: a 16550A UART that carries the guest's console;
* ``virtio-rng`` at 00:06.0: an entropy source behind /dev/hwrng.

Debian's stock kernel boots under QEMU with busybox; the guest walks a light
along the GPIO outputs, reads inputs the host flips, pulls random bytes, and
powers off. Everything the guest prints reaches us through the Python UART.
"""

import os
import socket
import sys
import tempfile
import threading
import time


from vfiouser.devices.idio16 import Idio16
from vfiouser.devices.serial import PciSerial
from vfiouser.devices.virtio import VirtioRng
from vfiouser.testing.guest import Guest, GuestAssets, default_accel
from vfiouser.server import serve_in_thread

COLOR = sys.stdout.isatty()
BOLD, DIM, CYAN, GREEN, YELLOW, RESET = (
    ("\033[1m", "\033[2m", "\033[36m", "\033[32m", "\033[33m", "\033[0m") if COLOR else ("",) * 6
)
_print_lock = threading.Lock()


def say(prefix: str, color: str, text: str) -> None:
    with _print_lock:
        print(f"{color}{prefix:>6}|{RESET} {text}", flush=True)


def step(text: str) -> None:
    with _print_lock:
        print(f"\n{BOLD}{text}{RESET}", flush=True)


GUEST_SCRIPT = r"""
G=/sys/class/gpio
exec 3< /dev/ttyS0   # QEMU's own UART, the host's "go" signal; open now, or a byte sent early is lost
echo "Hello from Linux $(uname -r), on a Python 16550A"
echo "PCI devices the guest sees:"
for d in /sys/bus/pci/devices/0000:00:0[456].0; do
    echo "  ${d##*/}  $(cat $d/vendor):$(cat $d/device)  driver $(basename $(readlink $d/driver))"
done
base=$(cat $G/gpiochip*/base)
for i in $(seq 0 31); do echo $((base + i)) > $G/export; done
echo "gpiochip $(cat $G/gpiochip*/label): $(cat $G/gpiochip*/ngpio) lines; walking a light along OUT0-OUT15"
for i in $(seq 0 15); do
    echo 1 > $G/OUT$i/value; sleep 0.15; echo 0 > $G/OUT$i/value
done
echo "waiting for the host to set the inputs..."
read -t 20 _ <&3 || echo "no word from the host"
v=0; for i in $(seq 15 -1 0); do v=$((v * 2 + $(cat $G/IIN$i/value))); done
printf "inputs read by the guest: 0x%04x\n" $v
echo "32 bytes from /dev/hwrng ($(cat /sys/class/misc/hw_random/rng_current)):"
dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 -v
echo "interrupts: $(awk '/virtio0-input|ttyS1/ {printf "%s=%s ", $NF, $2}' /proc/interrupts)"
echo "powering off"
"""


def main() -> int:
    assets = GuestAssets.find()
    with tempfile.TemporaryDirectory(prefix="vfiouser-demo-") as tmp:
        return run(assets, tmp)


def run(assets: GuestAssets, tmp: str) -> int:
    gpio, uart, rng = Idio16(), PciSerial(backend=f"unix:{tmp}/uart"), VirtioRng()
    step("1. Three Python device models, each served on its own vfio-user socket")
    with serve_in_thread(gpio, f"{tmp}/gpio.sock") as s_gpio, \
         serve_in_thread(uart, f"{tmp}/uart.sock") as s_uart, \
         serve_in_thread(rng, f"{tmp}/rng.sock") as s_rng:
        for name, server in (("idio16", s_gpio), ("serial", s_uart), ("rng", s_rng)):
            say(name, CYAN, f"{server.device!r} on {server.path}")
        console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        console.connect(f"{tmp}/uart")
        lines: list[str] = []
        inputs_wanted = threading.Event()

        def show_uart() -> None:
            buf = b""
            while chunk := console.recv(4096):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace").rstrip("\r")
                    lines.append(text)
                    if not text.startswith("VFIOUSER-GUEST"):  # the harness's own markers
                        say("uart", GREEN, text)
                    if "waiting for the host" in text:
                        inputs_wanted.set()

        threading.Thread(target=show_uart, daemon=True).start()

        def show_gpio() -> None:
            last = gpio.outputs
            while not done.is_set():
                now = gpio.outputs
                if now != last and now:  # each light as it comes on
                    lit = [i for i in range(16) if now >> i & 1]
                    say("gpio", YELLOW, "outputs " + "".join("#" if now >> i & 1 else "." for i in range(16))
                        + f"   (OUT{lit[0]} high)")
                last = now
                time.sleep(0.02)

        done = threading.Event()
        threading.Thread(target=show_gpio, daemon=True).start()

        step(f"2. Debian's kernel {assets.version} boots under QEMU ({default_accel().upper()}), "
             "its console on the Python UART")
        devices = [s_gpio.qemu_device_json(addr="04.0"), s_uart.qemu_device_json(addr="05.0"),
                   s_rng.qemu_device_json(addr="06.0")]
        with Guest(assets, GUEST_SCRIPT + "sleep 0.3\n", devices=devices, modules=["gpio-pci-idio-16", "virtio-rng"],
                   console="ttyS1", append="quiet rng_core.default_quality=0") as guest:
            if inputs_wanted.wait(60):
                value = 0xA5C3
                say("gpio", YELLOW, f"the host drives inputs IIN0-15 to {value:#06x}")
                gpio.set_inputs(value)
                guest.send("\n")
            result = guest.wait(120)
        done.set()
        time.sleep(0.2)
        step("3. The guest powered off")
        say("rng", CYAN, f"the entropy device handed out {rng.produced} bytes")
        say("serial", CYAN, f"the UART carried {uart.bytes_sent} bytes from the guest")
        say("qemu", CYAN, f"exited with status {result.qemu_status} after {result.elapsed:.1f} s")
        console.close()
    uart.close()
    ok = any("inputs read by the guest: 0xa5c3" in line for line in lines) and \
        not any("no word from the host" in line for line in lines)
    print(f"\n{BOLD}{'Done.' if ok else 'Something went wrong (see above).'}{RESET} "
          "Serve a device yourself:  .venv/bin/vfiouser serve idio16 --socket /tmp/idio16.sock -v")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
