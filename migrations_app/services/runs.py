"""Services for the execution of a migration: queue, claim, drive the driver, record progress, finish.

A migration is not idempotent, so correctness never rests on the broker: the worker task is acked
early, a run is claimed in the database (``select_for_update``, only from ``queued``), and a running
run proves it is alive by its heartbeat. The worker's main thread is the only writer of a run's
progress: the driver runs in a helper thread and hands its reports over through a queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connections, router, transaction
from django.db.models import F, Prefetch, Q, sql
from django.utils import timezone

from drivers import base as drv
from migrations_app import admission, events, notifications, watchdog, windows
from migrations_app.choices import (
    TERMINAL,
    AuditAction,
    AuditOutcome,
    MigrationKind,
    NotificationCategory,
    Phase,
    RequestStatus,
)
from migrations_app.models import Datastore, Host, MigrationRequest, MigrationRun, RunEvent, VirtualDisk
from migrations_app.services.audit import audit_record
from migrations_app.services.errors import ActionRefused
from migrations_app.services.plans import plan_request_settled
from migrations_app.services.requests import expire_locked, notify_request_changed, set_status

log = logging.getLogger(__name__)
S = RequestStatus
GiB = 1024**3


# -- events -----------------------------------------------------------------------------------


def append_run_event(run: MigrationRun, *, status: str, message: str = "", run_fields: dict | None = None,
                     **fields) -> RunEvent:
    """Store the next numbered event of a run (call inside a transaction) and push it on commit.

    The sequence number comes from an UPDATE on the run row, so two writers (worker and a cancel
    from the web) never take the same number; ``run_fields`` are written by that same UPDATE.
    """
    seq = _next_seq(run.pk, run_fields or {})
    run.last_seq = seq
    event = RunEvent.objects.create(
        run=run,
        seq=seq,
        status=status,
        phase=fields.get("phase", run.phase),
        percent=fields.get("percent", run.percent),
        bytes_done=fields.get("bytes_done", run.bytes_done),
        bytes_total=fields.get("bytes_total", run.bytes_total),
        rate_bytes_per_s=fields.get("rate_bytes_per_s", run.rate_bytes_per_s),
        eta_s=fields.get("eta_s", run.eta_s),
        iteration=fields.get("iteration", run.iteration),
        message=message[:500],
    )
    payload = events.run_event_payload(event)
    transaction.on_commit(lambda: events.emit(events.run_group(run.pk), payload))
    return event


def _next_seq(run_id: int, run_fields: dict) -> int:
    """Take the run's next event number (and write ``run_fields``) in one UPDATE ... RETURNING
    where the database has it (PostgreSQL; SQLite from 3.35), else an UPDATE and a read back."""
    updates = {"last_seq": F("last_seq") + 1, **run_fields}
    db = connections[router.db_for_write(MigrationRun)]
    if not db.features.can_return_columns_from_insert:
        MigrationRun.objects.filter(pk=run_id).update(**updates)
        return MigrationRun.objects.filter(pk=run_id).values_list("last_seq", flat=True).get()
    query = sql.UpdateQuery(MigrationRun)
    query.add_update_values(updates)
    query.add_q(Q(pk=run_id))
    text, params = query.get_compiler(connection=db).as_sql()
    with db.cursor() as cursor:
        cursor.execute(f"{text} RETURNING {db.ops.quote_name('last_seq')}", params)
        row = cursor.fetchone()
    if row is None:
        raise MigrationRun.DoesNotExist(f"run {run_id} does not exist")
    return row[0]


# -- queueing ---------------------------------------------------------------------------------


def completion_budget_s(*, memory_bytes: int, disk_bytes: int, kind: str) -> float:
    """Time a migration may take before it is aborted: per GiB of what is copied (Nova's rule)."""
    copied = (memory_bytes if kind != MigrationKind.STORAGE else 0) + (disk_bytes if kind != MigrationKind.COMPUTE else 0)
    budget = settings.PORTAL["TIMEOUT_S_PER_GIB"] * copied / GiB
    return max(settings.PORTAL["TIMEOUT_MIN_S"], budget)


def dispatch(run_id: int, worker_task_id: str) -> None:
    """Hand a run to the workers. Safe to repeat: a worker only starts a run it can claim."""
    from migrations_app.tasks import execute_run

    execute_run.apply_async(args=[run_id], task_id=worker_task_id)


def migration_run_enqueue(*, request: MigrationRequest, actor) -> MigrationRun:
    """Approved and due: create the run and queue it (inside the caller's transaction, request locked)."""
    set_status(request, S.QUEUED)
    request.save(update_fields=["status", "updated_at"])
    run = MigrationRun.objects.create(
        request=request,
        worker_task_id=str(uuid.uuid4()),
        dispatched_at=timezone.now(),
        timeout_s=completion_budget_s(memory_bytes=request.vm.memory_bytes, disk_bytes=request.vm.disk_bytes,
                                      kind=request.kind),
    )
    append_run_event(run, status=request.status, message="queued for a worker")
    audit_record(actor=actor, action=AuditAction.RUN_QUEUED, request=request, object_type="migration_run",
                 object_id=str(run.pk))
    run_id, task_id = run.pk, run.worker_task_id
    # robust: a broker outage must not undo the approval; the scheduler re-dispatches queued runs.
    transaction.on_commit(lambda: dispatch(run_id, task_id), robust=True)
    return run


def dispatch_all_admissible() -> int:
    """For every connection with queued runs, hand out those admission control lets start."""
    connection_ids = set(
        MigrationRun.objects.filter(request__status=S.QUEUED).values_list("request__vm__connection_id", flat=True)
    )
    return sum(dispatch_admissible(cid) for cid in connection_ids)


def migration_run_redispatch_stale(*, older_than_s: float = 300.0) -> int:
    """Re-send queued runs whose message may have been lost (broker restarted), at most once per
    ``older_than_s`` each, so a long queue behind busy workers does not grow copies. Returns the count."""
    now = timezone.now()
    stale = MigrationRun.objects.filter(
        request__status=S.QUEUED, started_at__isnull=True, dispatched_at__lt=now - timedelta(seconds=older_than_s))
    count = 0
    for run_id, task_id in stale.values_list("pk", "worker_task_id"):
        MigrationRun.objects.filter(pk=run_id).update(dispatched_at=now)
        dispatch(run_id, task_id)
        count += 1
    return count


def migration_request_start_due(*, now=None) -> int:
    """Queue approved requests whose window has opened (and not closed: the expiry pass ends
    those). Returns how many were queued."""
    now = now or timezone.now()
    count = 0
    due = MigrationRequest.objects.filter(status=S.APPROVED, start_after__lte=now).exclude(
        window_end__lte=now).values_list("pk", flat=True)
    for pk in due:
        with transaction.atomic():
            request = MigrationRequest.objects.select_for_update(of=("self",)).select_related("vm").get(pk=pk)
            if request.status != S.APPROVED or windows.window_closed(request, now):
                continue
            migration_run_enqueue(request=request, actor=None)
            notify_request_changed(request)
            count += 1
    return count


# -- execution --------------------------------------------------------------------------------


_FINISHED = object()


@dataclass
class _Outcome:
    result: drv.MigrationResult | None = None
    error: BaseException | None = None
    traceback: str = ""


@dataclass(frozen=True)
class ActiveRun:
    """A queued or running run as admission control sees it: the columns it needs, read in one
    query (no model instances: a claim decides on every run ahead of it, often)."""

    pk: int
    request_id: int
    status: str
    wait_reason: str
    dispatched_at: datetime | None
    worker_task_id: str
    move: admission.Move


_ACTIVE_RUN_COLUMNS = (
    "pk", "request_id", "request__status", "request__kind", "request__vm_id", "request__vm__host__name",
    "request__target_host__name", "request__target_datastore__name", "wait_reason", "dispatched_at", "worker_task_id",
)


def _active_runs(runs) -> list[ActiveRun]:
    rows = list(runs.order_by("pk").values_list(*_ACTIVE_RUN_COLUMNS))
    stores: dict[int, set[str]] = {}
    if rows:
        disks = VirtualDisk.objects.filter(vm_id__in={row[4] for row in rows}).values_list("vm_id", "datastore__name")
        for vm_id, name in disks:
            stores.setdefault(vm_id, set()).add(name)
    out = []
    for pk, request_id, status, kind, vm_id, host, target_host, target_store, wait_reason, dispatched_at, task in rows:
        move = admission.Move(
            id=request_id,
            kind=kind,
            source_host=host,
            target_host=target_host,
            datastores=frozenset(stores.get(vm_id, ())),
            target_datastore=target_store,
            order=pk,  # line order is arrival at one priority (admission_decision's up_to relies on it)
        )
        out.append(ActiveRun(pk, request_id, status, wait_reason, dispatched_at, task, move))
    return out


def admission_decision(connection, *, up_to: int | None = None) -> tuple[admission.Decision, dict[int, ActiveRun]]:
    """Admission control over one connection's running and queued runs (queued in arrival order).
    ``up_to`` (a run id) leaves out the queued runs behind that one in line: a queued move is
    judged against the running ones and those ahead of it only, so the decision on it is the same,
    and a claim does not read the whole queue (which made a long queue quadratic)."""
    runs = MigrationRun.objects.filter(
        request__vm__connection=connection, request__status__in=[S.QUEUED, S.RUNNING, S.CANCELLING]
    )
    if up_to is not None:
        # Line order is arrival (run id) at one priority: see _active_runs.
        runs = runs.exclude(request__status=S.QUEUED, pk__gt=up_to)
    active = _active_runs(runs)
    by_request = {r.request_id: r for r in active}
    running = [r.move for r in active if r.status != S.QUEUED]
    queued = [r.move for r in active if r.status == S.QUEUED]
    limits = admission.Limits.for_connection(connection.kind, connection.options)
    return admission.admit(running, queued, limits), by_request


def dispatch_admissible(connection_id: int) -> int:
    """Hand the workers every queued run of this connection that admission control lets start now
    (after a run finishes, and from the scheduler). The worker's claim decides again under lock."""
    from migrations_app.models import HypervisorConnection

    held_back = MigrationRun.objects.filter(
        request__vm__connection_id=connection_id, request__status=S.QUEUED, dispatched_at__isnull=True
    ).exclude(wait_reason="")
    if not held_back.exists():
        return 0  # only held-back runs are sent again: none, nothing to decide
    connection = HypervisorConnection.objects.get(pk=connection_id)
    decision, by_request = admission_decision(connection)
    now = timezone.now()
    count = 0
    for move in decision.admitted:
        run = by_request[move.id]
        # Only a run a worker held back has no message left in the queue (dispatched_at cleared);
        # re-send those alone, so a busy worker pool never grows copies.
        if run.wait_reason and run.dispatched_at is None:
            MigrationRun.objects.filter(pk=run.pk).update(dispatched_at=now)
            dispatch(run.pk, run.worker_task_id)
            count += 1
    return count


def _claim(run_id: int, worker: str) -> MigrationRun | None:
    """Take ownership of a queued run; None when it is not queued (cancelled, already claimed) or
    when admission control makes it wait (its reason and place in line are recorded on the run)."""
    from migrations_app.models import HypervisorConnection

    with transaction.atomic():
        target = MigrationRun.objects.filter(pk=run_id).values_list("request__vm__connection_id", flat=True).first()
        if target is None:
            log.warning("run %s does not exist; dropping the message", run_id)
            return None
        # One claim per connection at a time: admission sees every run that has started.
        connection = HypervisorConnection.objects.select_for_update().get(pk=target)
        # Lock order everywhere: the request, then its run (cancel and finish take them so too).
        request = MigrationRequest.objects.select_for_update(of=("self",)).select_related("vm").get(run__pk=run_id)
        run = MigrationRun.objects.select_for_update(of=("self",)).get(pk=run_id)
        if request.status != S.QUEUED:
            log.info("run %s is %s, not queued; not starting it", run_id, request.status)
            return None
        # A run never starts outside its change window: past its end it expires, before its
        # start it waits (its message is consumed; dispatch_admissible sends a new one).
        now = timezone.now()
        if closed := windows.window_closed(request, now):
            expire_locked(request, reason=closed, now=now, run=run)
            return None
        if not_yet := windows.window_not_open_yet(request, now):
            run.dispatched_at = None
            if not_yet != run.wait_reason:
                run.wait_reason = not_yet
                append_run_event(run, status=request.status, message=f"waiting: {not_yet}")
            run.save(update_fields=["wait_reason", "dispatched_at"])
            return None
        decision, _ = admission_decision(connection, up_to=run.pk)
        if request.pk in decision.waiting:
            why = f"{decision.waiting[request.pk]} (place {decision.place[request.pk]} in line)"
            run.dispatched_at = None  # its message is consumed: dispatch_admissible sends a new one
            if why != run.wait_reason:
                run.wait_reason = why
                append_run_event(run, status=request.status, message=f"waiting: {why}")
            run.save(update_fields=["wait_reason", "dispatched_at"])
            return None
        run.wait_reason = ""
        set_status(request, S.RUNNING)
        request.save(update_fields=["status", "updated_at"])
        run.worker = worker
        run.started_at = now
        run.heartbeat_at = now
        run.phase = Phase.PRECHECK
        run.save(update_fields=["worker", "started_at", "heartbeat_at", "phase", "wait_reason"])
        append_run_event(run, status=request.status, message=f"started by {worker}")
        # The audit append last: it holds the chain's lock (every audited action waits on it) until commit.
        audit_record(actor=None, action=AuditAction.RUN_STARTED, request=request, object_type="migration_run",
                     object_id=str(run.pk), before=request.source_placement, data={"worker": worker})
        notify_request_changed(request)
        notifications.notify(request, NotificationCategory.RUN_STARTED, occasion=f"run-{run.pk}")
    return run


def _spec(run: MigrationRun) -> drv.MigrationSpec:
    """What the driver is asked to do; the connection's options carry the admin's link policy
    (``bandwidth_bytes_per_s``, ``max_downtime_ms``) where the hypervisor lets us set them."""
    request = run.request
    options = request.vm.connection.options or {}
    bandwidth, downtime = options.get("bandwidth_bytes_per_s"), options.get("max_downtime_ms")
    return drv.MigrationSpec(
        vm_ref=request.vm.ref,
        target_host_ref=request.target_host.ref if request.target_host_id else None,
        target_datastore_ref=request.target_datastore.ref if request.target_datastore_id else None,
        timeout_s=run.timeout_s,
        bandwidth_bytes_per_s=int(bandwidth) if bandwidth else None,
        max_downtime_ms=int(downtime) if downtime else None,
    )


def migration_run_execute(*, run_id: int, worker: str) -> None:
    """Claim the run, drive the migration through the driver, record progress, and finish it."""
    from migrations_app.services.inventory import driver_for

    run = _claim(run_id, worker)
    if run is None:
        return
    run = MigrationRun.objects.select_related(
        "request__vm__connection", "request__vm__host", "request__target_host", "request__target_datastore"
    ).get(pk=run.pk)
    outcome = _Outcome()
    try:
        driver = driver_for(run.request.vm.connection)
        spec = _spec(run)
        problem = _preflight_at_start(run, driver, spec)
    except drv.DriverError as exc:
        outcome.error = exc
    except (ValueError, LookupError) as exc:  # broken configuration: our side
        outcome.error, outcome.traceback = exc, traceback.format_exc()
    else:
        if problem:
            # Stopped before the driver's migrate is called; the explanation reaches the page and the audit log.
            outcome.error = drv.MigrationFailed(f"Pre-flight at start failed, the world changed: {problem}. "
                                                "Nothing was moved.")
        elif (status := _start_gate(run)) in TERMINAL:
            log.warning("run %s was settled (%s) while its worker prepared it; not starting it", run.pk, status)
            return
        elif status == S.CANCELLING:
            outcome.error = drv.MigrationCancelled("Cancelled before the move started; nothing was moved.")
        else:
            outcome = _drive(run, driver, spec)
    migration_run_finish(run=run, outcome=outcome)


def _start_gate(run: MigrationRun) -> str:
    """Last look before the hypervisor is asked to move anything: renew the heartbeat and return
    the request's status. A run the reconciler settled meanwhile (this worker was judged lost) or
    one cancelled during pre-flight is never started. With the heartbeat renewed here, the
    reconciler can only judge this worker lost if starting the task takes longer than
    STALE_AFTER_S, which the setting's rule (above the driver's request timeout) excludes."""
    return _heartbeat(run)


def _preflight_at_start(run: MigrationRun, driver: drv.Driver, spec: drv.MigrationSpec) -> str:
    """The world may have changed since approval (a host entered maintenance, a datastore filled
    up): check again, with the portal's inventory and the endpoint's own checks. '' when all pass."""
    from migrations_app.services.preflight import check_move

    request = run.request
    try:
        check_move(request.vm, request.kind, request.target_host, request.target_datastore, cold=request.cold)
    except ActionRefused as exc:
        return exc.message
    failed = [c.message for c in driver.preflight(spec) if not c.ok]
    return "; ".join(failed)


def _drive(run: MigrationRun, driver: drv.Driver, spec: drv.MigrationSpec) -> _Outcome:
    """Run the driver in a helper thread; this thread records progress and heartbeats."""
    updates: queue.Queue = queue.Queue()
    cancel = threading.Event()
    outcome = _Outcome()

    def target() -> None:
        try:
            move = driver.cold_move if run.request.cold else driver.migrate  # cold: a move plan's fallback
            outcome.result = move(spec, on_progress=updates.put, cancel=cancel)
        except drv.DriverError as exc:
            outcome.error = exc
        except Exception as exc:  # noqa: BLE001 - any other error is the portal's bug: keep the traceback
            outcome.error, outcome.traceback = exc, traceback.format_exc()
        finally:
            updates.put(_FINISHED)

    thread = threading.Thread(target=target, name=f"migrate-run-{run.pk}", daemon=True)
    thread.start()
    began, overdue = time.monotonic(), False
    heartbeat_s = settings.PORTAL["HEARTBEAT_S"]
    recorder = _ProgressRecorder(run)
    next_beat = time.monotonic() + heartbeat_s
    while True:
        try:
            item = updates.get(timeout=max(0.0, next_beat - time.monotonic()))
        except queue.Empty:
            item = None
        # Take whatever else the driver has sent meanwhile, so that a move that ends at once (a
        # burst of phase changes) is stored in one transaction rather than one per update.
        batch = [] if item is None else [item]
        while batch and batch[-1] is not _FINISHED:
            try:
                batch.append(updates.get_nowait())
            except queue.Empty:
                break
        finished = bool(batch) and batch[-1] is _FINISHED
        due = False
        for update in batch[:-1] if finished else batch:
            due = recorder.offer(update) or due
        if finished:
            break  # the last updates are stored after the join below
        try:
            if due:
                recorder.flush()
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + heartbeat_s
                recorder.flush()
                recorder.status = _heartbeat(run)
                if recorder.status in (S.CANCELLING, *TERMINAL) and not cancel.is_set():
                    # Cancel asked, or the run was settled without us (judged lost): stop the move.
                    log.info("run %s is %s: aborting the hypervisor job", run.pk, recorder.status)
                    cancel.set()
        except DatabaseError as exc:
            # Keep supervising the driver (cancel and timeout still work); record again next beat.
            log.warning("run %s: database unavailable while recording progress: %s", run.pk, exc)
            close_old_connections()
        if not cancel.is_set() and watchdog.worker_overdue(elapsed_s=time.monotonic() - began, budget_s=run.timeout_s,
                                                           grace_s=settings.PORTAL["ABORT_GRACE_S"]):
            log.warning("run %s: the driver did not end the move within its budget; aborting it", run.pk)
            overdue = True
            cancel.set()
    thread.join()
    if overdue and isinstance(outcome.error, drv.MigrationCancelled):
        outcome.error = drv.MigrationTimedOut(f"{watchdog.timed_out_text(run.timeout_s)}: the driver did not stop the "
                                              "move at its budget, so the portal aborted it; the VM stays on its source")
    try:
        recorder.flush()
    except DatabaseError as exc:
        log.warning("run %s: last progress not recorded: %s", run.pk, exc)
        close_old_connections()
    return outcome


def _heartbeat(run: MigrationRun) -> str:
    """Prove the worker is alive; returns the request's status (``cancelling`` when asked to stop)."""
    MigrationRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())
    return MigrationRequest.objects.filter(pk=run.request_id).values_list("status", flat=True).get()


class _ProgressRecorder:
    """Stores driver progress as numbered events: every phase change, else at most one per interval.

    ``offer`` only decides (no database); ``flush`` stores what is due, several updates in one
    transaction when the driver sent them in a burst."""

    def __init__(self, run: MigrationRun):
        self.run = run
        self.interval = settings.PORTAL["PROGRESS_INTERVAL_S"]
        self.last_stored = 0.0
        self.due: list[drv.ProgressUpdate] = []  # to store: phase changes, the first task id, interval ticks
        self.pending: drv.ProgressUpdate | None = None  # the latest other update, stored at the next flush
        self.percent = 0.0
        self.phase = run.phase  # as offered (the run's fields follow at flush)
        self.has_task_id = bool(run.task_id)
        self.status = S.RUNNING  # refreshed at every heartbeat

    def offer(self, update: drv.ProgressUpdate) -> bool:
        """Take an update; True when something is due to be stored now."""
        if not isinstance(update, drv.ProgressUpdate):
            log.warning("run %s: driver sent %r, not a ProgressUpdate; ignored", self.run.pk, update)
            return False
        must = (
            update.phase.value != self.phase
            or (update.task_id and not self.has_task_id)
            or time.monotonic() - self.last_stored >= self.interval
        )
        self.phase = update.phase.value
        self.has_task_id = self.has_task_id or bool(update.task_id)
        # An update newer than the pending one replaces it (only the latest is worth storing).
        self.pending = None
        if must:
            self.due.append(update)
        else:
            self.pending = update
        return bool(self.due)

    def flush(self) -> None:
        updates = self.due + ([self.pending] if self.pending is not None else [])
        self.due, self.pending = [], None
        if not updates:
            return
        run = self.run
        with transaction.atomic():
            phases = [self._store(run, update) for update in updates]
            # The audit appends last: they hold the chain's lock (every audited action waits on it) until commit.
            for phase in filter(None, phases):
                audit_record(actor=None, action=AuditAction.RUN_PHASE, request=run.request,
                             object_type="migration_run", object_id=str(run.pk), task_id=phase["task_id"],
                             data={"phase": phase["phase"], "percent": phase["percent"]})
        self.last_stored = time.monotonic()

    def _store(self, run: MigrationRun, update: drv.ProgressUpdate) -> dict | None:
        """Store one update as the run's next event; what to audit when it changed the phase."""
        phase_changed = update.phase.value != run.phase
        # Clamp what the driver says: percent within 0..100 and never backwards.
        self.percent = max(self.percent, min(100.0, max(0.0, float(update.percent))))
        run.phase = update.phase.value
        run.percent = self.percent
        run.bytes_done = max(0, int(update.bytes_done))
        run.bytes_total = max(0, int(update.bytes_total))
        run.rate_bytes_per_s = max(0.0, float(update.rate_bytes_per_s))
        run.eta_s = update.eta_s
        run.iteration = update.iteration
        if update.task_id:
            run.task_id = update.task_id[:200]
        run.heartbeat_at = timezone.now()
        fields = {
            "phase": run.phase, "percent": run.percent, "bytes_done": run.bytes_done, "bytes_total": run.bytes_total,
            "rate_bytes_per_s": run.rate_bytes_per_s, "eta_s": run.eta_s, "iteration": run.iteration,
            "task_id": run.task_id, "heartbeat_at": run.heartbeat_at,
        }
        append_run_event(run, status=self.status, message=update.message, run_fields=fields)
        if not phase_changed:
            return None
        return {"phase": run.phase, "percent": round(run.percent, 1), "task_id": run.task_id}


def _apply_placement(run: MigrationRun, placement: drv.Placement) -> None:
    """Record where the VM is now (as the driver read it back), and move datastore free space with it.
    Works on the VM's disks as ``migration_run_finish`` loaded them (with their datastores) and keeps
    those objects current, so the placement after the move is read without going back to the database.
    Every lookup that can fail comes before the first write."""
    vm = run.request.vm
    disks = list(vm.disks.all())
    new_refs = {d.pk: placement.disk_datastores.get(d.key) for d in disks}
    moving = [d for d in disks if new_refs[d.pk] is not None and new_refs[d.pk] != d.datastore.ref]
    host = vm.host
    if host.ref != placement.host_ref:
        host = Host.objects.get(connection_id=vm.connection_id, ref=placement.host_ref)
    stores = {}
    if moving:
        stores = {d.ref: d for d in Datastore.objects.filter(connection_id=vm.connection_id,
                                                             ref__in={new_refs[d.pk] for d in moving})}
    moved = [(disk, stores[new_refs[disk.pk]]) for disk in moving]
    # Datastores first, then the VM and its disks: the order inventory sync writes them in, so the
    # two never wait on each other's rows.
    for disk, target in moved:
        Datastore.objects.filter(pk=disk.datastore_id).update(free_bytes=F("free_bytes") + disk.capacity_bytes)
        Datastore.objects.filter(pk=target.pk).update(free_bytes=F("free_bytes") - disk.capacity_bytes)
    if host.pk != vm.host_id:
        vm.host = host
        vm.save(update_fields=["host"])
    for disk, target in moved:
        disk.datastore = target
        disk.save(update_fields=["datastore"])


def migration_run_finish(*, run: MigrationRun, outcome: _Outcome, reconciled_by: str = "") -> bool:
    """Write the run's true outcome, the VM's new placement and the audit entry, in one transaction.
    Returns False (and changes nothing) when the run was already settled. ``reconciled_by`` names
    the reconciliation that settles a run whose worker was lost; it is audited in the same transaction."""
    with transaction.atomic():
        request = (
            MigrationRequest.objects.select_for_update(of=("self",))
            .select_related("vm__host", "vm__connection")
            .prefetch_related(Prefetch("vm__disks", queryset=VirtualDisk.objects.select_related("datastore")))
            .get(pk=run.request_id)
        )
        run = MigrationRun.objects.select_for_update(of=("self",)).get(pk=run.pk)
        if request.status not in (S.RUNNING, S.CANCELLING):
            # Settled meanwhile (the reconciler judged the worker lost): the first outcome stands.
            log.warning("run %s is already %s; outcome %r not recorded", run.pk, request.status, outcome)
            return False
        run.request = request
        now = timezone.now()
        before = request.vm.placement_snapshot()
        after: dict = {}
        error = outcome.error
        if outcome.result is not None:
            try:
                with transaction.atomic():  # a savepoint: all of the placement or none of it
                    _apply_placement(run, outcome.result.placement)
            except (Host.DoesNotExist, KeyError) as exc:
                error = exc
                outcome.traceback = (
                    f"the hypervisor reported a placement the portal does not know ({exc!r}); "
                    "an inventory sync will correct it"
                )
        if outcome.result is not None and error is None:
            target, action = S.SUCCEEDED, AuditAction.RUN_SUCCEEDED
            run.task_id = outcome.result.task_id or run.task_id
            run.downtime_ms = outcome.result.downtime_ms
            run.phase, run.percent = Phase.DONE, 100.0
            run.bytes_done = run.bytes_total
            run.eta_s = 0
            after = request.vm.placement_snapshot()  # _apply_placement kept the VM's objects current
            late = " (the cancel arrived after the move had completed)" if request.status == S.CANCELLING else ""
            run.explanation = f"{request.vm.name} now runs as requested: {_placement_text(after)}.{late}"
        elif isinstance(error, drv.MigrationCancelled):
            target, action = S.CANCELLED, AuditAction.RUN_CANCELLED
            run.explanation = error.explanation()
        elif isinstance(error, drv.DriverError):
            target, action = S.FAILED, AuditAction.RUN_FAILED
            run.explanation = error.explanation()
        else:
            target, action = S.ERRORED, AuditAction.RUN_ERRORED
            run.explanation = (
                f"The portal hit an internal error ({type(error).__name__}: {str(error)[:200]}); "
                "the VM's placement is re-checked by the next sync."
            )
            run.traceback = outcome.traceback or repr(error)
        set_status(request, target)
        request.save(update_fields=["status", "updated_at"])
        run.finished_at = now
        run.save()
        append_run_event(run, status=target, message=run.explanation)
        # The audit appends last: they hold the chain's lock (every audited action waits on it) until commit.
        audit_record(
            actor=None,
            action=action,
            request=request,
            object_type="migration_run",
            object_id=str(run.pk),
            outcome=AuditOutcome.SUCCESS if target == S.SUCCEEDED else AuditOutcome.FAILURE,
            reason=run.explanation,
            before=before,
            after=after,
            task_id=run.task_id,
            data={"downtime_ms": run.downtime_ms, "worker": run.worker},
        )
        if reconciled_by:
            audit_record(actor=None, action=AuditAction.RUN_RECONCILED, request=request, task_id=run.task_id,
                         reason=reconciled_by)
        notify_request_changed(request)
        notifications.notify(request, _OUTCOME_CATEGORY[target], occasion=f"run-{run.pk}", detail=run.explanation)
        # Its resources are free again: start what was waiting for them.
        connection_id = request.vm.connection_id
        transaction.on_commit(lambda: dispatch_admissible(connection_id), robust=True)
        # A move plan's item: record it, retry a failure, finish the plan (services.plans).
        transaction.on_commit(lambda: plan_request_settled(request.pk), robust=True)
    return True


_OUTCOME_CATEGORY = {
    S.SUCCEEDED: NotificationCategory.RUN_SUCCEEDED,
    S.FAILED: NotificationCategory.RUN_FAILED,
    S.ERRORED: NotificationCategory.RUN_FAILED,
    S.CANCELLED: NotificationCategory.CANCELLED,
}


def _placement_text(snapshot: dict) -> str:
    stores = sorted(set(snapshot.get("disks", {}).values()))
    return f"host {snapshot.get('host')}, datastore {', '.join(stores)}"
