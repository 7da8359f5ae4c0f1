"""The end of a run: its outcome recorded with the placement read back, audited, pushed and notified."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.db import transaction
from django.db.models import F, Prefetch
from django.utils import timezone

from drivers import base as drv
from migrations_app import notifications
from migrations_app.bulk import update_objects
from migrations_app.choices import (
    AuditAction,
    AuditOutcome,
    NotificationCategory,
    Phase,
    RequestStatus,
)
from migrations_app.models import Datastore, Host, MigrationRequest, MigrationRun, VirtualDisk
from migrations_app.services.audit import audit_append, audit_entry
from migrations_app.services.plans import plan_request_settled
from migrations_app.services.requests import notify_requests_changed, set_status
from migrations_app.services.runs.events import NewEvent, append_run_events
from migrations_app.services.runs.queueing import dispatch_admissible

log = logging.getLogger(__name__)
S = RequestStatus


@dataclass
class _Outcome:
    result: drv.MigrationResult | None = None
    error: BaseException | None = None
    traceback: str = ""



def _placements(items: list[tuple[MigrationRun, drv.Placement]]) -> dict[int, Exception]:
    """Record where each VM is now (as the driver read it back), and move datastore free space with
    it: one query per kind of lookup and one write per kind of row for the whole batch. Works on the
    VMs' disks as ``migration_runs_finish`` loaded them (with their datastores) and keeps those objects
    current, so the placement after the move is read without going back to the database. Every
    lookup comes before the first write: a run whose placement cannot be read is left out whole
    and its error returned (run id -> error)."""
    errors: dict[int, Exception] = {}
    connection_id = items[0][0].request.vm.connection_id if items else None
    host_refs = {p.host_ref for run, p in items if p.host_ref != run.request.vm.host.ref}
    hosts = {h.ref: h for h in Host.objects.filter(connection_id=connection_id, ref__in=host_refs)} if host_refs else {}
    plans = []
    for run, placement in items:
        vm = run.request.vm
        disks = list(vm.disks.all())
        new_refs = {d.pk: placement.disk_datastores.get(d.key) for d in disks}
        moving = [d for d in disks if new_refs[d.pk] is not None and new_refs[d.pk] != d.datastore.ref]
        host = vm.host if vm.host.ref == placement.host_ref else hosts.get(placement.host_ref)
        if host is None:
            errors[run.pk] = Host.DoesNotExist(f"host {placement.host_ref!r} is not in the portal's inventory")
            continue
        plans.append((run, vm, host, moving, new_refs))
    store_refs = {new_refs[d.pk] for *_, moving, new_refs in plans for d in moving}
    stores = ({d.ref: d for d in Datastore.objects.filter(connection_id=connection_id, ref__in=store_refs)}
              if store_refs else {})
    writes = []
    for run, vm, host, moving, new_refs in plans:
        missing = sorted({new_refs[d.pk] for d in moving} - set(stores))
        if missing:
            errors[run.pk] = KeyError(f"datastore(s) {', '.join(missing)} not in the portal's inventory")
            continue
        writes.append((vm, host, [(disk, stores[new_refs[disk.pk]]) for disk in moving]))
    # Datastores first, then the VMs and their disks: the order inventory sync writes them in, so
    # the two never wait on each other's rows.
    delta: dict[int, int] = {}
    for _, _, moved in writes:
        for disk, target in moved:
            delta[disk.datastore_id] = delta.get(disk.datastore_id, 0) + disk.capacity_bytes
            delta[target.pk] = delta.get(target.pk, 0) - disk.capacity_bytes
    for pk in sorted(delta):
        if delta[pk]:
            Datastore.objects.filter(pk=pk).update(free_bytes=F("free_bytes") + delta[pk])
    vms = []
    disks = []
    for vm, host, moved in writes:
        if host.pk != vm.host_id:
            vm.host = host
            vms.append(vm)
        for disk, target in moved:
            disk.datastore = target
            disks.append(disk)
    if vms:
        update_objects(vms, ["host"])
    if disks:
        update_objects(disks, ["datastore"])
    return errors


def migration_run_finish(*, run: MigrationRun, outcome: _Outcome, reconciled_by: str = "") -> bool:
    """Write the run's true outcome, the VM's new placement and the audit entry, in one transaction.
    Returns False (and changes nothing) when the run was already settled. ``reconciled_by`` names
    the reconciliation that settles a run whose worker was lost; it is audited in the same transaction."""
    return bool(migration_runs_finish([(run, outcome)], reconciled_by=reconciled_by))


def migration_runs_finish(items: list[tuple[MigrationRun, _Outcome]], *, reconciled_by: str = "",
                          claims: dict[int, str] | None = None) -> list[int]:
    """``migration_run_finish`` for a batch of runs, in one transaction: each run gets its own
    outcome, placement, event, audit entry and notification. Returns the ids of the runs settled
    now (a run settled meanwhile keeps its first outcome and is left out). ``claims`` (run id ->
    its worker_task_id at the claim), from the worker that claimed them: a run put back in line
    since (and maybe claimed again by another worker) is not this worker's to finish, and is left out."""
    if not items:
        return []
    outcomes = {run.pk: outcome for run, outcome in items}
    with transaction.atomic():
        requests = {r.pk: r for r in (
            MigrationRequest.objects.select_for_update(of=("self",))
            .select_related("vm__host", "vm__connection", "requester", "target_host", "target_datastore")
            .prefetch_related(Prefetch("vm__disks", queryset=VirtualDisk.objects.select_related("datastore")))
            .filter(pk__in=[run.request_id for run, _ in items]).order_by("pk"))}
        runs = []
        for run in MigrationRun.objects.select_for_update(of=("self",)).filter(pk__in=outcomes).order_by("pk"):
            request = requests[run.request_id]
            if request.status not in (S.RUNNING, S.CANCELLING):
                # Settled meanwhile (the reconciler judged the worker lost): the first outcome stands.
                log.warning("run %s is already %s; outcome %r not recorded", run.pk, request.status, outcomes[run.pk])
                continue
            if claims is not None and run.worker_task_id != claims.get(run.pk):
                log.warning("run %s was put back in line since this worker claimed it; outcome %r not recorded",
                            run.pk, outcomes[run.pk])
                continue
            run.request = request
            runs.append(run)
        if not runs:
            return []
        before = {run.pk: run.request.vm.placement_snapshot() for run in runs}
        placed = [(run, outcomes[run.pk].result.placement) for run in runs if outcomes[run.pk].result is not None]
        unknown = {}
        for connection_id in {run.request.vm.connection_id for run, _ in placed}:
            unknown.update(_placements([(r, p) for r, p in placed if r.request.vm.connection_id == connection_id]))
        now = timezone.now()
        new_events, audits, notices = [], [], []
        for run in runs:
            request, outcome = run.request, outcomes[run.pk]
            error = unknown.get(run.pk, outcome.error)
            if run.pk in unknown:
                outcome.traceback = (
                    f"the hypervisor reported a placement the portal does not know ({error!r}); "
                    "an inventory sync will correct it"
                )
            target, action, after = _settle(run, outcome, error)
            set_status(request, target)
            request.updated_at = now
            run.finished_at = now
            new_events.append(NewEvent(run, target, run.explanation))
            audits.append(audit_entry(
                actor=None,
                action=action,
                request=request,
                object_type="migration_run",
                object_id=str(run.pk),
                outcome=AuditOutcome.SUCCESS if target == S.SUCCEEDED else AuditOutcome.FAILURE,
                reason=run.explanation,
                before=before[run.pk],
                after=after,
                task_id=run.task_id,
                data={"downtime_ms": run.downtime_ms, "worker": run.worker},
            ))
            if reconciled_by:
                audits.append(audit_entry(actor=None, action=AuditAction.RUN_RECONCILED, request=request,
                                          task_id=run.task_id, reason=reconciled_by))
            notices.append(notifications.Notice(request, _OUTCOME_CATEGORY[target], f"run-{run.pk}", run.explanation))
        update_objects([run.request for run in runs], ["status", "updated_at"])
        update_objects(runs, _FINISH_FIELDS)
        append_run_events(new_events)
        # The audit appends last: they hold the chain's lock (every audited action waits on it) until commit.
        audit_append(audits)
        notify_requests_changed([run.request for run in runs])
        notifications.notify_many(notices)
        # Their resources are free again: start what was waiting for them.
        for connection_id in sorted({run.request.vm.connection_id for run in runs}):
            transaction.on_commit(lambda cid=connection_id: dispatch_admissible(cid), robust=True)
        # A move plan's item: record it, retry a failure, finish the plan (services.plans).
        for request_id in [run.request_id for run in runs if notifications.plan_id_of(run.request) is not None]:
            transaction.on_commit(lambda rid=request_id: plan_request_settled(rid), robust=True)
    return [run.pk for run in runs]


_FINISH_FIELDS = ["task_id", "downtime_ms", "phase", "percent", "bytes_done", "eta_s", "explanation", "traceback",
                  "finished_at"]


def _settle(run: MigrationRun, outcome: _Outcome, error: BaseException | None) -> tuple[str, AuditAction, dict]:
    """The run's final status, audit action and placement after, with its fields set to tell it."""
    request = run.request
    if outcome.result is not None and error is None:
        run.task_id = outcome.result.task_id or run.task_id
        run.downtime_ms = outcome.result.downtime_ms
        run.phase, run.percent = Phase.DONE, 100.0
        run.bytes_done = run.bytes_total
        run.eta_s = 0
        after = request.vm.placement_snapshot()  # _placements kept the VM's objects current
        late = " (the cancel arrived after the move had completed)" if request.status == S.CANCELLING else ""
        run.explanation = f"{request.vm.name} now runs as requested: {_placement_text(after)}.{late}"
        return S.SUCCEEDED, AuditAction.RUN_SUCCEEDED, after
    if isinstance(error, drv.MigrationCancelled):
        run.explanation = error.explanation()
        return S.CANCELLED, AuditAction.RUN_CANCELLED, {}
    if isinstance(error, drv.DriverError):
        run.explanation = error.explanation()
        return S.FAILED, AuditAction.RUN_FAILED, {}
    run.explanation = (
        f"The portal hit an internal error ({type(error).__name__}: {str(error)[:200]}); "
        "the VM's placement is re-checked by the next sync."
    )
    run.traceback = outcome.traceback or repr(error)
    return S.ERRORED, AuditAction.RUN_ERRORED, {}


_OUTCOME_CATEGORY = {
    S.SUCCEEDED: NotificationCategory.RUN_SUCCEEDED,
    S.FAILED: NotificationCategory.RUN_FAILED,
    S.ERRORED: NotificationCategory.RUN_FAILED,
    S.CANCELLED: NotificationCategory.CANCELLED,
}


def _placement_text(snapshot: dict) -> str:
    stores = sorted(set(snapshot.get("disks", {}).values()))
    return f"host {snapshot.get('host')}, datastore {', '.join(stores)}"
