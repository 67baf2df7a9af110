"""Several models served on sockets of their own, with the ``-device`` arguments that attach them.

Used by ``qemu_qtest``, ``linux_guest`` and ``vfiouser guest``: each model (a
class, a device name, or an instance) is served on a private socket on a
background thread and gets the next PCI slot from :data:`FIRST_SLOT` on. A
string that starts with ``{`` is taken as a ready ``-device`` value (a device
you serve yourself) and passed through unchanged, without a slot.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from vfiouser.backends import DEFAULT_BACKEND
from vfiouser.server import serve_in_thread

from .device import make_model

__all__ = ["ServedModels", "FIRST_SLOT"]

#: The slot of the first served device; the next ones follow.
FIRST_SLOT = 4


class ServedModels:
    """Serve ``devices`` (see the module docstring) on ``backend`` until :meth:`close`.

    ``params`` go to the class when there is exactly one device. After construction:
    :attr:`models` (instances, in order), :attr:`slots`, :attr:`servers` and
    :attr:`device_args` (the ``-device`` values, pass-through strings included).
    """

    def __init__(self, devices, *, backend: str | None = None, params: dict | None = None) -> None:
        self.backend = backend or DEFAULT_BACKEND
        self.models, self.slots, self.servers, self.device_args = [], [], [], []
        self._stack = contextlib.ExitStack()
        try:
            directory = tempfile.mkdtemp(prefix="vfu-")
            self._stack.callback(shutil.rmtree, directory, True)
            slot = FIRST_SLOT
            for i, device in enumerate(devices):
                if isinstance(device, str) and device.lstrip().startswith("{"):
                    self.device_args.append(device)
                    continue
                model = make_model(device, params or {})
                server = self._stack.enter_context(
                    serve_in_thread(model, os.path.join(directory, f"dev{i}.sock"), backend=self.backend))
                self.models.append(model)
                self.slots.append(slot)
                self.servers.append(server)
                self.device_args.append(server.qemu_device_json(addr=f"{slot:02x}.0"))
                slot += 1
        except BaseException:
            self._stack.close()
            raise

    def close(self) -> None:
        """Stop every server (each model is power-cycled as its client leaves)."""
        self._stack.close()

    def __enter__(self) -> ServedModels:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
