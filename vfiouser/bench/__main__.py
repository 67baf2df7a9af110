"""``python -m vfiouser.bench``: see :mod:`vfiouser.bench`."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
