"""Following a running job: what libvirt's event thread shares with the caller, the event
callbacks, and the loops that turn ``jobStats()`` / ``blockJobInfo()`` samples into progress and
stop a job on cancel or past its deadline."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING

from drivers.base import MigrationCancelled, MigrationFailed, ProgressCallback
from drivers.libvirt import jobs, sdk
from drivers.libvirt.sdk import errors

if TYPE_CHECKING:
    from drivers.libvirt.planning import DiskMove, Plan

log = logging.getLogger(__name__)

ACTIVE_JOB_TYPES = (jobs.JOB_BOUNDED, jobs.JOB_UNBOUNDED)


class JobWatch:
    """What a running job shares between libvirt's event thread, the call thread and the caller.
    Every writer sets ``wake`` so the caller's wait ends early."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.returned = False  # the blocking call came back without an error
        self.finished = False  # the blocking call came back, one way or the other
        self.error: sdk.libvirt.libvirtError | None = None
        self.iteration = 0
        self.switching = False
        self.completed: dict = {}
        self.block_status: dict[str, int] = {}

    def note(self) -> None:
        self.wake.set()


# Event callbacks run in the event loop thread; they only record and wake the caller.
def on_iteration(_conn, _dom, iteration, watch: JobWatch) -> None:
    watch.iteration = int(iteration)
    watch.note()


def on_job_completed(_conn, _dom, params, watch: JobWatch) -> None:
    watch.completed = dict(params or {})
    watch.note()


def on_lifecycle(_conn, _dom, event, detail, watch: JobWatch) -> None:
    if event == sdk.libvirt.VIR_DOMAIN_EVENT_SUSPENDED and detail in (
        sdk.libvirt.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED,
        sdk.libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY,
    ):
        watch.switching = True  # the source paused: last pages are being sent
        watch.note()


def on_block_job(_conn, _dom, disk, _type, status, watch: JobWatch) -> None:
    watch.block_status[str(disk)] = int(status)
    watch.note()


class ProgressMixin:
    """Progress and stopping while a move runs. Uses the driver's settings below."""

    poll_interval: float
    post_copy: bool
    post_copy_after: int

    # A live migration (compute or both) -----------------------------------------------------------
    def _follow_migration(
        self,
        plan: Plan,
        watch: JobWatch,
        tracker: jobs.ProgressTracker,
        on_progress: ProgressCallback,
        cancel: threading.Event,
        deadline: float,
    ) -> str:
        """Report progress until the migration call returns; abort it on cancel or past the
        deadline. Returns why it was aborted ("cancel", "timeout") or ""."""
        dom = plan.vm.dom
        stop = ""
        postcopy_started = False
        last_sample = 0.0
        while True:
            watch.wake.wait(self.poll_interval)  # an event, the call's end, or the next sample
            watch.wake.clear()
            if watch.finished:
                return stop
            if stop:
                continue  # aborted: wait for the call to come back
            if cancel.is_set() or jobs.timed_out(time.monotonic(), deadline):
                stop = "cancel" if cancel.is_set() else "timeout"
                self._abort(dom)
                continue
            # Events wake the loop to notice the end, a cancel or a deadline at once; samples stay at
            # one per interval. A jobStats() sent right on the heels of a migration event was seen to
            # wait for libvirt's job lock until switchover (seconds without progress).
            if time.monotonic() - last_sample < self.poll_interval:
                continue
            last_sample = time.monotonic()
            try:
                stats = dom.jobStats(0)
            except sdk.libvirt.libvirtError:
                continue  # the job is ending; the call's outcome tells what happened
            if stats.get("type") not in ACTIVE_JOB_TYPES:
                continue
            on_progress(
                tracker.migration(
                    stats, time.monotonic(), copies_disks=bool(plan.copies), switching_over=watch.switching
                )
            )
            iteration = max(watch.iteration, int(stats.get("memory_iteration", 0)))
            if self.post_copy and not postcopy_started and jobs.postcopy_due(iteration, self.post_copy_after):
                with contextlib.suppress(sdk.libvirt.libvirtError):
                    dom.migrateStartPostCopy(0)
                    postcopy_started = True
                    log.info("migration of %s switched to post-copy after %s passes", plan.vm.name, iteration)

    @staticmethod
    def _abort(dom: sdk.libvirt.virDomain) -> bool:
        """Ask libvirt to abort the domain's job; False when it refused (the job may have just
        ended, or be past the point of no return, as a post-copy migration is)."""
        try:
            dom.abortJob()
        except sdk.libvirt.libvirtError as err:
            log.warning("abortJob failed (the job may have just ended): %s", err.get_error_message())
            return False
        return True

    # Block copies on one host ---------------------------------------------------------------------
    def _follow_block_copies(
        self,
        plan: Plan,
        running: list[DiskMove],
        watch: JobWatch,
        tracker: jobs.ProgressTracker,
        on_progress: ProgressCallback,
        cancel: threading.Event,
        deadline: float,
    ) -> str:
        """Report progress until every copy is ready to pivot; "cancel"/"timeout" when told to stop."""
        dom = plan.vm.dom
        complete: dict[str, bool] = {}
        while True:
            if cancel.is_set():
                return "cancel"
            if jobs.timed_out(time.monotonic(), deadline):
                return "timeout"
            infos = {}
            for move in running:
                with errors(f"cannot follow the copy of {plan.vm.name}'s {move.dev}", MigrationFailed):
                    infos[move.dev] = dom.blockJobInfo(move.dev, 0)
            for move in running:
                status = watch.block_status.get(move.dev, watch.block_status.get(move.source_path))
                # The job is gone: its BLOCK_JOB_2 event (which says why) may trail the poll by a moment.
                # (A copy that was READY and then vanished has status READY until that event.)
                settle = time.monotonic() + 1.0
                while (not infos[move.dev] and status in (None, sdk.libvirt.VIR_DOMAIN_BLOCK_JOB_READY)
                       and time.monotonic() < settle):
                    watch.wake.wait(0.05)
                    watch.wake.clear()
                    status = watch.block_status.get(move.dev, watch.block_status.get(move.source_path))
                if status == sdk.libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED:
                    # Aborted from outside this call: the portal's watchdog (cancel_task) or an admin.
                    raise MigrationCancelled(
                        f"the copy of {plan.vm.name}'s {move.dev} to {move.target_ds} was aborted on the host; "
                        "it stays where it was"
                    )
                if status == sdk.libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED or not infos[move.dev]:
                    raise MigrationFailed(
                        f"the copy of {plan.vm.name}'s {move.dev} to {move.target_ds} stopped; it stays where it was"
                    )
            on_progress(tracker.block_copy([(int(i["cur"]), int(i["end"])) for i in infos.values()], time.monotonic()))
            # Ready = the BLOCK_JOB_2 READY event; a copy seen complete on two samples in a row
            # counts too, in case the event was lost (a reconnect drops registrations).
            ready = [
                watch.block_status.get(m.dev, watch.block_status.get(m.source_path))
                == sdk.libvirt.VIR_DOMAIN_BLOCK_JOB_READY
                or (complete.get(m.dev, False) and 0 < int(infos[m.dev]["end"]) == int(infos[m.dev]["cur"]))
                for m in running
            ]
            if all(ready):
                return ""
            complete = {dev: 0 < int(i["end"]) == int(i["cur"]) for dev, i in infos.items()}
            watch.wake.wait(self.poll_interval)
            watch.wake.clear()

    # Event registration ---------------------------------------------------------------------------
    @staticmethod
    def _register(conn: sdk.libvirt.virConnect, dom: sdk.libvirt.virDomain, watch: JobWatch, events) -> list[int]:
        ids = []
        for event_id, callback in events:
            try:
                ids.append(conn.domainEventRegisterAny(dom, event_id, callback, watch))
            except sdk.libvirt.libvirtError as err:
                log.warning("no event %s: %s (progress falls back to sampling)", event_id, err.get_error_message())
        return ids

    @staticmethod
    def _deregister(conn: sdk.libvirt.virConnect, ids: list[int]) -> None:
        for callback_id in ids:
            with contextlib.suppress(sdk.libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
