"""A seeded, bounded mutation fuzzer of whole vfio-user sessions (``scripts/fuzz``,
``python -m vfiouser.fuzz``; ``docs/fuzzing.md``).

It serves built-in devices in a child process, exactly as a user would
(``python -m vfiouser serve DEVICE --socket PATH``: the C fast loop when it is built,
the pure-Python loop under ``VFIOUSER_PURE_PYTHON=1``), and plays sessions against it,
one connection after another. Each session is shaped like one QEMU 11.1.3 really had
(the recordings in ``tests/vectors``), adapted to the device, varied, and mutated; the
server is checked for crashes, hangs, replies to NO_REPLY, missing or malformed replies,
and growth of its fds, threads, mappings and RSS.

Everything a session does is decided in advance by ``random.Random`` seeded with
``(seed, device, session number)``, so ``--device D --seed S --session N`` replays
exactly the session that failed.

Modules: :mod:`.wire` (messages, plans, failures), :mod:`.shapes` (recorded sessions
fitted to a device), :mod:`.mutations`, :mod:`.fds`, :mod:`.plan`, :mod:`.child` (the
server process and its /proc), :mod:`.watch` (its resources between sessions),
:mod:`.inbox`, :mod:`.replies` and :mod:`.player` (one session), :mod:`.report`,
:mod:`.run` (a whole run), :mod:`.cli`.
"""

from .cli import build_parser, main
from .plan import build_plan, iter_plans
from .run import Fuzzer
from .shapes import DeviceProfile, default_vector_dir, device_profile, load_shapes
from .wire import BUILTIN, FuzzFailure, Msg, SessionPlan

__all__ = ["BUILTIN", "FuzzFailure", "Msg", "SessionPlan", "DeviceProfile", "device_profile", "default_vector_dir",
           "load_shapes", "build_plan", "iter_plans", "Fuzzer", "build_parser", "main"]
