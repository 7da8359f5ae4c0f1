"""Following a vCenter task with the SDK's own waiting primitive: a property filter per task and
``WaitForUpdatesEx`` with a short ``maxWaitSeconds``, so a cancel request or a timeout is noticed
between waits without polling loops. The abort and progress decisions are small pure functions."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim, vmodl

from drivers.base import (
    DriverError,
    MigrationCancelled,
    MigrationFailed,
    MigrationSpec,
    MigrationTimedOut,
    Phase,
    ProgressCallback,
    ProgressUpdate,
    TaskState,
)
from drivers.vmware.faults import _CONNECTION_ERRORS, domain_error, fault_text
from drivers.vmware.inventory import PC
from drivers.vmware.session import _Session

log = logging.getLogger(__name__)

TASK_PATHS = ["info.state", "info.progress", "info.error", "info.cancelable"]


def abort_reason(*, cancel_requested: bool, elapsed_s: float, timeout_s: float | None) -> str | None:
    """Why a running migration must be aborted now: "cancel", "timeout", or None to go on."""
    if cancel_requested:
        return "cancel"
    if timeout_s is not None and elapsed_s > timeout_s:
        return "timeout"
    return None


def progress_percent(task_progress: float | None, previous: float) -> float:
    """Overall percent from vCenter's task progress: never backwards, below 100 until the driver
    has confirmed the result (DONE reports the 100)."""
    if task_progress is None:
        return previous
    return max(previous, min(float(task_progress), 99.0))


def task_state(state: str | None, error: vmodl.MethodFault | None = None) -> TaskState:
    """The portal's task state for a vCenter ``TaskInfo.state`` (and error, to spot cancels)."""
    if state in ("queued", "running"):
        return TaskState.RUNNING
    if state == "success":
        return TaskState.SUCCEEDED
    if state == "error":
        return TaskState.CANCELLED if isinstance(error, vmodl.fault.RequestCanceled) else TaskState.FAILED
    return TaskState.UNKNOWN


@dataclass(frozen=True)
class _TaskEnd:
    """How a followed task ended. state "running": it had not ended when the driver gave up."""

    state: str
    error: Any = None  # vmodl.MethodFault
    result: Any = None
    aborted: str | None = None  # "cancel" / "timeout" when the driver asked vCenter to stop it


def _task_spec(task: Any, paths: list[str]) -> Any:
    return PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=task)], propSet=[PC.PropertySpec(type=vim.Task, pathSet=paths)])


def unsuccessful(end: _TaskEnd, task_id: str, vm_name: str, spec: MigrationSpec) -> DriverError:
    """The error for a relocation task that did not succeed."""
    said = fault_text(end.error) if end.error is not None else ""
    if end.state == "running":  # we asked for an abort and vCenter did not end the task in time
        error_class = MigrationTimedOut if end.aborted == "timeout" else MigrationCancelled
        return error_class(
            f"vCenter task {task_id} did not stop after it was cancelled; VM {vm_name} may still move",
            code="abort-unconfirmed",
        )
    if end.aborted == "timeout":
        return MigrationTimedOut(
            f"VM {vm_name} did not move within {spec.timeout_s:g} s; vCenter task {task_id} was cancelled",
            hypervisor_message=said,
        )
    if end.aborted == "cancel" or isinstance(end.error, vmodl.fault.RequestCanceled):
        return MigrationCancelled(
            f"migration of VM {vm_name} cancelled; it stays where it was", hypervisor_message=said
        )
    if end.error is not None:
        return domain_error(end.error, default=MigrationFailed, context=f"vCenter task {task_id} failed")
    return MigrationFailed(f"vCenter task {task_id} ended in state {end.state}")


def take_collector(session: _Session) -> Any:
    """A property collector of this session for one task wait. Each waiting thread needs its
    own: WaitForUpdatesEx returns the updates of every filter of the collector it is called on."""
    try:
        return session.idle_collectors.get_nowait()
    except queue.Empty:
        return session.content.propertyCollector.CreatePropertyCollector()


def follow_task(
    session: _Session,
    task: Any,
    *,
    task_wait_s: int,
    abort_grace_s: float,
    paths: list[str] = TASK_PATHS,
    started: float = 0.0,
    timeout_s: float | None = None,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int | None], None] | None = None,
) -> _TaskEnd:
    """Follow a task to its end with a property filter and WaitForUpdatesEx. Between waits
    (each at most task_wait_s) it checks ``cancel`` and the time budget; on either it cancels
    the task where vCenter allows it and keeps waiting for the task to end, for at most
    abort_grace_s (then the task is reported as still running)."""
    collector = take_collector(session)
    task_filter = collector.CreateFilter(_task_spec(task, paths), partialUpdates=False)
    info: dict[str, Any] = {}
    version = ""
    aborted: str | None = None
    abort_sent = False
    give_up_at = float("inf")
    try:
        while info.get("info.state") not in ("success", "error"):
            update = collector.WaitForUpdatesEx(version=version, options=PC.WaitOptions(maxWaitSeconds=task_wait_s))
            if update is not None:  # None: the wait ran out with nothing new
                version = update.version
                for filter_update in update.filterSet or ():
                    for object_update in filter_update.objectSet or ():
                        info.update((change.name, change.val) for change in object_update.changeSet or ())
                if on_progress is not None and info.get("info.state") == "running":
                    on_progress(info.get("info.progress"))
            now = time.monotonic()
            if aborted is None:
                aborted = abort_reason(
                    cancel_requested=cancel is not None and cancel.is_set(),
                    elapsed_s=now - started,
                    timeout_s=timeout_s,
                )
                if aborted:
                    log.info("aborting vCenter task %s (%s)", task._moId, aborted)
                    give_up_at = now + abort_grace_s
            if aborted and not abort_sent and info.get("info.cancelable"):
                task.CancelTask()
                abort_sent = True
            if now > give_up_at:
                break
    finally:
        release_collector(session, collector, task_filter)
    state = info.get("info.state")
    return _TaskEnd(
        state="running" if state not in ("success", "error") else state,
        error=info.get("info.error"),
        result=info.get("info.result"),
        aborted=aborted,
    )


def wait_for_power_state(session: _Session, vm: Any, wanted: str, *, task_wait_s: int, bound_s: float) -> str:
    """Wait (WaitForUpdatesEx on a filter of the VM's runtime.powerState, each wait at most
    task_wait_s) until the VM is in the ``wanted`` state or ``bound_s`` has passed; returns the
    last state seen. A guest shutdown is asked with ShutdownGuest, which answers at once: this
    is how the driver sees the guest finish."""
    collector = take_collector(session)
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm)],
                         propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["runtime.powerState"])])
    power_filter = collector.CreateFilter(spec, partialUpdates=False)
    state, version = "", ""
    give_up_at = time.monotonic() + bound_s
    try:
        while True:  # the first wait answers at once with the current state
            wait_s = max(1, min(task_wait_s, int(give_up_at - time.monotonic() + 0.999)))
            update = collector.WaitForUpdatesEx(version=version, options=PC.WaitOptions(maxWaitSeconds=wait_s))
            if update is not None:  # None: the wait ran out with nothing new
                version = update.version
                for filter_update in update.filterSet or ():
                    for object_update in filter_update.objectSet or ():
                        for change in object_update.changeSet or ():
                            state = str(change.val)
            if state == wanted or time.monotonic() >= give_up_at:
                break
    finally:
        release_collector(session, collector, power_filter)
    return state


def release_collector(session: _Session, collector: Any, task_filter: Any) -> None:
    """Drop the task's filter and give the collector back for the next wait."""
    try:
        task_filter.DestroyPropertyFilter()
    except (vmodl.MethodFault, *_CONNECTION_ERRORS) as exc:
        # The session may have ended with the filter in it; the collector goes with it.
        log.debug("could not destroy a task filter: %s", exc)
        return
    session.idle_collectors.put(collector)


class _ProgressReporter:
    """Sends ProgressUpdates with a percent that never goes back and stays below 100 until DONE."""

    def __init__(self, callback: ProgressCallback):
        self._callback = callback
        self.percent = 0.0
        self._last: tuple[Phase, float, str] | None = None

    def __call__(self, phase: Phase, percent: float, *, task_id: str = "", message: str = "") -> None:
        self.percent = 100.0 if phase == Phase.DONE else max(self.percent, min(percent, 99.0))
        key = (phase, self.percent, task_id)
        if key == self._last and not message:
            return  # nothing new to say
        self._last = key
        self._callback(ProgressUpdate(phase, self.percent, task_id=task_id, message=message))
