"""An NVMe controller in Python, driven by Linux's own ``nvme`` driver.

``vfiouser serve nvme --param file=disk.img`` serves
:class:`~vfiouser.devices.nvme.controller.NvmeController`: an NVM Express 1.4
controller with one namespace backed by a raw image file. The package is laid
out as the specification is:

* :mod:`.spec` - opcodes, status codes, the command and completion layouts;
* :mod:`.registers` - the controller registers, declared as a table;
* :mod:`.queues` - submission and completion queues in guest memory, PRPs;
* :mod:`.identify` - Identify data and log pages;
* :mod:`.admin` - the admin command set;
* :mod:`.nvm` - the NVM (I/O) command set;
* :mod:`.controller` - the PCI function: BARs, doorbells, MSI-X, enable, reset,
  shutdown, and the deferred work that runs the queues.

``docs/storage.md`` says what is implemented and what is not;
``docs/writing-a-device.md`` walks through the model as an example.
"""

from .controller import NvmeController
from .spec import AdminOpcode, Command, Completion, NvmOpcode, Status

__all__ = ["NvmeController", "AdminOpcode", "NvmOpcode", "Command", "Completion", "Status"]
