"""NVMe queues in guest memory, and the PRPs that say where a command's data is.

A submission queue (SQ) is a ring of 64-byte commands the host fills; it
tells the controller how far by writing the SQ's *tail doorbell*. The
controller takes commands from its *head* and reports each in a completion
queue (CQ), a ring of 16-byte entries the controller fills from its tail; the
host consumes them and writes the CQ's *head doorbell*. Which entries are new
is told by the *phase tag*: the controller writes entries with phase 1 on its
first pass over the ring, 0 on the second, and so on, so the host needs no
index from the controller. Both rings are physically contiguous here
(CAP.CQR = 1).

The queue objects only keep the indexes; the controller reads and writes the
rings through its DMA API from deferred work.

A command's data is described by two PRP entries (Physical Region Pages).
PRP1 points at the first byte, anywhere in a page; if the data runs into a
second page, PRP2 is that page; if it runs into more, PRP2 points at a *PRP
list*, page addresses one after the other, the last entry of a full list page
pointing at the next list page. :func:`prp_segments` walks that into
``(address, length)`` segments, merging pages that are contiguous.

**Shadow doorbells** (Doorbell Buffer Config, an admin command Linux sends
when the controller offers it): the host also keeps each I/O queue's doorbell
values in a page of guest memory, and the controller keeps an *event index*
per doorbell in another page. The host writes the real (trapped) doorbell
only when its new value passes the event index, so a controller that sets a
SQ's event index to the tail it has seen hears of new commands once per
idle-to-busy transition, and one that parks a CQ's event index out of reach
never hears of consumed entries (it reads the shadow head when it needs room).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .spec import PAGE_SIZE, Status

__all__ = ["SubmissionQueue", "CompletionQueue", "prp_segments", "PrpError"]


@dataclass(eq=False)
class CompletionQueue:
    """A completion queue: where it is, its size, its interrupt, the controller's tail and phase."""

    qid: int
    base: int
    size: int
    vector: int = 0
    interrupts: bool = True
    head: int = 0
    tail: int = 0
    phase: int = 1
    #: SQs that report here (a CQ with any cannot be deleted)
    sqs: set = field(default_factory=set)
    #: completions that did not fit yet (the CQ was full): posted when the host frees entries
    backlog: list = field(default_factory=list)
    #: commands of this CQ's SQs running on the I/O threads, and whether they posted completions
    #: no interrupt told of yet (the last to finish sends it)
    io_running: int = 0
    io_unsignalled: bool = False
    #: guest addresses of the shadow head doorbell and its event index (Doorbell Buffer Config)
    shadow: int | None = None
    event: int | None = None
    #: the event index last written, so it is written only when it changes
    event_value: int | None = None

    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    def entry_address(self) -> int:
        return self.base + 16 * self.tail

    def advance(self) -> None:
        """The entry at the tail was written: move on (the phase flips when the tail wraps)."""
        self.tail += 1
        if self.tail == self.size:
            self.tail = 0
            self.phase ^= 1

    def pending(self) -> bool:
        """Entries the host has not consumed yet (an INTx-mode interrupt is asserted for them)."""
        return self.head != self.tail


@dataclass(eq=False)
class SubmissionQueue:
    """A submission queue: where it is, its size, its CQ, the host's tail and the controller's head."""

    qid: int
    base: int
    size: int
    cq: CompletionQueue
    head: int = 0
    tail: int = 0
    #: a task to process it is queued or running (set and cleared under the device lock)
    scheduled: bool = False
    #: guest addresses of the shadow tail doorbell and its event index (Doorbell Buffer Config)
    shadow: int | None = None
    event: int | None = None
    event_value: int | None = None
    #: its memory is reached in place, so it may run in its doorbell's handler
    in_place: bool = False
    #: shadow doorbells: rung since the running task last read the tail from memory
    rung: bool = False

    def waiting(self) -> int:
        """Commands between head and tail."""
        return (self.tail - self.head) % self.size


class PrpError(Exception):
    """A PRP entry breaks the rules; ``status`` is the completion status to report."""

    def __init__(self, message: str, status: int = Status.PRP_OFFSET_INVALID) -> None:
        super().__init__(message)
        self.status = status


def prp_segments(prp1: int, prp2: int, length: int, read_list, page: int = PAGE_SIZE) -> list[tuple[int, int]]:
    """The guest memory a command's ``length`` bytes occupy, as merged ``(addr, length)``.

    ``read_list(addr, count)`` returns ``count`` 8-byte entries read from guest
    memory at ``addr`` (the controller's DMA). Raises :class:`PrpError` for an
    entry that is not page-aligned where it must be (PRP2 as a page, list
    entries) or a list pointer that is not 8-byte aligned.
    """
    if length <= 0:
        return []
    first = min(length, page - prp1 % page)
    segments = [[prp1, first]]
    left = length - first
    if left == 0:
        return [(prp1, first)]
    if left <= page:  # PRP2 is the second (and last) page
        if prp2 % page:
            raise PrpError(f"PRP2 {prp2:#x} is not page-aligned")
        return [(prp1, length)] if prp1 + first == prp2 else [(prp1, first), (prp2, left)]
    if prp2 % 8:
        raise PrpError(f"PRP list pointer {prp2:#x} is not 8-byte aligned")
    pages = (left + page - 1) // page
    overshoot = pages * page - left  # the last page is only partly used
    list_addr = prp2
    last = segments[-1]
    end = prp1 + first
    mask = page - 1
    while pages:
        room = (page - list_addr % page) // 8  # entries left in this list page
        count = pages if pages <= room else room - 1  # the last slot of a full page chains
        entries = read_list(list_addr, count + (0 if pages <= room else 1))
        # Every entry taken as a whole page (the last one is trimmed below): one test and one
        # addition per page on the path of every large transfer.
        for entry in entries[:count]:
            if entry == end:
                last[1] += page
            elif entry & mask:
                raise PrpError(f"PRP list entry {entry:#x} is not page-aligned")
            else:
                last = [entry, page]
                segments.append(last)
            end = entry + page
        pages -= count
        if pages:
            list_addr = entries[count]
            if list_addr % 8:
                raise PrpError(f"chained PRP list pointer {list_addr:#x} is not 8-byte aligned")
    last[1] -= overshoot
    return [(addr, n) for addr, n in segments]


def unpack_entries(raw: bytes) -> list[int]:
    """8-byte little-endian PRP entries."""
    return list(struct.unpack(f"<{len(raw) // 8}Q", raw))
