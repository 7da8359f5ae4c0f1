"""The end of a run: its outcome recorded with the placement read back, audited, pushed and notified."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.db import transaction
from django.db.models import F, Prefetch
from django.utils import timezone

from drivers import base as drv
from migrations_app import notifications
from migrations_app.choices import (
    AuditAction,
    AuditOutcome,
    NotificationCategory,
    Phase,
    RequestStatus,
)
from migrations_app.models import Datastore, Host, MigrationRequest, MigrationRun, VirtualDisk
from migrations_app.services.audit import audit_record
from migrations_app.services.plans import plan_request_settled
from migrations_app.services.requests import notify_request_changed, set_status
from migrations_app.services.runs.events import append_run_event
from migrations_app.services.runs.queueing import dispatch_admissible

log = logging.getLogger(__name__)
S = RequestStatus


@dataclass
class _Outcome:
    result: drv.MigrationResult | None = None
    error: BaseException | None = None
    traceback: str = ""



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
