"""Crash recovery: runs whose worker stopped heartbeating are settled with the hypervisor's truth.

A run is *stale* when it is running (or cancelling) and its heartbeat is older than the threshold.
The reconciler asks the driver what became of the stored hypervisor task and where the VM is now:

- the task is still running on the hypervisor: the run is adopted (heartbeat renewed, checked again
  at the next pass) until the hypervisor finishes it;
- the task succeeded, or the VM already sits on its target: succeeded, with the read-back placement;
- the task failed or was cancelled, or no task was ever started and the VM is still on its source:
  failed, with the reason; the VM did not move.

It never starts a migration: a run that died is settled, not retried.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from drivers import base as drv
from migrations_app.choices import AuditAction, RequestStatus
from migrations_app.models import MigrationRequest, MigrationRun
from migrations_app.services.audit import audit_record
from migrations_app.services.runs import _Outcome, append_run_event, migration_run_finish

log = logging.getLogger(__name__)
S = RequestStatus


def _at_target(run: MigrationRun, placement: drv.Placement) -> bool:
    request = run.request
    host_ok = not request.target_host_id or placement.host_ref == request.target_host.ref
    ds_ok = not request.target_datastore_id or set(placement.disk_datastores.values()) == {request.target_datastore.ref}
    return host_ok and ds_ok


def migration_run_reconcile_stale(*, stale_after_s: float | None = None) -> dict[str, int]:
    """Settle every run whose worker went silent. Returns counts per outcome."""
    stale_after_s = stale_after_s or settings.PORTAL["STALE_AFTER_S"]
    cutoff = timezone.now() - timedelta(seconds=stale_after_s)
    stale_ids = list(MigrationRun.objects.filter(
        request__status__in=[S.RUNNING, S.CANCELLING], heartbeat_at__lt=cutoff).values_list("pk", flat=True))
    counts = {"adopted": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "unreachable": 0}
    for run_id in stale_ids:
        outcome = _reconcile(run_id, cutoff)
        if outcome:
            counts[outcome] += 1
    return counts


def _reconcile(run_id: int, cutoff) -> str:
    """Settle one stale run; returns the outcome's name, or "" when it was no longer stale."""
    from migrations_app.services.inventory import driver_for

    run = MigrationRun.objects.select_related(
        "request__vm__connection", "request__target_host", "request__target_datastore").get(pk=run_id)
    # Ask the hypervisor outside any transaction: it may be slow, and no row is locked meanwhile.
    try:
        driver = driver_for(run.request.vm.connection)
        info = driver.task_info(run.task_id) if run.task_id else drv.TaskInfo("", drv.TaskState.UNKNOWN)
        placement = driver.placement(run.request.vm.ref)
    except drv.Unsupported:
        info, placement = drv.TaskInfo(run.task_id, drv.TaskState.UNKNOWN), None
    except drv.DriverError as exc:
        # Cannot ask now; the run stays stale and the next pass asks again.
        log.warning("run %s: cannot reach the hypervisor to reconcile: %s", run.pk, exc.explanation())
        return "unreachable"
    if info.state == drv.TaskState.RUNNING:
        with transaction.atomic():
            request = MigrationRequest.objects.select_for_update(of=("self",)).get(pk=run.request_id)
            locked = MigrationRun.objects.select_for_update(of=("self",)).get(pk=run.pk)
            if request.status not in (S.RUNNING, S.CANCELLING) or locked.heartbeat_at >= cutoff:
                return ""  # its worker came back, or someone settled it meanwhile
            MigrationRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())
            append_run_event(locked, status=request.status, message=f"worker lost; hypervisor task "
                             f"{run.task_id} still running, followed by the reconciler")
            audit_record(actor=None, action=AuditAction.RUN_RECONCILED, request=request,
                         task_id=run.task_id, reason="worker lost; the hypervisor still runs the task: adopted")
        return "adopted"
    why = f"worker lost; hypervisor task state {info.state.value}"
    if info.state == drv.TaskState.SUCCEEDED or (placement is not None and _at_target(run, placement)):
        if placement is None:
            log.warning("run %s: task succeeded but placement is unknown; waiting", run.pk)
            return ""
        outcome, name = _Outcome(result=drv.MigrationResult(placement=placement, task_id=run.task_id,
                                                            message="settled by the reconciler")), "succeeded"
    elif info.state == drv.TaskState.CANCELLED and run.request.status == S.CANCELLING:
        outcome, name = _Outcome(error=drv.MigrationCancelled(
            "The migration was cancelled on the hypervisor; the VM stays on its source.")), "cancelled"
    else:
        detail = info.message or "the worker running it stopped before the hypervisor reported a result"
        outcome, name = _Outcome(error=drv.MigrationFailed(
            f"The worker was lost and the move did not complete: {detail}. The VM stays on its source.")), "failed"
    # migration_run_finish locks the request and run, re-checks that the run is still active, and
    # audits the reconciliation in its own transaction, after the row locks like every writer.
    with transaction.atomic():
        locked = MigrationRun.objects.select_for_update(of=("self",)).get(pk=run.pk)
        if locked.heartbeat_at >= cutoff:
            return ""  # the worker is alive after all
    settled = migration_run_finish(run=run, outcome=outcome, reconciled_by=why)
    return name if settled else ""
