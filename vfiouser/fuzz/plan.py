"""Session plans: a recorded shape, additions and mutations, all decided by one
``random.Random`` seeded with (seed, device, session number), so that a session replays alone."""

from __future__ import annotations

import random
import struct

from ..protocol import Command
from .mutations import mutate
from .shapes import DeviceProfile, adapt, fire_vectors, kvm_intx, msi_setup, poke, with_write_multi
from .wire import ACCESS, CONFIG_REGION, HDR, Msg, SessionPlan


def build_plan(seed: int, device: str, number: int, prof: DeviceProfile,
               shapes: dict[str, list[Msg]]) -> SessionPlan:
    """The plan of session ``number`` for ``device``: a pure function of its arguments.

    Negative numbers are warm-up sessions: a whole recorded session, unmutated,
    every message waited for as QEMU does at realize time.
    """
    rng = random.Random(f"vfiouser-fuzz:{seed}:{device}:{number}")
    shape_name = rng.choice(sorted(shapes))
    base = adapt(shapes[shape_name], prof)
    warmup = number < 0
    if warmup:
        msgs = base
    else:
        body = base[1:]
        if rng.random() < 0.4:  # a window of the recorded session
            start = rng.randrange(len(body))
            body = body[start:start + rng.randrange(1, len(body) - start + 1)]
        if rng.random() < 0.5:
            body = with_write_multi(body, rng)
        if rng.random() < 0.4:
            at = next((k + 1 for k, m in enumerate(body) if m.cmd == Command.DEVICE_SET_IRQS and m.fds), None)
            if at is not None:
                body[at:at] = kvm_intx("reference §4.1 (KVM INTx resample set-up)")
        if rng.random() < 0.25:
            at = rng.randrange(len(body) + 1)
            body[at:at] = msi_setup(rng)
        for _ in range(rng.choice((0, 0, 1, 2, 4, 8))):
            body.insert(rng.randrange(len(body) + 1), poke(rng, prof))
        if rng.random() < 0.4:
            at = next((k + 1 for k, m in enumerate(body) if m.cmd == Command.DEVICE_SET_IRQS and m.fds), None)
            if at is not None:
                at = rng.randrange(at, len(body) + 1)
                body[at:at] = fire_vectors(rng, prof)
        msgs = [base[0]] + body
    msgs.append(Msg(Command.REGION_READ, 0, ACCESS.pack(0, CONFIG_REGION, 4), origin="sentinel (vendor/device id)"))
    mutated: list[int] = []
    if not warmup:
        count = 0 if rng.random() < 0.12 else min(8, 1 + int(rng.expovariate(0.7)))
        # Messages that carry fds or change state are picked more often than region accesses.
        weights = [6 if m.fds else 1 if m.cmd in (Command.REGION_READ, Command.REGION_WRITE) else 4
                   for m in msgs[1:-1]]
        for _ in range(count):
            i = 0 if rng.random() < 0.08 else rng.choices(range(1, len(msgs) - 1), weights)[0]
            m = msgs[i]
            family, what = mutate(m, rng, first=(i == 0))
            m.notes.append(f"{family}: {what}")
            if i not in mutated:
                mutated.append(i)
        # The first message after which the session cannot go on ends the plan.
        for i, m in enumerate(msgs):
            if m.ends:
                del msgs[i + 1:]
                break
        mutated = sorted(i for i in mutated if i < len(msgs))
    base_id = rng.randrange(0x10000)
    for i, m in enumerate(msgs):
        m.msg_id = (base_id + i) & 0xFFFF
    if warmup:
        flush = set(range(len(msgs)))
    else:
        every = rng.choice((1, 2, 3, 4, 8, 16, 64))
        flush = {i for i in range(len(msgs)) if rng.randrange(every) == 0}
        flush |= {i - 1 for i, m in enumerate(msgs) if m.fd_check and i > 0}
    flush.add(len(msgs) - 1)
    plan = SessionPlan(number, device, shape_name, msgs, flush, mutated=mutated)
    if not warmup:
        if rng.random() < 0.12:
            i = rng.randrange(len(msgs))
            plan.cut = (i, rng.randrange(HDR.size + len(msgs[i].payload)))
            del msgs[i + 1:]  # never sent: not part of the session (nor of the budget)
            plan.mutated = [k for k in plan.mutated if k <= i]
            plan.flush_after = {k for k in plan.flush_after if k <= i}
        plan.half_close = rng.random() < 0.5 and plan.cut is None
        resample_like = any(m.cmd == Command.DEVICE_SET_IRQS and (m.fds and set(m.fds) - {"eventfd"}
                            or len(m.payload) >= 8 and struct.unpack_from("<I", m.payload, 4)[0] & 0x14 == 0x14)
                            for m in msgs)
        plan.idle_check = resample_like or number % 25 == 0
        plan.linger = 0.12 if rng.random() < 0.02 else 0.0
    return plan


def iter_plans(seed: int, devices: list[str], budget: int, profiles: dict[str, DeviceProfile],
               shapes: dict[str, list[Msg]]):
    """Plans of a whole run: the message budget split evenly over ``devices``, in order;
    sessions are numbered across the run."""
    number = 0
    for k, device in enumerate(devices):
        share = budget // len(devices) + (1 if k < budget % len(devices) else 0)
        used = 0
        while used < share:
            plan = build_plan(seed, device, number, profiles[device], shapes)
            yield plan
            used += len(plan.msgs)
            number += 1
