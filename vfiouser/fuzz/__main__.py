"""``python -m vfiouser.fuzz``: see :mod:`vfiouser.fuzz.cli`."""

import sys

from .cli import main

sys.exit(main())
