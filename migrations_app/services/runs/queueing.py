"""Queueing: hand runs to the workers, within admission control, and re-send those whose message was lost.

The database, not the broker, is the source of truth: a run is dispatched from its row, and a
worker only starts a run it can claim."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import prefetch_related_objects
from django.utils import timezone

from migrations_app import admission, windows
from migrations_app.bulk import update_objects
from migrations_app.choices import AuditAction, MigrationKind, RequestStatus
from migrations_app.models import MigrationRequest, MigrationRun, VirtualDisk
from migrations_app.services.audit import audit_append, audit_entry
from migrations_app.services.requests import notify_requests_changed, set_status
from migrations_app.services.runs.events import NewEvent, append_run_events

S = RequestStatus
GiB = 1024**3


def completion_budget_s(*, memory_bytes: int, disk_bytes: int, kind: str, cold: bool = False) -> float:
    """Time a migration may take before it is aborted: per GiB of what is copied (Nova's rule).
    A cold move copies no memory, and has its guest shutdown and power operations on top."""
    memory = memory_bytes if kind != MigrationKind.STORAGE and not cold else 0
    copied = memory + (disk_bytes if kind != MigrationKind.COMPUTE else 0)
    budget = max(settings.PORTAL["TIMEOUT_MIN_S"], settings.PORTAL["TIMEOUT_S_PER_GIB"] * copied / GiB)
    return budget + settings.PORTAL["COLD_POWER_S"] if cold else budget


def dispatch(run_id: int, worker_task_id: str) -> None:
    """Hand a run to the workers. Safe to repeat: a worker only starts a run it can claim."""
    from migrations_app.tasks import execute_run

    execute_run.apply_async(args=[run_id], task_id=worker_task_id)


def dispatch_many(runs: list[tuple[int, int, str]]) -> None:
    """Hand runs to the workers, given as (run id, connection id, worker task id): one message
    per ``WORKER_BATCH`` runs of a connection (a worker claims and moves a message's runs
    together). Safe to repeat, like ``dispatch``."""
    from migrations_app.tasks import execute_runs

    size = settings.PORTAL["WORKER_BATCH"]
    by_connection: dict[int, list[tuple[int, str]]] = {}
    for run_id, connection_id, task_id in runs:
        by_connection.setdefault(connection_id, []).append((run_id, task_id))
    for batch in (chunk for group in by_connection.values() for chunk in _chunks(group, size)):
        if len(batch) == 1:
            dispatch(*batch[0])
        else:
            # The message is named after its first run's worker task id: unique, and found in the logs.
            execute_runs.apply_async(args=[[run_id for run_id, _ in batch]], task_id=batch[0][1])


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def migration_run_enqueue(*, request: MigrationRequest, actor) -> MigrationRun:
    """Approved and due: create the run and queue it (inside the caller's transaction, request locked)."""
    return migration_runs_enqueue(requests=[request], actor=actor)[0]


def migration_runs_enqueue(*, requests: list[MigrationRequest], actor) -> list[MigrationRun]:
    """Approved and due: create the runs of these requests and queue them (inside the caller's
    transaction, requests locked): one UPDATE of the requests, one INSERT of the runs, one of
    their first events, one append to the audit log, and one hand-over to the workers on commit."""
    if not requests:
        return []
    now = timezone.now()
    for request in requests:
        set_status(request, S.QUEUED)
        request.updated_at = now
    update_objects(requests, ["status", "updated_at"])
    # The completion budgets read the VMs' disks: once for all.
    prefetch_related_objects([r.vm for r in requests if "disks" not in getattr(r.vm, "_prefetched_objects_cache", {})],
                             "disks")
    runs = [MigrationRun(
        request=request,
        worker_task_id=str(uuid.uuid4()),
        dispatched_at=now,
        timeout_s=completion_budget_s(memory_bytes=request.vm.memory_bytes, disk_bytes=request.vm.disk_bytes,
                                      kind=request.kind, cold=request.cold),
    ) for request in requests]
    if len(runs) == 1:
        runs[0].save(force_insert=True)
    else:
        MigrationRun.objects.bulk_create(runs)
    append_run_events([NewEvent(run, status=request.status, message="queued for a worker")
                       for run, request in zip(runs, requests, strict=True)])
    audit_append([audit_entry(actor=actor, action=AuditAction.RUN_QUEUED, request=request,
                              object_type="migration_run", object_id=str(run.pk))
                   for run, request in zip(runs, requests, strict=True)])
    # robust: a broker outage must not undo the approval; the scheduler re-dispatches queued runs.
    sent = [(run.pk, request.vm.connection_id, run.worker_task_id) for run, request in zip(runs, requests, strict=True)]
    transaction.on_commit(lambda: dispatch_many(sent), robust=True)
    return runs


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
    runs = list(stale.values_list("pk", "request__vm__connection_id", "worker_task_id"))
    if runs:
        MigrationRun.objects.filter(pk__in=[pk for pk, _, _ in runs]).update(dispatched_at=now)
        dispatch_many(runs)
    return len(runs)


def migration_request_start_due(*, now=None) -> int:
    """Queue approved requests whose window has opened (and not closed: the expiry pass ends
    those), all in one transaction, so runs whose window opens together reach the workers in
    batches (``dispatch_many``). Returns how many were queued."""
    now = now or timezone.now()
    due = list(MigrationRequest.objects.filter(status=S.APPROVED, start_after__lte=now).exclude(
        window_end__lte=now).order_by("pk").values_list("pk", flat=True)[:MAX_DUE_AT_ONCE])
    if not due:
        return 0
    with transaction.atomic():
        locked = MigrationRequest.objects.select_for_update(of=("self",)).select_related("vm", "requester").filter(
            pk__in=due).order_by("pk")
        requests = [r for r in locked if r.status == S.APPROVED and not windows.window_closed(r, now)]
        migration_runs_enqueue(requests=requests, actor=None)
        notify_requests_changed(requests)
    return len(requests)


# A scheduler pass queues at most this many due requests in one transaction (the next pass,
# seconds later, takes the rest): its row locks are held until it commits.
MAX_DUE_AT_ONCE = 500


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
    # Only a run a worker held back has no message left in the queue (dispatched_at cleared);
    # re-send those alone, so a busy worker pool never grows copies.
    again = [by_request[move.id] for move in decision.admitted
             if by_request[move.id].wait_reason and by_request[move.id].dispatched_at is None]
    if again:
        MigrationRun.objects.filter(pk__in=[run.pk for run in again]).update(dispatched_at=timezone.now())
        dispatch_many([(run.pk, connection_id, run.worker_task_id) for run in again])
    return len(again)
