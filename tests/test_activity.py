"""The model's own activity as a recording or replaying backend sees it: deferred tasks told and stepped,
the device lock watched (and as plain as an RLock when it is not)."""

import threading
import time

from vfiouser.devices.edu import Edu
from vfiouser.devices.pci.lock import DeviceLock
from vfiouser.devices.pci.worker import DeviceWorker
from vfiouser.devices.port import ActivityWatcher, DevicePort, ModelActivity


class Log(ActivityWatcher):
    def __init__(self):
        self.seen = []

    def task_started(self, name):
        self.seen.append(("start", name, threading.current_thread().name))

    def task_finished(self, name, error):
        self.seen.append(("finish", name, type(error).__name__ if error else None))

    def lock_wanted(self):
        self.seen.append(("wanted", threading.current_thread().name))

    def lock_taken(self):
        self.seen.append(("taken", threading.current_thread().name))

    def lock_released(self):
        self.seen.append(("released", threading.current_thread().name))


def test_the_device_lock_reports_outermost_takes_only_while_watched():
    lock, log = DeviceLock(), Log()
    assert type(lock) is DeviceLock and isinstance(lock, type(threading.RLock()))
    lock.watch(log)
    with lock:
        with lock:
            pass
    me = threading.current_thread().name
    assert log.seen == [("wanted", me), ("taken", me), ("released", me)]
    cond = threading.Condition(lock)  # conditions work on it
    with cond:
        assert not cond.wait(0.01)
    lock.watch(None)
    assert type(lock) is DeviceLock
    log.seen.clear()
    with lock:
        assert lock._is_owned()
    assert log.seen == [] and not lock._is_owned()


def test_a_watcher_waiting_in_lock_wanted_holds_the_thread_back():
    lock, gate = DeviceLock(), threading.Event()
    order = []

    class Gate(ActivityWatcher):
        def lock_wanted(self):
            if threading.current_thread().name == "other":
                gate.wait(5)

    lock.watch(Gate())
    other = threading.Thread(target=lambda: (lock.acquire(), order.append("other"), lock.release()), name="other")
    other.start()
    time.sleep(0.05)
    with lock:
        order.append("main")
    gate.set()
    other.join(5)
    assert order == ["main", "other"]


def test_the_worker_tells_a_watcher_about_each_task():
    worker, log = DeviceWorker("t"), Log()
    worker.watcher = log

    def fine():
        pass

    def broken():
        raise ValueError("no")

    worker.submit(fine)
    worker.submit(broken)
    assert worker.wait_idle(5)
    assert [s[:2] for s in log.seen] == [("start", "test_the_worker_tells_a_watcher_about_each_task.<locals>.fine"),
                                        ("finish", "test_the_worker_tells_a_watcher_about_each_task.<locals>.fine"),
                                        ("start", "test_the_worker_tells_a_watcher_about_each_task.<locals>.broken"),
                                        ("finish", "test_the_worker_tells_a_watcher_about_each_task.<locals>.broken")]
    assert log.seen[1][2] is None and log.seen[3][2] == "ValueError" and log.seen[0][2] == "t-worker"
    worker.stop()


def test_stepping_runs_tasks_only_when_told_in_submission_order_whatever_their_delay():
    worker, ran = DeviceWorker("s"), []
    worker.set_stepping(True)

    def a():
        ran.append("a")

    def b():
        ran.append("b")

    worker.submit(a, delay=30)  # due in 30 s: stepping ignores it
    worker.submit(b)
    worker.submit(a)
    time.sleep(0.1)
    assert ran == [] and [n.rsplit(".", 1)[1] for n in worker.waiting_tasks()] == ["a", "b", "a"]
    assert worker.start_next() and worker.wait_running(5)
    assert ran == ["a"]
    assert worker.start_next(DeviceWorker.task_name(a)) and worker.wait_running(5)
    assert ran == ["a", "a"]  # the oldest one of that name
    assert not worker.start_next("nothing.like.this")
    worker.set_stepping(False)
    assert worker.wait_idle(5) and ran == ["a", "a", "b"]
    worker.stop()


def test_pci_ports_offer_their_activity_and_other_ports_need_not():
    dev = Edu()
    activity = dev.port.activity
    assert isinstance(activity, ModelActivity) and activity is dev.port.activity
    log = Log()
    activity.watch(log, lock=True)
    with dev.lock:
        pass
    activity.watch(None)
    with dev.lock:
        pass
    assert [s[0] for s in log.seen] == ["wanted", "taken", "released"]
    assert DevicePort.activity.fget(dev.port) is None  # the port's default
