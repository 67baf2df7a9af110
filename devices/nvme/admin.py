"""The admin command set: what the host sends on the admin queue (queue 0).

================================  =====================================================
command                           what the model does
================================  =====================================================
Identify (06h)                    CNS 00h namespace, 01h controller, 02h active
                                  namespace list, 03h namespace identification
                                  descriptors; other CNS values: Invalid Field
Create/Delete I/O CQ (05h/04h)    physically contiguous queues only (CAP.CQR); a CQ
                                  with SQs still attached cannot be deleted
Create/Delete I/O SQ (01h/00h)    bound to an existing CQ
Get Log Page (02h)                error information (empty), SMART / health,
                                  firmware slot, changed namespace list (read clears
                                  it and, unless RAE, re-arms its notice)
Set/Get Features (09h/0Ah)        arbitration, power management, temperature threshold,
                                  error recovery, volatile write cache, number of queues,
                                  interrupt coalescing and vector configuration, write
                                  atomicity, asynchronous event configuration; nothing
                                  is saveable
Asynchronous Event Request (0Ch)  held until an event (up to AERL + 1 at once)
Abort (08h)                       aborts a held Asynchronous Event Request; any other
                                  command has completed by the time an Abort is read
                                  (commands run in order), so it reports "not aborted"
Doorbell Buffer Config (7Ch)      shadow doorbells and event indexes for the I/O queues
                                  (page-aligned PRP1 and PRP2; see :mod:`.queues`)
================================  =====================================================

Anything else is Invalid Command Opcode. The handlers run on the controller's
worker (deferred work) and take the device lock around queue state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import identify
from .queues import CompletionQueue, SubmissionQueue
from .spec import (
    AEN_NS_ATTR,
    AER_INFO_NS_ATTR_CHANGED,
    AER_TYPE_NOTICE,
    CQES_LOG2,
    NSID_ALL,
    OK,
    PAGE_SIZE,
    SQES_LOG2,
    AdminOpcode,
    Command,
    Completion,
    Feature,
    LogPage,
    Status,
)

if TYPE_CHECKING:
    from .controller import NvmeController

__all__ = ["AdminCommands", "Features"]

#: Bit 31 of CDW10 in Set Features: save the value (the model has nothing saveable).
_SAVE = 1 << 31
_TEMP_OVER_DEFAULT = identify.WARNING_TEMP_K


@dataclass
class Features:
    """The current value of every feature the model keeps (reset by a controller reset)."""

    values: dict[int, int] = field(default_factory=dict)
    #: temperature thresholds by (sensor, under?) (Feature 04h selects with TMPSEL and THSEL)
    thresholds: dict[tuple[int, bool], int] = field(default_factory=dict)
    #: I/O queues allocated by Number of Queues (1-based), or None until the host sets it
    queues_allocated: int | None = None

    def defaults(self, max_queues: int) -> None:
        self.values = {Feature.ARBITRATION: 0, Feature.POWER_MANAGEMENT: 0, Feature.ERROR_RECOVERY: 0,
                       Feature.VOLATILE_WRITE_CACHE: 1, Feature.INTERRUPT_COALESCING: 0,
                       Feature.WRITE_ATOMICITY: 0, Feature.ASYNC_EVENT_CONFIG: 0,
                       Feature.NUMBER_OF_QUEUES: (max_queues - 1) | (max_queues - 1) << 16}
        self.thresholds = {}
        self.queues_allocated = None


class AdminCommands:
    """Executes admin commands for one controller."""

    def __init__(self, ctrl: NvmeController) -> None:
        self.ctrl = ctrl
        self._handlers = {
            AdminOpcode.DELETE_IO_SQ: self.delete_sq,
            AdminOpcode.CREATE_IO_SQ: self.create_sq,
            AdminOpcode.GET_LOG_PAGE: self.get_log_page,
            AdminOpcode.DELETE_IO_CQ: self.delete_cq,
            AdminOpcode.CREATE_IO_CQ: self.create_cq,
            AdminOpcode.IDENTIFY: self.identify,
            AdminOpcode.ABORT: self.abort,
            AdminOpcode.SET_FEATURES: self.set_features,
            AdminOpcode.GET_FEATURES: self.get_features,
            AdminOpcode.ASYNC_EVENT_REQUEST: self.async_event_request,
            AdminOpcode.DOORBELL_BUFFER_CONFIG: self.doorbell_buffer_config,
        }

    def execute(self, cmd: Command) -> Completion | None:
        """The command's completion, or None when it is held (an Asynchronous Event Request)."""
        handler = self._handlers.get(cmd.opcode)
        if handler is None:
            self.ctrl.log.debug("admin opcode %#04x not supported", cmd.opcode)
            return Completion(Status.INVALID_OPCODE)
        if cmd.fused or cmd.uses_sgl:
            return Completion(Status.INVALID_FIELD)
        return handler(cmd)

    # -- identify --------------------------------------------------------------------------

    def identify(self, cmd: Command) -> Completion:
        ctrl = self.ctrl
        cns = cmd.cdw10 & 0xFF
        if cns == 0x01:
            data = identify.identify_controller(ctrl.identity())
        elif cns == 0x00:
            if cmd.nsid == ctrl.NSID:
                data = identify.identify_namespace(ctrl.namespace())
            elif cmd.nsid in (0, NSID_ALL) or cmd.nsid > ctrl.NAMESPACES:
                return Completion(Status.INVALID_NAMESPACE)
            else:
                data = bytes(identify.IDENTIFY_SIZE)  # an inactive NSID: all zeros
        elif cns == 0x02:
            if cmd.nsid >= 0xFFFF_FFFE:
                return Completion(Status.INVALID_NAMESPACE)
            data = identify.active_namespaces(cmd.nsid, [ctrl.NSID])
        elif cns == 0x03:
            if cmd.nsid != ctrl.NSID:
                return Completion(Status.INVALID_NAMESPACE)
            data = identify.namespace_descriptors(ctrl.namespace())
        else:
            return Completion(Status.INVALID_FIELD)
        return ctrl.to_host(cmd, data)

    # -- queues ----------------------------------------------------------------------------

    def _queue_args(self, cmd: Command) -> tuple[int, int, int | None]:
        """``(qid, entries, status)`` from CDW10; ``status`` is None if they are acceptable."""
        qid, size = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
        if not 1 <= qid <= self.ctrl.io_queue_limit():
            return qid, size, Status.INVALID_QUEUE_IDENTIFIER
        if size < 2 or size > self.ctrl.MAX_QUEUE_ENTRIES:
            return qid, size, Status.INVALID_QUEUE_SIZE
        if not cmd.cdw11 & 0x1:  # PC: physically contiguous (CAP.CQR requires it)
            return qid, size, Status.INVALID_FIELD
        if cmd.prp1 % PAGE_SIZE or cmd.prp1 == 0:
            return qid, size, Status.PRP_OFFSET_INVALID
        return qid, size, None

    def create_cq(self, cmd: Command) -> Completion:
        ctrl = self.ctrl
        qid, size, bad = self._queue_args(cmd)
        if bad is not None:
            return Completion(bad)
        vector, interrupts = cmd.cdw11 >> 16, bool(cmd.cdw11 & 0x2)
        if ctrl.io_entry_sizes() != (SQES_LOG2, CQES_LOG2):
            return Completion(Status.INVALID_FIELD)
        if interrupts and vector >= ctrl.msix.vectors:
            return Completion(Status.INVALID_INTERRUPT_VECTOR)
        with ctrl.lock:
            if qid in ctrl.queues.cqs:
                return Completion(Status.INVALID_QUEUE_IDENTIFIER)
            cq = ctrl.queues.cqs[qid] = CompletionQueue(qid, cmd.prp1, size, vector, interrupts)
        ctrl.log.debug("I/O CQ %d: %d entries at %#x, vector %d%s", qid, size, cmd.prp1, vector,
                       "" if interrupts else " (no interrupts)")
        ctrl.queues.attach_shadow(cq)
        return OK

    def create_sq(self, cmd: Command) -> Completion:
        ctrl = self.ctrl
        qid, size, bad = self._queue_args(cmd)
        if bad is not None:
            return Completion(bad)
        cqid = cmd.cdw11 >> 16
        with ctrl.lock:
            cq = ctrl.queues.cqs.get(cqid) if cqid else None
            if cq is None:
                return Completion(Status.COMPLETION_QUEUE_INVALID)
            if qid in ctrl.queues.sqs:
                return Completion(Status.INVALID_QUEUE_IDENTIFIER)
            sq = ctrl.queues.sqs[qid] = SubmissionQueue(qid, cmd.prp1, size, cq)
            cq.sqs.add(qid)
        ctrl.log.debug("I/O SQ %d: %d entries at %#x, completions on CQ %d", qid, size, cmd.prp1, cqid)
        ctrl.queues.attach_shadow(sq)
        ctrl.queues.check_in_place(sq)
        return OK

    def delete_sq(self, cmd: Command) -> Completion:
        ctrl = self.ctrl
        qid = cmd.cdw10 & 0xFFFF
        with ctrl.lock:
            sq = ctrl.queues.sqs.get(qid) if qid else None
            if sq is None:
                return Completion(Status.INVALID_QUEUE_IDENTIFIER)
            del ctrl.queues.sqs[qid]
            sq.cq.sqs.discard(qid)
        return OK

    def delete_cq(self, cmd: Command) -> Completion:
        ctrl = self.ctrl
        qid = cmd.cdw10 & 0xFFFF
        with ctrl.lock:
            cq = ctrl.queues.cqs.get(qid) if qid else None
            if cq is None:
                return Completion(Status.INVALID_QUEUE_IDENTIFIER)
            if cq.sqs:
                return Completion(Status.INVALID_QUEUE_DELETION)
            del ctrl.queues.cqs[qid]
        ctrl.queues.update_intx()
        return OK

    # -- log pages -------------------------------------------------------------------------

    def get_log_page(self, cmd: Command) -> Completion:
        ctrl = self.ctrl
        lid = cmd.cdw10 & 0xFF
        retain = bool(cmd.cdw10 & (1 << 15))
        length = (((cmd.cdw11 & 0xFFFF) << 16 | cmd.cdw10 >> 16) + 1) * 4
        offset = cmd.cdw12 | cmd.cdw13 << 32
        if offset % 4:
            return Completion(Status.INVALID_FIELD)
        if lid == LogPage.ERROR_INFORMATION:
            page = bytes(64)  # one entry (ELPE 0), never used: errors are reported in completions
        elif lid == LogPage.SMART_HEALTH:
            if cmd.nsid not in (ctrl.NSID, NSID_ALL, 0):
                return Completion(Status.INVALID_NAMESPACE)
            page = ctrl.smart_log()
        elif lid == LogPage.FIRMWARE_SLOT:
            page = identify.firmware_slot_log(ctrl.FIRMWARE)
        elif lid == LogPage.CHANGED_NAMESPACES:
            with ctrl.lock:
                changed, ctrl.events.changed = sorted(ctrl.events.changed), set()
                if not retain:
                    ctrl.events.masked.discard(LogPage.CHANGED_NAMESPACES)
            page = struct.pack(f"<{len(changed)}I", *changed).ljust(4096, b"\0")
        else:
            return Completion(Status.INVALID_LOG_PAGE)
        if offset > len(page):
            return Completion(Status.INVALID_FIELD)
        data = page[offset : offset + length]
        return ctrl.to_host(cmd, data + bytes(length - len(data)))

    # -- features --------------------------------------------------------------------------

    def set_features(self, cmd: Command) -> Completion:
        ctrl = self.ctrl
        fid, value = cmd.cdw10 & 0xFF, cmd.cdw11
        if cmd.cdw10 & _SAVE:
            return Completion(Status.FEATURE_NOT_SAVEABLE)
        features = ctrl.features
        with ctrl.lock:
            if fid == Feature.NUMBER_OF_QUEUES:
                if (value & 0xFFFF) == 0xFFFF or (value >> 16) == 0xFFFF:
                    return Completion(Status.INVALID_FIELD)
                if features.queues_allocated is None:  # allocated once per controller reset
                    wanted = max((value & 0xFFFF) + 1, (value >> 16) + 1)
                    features.queues_allocated = min(wanted, ctrl.max_queues)
                n = features.queues_allocated - 1
                features.values[fid] = n | n << 16
                return Completion(OK.status, n | n << 16)
            if fid == Feature.TEMPERATURE_THRESHOLD:
                sensor, under = value >> 16 & 0xF, bool(value >> 20 & 0x3)
                if sensor not in (0, 0xF) or value >> 20 & 0x3 > 1:
                    return Completion(Status.INVALID_FIELD)
                features.thresholds[(sensor, under)] = value & 0xFFFF
                return OK
            if fid == Feature.VOLATILE_WRITE_CACHE:
                features.values[fid] = value & 0x1
                return OK
            if fid == Feature.ASYNC_EVENT_CONFIG:
                features.values[fid] = value & AEN_NS_ATTR
            elif fid in features.values:
                features.values[fid] = value
            else:
                return Completion(Status.INVALID_FIELD)
        if fid == Feature.ASYNC_EVENT_CONFIG:
            ctrl.deliver_events()  # notices that waited for this
        return OK

    def get_features(self, cmd: Command) -> Completion:
        ctrl = self.ctrl
        fid, select = cmd.cdw10 & 0xFF, cmd.cdw10 >> 8 & 0x7
        features = ctrl.features
        if select == 3:  # supported capabilities: changeable, not saveable, not per namespace
            return Completion(OK.status, 0x4) if fid in features.values or fid == Feature.TEMPERATURE_THRESHOLD \
                else Completion(Status.INVALID_FIELD)
        if select > 3:
            return Completion(Status.INVALID_FIELD)
        default = select in (1, 2)  # nothing is saved: "saved" reads the default
        with ctrl.lock:
            if fid == Feature.TEMPERATURE_THRESHOLD:
                sensor, under = cmd.cdw11 >> 16 & 0xF, bool(cmd.cdw11 >> 20 & 0x3)
                if sensor not in (0, 0xF) or cmd.cdw11 >> 20 & 0x3 > 1:
                    return Completion(Status.INVALID_FIELD)
                fallback = 0 if under else _TEMP_OVER_DEFAULT
                value = fallback if default else features.thresholds.get((sensor, under), fallback)
                return Completion(OK.status, value)
            if fid not in features.values:
                return Completion(Status.INVALID_FIELD)
            if default:
                fresh = Features()
                fresh.defaults(ctrl.max_queues)
                return Completion(OK.status, fresh.values[fid])
            return Completion(OK.status, features.values[fid])

    def doorbell_buffer_config(self, cmd: Command) -> Completion:
        if not cmd.prp1 or not cmd.prp2 or cmd.prp1 % PAGE_SIZE or cmd.prp2 % PAGE_SIZE:
            return Completion(Status.INVALID_FIELD)
        self.ctrl.queues.use_shadow_doorbells(cmd.prp1, cmd.prp2)
        return OK

    # -- events and aborts -----------------------------------------------------------------

    def async_event_request(self, cmd: Command) -> Completion | None:
        ctrl = self.ctrl
        with ctrl.lock:
            if len(ctrl.events.requests) >= ctrl.AER_LIMIT:
                return Completion(Status.ASYNC_EVENT_LIMIT_EXCEEDED)
            ctrl.events.requests.append(cmd.cid)
        ctrl.deliver_events()
        return None

    def abort(self, cmd: Command) -> Completion:
        ctrl = self.ctrl
        sqid, cid = cmd.cdw10 & 0xFFFF, cmd.cdw10 >> 16
        with ctrl.lock:
            held = sqid == 0 and cid in ctrl.events.requests
            if held:
                ctrl.events.requests.remove(cid)
        if held:
            ctrl.queues.complete_admin(cid, Completion(Status.ABORT_REQUESTED))
            return Completion(OK.status, 0)
        return Completion(OK.status, 1)  # bit 0: the command was not aborted


def event_dword(event_type: int, info: int, log_page: int) -> int:
    """Dword 0 of an Asynchronous Event Request's completion."""
    return event_type | info << 8 | log_page << 16


NS_ATTR_NOTICE = event_dword(AER_TYPE_NOTICE, AER_INFO_NS_ATTR_CHANGED, LogPage.CHANGED_NAMESPACES)
