"""Execution of a claimed run: claim it, check again, drive the driver, record progress and heartbeats.

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

from django.conf import settings
from django.db import DatabaseError, close_old_connections, transaction
from django.utils import timezone

from drivers import base as drv
from migrations_app import notifications, watchdog, windows
from migrations_app.choices import (
    TERMINAL,
    AuditAction,
    NotificationCategory,
    Phase,
    RequestStatus,
)
from migrations_app.models import MigrationRequest, MigrationRun
from migrations_app.services.audit import audit_record
from migrations_app.services.errors import ActionRefused
from migrations_app.services.requests import expire_locked, notify_request_changed, set_status
from migrations_app.services.runs.events import append_run_event
from migrations_app.services.runs.finish import _Outcome, migration_run_finish
from migrations_app.services.runs.queueing import admission_decision

log = logging.getLogger(__name__)
S = RequestStatus
GiB = 1024**3



_FINISHED = object()

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
