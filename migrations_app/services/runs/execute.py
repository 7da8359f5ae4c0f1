"""Execution of queued runs: claim them, check them again, hand them to ``drive``, finish those that cannot start.

A migration is not idempotent, so correctness never rests on the broker: the worker task is acked
early, a run is claimed in the database (``select_for_update``, only from ``queued``), a running
run proves it is alive by its heartbeat (``drive``), and the start gate marks it handed
(``handed_at``, committed) before the driver is asked to move it. A claim is the run's
``worker_task_id`` at the claim: the reconciler replaces it when it puts back in line a run whose
worker was lost before the gate, so a slow worker never starts, nor finishes, a run that is no
longer its own.

A worker executes a batch of runs at once (one message names several runs of one connection; a
single run is a batch of one): they are claimed in one transaction, checked with one call to the
driver, moved by one ``Driver.migrate_many`` call, and each is finished as its move ends, so a
batch costs about the database and SOAP round trips of one move. Each run keeps its own claim,
cancel, budget, events and audit entries: batching changes what a step costs, not what it means.
"""

from __future__ import annotations

import logging
import traceback

from django.db import transaction
from django.utils import timezone

from drivers import base as drv
from migrations_app import notifications, windows
from migrations_app.bulk import update_objects
from migrations_app.choices import (
    AuditAction,
    NotificationCategory,
    Phase,
    RequestStatus,
)
from migrations_app.models import HypervisorConnection, MigrationRequest, MigrationRun
from migrations_app.services.audit import audit_append, audit_entry
from migrations_app.services.errors import ActionRefused
from migrations_app.services.requests import expire_locked, notify_requests_changed, set_status
from migrations_app.services.runs.drive import _drive
from migrations_app.services.runs.events import NewEvent, append_run_events
from migrations_app.services.runs.finish import _Outcome, migration_runs_finish
from migrations_app.services.runs.queueing import admission_decision

log = logging.getLogger(__name__)
S = RequestStatus


def _wait(waiting: list[tuple[MigrationRun, str]]) -> None:
    """Leave queued runs in line, each with its reason (an event when the reason changed); their
    messages are consumed, so dispatch_admissible sends new ones when they may start
    (dispatched_at cleared). One UPDATE and one INSERT for all."""
    if not waiting:
        return
    changed = []
    for run, why in waiting:
        run.dispatched_at = None
        if why != run.wait_reason:
            run.wait_reason = why
            changed.append(NewEvent(run, S.QUEUED, f"waiting: {why}"))
    update_objects([run for run, _ in waiting], ["wait_reason", "dispatched_at"])
    append_run_events(changed)


def _claim(run_id: int, worker: str) -> MigrationRun | None:
    """Take ownership of a queued run; None when it is not queued (cancelled, already claimed) or
    when admission control makes it wait (its reason and place in line are recorded on the run)."""
    claimed = _claim_many([run_id], worker)
    return claimed[0] if claimed else None


def _claim_many(run_ids: list[int], worker: str) -> list[MigrationRun]:
    """Take ownership of the queued runs among ``run_ids`` that may start now, in one transaction.
    A run that is not queued (cancelled, already claimed) is left alone; one outside its window
    expires or waits; one admission control holds back waits with its reason and place in line."""
    with transaction.atomic():
        connection_of = dict(MigrationRun.objects.filter(pk__in=run_ids).values_list("pk", "request__vm__connection_id"))
        for run_id in sorted(set(run_ids) - set(connection_of)):
            log.warning("run %s does not exist; dropping the message", run_id)
        if not connection_of:
            return []
        # One claim per connection at a time: admission sees every run that has started.
        connections = list(HypervisorConnection.objects.select_for_update()
                           .filter(pk__in=set(connection_of.values())).order_by("pk"))
        # Lock order everywhere: the requests, then their runs (cancel and finish take them so too).
        requests = {r.pk: r for r in MigrationRequest.objects.select_for_update(of=("self",))
                    .select_related("vm", "requester", "target_host", "target_datastore")
                    .filter(run__pk__in=connection_of).order_by("pk")}
        runs = list(MigrationRun.objects.select_for_update(of=("self",)).filter(pk__in=connection_of).order_by("pk"))
        now = timezone.now()
        candidates, waiting = [], []
        for run in runs:
            request = run.request = requests[run.request_id]
            if request.status != S.QUEUED:
                log.info("run %s is %s, not queued; not starting it", run.pk, request.status)
            elif closed := windows.window_closed(request, now):
                # A run never starts outside its change window: past its end it expires,
                expire_locked(request, reason=closed, now=now, run=run)
            elif not_yet := windows.window_not_open_yet(request, now):
                waiting.append((run, not_yet))  # before its start it waits
            else:
                candidates.append(run)
        claimed = []
        for connection in connections:
            mine = [run for run in candidates if connection_of[run.pk] == connection.pk]
            if not mine:
                continue
            decision, _ = admission_decision(connection, up_to=mine[-1].pk)
            for run in mine:
                if run.request_id in decision.waiting:
                    why = f"{decision.waiting[run.request_id]} (place {decision.place[run.request_id]} in line)"
                    waiting.append((run, why))
                else:
                    claimed.append(run)
        _wait(waiting)
        if claimed:
            _start(claimed, worker, now)
    return claimed


def _start(runs: list[MigrationRun], worker: str, now) -> None:
    """Mark claimed runs running: their requests, rows, first events, audit entries, pushes, mails."""
    requests = [run.request for run in runs]
    for run in runs:
        set_status(run.request, S.RUNNING)
        run.request.updated_at = now
        run.wait_reason, run.worker, run.started_at, run.heartbeat_at, run.phase = "", worker, now, now, Phase.PRECHECK
    update_objects(requests, ["status", "updated_at"])
    update_objects(runs, ["worker", "started_at", "heartbeat_at", "phase", "wait_reason"])
    append_run_events([NewEvent(run, S.RUNNING, f"started by {worker}") for run in runs])
    # The audit append last: it holds the chain's lock (every audited action waits on it) until commit.
    audit_append([audit_entry(actor=None, action=AuditAction.RUN_STARTED, request=run.request,
                              object_type="migration_run", object_id=str(run.pk),
                              before=run.request.source_placement, data={"worker": worker}) for run in runs])
    notify_requests_changed(requests)
    notifications.notify_many([notifications.Notice(run.request, NotificationCategory.RUN_STARTED, f"run-{run.pk}")
                               for run in runs])


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
    migration_runs_execute(run_ids=[run_id], worker=worker)


def migration_runs_execute(*, run_ids: list[int], worker: str) -> None:
    """``migration_run_execute`` for a batch of runs: claim those that may start, check them again,
    move them together through their connection's driver, and finish each with its own outcome as
    its move ends. Runs of several connections (``dispatch_many`` never mixes them) are taken one
    connection at a time, each claimed just before it is moved."""
    groups: dict[int, list[int]] = {}
    for run_id, connection_id in MigrationRun.objects.filter(pk__in=list(run_ids)).values_list(
            "pk", "request__vm__connection_id").order_by("pk"):
        groups.setdefault(connection_id, []).append(run_id)
    for run_id in sorted(set(run_ids) - {pk for ids in groups.values() for pk in ids}):
        log.warning("run %s does not exist; dropping the message", run_id)
    for ids in groups.values():
        claimed = _claim_many(ids, worker)
        if claimed:
            # The claims as they were taken (the reload below reads whatever the rows hold now).
            claims = {run.pk: run.worker_task_id for run in claimed}
            _execute(list(MigrationRun.objects.select_related(
                "request__vm__connection", "request__vm__host__cluster", "request__target_host__cluster",
                "request__target_datastore", "request__requester",
            ).prefetch_related("request__vm__disks").filter(pk__in=list(claims)).order_by("pk")), claims=claims)


def _execute(runs: list[MigrationRun], *, claims: dict[int, str]) -> None:
    """Check, start and drive claimed runs of one connection; a run that cannot start is finished
    at once, and each moving run when its move ends. A run settled meanwhile, or put back in line
    (``claims``: run id -> its worker_task_id at the claim), is left alone."""
    from migrations_app.services.inventory import driver_for

    outcomes = {run.pk: _Outcome() for run in runs}
    try:
        driver = driver_for(runs[0].request.vm.connection)
    except drv.DriverError as exc:
        for outcome in outcomes.values():
            outcome.error = exc
        migration_runs_finish([(run, outcomes[run.pk]) for run in runs], claims=claims)
        return
    except (ValueError, LookupError) as exc:  # broken configuration: our side
        for outcome in outcomes.values():
            outcome.error, outcome.traceback = exc, traceback.format_exc()
        migration_runs_finish([(run, outcomes[run.pk]) for run in runs], claims=claims)
        return
    specs: dict[int, drv.MigrationSpec] = {}
    for run in runs:
        try:
            specs[run.pk] = _spec(run)
        except (ValueError, LookupError) as exc:  # this run's data is broken: our side
            outcomes[run.pk].error, outcomes[run.pk].traceback = exc, traceback.format_exc()
    checked = [run for run in runs if run.pk in specs]
    problems = _preflight_at_start(checked, driver, specs)
    ready = []
    for run in checked:
        problem, outcome = problems[run.pk], outcomes[run.pk]
        if isinstance(problem, drv.DriverError):
            outcome.error = problem
        elif isinstance(problem, Exception):  # the portal's bug, for this run alone
            outcome.error, outcome.traceback = problem, "".join(traceback.format_exception(problem))
        elif problem:
            # Stopped before the driver's migrate is called; the explanation reaches the page and the audit log.
            outcome.error = drv.MigrationFailed(f"Pre-flight at start failed, the world changed: {problem}. "
                                                "Nothing was moved.")
        else:
            ready.append(run)
    to_drive, refused = _start_gate(ready, claims)
    for run in ready:
        if run.pk not in refused:
            continue
        status = refused[run.pk]
        if status == S.CANCELLING:
            outcomes[run.pk].error = drv.MigrationCancelled("Cancelled before the move started; nothing was moved.")
        elif status == NOT_MINE:
            log.warning("run %s was put back in line while its worker prepared it; not starting it", run.pk)
            outcomes.pop(run.pk)
        else:
            log.warning("run %s was settled (%s) while its worker prepared it; not starting it", run.pk, status)
            outcomes.pop(run.pk)
    driving = {run.pk for run in to_drive}
    migration_runs_finish([(run, outcomes[run.pk]) for run in runs if run.pk in outcomes and run.pk not in driving],
                          claims=claims)
    if to_drive:
        _drive(to_drive, driver, specs, outcomes)


# What the start gate says of a run that is no longer this worker's claim (put back in line).
NOT_MINE = "not this worker's claim"


def _start_gate(runs: list[MigrationRun], claims: dict[int, str]) -> tuple[list[MigrationRun], dict[int, str]]:
    """Last look before the hypervisor is asked to move anything, under the rows' locks (the
    requests, then their runs): a run still this worker's claim (its ``worker_task_id`` unchanged,
    so never put back in line since), still running and never handed is marked handed
    (``handed_at``) with its heartbeat renewed, and that commits before the caller calls the
    driver. Returns the runs to move, and why each other one is not: its request's status
    (``cancelling``: cancelled during pre-flight, this worker ends it; a final status: settled
    elsewhere) or ``NOT_MINE`` (the reconciler put it back in line; it may be another claim's now).

    ``handed_at`` is set only here, only from empty, and never cleared, and the reconciler puts
    back in line only runs whose ``handed_at`` it finds empty under the same locks: so each run is
    handed to a driver at most once, and never after it went back in line. With the heartbeat
    renewed here, the reconciler can only judge a handed run's worker lost if starting the task
    takes longer than STALE_AFTER_S, which the setting's rule (above the driver's request timeout)
    excludes."""
    if not runs:
        return [], {}
    now = timezone.now()
    with transaction.atomic():
        statuses = dict(MigrationRequest.objects.select_for_update(no_key=True).filter(
            pk__in=[run.request_id for run in runs]).order_by("pk").values_list("pk", "status"))
        rows = {pk: (task, handed_at) for pk, task, handed_at in MigrationRun.objects.select_for_update(no_key=True)
                .filter(pk__in=[run.pk for run in runs]).order_by("pk").values_list("pk", "worker_task_id", "handed_at")}
        handed, refused = [], {}
        for run in runs:
            task, handed_at = rows.get(run.pk, (None, None))
            status = statuses.get(run.request_id)
            if task is None or status is None:
                refused[run.pk] = "gone"
            elif task != claims.get(run.pk) or handed_at is not None:
                refused[run.pk] = NOT_MINE
            elif status != S.RUNNING:
                refused[run.pk] = status
            else:
                run.handed_at = run.heartbeat_at = now
                handed.append(run)
        if handed:
            MigrationRun.objects.filter(pk__in=[run.pk for run in handed]).update(handed_at=now, heartbeat_at=now)
    return handed, refused


def _preflight_at_start(runs: list[MigrationRun], driver: drv.Driver,
                        specs: dict[int, drv.MigrationSpec]) -> dict[int, str | Exception]:
    """The world may have changed since approval (a host entered maintenance, a datastore filled
    up): check again, with the portal's inventory and the endpoint's own checks, one call to the
    driver for the batch. Per run: '' when all pass, else what failed, or the exception that
    stopped its check (a DriverError, or the portal's bug)."""
    from migrations_app.services.preflight import check_move, host_mounts

    problems: dict[int, str | Exception] = {}
    asked = []
    mounts = host_mounts({run.request.target_host_id or run.request.vm.host_id for run in runs})
    for run in runs:
        request = run.request
        try:
            check_move(request.vm, request.kind, request.target_host, request.target_datastore, cold=request.cold,
                       mounts=mounts)
        except ActionRefused as exc:
            problems[run.pk] = exc.message
        except Exception as exc:  # noqa: BLE001 - this run alone
            problems[run.pk] = exc
        else:
            asked.append(run)
    # One call for the batch; a driver answers about as fast as for one move (vCenter checks the
    # moves side by side), so the claim's heartbeat covers it as it covers a single run's.
    try:
        cold = frozenset(i for i, run in enumerate(asked) if run.request.cold)  # judged as cold moves
        answers = driver.preflight_many([specs[run.pk] for run in asked], cold=cold) if asked else []
    except Exception as exc:  # noqa: BLE001 - the endpoint unreachable, say: every move asked fails with it
        answers = [exc] * len(asked)
    if len(answers) != len(asked):
        answers = [RuntimeError(f"the driver answered {len(answers)} pre-flights for {len(asked)} moves")] * len(asked)
    for run, answer in zip(asked, answers, strict=True):
        if isinstance(answer, Exception):
            problems[run.pk] = answer
        else:
            problems[run.pk] = "; ".join(c.message for c in answer if not c.ok)
    return problems
