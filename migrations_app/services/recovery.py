"""Crash recovery and the watchdog: runs whose worker stopped heartbeating are put back in line
when the hypervisor was never asked to move them, else settled with the hypervisor's truth.

A run is *stale* when it is running (or cancelling) and its heartbeat is older than the threshold.

A stale run never handed to the hypervisor (``handed_at`` empty: the worker's start gate commits
it before the driver is called) provably moved nothing, so the hypervisor is not asked: a running
one goes back in line (queued, its claim's fields cleared, a fresh ``worker_task_id``, sent to the
workers on commit), up to ``PORTAL["MAX_REQUEUES"]`` times, then fails with that reason; a
cancelling one is cancelled. A killed worker's whole batch is handled so in one transaction.

For a stale run that was handed over, the reconciler asks the driver what became of the run's
hypervisor task (the stored task id, or, when the worker died before storing it, the migration
tasks the hypervisor started on the VM since the claim) and where the VM is now, then applies
``watchdog.decide``:

- the task still runs: the run is adopted (heartbeat renewed, asked again at the next pass), unless
  it is past its completion budget or a cancel was asked: then the task is aborted on the
  hypervisor and the run settled with what the hypervisor confirms ("timed out after N s");
- the task succeeded, or the VM already sits on its target: succeeded, with the read-back placement;
- otherwise failed (or cancelled when a cancel was asked), with the reason; the VM did not move.

It never starts a migration, and never retries one the hypervisor may have seen. The only way
into a hypervisor start is ``runs._claim`` (queued -> running under row locks) followed by the
start gate, which marks the run handed (``handed_at``, only from empty, never cleared) under the
same locks before the driver call, and only while the run is still its claim's (the
``worker_task_id`` a requeue replaces). A run is put back in line only while ``handed_at`` is
empty, checked under those locks: so whichever of the gate and the requeue takes the locks first,
the other backs off, and a run is handed to a driver at most once by construction.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from drivers import base as drv
from migrations_app import watchdog
from migrations_app.bulk import update_objects
from migrations_app.choices import AuditAction, Phase, RequestStatus
from migrations_app.models import MigrationRequest, MigrationRun
from migrations_app.services.audit import audit_append, audit_entry, audit_record
from migrations_app.services.requests import MAX_BATCH, notify_requests_changed, set_status
from migrations_app.services.runs import (
    _Outcome,
    append_run_event,
    dispatch_many,
    migration_run_finish,
    migration_runs_finish,
)
from migrations_app.services.runs.events import NewEvent, append_run_events

log = logging.getLogger(__name__)
S = RequestStatus
V = watchdog.Verdict
# Tasks found on the VM may be queued a little before the claim by the hypervisor's clock.
CLOCK_SKEW_S = 30.0


def _where(run: MigrationRun, placement: drv.Placement | None) -> watchdog.Where:
    """The hypervisor's placement against the run's target and the portal's record of the source
    (the VM's placement in the portal changes only when a run finishes)."""
    if placement is None:
        return watchdog.Where.UNKNOWN
    request = run.request
    host_ok = not request.target_host_id or placement.host_ref == request.target_host.ref
    ds_ok = not request.target_datastore_id or set(placement.disk_datastores.values()) == {request.target_datastore.ref}
    if host_ok and ds_ok:
        return watchdog.Where.TARGET
    vm = request.vm
    source_disks = {d.key: d.datastore.ref for d in vm.disks.select_related("datastore")}
    if placement.host_ref == vm.host.ref and dict(placement.disk_datastores) == source_disks:
        return watchdog.Where.SOURCE
    return watchdog.Where.ELSEWHERE


def migration_run_reconcile_stale(*, stale_after_s: float | None = None, now=None) -> dict[str, int]:
    """Put back in line every run whose worker went silent before handing it to the hypervisor,
    and settle (or adopt, or abort) every other run whose worker went silent. Returns counts per
    verdict."""
    stale_after_s = stale_after_s or settings.PORTAL["STALE_AFTER_S"]
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=stale_after_s)
    stale = list(MigrationRun.objects.filter(
        request__status__in=[S.RUNNING, S.CANCELLING], heartbeat_at__lt=cutoff).order_by("pk").values_list(
        "pk", "handed_at", "task_id", "phase"))
    counts = {"requeued": 0, "adopted": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "errored": 0,
              "unreachable": 0}
    never_handed = [pk for pk, *fields in stale if _never_handed(*fields)]
    for start in range(0, len(never_handed), MAX_BATCH):
        for outcome, count in _reconcile_never_handed(never_handed[start:start + MAX_BATCH], cutoff, now).items():
            counts[outcome] += count
    for run_id in [pk for pk, *fields in stale if not _never_handed(*fields)]:
        outcome = _reconcile(run_id, cutoff, now)
        if outcome:
            counts[outcome] += 1
    return counts


def _never_handed(handed_at, task_id: str, phase: str) -> bool:
    """The hypervisor was never asked to move this run: no hand-over recorded, and nothing the
    driver reports (a task id, a phase past the pre-check) either. The second half covers a worker
    of a release before ``handed_at`` (a rolling deploy), which hands runs over without recording it."""
    return handed_at is None and not task_id and phase == Phase.PRECHECK


# The words of a requeue: its run event, its audit entry, the reconciliation of a run not requeued.
LOST_BEFORE_THE_MOVE = "worker lost before the move started; nothing was moved"
REQUEUED = f"{LOST_BEFORE_THE_MOVE}; back in line"


def _reconcile_never_handed(run_ids: list[int], cutoff, now) -> dict[str, int]:
    """Stale runs the hypervisor was never asked to move, in one transaction (a killed worker's
    batch goes back in line together, and reaches the workers in batches again). Under the rows'
    locks (the requests, then their runs), each must still be active, stale and never handed (the
    worker's start gate did not win the locks first): a running one is put back in line, unless it
    already was ``MAX_REQUEUES`` times (failed, nothing moved); a cancelling one is cancelled."""
    counts = {"requeued": 0, "failed": 0, "cancelled": 0}
    limit = settings.PORTAL["MAX_REQUEUES"]
    with transaction.atomic():
        requests = {r.pk: r for r in MigrationRequest.objects.select_for_update(of=("self",)).select_related(
            "vm", "requester").filter(run__pk__in=run_ids).order_by("pk")}
        runs = list(MigrationRun.objects.select_for_update(of=("self",)).filter(pk__in=run_ids).order_by("pk"))
        back, ended = [], []
        for run in runs:
            request = run.request = requests[run.request_id]
            if (request.status not in (S.RUNNING, S.CANCELLING) or not _never_handed(run.handed_at, run.task_id, run.phase)
                    or run.heartbeat_at is None or run.heartbeat_at >= cutoff):
                continue  # settled, handed or renewed meanwhile: its worker, or the next pass, sees to it
            if request.status == S.CANCELLING:
                ended.append((run, _Outcome(error=drv.MigrationCancelled(
                    "Cancelled; its worker was lost before the move started, so nothing was moved."))))
                counts["cancelled"] += 1
            elif run.requeues >= limit:
                ended.append((run, _Outcome(error=drv.MigrationFailed(
                    f"Its worker was lost before the move started {run.requeues + 1} times; nothing was moved, "
                    "and it is not put back in line again."))))
                counts["failed"] += 1
            else:
                back.append(run)
        _requeue(back, now)
        counts["requeued"] = len(back)
        # Nested: the same locks, already held; audits the reconciliation with each outcome.
        migration_runs_finish(ended, reconciled_by=LOST_BEFORE_THE_MOVE)
    return counts


def _requeue(runs: list[MigrationRun], now) -> None:
    """Put these locked, never-handed runs back in line: their requests queued, their claims'
    fields cleared and a fresh ``worker_task_id`` (the old claim's worker, if only slow, finds its
    claim gone at its start gate), a numbered event and an audit entry each, the pages told, and
    the runs sent to the workers on commit (the claim decides admission again)."""
    if not runs:
        return
    requests = [run.request for run in runs]
    lost = {run.pk: run.worker for run in runs}
    for run in runs:
        set_status(run.request, S.QUEUED)
        run.request.updated_at = now
        run.worker, run.started_at, run.heartbeat_at, run.phase, run.wait_reason = "", None, None, Phase.WAITING, ""
        run.worker_task_id, run.dispatched_at, run.requeues = str(uuid.uuid4()), now, run.requeues + 1
    update_objects(requests, ["status", "updated_at"])
    update_objects(runs, ["worker", "started_at", "heartbeat_at", "phase", "wait_reason", "worker_task_id",
                          "dispatched_at", "requeues"])
    append_run_events([NewEvent(run, S.QUEUED, REQUEUED) for run in runs])
    # The audit append last: it holds the chain's lock (every audited action waits on it) until commit.
    audit_append([audit_entry(actor=None, action=AuditAction.RUN_REQUEUED, request=run.request,
                              object_type="migration_run", object_id=str(run.pk), reason=REQUEUED,
                              data={"worker": lost[run.pk], "requeues": run.requeues}) for run in runs])
    notify_requests_changed(requests)
    sent = [(run.pk, run.request.vm.connection_id, run.worker_task_id) for run in runs]
    # robust: a broker outage must not undo the requeue; the scheduler re-dispatches queued runs.
    transaction.on_commit(lambda: dispatch_many(sent), robust=True)


def _find_task(run: MigrationRun, driver: drv.Driver) -> drv.TaskInfo | None:
    """The run's hypervisor task: the stored one, or the one the hypervisor started on the VM after
    the claim (the worker died before storing its id). None: the hypervisor started none."""
    if run.task_id:
        return driver.task_info(run.task_id)
    if not driver.supports(drv.Capability.TASKS_BY_VM):
        return None  # only the placement can tell (libvirt reports its task id before the job starts)
    since = run.started_at.timestamp() - CLOCK_SKEW_S
    earlier = set(MigrationRun.objects.filter(request__vm_id=run.request.vm_id).exclude(pk=run.pk)
                  .exclude(task_id="").values_list("task_id", flat=True))
    tasks = [t for t in driver.migration_tasks(run.request.vm.ref, since=since) if t.task_id not in earlier]
    if len(tasks) > 1:
        log.error("run %s: the hypervisor shows %d migration tasks on %s since the claim: %s", run.pk, len(tasks),
                  run.request.vm.name, [t.task_id for t in tasks])
    return tasks[-1] if tasks else None


def _found(run: MigrationRun, task: drv.TaskInfo | None) -> str:
    """Says so when the task was found on the VM: its worker died before it stored the id."""
    return f"task {task.task_id} found on the VM (its id was never stored); " if task and not run.task_id else ""


def _observe(run: MigrationRun, driver: drv.Driver, now) -> tuple[watchdog.Observation, drv.TaskInfo | None,
                                                                  drv.Placement | None]:
    task = _find_task(run, driver)
    try:
        placement = driver.placement(run.request.vm.ref)
    except drv.NotFound:
        placement, where = None, watchdog.Where.GONE
    else:
        where = _where(run, placement)
    started = run.started_at or now
    observation = watchdog.Observation(
        cancelling=run.request.status == S.CANCELLING,
        task_state=task.state if task is not None else None,
        where=where,
        elapsed_s=(now - started).total_seconds(),
        budget_s=run.timeout_s or settings.PORTAL["TIMEOUT_MIN_S"],
        abort_grace_s=settings.PORTAL["ABORT_GRACE_S"],
        hypervisor_message=task.message if task is not None else "",
    )
    return observation, task, placement


def _reconcile(run_id: int, cutoff, now) -> str:
    """Judge one stale run; returns the counter to bump, or "" when nothing was done."""
    from migrations_app.services.inventory import driver_for

    run = MigrationRun.objects.select_related(
        "request__vm__connection", "request__vm__host", "request__target_host", "request__target_datastore",
    ).get(pk=run_id)
    # Ask the hypervisor outside any transaction: it may be slow, and no row is locked meanwhile.
    try:
        driver = driver_for(run.request.vm.connection)
        observation, task, placement = _observe(run, driver, now)
        if not driver.supports(drv.Capability.TASK_ABORT):
            observation = replace(observation, can_abort=False)
        decision = watchdog.decide(observation)
        if decision.verdict == V.ABORT:
            _audit_abort(run, task, decision.reason, cutoff)
            try:
                task = driver.cancel_task(task.task_id)
            except drv.Unsupported:
                observation = replace(observation, can_abort=False)
            else:
                placement = driver.placement(run.request.vm.ref)
                observation = replace(observation, task_state=task.state, where=_where(run, placement),
                                       hypervisor_message=task.message)
            decision = watchdog.decide(observation)
            if decision.verdict == V.ABORT:  # the hypervisor has not ended it yet: next pass
                decision = watchdog.Decision(V.ADOPT, "abort sent; the hypervisor has not ended the task yet")
    except drv.DriverError as exc:
        # Cannot ask now; the run stays stale and the next pass asks again.
        log.warning("run %s: cannot reach the hypervisor to reconcile: %s", run.pk, exc.explanation())
        return "unreachable"
    if decision.verdict == V.WAIT:
        log.info("run %s: %s; asking again at the next pass", run.pk, decision.reason)
        return ""
    if decision.verdict == V.ADOPT:
        return "adopted" if _adopt(run, task, decision.reason, cutoff) else ""
    return _settle(run, task, placement, decision, cutoff)


def _still_stale(run: MigrationRun, cutoff) -> MigrationRequest | None:
    """Lock the request and the run (in that order, as every writer); the request when the run is
    still active and stale, else None (its worker came back, or someone settled it meanwhile)."""
    request = MigrationRequest.objects.select_for_update(of=("self",)).get(pk=run.request_id)
    locked = MigrationRun.objects.select_for_update(of=("self",)).get(pk=run.pk)
    if request.status not in (S.RUNNING, S.CANCELLING) or locked.heartbeat_at >= cutoff:
        return None
    return request


def _adopt(run: MigrationRun, task: drv.TaskInfo | None, reason: str, cutoff) -> bool:
    with transaction.atomic():
        request = _still_stale(run, cutoff)
        if request is None:
            return False
        task_id = task.task_id if task is not None else run.task_id
        MigrationRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now(), task_id=task_id[:200])
        append_run_event(run, status=request.status, message=f"worker lost; task {task_id}: {reason}")
        audit_record(actor=None, action=AuditAction.RUN_RECONCILED, request=request, task_id=task_id,
                     reason=f"worker lost; {_found(run, task)}{reason}: adopted")
    return True


def _audit_abort(run: MigrationRun, task: drv.TaskInfo, reason: str, cutoff) -> None:
    with transaction.atomic():
        request = _still_stale(run, cutoff)
        if request is None:
            return
        append_run_event(run, status=request.status, message=reason)
        audit_record(actor=None, action=AuditAction.RUN_WATCHDOG_ABORT, request=request, task_id=task.task_id,
                     reason=reason)


def _settle(run: MigrationRun, task: drv.TaskInfo | None, placement: drv.Placement | None,
            decision: watchdog.Decision, cutoff) -> str:
    task_id = task.task_id if task is not None else run.task_id
    if task_id and not run.task_id:
        MigrationRun.objects.filter(pk=run.pk, task_id="").update(task_id=task_id[:200])
    why = f"worker lost; {_found(run, task)}{decision.reason}"
    if decision.verdict == V.SUCCEEDED:
        outcome = _Outcome(result=drv.MigrationResult(placement=placement, task_id=task_id,
                                                      message="settled by the reconciler"))
    elif decision.verdict == V.CANCELLED:
        outcome = _Outcome(error=drv.MigrationCancelled(f"The worker was lost: {decision.reason}."))
    elif decision.verdict == V.FAILED:
        outcome = _Outcome(error=drv.MigrationFailed(
            f"The worker was lost and the move did not complete: {decision.reason}."))
    else:
        error = RuntimeError(f"the worker was lost and {decision.reason}")
        outcome = _Outcome(error=error, traceback=f"reconciler: {decision.reason}")
    # migration_run_finish locks the request and run, re-checks that the run is still active, and
    # audits the reconciliation in its own transaction, after the row locks like every writer.
    with transaction.atomic():
        if _still_stale(run, cutoff) is None:
            return ""
    settled = migration_run_finish(run=run, outcome=outcome, reconciled_by=why)
    return decision.verdict.value if settled else ""
