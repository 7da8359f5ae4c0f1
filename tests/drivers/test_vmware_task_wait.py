"""How the vCenter driver follows a task: progress, cancel, timeout, an abort vCenter refuses.

vcsim runs every task to its end inside the call that starts it, so the contract suite never sees a
running task there. These tests feed the driver's wait loop scripted WaitForUpdatesEx answers
instead (a stand-in collector, no network), the way a real vCenter reports a running vMotion."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from pyVmomi import vim, vmodl

from drivers.base import ConnectionConfig, MigrationCancelled, MigrationSpec, MigrationTimedOut
from drivers.vmware import VCenterDriver, _Session


class ScriptedCollector:
    """Answers WaitForUpdatesEx from a script: a dict of task property changes, or None for a
    wait that ran out with nothing new (the script's end repeats None)."""

    def __init__(self, script: list[dict | None]):
        self.script = list(script)
        self.filters_created = self.filters_destroyed = 0

    def CreateFilter(self, spec, partialUpdates):  # noqa: N802 - pyvmomi's names
        self.filters_created += 1
        return SimpleNamespace(DestroyPropertyFilter=self._destroyed)

    def _destroyed(self):
        self.filters_destroyed += 1

    def WaitForUpdatesEx(self, version, options):  # noqa: N802
        assert options.maxWaitSeconds == 1, "waits must be short so cancel is seen between them"
        changes = self.script.pop(0) if self.script else None
        if changes is None:
            return None
        change_set = [SimpleNamespace(name=name, val=val) for name, val in changes.items()]
        return SimpleNamespace(
            version=f"v{len(self.script)}",
            filterSet=[SimpleNamespace(objectSet=[SimpleNamespace(changeSet=change_set)])],
        )


class Task(vim.Task):
    """vim.Task with a stand-in CancelTask: the collector's next answer is the cancelled end."""

    def __init__(self, collector: ScriptedCollector):
        super().__init__("task-42", None)
        self.collector = collector
        self.cancelled = 0

    def CancelTask(self):  # noqa: N802
        self.cancelled += 1
        self.collector.script[:0] = [{"info.state": "error", "info.error": vmodl.fault.RequestCanceled(msg="Canceled")}]


RUNNING = {"info.state": "running", "info.progress": 10, "info.cancelable": True}


def follow(script, *, cancel=None, started=None, timeout_s=None, grace_s=120.0, on_progress=None):
    driver = VCenterDriver(ConnectionConfig(kind="vcenter", url="vc.example.com", options={"abort_grace_s": grace_s}))
    collector = ScriptedCollector(script)
    session = _Session(content=None)
    session.idle_collectors.put(collector)
    task = Task(collector)
    end = driver._follow(
        session,
        task,
        started=time.monotonic() if started is None else started,
        timeout_s=timeout_s,
        cancel=cancel or threading.Event(),
        on_progress=on_progress,
    )
    return driver, end, task, collector, session


def test_progress_is_reported_until_the_task_succeeds_and_the_filter_is_dropped():
    seen = []
    _, end, task, collector, session = follow(
        [RUNNING, {"info.progress": 60}, None, {"info.state": "success", "info.progress": 100}],
        on_progress=seen.append,
    )
    assert (end.state, end.aborted, task.cancelled) == ("success", None, 0)
    assert seen == [10, 60]  # a wait with nothing new reports nothing; the end is not progress
    assert collector.filters_created == collector.filters_destroyed == 1
    assert session.idle_collectors.get_nowait() is collector  # back in the pool for the next wait


def test_cancel_cancels_a_cancelable_task_and_the_move_ends_cancelled():
    cancel = threading.Event()
    driver, end, task, _, _ = follow([RUNNING, None, None], cancel=cancel, on_progress=lambda _: cancel.set())
    assert (end.state, end.aborted, task.cancelled) == ("error", "cancel", 1)
    error = driver._unsuccessful(end, task._moId, "web-01", MigrationSpec("vm-1", target_host_ref="host-2"))
    assert isinstance(error, MigrationCancelled) and error.hypervisor_message == "Canceled"


def test_a_spent_time_budget_cancels_the_task_and_the_move_times_out():
    spec = MigrationSpec("vm-1", target_host_ref="host-2", timeout_s=5)
    driver, end, task, _, _ = follow([RUNNING, None], started=time.monotonic() - 6, timeout_s=spec.timeout_s)
    assert (end.state, end.aborted, task.cancelled) == ("error", "timeout", 1)
    assert isinstance(driver._unsuccessful(end, task._moId, "web-01", spec), MigrationTimedOut)


def test_a_task_vcenter_will_not_cancel_is_followed_for_the_grace_period_then_reported_unconfirmed():
    cancel = threading.Event()
    cancel.set()
    not_cancelable = {**RUNNING, "info.cancelable": False}
    driver, end, task, _, _ = follow([not_cancelable], cancel=cancel, grace_s=0.0)
    assert (end.state, end.aborted, task.cancelled) == ("running", "cancel", 0)
    error = driver._unsuccessful(end, task._moId, "web-01", MigrationSpec("vm-1", target_host_ref="host-2"))
    assert isinstance(error, MigrationCancelled) and error.code == "abort-unconfirmed"


def test_a_task_that_finishes_despite_a_late_cancel_counts_as_done():
    cancel = threading.Event()
    cancel.set()
    _, end, task, _, _ = follow([{**RUNNING, "info.cancelable": False}, {"info.state": "success"}], cancel=cancel)
    assert (end.state, end.aborted, task.cancelled) == ("success", "cancel", 0)


@pytest.mark.parametrize("state", ["success", "error"])
def test_a_task_already_over_needs_one_wait(state):
    _, end, _, collector, _ = follow([{"info.state": state}])
    assert end.state == state and collector.script == []


class OneRead:
    """A property collector answering RetrievePropertiesEx with fixed task and VM properties."""

    def __init__(self, task_props: dict, vm_props: dict):
        self.contents = [
            vmodl.query.PropertyCollector.ObjectContent(
                obj=obj, propSet=[vmodl.DynamicProperty(name=k, val=v) for k, v in props.items()]
            )
            for obj, props in ((vim.Task("task-42", None), task_props), (vim.VirtualMachine("vm-1", None), vm_props))
        ]
        self.reads = 0

    def RetrievePropertiesEx(self, specSet, options):  # noqa: N802, N803 - pyvmomi's names
        self.reads += 1
        return SimpleNamespace(objects=self.contents, token=None)


def ended_at_once(task_props, *, cancel=None):
    disk = vim.vm.device.VirtualDisk(
        key=2000, capacityInKB=1024, backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName="[DS] vm-1/vm-1.vmdk", datastore=vim.Datastore("datastore-15", None), diskMode="persistent"))
    collector = OneRead(task_props, {"runtime.host": vim.HostSystem("host-2", None), "config.hardware.device": vim.vm.device.VirtualDevice.Array([disk])})
    driver = VCenterDriver(ConnectionConfig(kind="vcenter", url="vc.example.com"))
    session = _Session(content=SimpleNamespace(propertyCollector=collector))
    spec = MigrationSpec("vm-1", target_host_ref="host-2", timeout_s=60)
    result = driver._ended_at_once(session, [(vim.Task("task-42", None), spec)], started=time.monotonic(),
                                   cancels=[cancel or threading.Event()])
    assert collector.reads == 1
    return result[0]


def test_a_task_that_ended_in_its_call_is_read_with_the_placement_in_one_round_trip():
    end, placement = ended_at_once({"info.state": "success", "info.cancelable": False})
    assert (end.state, end.aborted) == ("success", None)
    assert placement.host_ref == "host-2" and dict(placement.disk_datastores) == {"2000": "datastore-15"}


def test_a_running_task_is_left_to_the_wait_loop():
    assert ended_at_once({"info.state": "running", "info.progress": 5, "info.cancelable": True}) is None


def test_a_cancel_seen_after_an_instant_end_is_still_reported_as_late():
    cancel = threading.Event()
    cancel.set()
    end, placement = ended_at_once({"info.state": "success"}, cancel=cancel)
    assert (end.state, end.aborted) == ("success", "cancel") and placement is not None
    failed, none = ended_at_once({"info.state": "error", "info.error": vim.fault.InvalidState(msg="no")})
    assert failed.state == "error" and none is None
