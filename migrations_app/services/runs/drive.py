"""Driving claimed runs: the driver's batch in a helper thread, while this thread records each
run's progress as numbered events (and its phase changes in the audit log), renews the heartbeats,
stops a move whose run was cancelled or settled elsewhere or ran past its budget, and finishes each
run as soon as its move has ended. The worker's main thread is the only writer of a run's progress:
the driver hands its reports over through a queue."""

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
from migrations_app import watchdog
from migrations_app.bulk import update_rows
from migrations_app.choices import TERMINAL, AuditAction, RequestStatus
from migrations_app.models import MigrationRequest, MigrationRun
from migrations_app.services.audit import audit_append, audit_entry
from migrations_app.services.runs.events import NewEvent, append_run_events
from migrations_app.services.runs.finish import _Outcome, migration_runs_finish

log = logging.getLogger(__name__)
S = RequestStatus

_FINISHED = object()


class _Done:
    """A move of the batch has ended (``Driver.migrate_many``'s on_done), put on the updates queue."""

    __slots__ = ("index", "result")

    def __init__(self, index: int, result):
        self.index, self.result = index, result


def _drive(runs: list[MigrationRun], driver: drv.Driver, specs: dict[int, drv.MigrationSpec],
           outcomes: dict[int, _Outcome]) -> None:
    """Run the driver's batch in a helper thread; this thread records progress and heartbeats,
    stops a move whose run is cancelled or settled elsewhere, or overdue, and finishes each run as
    soon as its move has ended (a short move does not wait for the batch's longest)."""
    updates: queue.Queue = queue.Queue()
    cancels = [threading.Event() for _ in runs]
    overdue = [False] * len(runs)
    cold = frozenset(i for i, run in enumerate(runs) if run.request.cold)  # cold: a move plan's fallback
    results: list = []

    def target() -> None:
        try:
            answer = driver.migrate_many([specs[run.pk] for run in runs], on_progress=lambda i, u: updates.put((i, u)),
                                         cancels=cancels, cold=cold, on_done=lambda i, r: updates.put(_Done(i, r)))
            if len(answer) != len(runs):
                raise drv.MigrationFailed(f"the driver answered {len(answer)} moves for {len(runs)}")
            results.extend(answer)
        except BaseException as exc:  # noqa: BLE001 - every move of the batch ends with it
            results[:] = [exc] * len(runs)
        finally:
            updates.put(_FINISHED)

    thread = threading.Thread(target=target, name=f"migrate-runs-{runs[0].pk}", daemon=True)
    thread.start()
    began = time.monotonic()
    heartbeat_s = settings.PORTAL["HEARTBEAT_S"]
    recorders = [_ProgressRecorder(run) for run in runs]
    ended: dict[int, object] = {}  # index -> the driver's result, once the move has ended
    finished: set[int] = set()  # indexes whose run is finished
    next_beat = time.monotonic() + heartbeat_s
    while True:
        try:
            item = updates.get(timeout=max(0.0, next_beat - time.monotonic()))
        except queue.Empty:
            item = None
        # Take whatever else the driver has sent meanwhile, so that moves that end at once (a
        # burst of phase changes) are stored in one transaction rather than one per update.
        batch = [] if item is None else [item]
        while batch and batch[-1] is not _FINISHED:
            try:
                batch.append(updates.get_nowait())
            except queue.Empty:
                break
        over = bool(batch) and batch[-1] is _FINISHED
        due = False
        for entry in batch[:-1] if over else batch:
            if isinstance(entry, _Done):
                ended[entry.index] = entry.result
            else:
                index, update = entry
                due = recorders[index].offer(update) or due
        if over:
            break  # the rest is stored and finished after the join below
        try:
            if due:
                _flush(recorders)
            newly = sorted(set(ended) - finished)
            if newly:
                _finish_ended(runs, newly, ended, recorders, outcomes, overdue)
                finished.update(newly)
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + heartbeat_s
                _flush(recorders, force=True)
                # Every run whose move has not ended proves its worker alive, aborting ones included.
                moving = [i for i in range(len(runs)) if i not in ended]
                statuses = _heartbeat([runs[i] for i in moving])
                for i in moving:
                    recorders[i].status = statuses.get(runs[i].pk, recorders[i].status)
                    if recorders[i].status in (S.CANCELLING, *TERMINAL) and not cancels[i].is_set():
                        # Cancel asked, or the run was settled without us (judged lost): stop the move.
                        log.info("run %s is %s: aborting the hypervisor job", runs[i].pk, recorders[i].status)
                        cancels[i].set()
        except DatabaseError as exc:
            # Keep supervising the driver (cancel and timeout still work); record again next beat.
            log.warning("runs %s: database unavailable while recording progress: %s", [r.pk for r in runs], exc)
            close_old_connections()
        for i, run in enumerate(runs):
            if i not in ended and not cancels[i].is_set() and watchdog.worker_overdue(
                    elapsed_s=time.monotonic() - began, budget_s=run.timeout_s,
                    grace_s=settings.PORTAL["ABORT_GRACE_S"]):
                log.warning("run %s: the driver did not end the move within its budget; aborting it", run.pk)
                overdue[i] = True
                cancels[i].set()
    thread.join()
    for i, result in enumerate(results):
        ended.setdefault(i, result)
    rest = [i for i in range(len(runs)) if i not in finished]
    try:
        _finish_ended(runs, rest, ended, recorders, outcomes, overdue)
    except DatabaseError as exc:
        # The reconciler settles these runs from the hypervisor's record.
        log.warning("runs %s: outcome not recorded: %s", [runs[i].pk for i in rest], exc)
        close_old_connections()


def _finish_ended(runs: list[MigrationRun], indexes: list[int], ended: dict[int, object],
                  recorders: list[_ProgressRecorder], outcomes: dict[int, _Outcome], overdue: list[bool]) -> None:
    """Store the last progress of these ended moves and finish their runs with what the driver said."""
    if not indexes:
        return
    _flush([recorders[i] for i in indexes], force=True)
    for i in indexes:
        run, result = runs[i], ended[i]
        outcome = outcomes[run.pk]
        if isinstance(result, drv.MigrationResult):
            outcome.result = result
        elif isinstance(result, drv.DriverError):
            outcome.error = result
        else:  # any other error is the portal's bug: keep the traceback
            outcome.error = result if isinstance(result, BaseException) else RuntimeError(f"driver returned {result!r}")
            outcome.traceback = "".join(traceback.format_exception(outcome.error))
        if overdue[i] and isinstance(outcome.error, drv.MigrationCancelled):
            # The driver's words say where the VM is (a cold move: powered on again, or left off).
            outcome.error = drv.MigrationTimedOut(
                f"{watchdog.timed_out_text(run.timeout_s)}: the driver did not stop the move at its budget, "
                f"so the portal aborted it: {outcome.error.message}",
                hypervisor_message=outcome.error.hypervisor_message, code=outcome.error.code)
    migration_runs_finish([(runs[i], outcomes[runs[i].pk]) for i in indexes])


def _heartbeat(runs: list[MigrationRun]) -> dict[int, str]:
    """Prove the worker is alive for these runs; returns each request's status (``cancelling``
    when asked to stop), two queries for the batch (the rows locked in id order, as every
    writer of several runs does)."""
    if not runs:
        return {}
    now = timezone.now()
    update_rows(MigrationRun, [(run.pk, [now]) for run in runs], ["heartbeat_at"])
    by_request = dict(MigrationRequest.objects.filter(pk__in=[run.request_id for run in runs])
                      .values_list("pk", "status"))
    return {run.pk: by_request[run.request_id] for run in runs if run.request_id in by_request}


def _flush(recorders: list[_ProgressRecorder], *, force: bool = False) -> None:
    """Store what the recorders have due (and, with ``force``, their latest other update), in one
    transaction: the events, then the phase changes' audit entries."""
    new, audits = [], []
    for recorder in recorders:
        events, phases = recorder.take(force=force)
        new += events
        audits += phases
    if not new:
        return
    with transaction.atomic():
        # Lock order everywhere: the requests, then their runs. The events update the runs and the
        # audit entries refer to the requests (a key-share lock on each): without the requests
        # locked first, a cancel (request, then run) and this flush (run, then request) deadlock.
        list(MigrationRequest.objects.select_for_update(no_key=True).filter(
            pk__in={item.run.request_id for item in new}).order_by("pk").values_list("pk", flat=True))
        append_run_events(new)
        # The audit appends last: they hold the chain's lock (every audited action waits on it) until commit.
        audit_append(audits)
    stored = time.monotonic()
    for recorder in recorders:
        if recorder.taken:
            recorder.last_stored, recorder.taken = stored, False


class _ProgressRecorder:
    """Stores driver progress as numbered events: every phase change, else at most one per interval.

    ``offer`` only decides (no database); ``take`` hands over what is due (``_flush`` stores it
    for many runs at once), several updates when the driver sent them in a burst."""

    def __init__(self, run: MigrationRun):
        self.run = run
        self.interval = settings.PORTAL["PROGRESS_INTERVAL_S"]
        self.last_stored = 0.0
        self.taken = False
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

    def take(self, *, force: bool = False) -> tuple[list[NewEvent], list]:
        """The events to store for what is due (with ``force`` or past the interval, the latest
        other update too), and the audit entries of its phase changes."""
        updates = list(self.due)
        if self.pending is not None and (force or time.monotonic() - self.last_stored >= self.interval):
            updates.append(self.pending)
            self.pending = None
        self.due = []
        events, audits = [], []
        for update in updates:
            event, phase = self._event(update)
            events.append(event)
            if phase is not None:
                run = self.run
                audits.append(audit_entry(actor=None, action=AuditAction.RUN_PHASE, request=run.request,
                                          object_type="migration_run", object_id=str(run.pk),
                                          task_id=phase["task_id"],
                                          data={"phase": phase["phase"], "percent": phase["percent"]}))
        self.taken = self.taken or bool(events)
        return events, audits

    def _event(self, update: drv.ProgressUpdate) -> tuple[NewEvent, dict | None]:
        """One update as the run's next event; what to audit when it changed the phase."""
        run = self.run
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
        # The event copies the run's fields as they are now (a later update of the same run in
        # this batch changes the run object before the events are built).
        event = NewEvent(run, self.status, update.message, run_fields=fields, fields=dict(fields))
        if not phase_changed:
            return event, None
        return event, {"phase": run.phase, "percent": round(run.percent, 1), "task_id": run.task_id}
