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
from migrations_app.models import MigrationRun
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
    from migrations_app.services.inventory import driver_for

    stale_after_s = stale_after_s or settings.PORTAL["STALE_AFTER_S"]
    cutoff = timezone.now() - timedelta(seconds=stale_after_s)
    stale = MigrationRun.objects.filter(
        request__status__in=[S.RUNNING, S.CANCELLING], heartbeat_at__lt=cutoff
    ).select_related("request__vm__connection", "request__target_host", "request__target_datastore")
    counts = {"adopted": 0, "succeeded": 0, "failed": 0, "unreachable": 0}
    for run in stale:
        try:
            driver = driver_for(run.request.vm.connection)
            info = driver.task_info(run.task_id) if run.task_id else drv.TaskInfo("", drv.TaskState.UNKNOWN)
            placement = driver.placement(run.request.vm.ref)
        except drv.Unsupported:
            info, placement = drv.TaskInfo(run.task_id, drv.TaskState.UNKNOWN), None
        except drv.DriverError as exc:
            # Cannot ask now; the run stays stale and the next pass asks again.
            log.warning("run %s: cannot reach the hypervisor to reconcile: %s", run.pk, exc.explanation())
            counts["unreachable"] += 1
            continue
        if info.state == drv.TaskState.RUNNING:
            with transaction.atomic():
                MigrationRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())
                append_run_event(run, status=run.request.status, message=f"worker lost; hypervisor task "
                                 f"{run.task_id} still running, followed by the reconciler")
                audit_record(actor=None, action=AuditAction.RUN_RECONCILED, request=run.request,
                             task_id=run.task_id, reason="worker lost; the hypervisor still runs the task: adopted")
            counts["adopted"] += 1
            continue
        if info.state == drv.TaskState.SUCCEEDED or (placement is not None and _at_target(run, placement)):
            if placement is None:
                log.warning("run %s: task succeeded but placement is unknown; waiting", run.pk)
                continue
            outcome = _Outcome(result=drv.MigrationResult(placement=placement, task_id=run.task_id,
                                                          message="settled by the reconciler"))
            counts["succeeded"] += 1
        else:
            why = info.message or "the worker running it stopped before the hypervisor reported a result"
            outcome = _Outcome(error=drv.MigrationFailed(f"The worker was lost and the move did not complete: {why}. "
                                                         "The VM stays on its source."))
            counts["failed"] += 1
        with transaction.atomic():  # the reconciliation and the outcome it settles, together
            audit_record(actor=None, action=AuditAction.RUN_RECONCILED, request=run.request, task_id=run.task_id,
                         reason=f"worker lost; hypervisor task state {info.state.value}",
                         data={"placement_host": placement.host_ref if placement else None})
            migration_run_finish(run=run, outcome=outcome)
    return counts
