"""Crash recovery and the watchdog: runs whose worker stopped heartbeating are settled with the
hypervisor's truth.

A run is *stale* when it is running (or cancelling) and its heartbeat is older than the threshold.
The reconciler asks the driver what became of the run's hypervisor task (the stored task id, or,
when the worker died before storing it, the migration tasks the hypervisor started on the VM since
the claim) and where the VM is now, then applies ``watchdog.decide``:

- the task still runs: the run is adopted (heartbeat renewed, asked again at the next pass), unless
  it is past its completion budget or a cancel was asked: then the task is aborted on the
  hypervisor and the run settled with what the hypervisor confirms ("timed out after N s");
- the task succeeded, or the VM already sits on its target: succeeded, with the read-back placement;
- otherwise failed (or cancelled when a cancel was asked), with the reason; the VM did not move.

It never starts a migration: a run that died is settled, not retried. The only way into a
hypervisor start is ``runs._claim`` (queued -> running under row locks, once) followed by the
driver call, so a run is started at most once by construction.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from drivers import base as drv
from migrations_app import watchdog
from migrations_app.choices import AuditAction, RequestStatus
from migrations_app.models import MigrationRequest, MigrationRun
from migrations_app.services.audit import audit_record
from migrations_app.services.runs import _Outcome, append_run_event, migration_run_finish

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
    """Settle (or adopt, or abort) every run whose worker went silent. Returns counts per verdict."""
    stale_after_s = stale_after_s or settings.PORTAL["STALE_AFTER_S"]
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=stale_after_s)
    stale_ids = list(MigrationRun.objects.filter(
        request__status__in=[S.RUNNING, S.CANCELLING], heartbeat_at__lt=cutoff).values_list("pk", flat=True))
    counts = {"adopted": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "errored": 0,
              "unreachable": 0}
    for run_id in stale_ids:
        outcome = _reconcile(run_id, cutoff, now)
        if outcome:
            counts[outcome] += 1
    return counts


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
