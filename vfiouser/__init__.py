"""vfiouser: serve Python PCI device models to an unmodified QEMU over vfio-user.

The pieces, in the order data flows through them:

* :mod:`vfiouser.transport` - framing and fd passing on the UNIX socket;
* :mod:`vfiouser.protocol` - every message declared once with construct;
* :mod:`vfiouser.session` - one client: negotiation, dispatch, interrupts, DMA maps;
* :mod:`vfiouser.endpoint` - the device model as the protocol sees it;
* :mod:`vfiouser.server` - the listening socket, one client after another;
* :mod:`vfiouser.client` - a Python client for tests and tools;
* :mod:`vfiouser.cli` - ``vfiouser serve <device> --socket PATH``.

Device models live in :mod:`devices` and never import this package.
"""

from .client import Client
from .errors import ErrorReply, ProtocolError, VfioUserError
from .server import Server, serve_in_thread
from .session import ServerCapabilities

__version__ = "0.1.0"

__all__ = ["Server", "serve_in_thread", "Client", "ServerCapabilities", "VfioUserError", "ProtocolError",
           "ErrorReply", "__version__"]
