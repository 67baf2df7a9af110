"""``python -m vfiouser``: the same as the ``vfiouser`` command."""

import sys

from .cli import main

sys.exit(main())
