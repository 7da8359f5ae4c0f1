"""The vCenter driver itself: one session per driver instance, the public operations of the
Driver contract, each translated into the portal's errors, built from the package's modules."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pyVmomi import VmomiSupport, vim, vmodl

from drivers.base import (
    Capability,
    ConnectionConfig,
    ConnectionFailed,
    Driver,
    Inventory,
    MigrationFailed,
    MigrationKind,
    MigrationResult,
    MigrationSpec,
    Phase,
    Placement,
    PreflightCheck,
    ProgressCallback,
    TaskInfo,
    TaskState,
)
from drivers.vmware.batch import BatchMoves
from drivers.vmware.cold import ColdMoves
from drivers.vmware.faults import _translated, fault_text
from drivers.vmware.inventory import (
    PC,
    PLACEMENT_PATHS,
    placement_of,
    props_of,
    read_inventory,
    read_placement,
    retrieve,
)
from drivers.vmware.moves import MoveFacts, assess_move, judge_move, read_move_facts, relocate_spec
from drivers.vmware.session import (
    DEFAULT_API_VERSION,
    _CountingStub,
    _Session,
    log_in,
    log_out,
    open_stub,
    parse_endpoint,
    run_in_session,
)
from drivers.vmware.tasks import (
    TASK_PATHS,
    _ProgressReporter,
    _task_spec,
    _TaskEnd,
    abort_reason,
    follow_task,
    progress_percent,
    task_state,
    unsuccessful,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
# TaskInfo.descriptionId of a relocation: vCenter's, and govmomi 0.24 vcsim's.
RELOCATE_TASKS = frozenset({"VirtualMachine.relocate", "VirtualMachine.relocateVm"})


class VCenterDriver(ColdMoves, BatchMoves, Driver):
    """vCenter through pyvmomi. Options (``ConnectionConfig.options``):

    - ``page_size`` (1000): objects per RetrievePropertiesEx page;
    - ``task_wait_s`` (1): longest WaitForUpdatesEx, i.e. how soon a cancel or timeout is seen;
    - ``abort_grace_s`` (120): how long to wait for vCenter to end a task after CancelTask;
    - ``guest_shutdown_s`` (180): how long a cold move waits for a guest it asked to shut down
      before it powers the VM off;
    - ``http_timeout_s`` (60), ``api_version`` ("vim25/6.5").
    """

    kind = "vcenter"
    capabilities = (
        Capability.COMPUTE_MIGRATION
        | Capability.STORAGE_MIGRATION
        | Capability.COMBINED_MIGRATION
        | Capability.PROGRESS
        | Capability.TASK_LOOKUP
        | Capability.TASKS_BY_VM
        | Capability.TASK_ABORT  # CancelTask; vcsim's tasks end within the call, so it proves the ended case
        | Capability.COLD_MOVE  # power off (guest shutdown where Tools run), RelocateVM_Task, power on: cold.py
    )

    def __init__(self, config: ConnectionConfig):
        super().__init__(config)
        self.endpoint = parse_endpoint(config)
        opts = dict(config.options)
        self.page_size = int(opts.get("page_size", 1000))
        self.task_wait_s = max(1, int(opts.get("task_wait_s", 1)))
        self.abort_grace_s = float(opts.get("abort_grace_s", 120))
        self.guest_shutdown_s = float(opts.get("guest_shutdown_s", 180))
        self.http_timeout_s = float(opts.get("http_timeout_s", 60))
        api_version = str(opts.get("api_version", DEFAULT_API_VERSION))
        if api_version not in VmomiSupport.versionMap:
            raise ConnectionFailed(f"pyvmomi does not know vSphere API version {api_version!r}", code="bad-config")
        self.api_version = VmomiSupport.versionMap[api_version]
        self._lock = threading.Lock()
        self._stub: _CountingStub | None = None
        self._session: _Session | None = None
        self._check_api: bool | None = None  # CheckRelocate_Task available? None = not tried yet

    def __repr__(self) -> str:
        return f"<VCenterDriver {self.endpoint.username}@{self.endpoint.host}:{self.endpoint.port}>"

    @property
    def round_trips(self) -> int:
        """SOAP requests sent so far on this driver's connection (logins included)."""
        return self._stub.round_trips if self._stub is not None else 0

    # -- session ----------------------------------------------------------------------------
    def _login(self, expired: _Session | None) -> _Session:
        """The current session, logging in if there is none or if ``expired`` is still current."""
        with self._lock:
            if self._session is not None and self._session is not expired:
                return self._session
            if self._stub is None:
                self._stub = open_stub(self.endpoint, self.config, self.api_version, self.http_timeout_s)
            self._session = log_in(self._stub, self.endpoint, expired)
            return self._session

    def _run(self, operation: Callable[[_Session], T]) -> T:
        """Run one operation in the session, logging in again once if vCenter says it expired
        (see ``run_in_session`` for why repeating it is safe)."""
        return run_in_session(self._session or self._login(None), self._login, operation)

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            stub = self._stub
        if session is None or stub is None:
            return
        log_out(session, stub, self.endpoint)

    @_translated()
    def describe(self) -> str:
        about = self._run(lambda s: s.content.about)
        return f"{about.fullName} at {self.endpoint.host}"

    # -- reading ----------------------------------------------------------------------------
    @_translated(context="reading the vCenter inventory")
    def inventory(self) -> Inventory:
        return self._run(lambda s: read_inventory(s, page_size=self.page_size))

    @_translated(context="reading the VM's placement")
    def placement(self, vm_ref: str) -> Placement:
        return self._run(lambda s: self._placement(s, vm_ref))

    def _placement(self, session: _Session, vm_ref: str) -> Placement:
        return read_placement(session, vm_ref, stub=self._stub, page_size=self.page_size)

    @_translated(context="looking up the vCenter task")
    def task_info(self, task_id: str) -> TaskInfo:
        try:
            objects = self._run(
                lambda s: retrieve(
                    s,
                    [_task_spec(vim.Task(task_id, self._stub), ["info.state", "info.error"])],
                    page_size=self.page_size,
                )
            )
        except vmodl.fault.ManagedObjectNotFound:
            # vCenter forgets finished tasks after a while (and on restart).
            return TaskInfo(task_id, TaskState.UNKNOWN, "vCenter no longer knows this task")
        props = props_of(objects[0]) if objects else {}
        error = props.get("info.error")
        return TaskInfo(task_id, task_state(props.get("info.state"), error), fault_text(error) if error else "")

    @_translated(context="listing the VM's vCenter tasks")
    def migration_tasks(self, vm_ref: str, *, since: float) -> tuple[TaskInfo, ...]:
        """Relocation tasks of the VM queued since ``since``, from the TaskManager's recentTask
        (vCenter keeps the last 200 or so for about ten minutes; govmomi 0.24's vcsim keeps the
        last 200 and has no TaskHistoryCollector). The reconciler asks within minutes of a crash."""
        return self._run(lambda s: self._migration_tasks(s, vm_ref, since))

    def _migration_tasks(self, session: _Session, vm_ref: str, since: float) -> tuple[TaskInfo, ...]:
        manager = session.content.taskManager
        contents = retrieve(session, [PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=manager)], propSet=[
            PC.PropertySpec(type=vim.TaskManager, pathSet=["recentTask"])])], page_size=self.page_size)
        recent = props_of(contents[0]).get("recentTask") if contents else None
        if not recent:
            return ()
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=task) for task in recent],
            propSet=[PC.PropertySpec(type=vim.Task, pathSet=[
                "info.entity", "info.descriptionId", "info.state", "info.error", "info.queueTime"])],
        )
        found = []
        for content in retrieve(session, [spec], page_size=self.page_size):
            props = props_of(content)
            entity, queued = props.get("info.entity"), props.get("info.queueTime")
            if entity is None or entity._moId != vm_ref or props.get("info.descriptionId") not in RELOCATE_TASKS:
                continue
            if queued is not None and queued.timestamp() < since:
                continue
            error = props.get("info.error")
            info = TaskInfo(content.obj._moId, task_state(props.get("info.state"), error),
                            fault_text(error) if error else "")
            found.append((queued.timestamp() if queued else 0.0, info.task_id, info))
        return tuple(info for *_, info in sorted(found, key=lambda f: (f[0], f[1])))

    @_translated(context="aborting the vCenter task")
    def cancel_task(self, task_id: str) -> TaskInfo:
        """CancelTask where vCenter allows it, then follow the task for a short grace."""
        cancel = threading.Event()
        cancel.set()
        try:
            end = self._run(lambda s: follow_task(s, vim.Task(task_id, self._stub), task_wait_s=self.task_wait_s,
                                                  abort_grace_s=min(self.abort_grace_s, 10.0), cancel=cancel))
        except vmodl.fault.ManagedObjectNotFound:
            return TaskInfo(task_id, TaskState.UNKNOWN, "vCenter no longer knows this task")
        if end.state == "running":
            return TaskInfo(task_id, TaskState.RUNNING, "vCenter has not ended the task yet")
        return TaskInfo(task_id, task_state(end.state, end.error), fault_text(end.error) if end.error else "")

    # -- judging a move ---------------------------------------------------------------------
    def _move_facts(self, session: _Session, spec: MigrationSpec) -> MoveFacts:
        return read_move_facts(session, spec, stub=self._stub, page_size=self.page_size)

    @_translated(context="checking the move")
    def preflight(self, spec: MigrationSpec) -> tuple[PreflightCheck, ...]:
        """The inventory rules, plus vCenter's own CheckRelocate_Task where the endpoint has it
        (vcsim has not: the driver notices once and stops asking)."""
        return self._checks(spec, self._run(lambda s: self._move_facts(s, spec)))

    def _checks(self, spec: MigrationSpec, facts: MoveFacts, *, cold: bool = False) -> tuple[PreflightCheck, ...]:
        checks = [PreflightCheck(c.name, c.ok, c.message if not c.ok else "passed")
                  for c in assess_move(facts, spec, cold=cold)]
        # vCenter judges a relocation by the VM's power state now: of a running VM it would check a
        # vMotion, stricter than the cold move it will be once the VM is off.
        if self._check_api is not False and not (cold and facts.vm.power == "poweredOn"):
            checks.extend(self._check_relocate(facts))
        return tuple(checks)

    def _check_relocate(self, facts: MoveFacts) -> list[PreflightCheck]:
        content = self._run(lambda s: s.content)
        checker = content.vmProvisioningChecker
        if checker is None:
            self._check_api = False
            return []
        try:
            task = checker.CheckRelocate_Task(
                vm=vim.VirtualMachine(facts.vm.ref, self._stub), spec=relocate_spec(facts, self._stub)
            )
        except (vmodl.fault.MethodNotFound, vmodl.fault.NotImplemented, vmodl.fault.NotSupported) as fault:
            log.info(
                "%s has no CheckRelocate_Task (%s); pre-flight uses inventory rules only",
                self.endpoint,
                fault_text(fault),
            )
            self._check_api = False
            return []
        self._check_api = True
        end = self._run(lambda s: self._follow(s, task, paths=[*TASK_PATHS, "info.result"]))
        if end.state != "success":
            return [
                PreflightCheck("vcenter-check", False, fault_text(end.error) if end.error else "vCenter's check failed")
            ]
        checks = []
        for result in end.result or ():
            checks += [PreflightCheck("vcenter-check", False, fault_text(f)) for f in result.error or ()]
            checks += [PreflightCheck("vcenter-warning", True, fault_text(f)) for f in result.warning or ()]
        return checks or [PreflightCheck("vcenter-check", True, "vCenter found no problem")]

    # -- moving -----------------------------------------------------------------------------
    @_translated(MigrationFailed, context="migrating the VM")
    def migrate(
        self, spec: MigrationSpec, *, on_progress: ProgressCallback, cancel: threading.Event
    ) -> MigrationResult:
        started = time.monotonic()
        facts = self._run(lambda s: self._move_facts(s, spec))
        progress = _ProgressReporter(on_progress)
        task = self._start_move(spec, facts, progress)
        at_once = self._run(lambda s: self._ended_at_once(s, [(task, spec)], started=started, cancels=[cancel]))[0]
        return self._end_move(spec, facts, task, progress, started=started, cancel=cancel, at_once=at_once)

    def _start_move(self, spec: MigrationSpec, facts: MoveFacts, progress: _ProgressReporter) -> Any:
        """Judge the move on its facts (raising the first broken rule's error) and start its task."""
        judge_move(facts, spec)
        progress(Phase.PRECHECK, 0.0, message=f"moving {facts.vm.name}")
        task = self._relocate(spec, facts)
        progress(self._move_phase(spec), 0.0, task_id=task._moId)
        return task

    def _relocate(self, spec: MigrationSpec, facts: MoveFacts) -> Any:
        """Start the RelocateVM_Task of a judged move; its task."""
        task = self._run(
            lambda s: vim.VirtualMachine(spec.vm_ref, self._stub).RelocateVM_Task(spec=relocate_spec(facts, self._stub))
        )
        log.info("relocating %s (%s): %s started", facts.vm.name, spec.kind.value, task._moId)
        return task

    @staticmethod
    def _move_phase(spec: MigrationSpec) -> Phase:
        return Phase.MEMORY_PRECOPY if spec.kind == MigrationKind.COMPUTE else Phase.DISK_COPY

    def _end_move(self, spec: MigrationSpec, facts: MoveFacts, task: Any, progress: _ProgressReporter, *,
                  started: float, cancel: threading.Event,
                  at_once: tuple[_TaskEnd, Placement | None] | None) -> MigrationResult:
        """Follow a started task to its end (unless it ended at once) and read where the VM is."""
        task_id = task._moId
        end, placement = self._follow_move(spec, facts, task, progress, phase=self._move_phase(spec),
                                           started=started, cancel=cancel, at_once=at_once)
        if placement is None:
            placement = self._run(lambda s: self._placement(s, spec.vm_ref))
        message = f"VM {facts.vm.name} moved"
        if end.aborted:
            message += f" (the {end.aborted} came too late: vCenter no longer allowed cancelling the task)"
        progress(Phase.DONE, 100.0, task_id=task_id, message=message)
        return MigrationResult(
            placement=placement, task_id=task_id, duration_s=time.monotonic() - started, message=message
        )

    def _follow_move(self, spec: MigrationSpec, facts: MoveFacts, task: Any, progress: _ProgressReporter, *,
                     phase: Phase, started: float, cancel: threading.Event,
                     at_once: tuple[_TaskEnd, Placement | None] | None,
                     span: tuple[float, float] = (0.0, 100.0)) -> tuple[_TaskEnd, Placement | None]:
        """Follow a relocation task to its end (unless it ended at once), reporting its progress in
        ``phase`` over ``span`` of the whole move's percent; raise unless it succeeded. Returns how
        it ended and, when the one read that saw it end had it, where the VM is."""
        task_id, (low, high) = task._moId, span

        def on_task_progress(value: int | None) -> None:
            overall = None if value is None else low + (high - low) * value / 100.0
            progress(phase, progress_percent(overall, progress.percent), task_id=task_id)

        placement = None
        if at_once is not None:
            end, placement = at_once
        else:
            end = self._run(
                lambda s: self._follow(
                    s, task, started=started, timeout_s=spec.timeout_s, cancel=cancel, on_progress=on_task_progress
                )
            )
        if end.state != "success":
            raise self._unsuccessful(end, task_id, facts.vm.name, spec)
        return end, placement

    _unsuccessful = staticmethod(unsuccessful)

    def _ended_at_once(
        self, session: _Session, started_tasks: list[tuple[Any, MigrationSpec]], *, started: float,
        cancels: Sequence[threading.Event]
    ) -> list[tuple[_TaskEnd, Placement | None] | None]:
        """One read of the tasks and their VMs together. A task that ended inside the call that
        started it (vcsim's always do; a small move on vCenter may) needs no filter and no wait,
        and the VM's placement comes with it: the move costs the round trips of a plain script.
        Item i is None when task i is still running (then it is followed as usual)."""
        objects = retrieve(session, [PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=obj) for task, spec in started_tasks
                       for obj in (task, vim.VirtualMachine(spec.vm_ref, self._stub))],
            propSet=[
                PC.PropertySpec(type=vim.Task, pathSet=TASK_PATHS),
                PC.PropertySpec(type=vim.VirtualMachine, pathSet=PLACEMENT_PATHS),
            ],
        )], page_size=self.page_size)
        by_ref = {o.obj._moId: props_of(o) for o in objects}
        out: list[tuple[_TaskEnd, Placement | None] | None] = []
        for (task, spec), cancel in zip(started_tasks, cancels, strict=True):
            info = by_ref.get(task._moId, {})
            state = info.get("info.state")
            if state not in ("success", "error"):
                out.append(None)
                continue
            # As follow_task reports it: a cancel or timeout seen after the end still says it came late.
            aborted = abort_reason(
                cancel_requested=cancel.is_set(), elapsed_s=time.monotonic() - started, timeout_s=spec.timeout_s
            )
            end = _TaskEnd(state=state, error=info.get("info.error"), aborted=aborted)
            vm_props = by_ref.get(spec.vm_ref)
            out.append((end, placement_of(spec.vm_ref, vm_props) if state == "success" and vm_props else None))
        return out

    def _follow(
        self,
        session: _Session,
        task: Any,
        *,
        paths: list[str] = TASK_PATHS,
        started: float = 0.0,
        timeout_s: float | None = None,
        cancel: threading.Event | None = None,
        on_progress: Callable[[int | None], None] | None = None,
    ) -> _TaskEnd:
        """Follow a task to its end (``follow_task``) with this driver's task_wait_s and abort_grace_s."""
        return follow_task(
            session,
            task,
            task_wait_s=self.task_wait_s,
            abort_grace_s=self.abort_grace_s,
            paths=paths,
            started=started,
            timeout_s=timeout_s,
            cancel=cancel,
            on_progress=on_progress,
        )
