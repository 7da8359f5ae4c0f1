"""The write side: one move from start to end. Compute and both are a live migration
(``migrateToURI3``), storage on one host is a block copy per disk and a pivot; the volumes a move
creates, and the ones it leaves behind, are handled here too."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from datetime import UTC, datetime

from drivers.base import (
    ConnectionFailed,
    DriverError,
    MigrationCancelled,
    MigrationFailed,
    MigrationResult,
    MigrationSpec,
    MigrationTimedOut,
    Phase,
    ProgressCallback,
    ProgressUpdate,
    TaskInfo,
    TaskState,
)
from drivers.libvirt import jobs, sdk
from drivers.libvirt import xml as lxml
from drivers.libvirt.planning import DiskMove, Plan
from drivers.libvirt.progress import (
    ACTIVE_JOB_TYPES,
    JobWatch,
    on_block_job,
    on_iteration,
    on_job_completed,
    on_lifecycle,
)
from drivers.libvirt.sdk import error_code, errors, translate

log = logging.getLogger(__name__)


class MovesMixin:
    """Running a move. Uses the driver's settings below, ``conn()``, planning and progress."""

    per_gib_s: float
    auto_converge: bool
    post_copy: bool

    # -- write side --------------------------------------------------------------------------
    def migrate(
        self, spec: MigrationSpec, *, on_progress: ProgressCallback, cancel: threading.Event
    ) -> MigrationResult:
        plan = self._plan(spec)
        started = time.monotonic()
        task_id = "/".join(
            (
                plan.source.name,
                plan.vm.uuid,
                datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ"),
                spec.target_host_ref or "-",
                spec.target_datastore_ref or "-",
            )
        )
        budget = jobs.completion_budget_s(plan.memory_bytes if plan.moves_host else 0, plan.copy_bytes, self.per_gib_s)
        deadline = started + jobs.effective_timeout_s(spec.timeout_s, budget)
        tracker = jobs.ProgressTracker(task_id, plan.memory_bytes if plan.moves_host else 0, plan.copy_bytes)
        on_progress(ProgressUpdate(Phase.PRECHECK, 0.0, task_id=task_id, message=f"moving {plan.vm.name}"))
        if plan.moves_host:
            downtime = self._live_migrate(plan, tracker, on_progress, cancel, deadline)
        else:
            downtime = self._block_copy(plan, tracker, on_progress, cancel, deadline)
        self._delete_sources(plan)
        placement = self.placement(spec.vm_ref)
        on_progress(tracker.done(plan.copy_bytes + (plan.memory_bytes if plan.moves_host else 0)))
        where = f"{placement.host_ref}, {', '.join(placement.datastore_refs)}"
        return MigrationResult(
            placement=placement,
            task_id=task_id,
            downtime_ms=downtime,
            duration_s=time.monotonic() - started,
            message=f"{plan.vm.name} moved to {where}",
        )

    # A live migration (compute or both) ------------------------------------------------------
    def _live_migrate(
        self,
        plan: Plan,
        tracker: jobs.ProgressTracker,
        on_progress: ProgressCallback,
        cancel: threading.Event,
        deadline: float,
    ) -> float | None:
        spec, vm = plan.spec, plan.vm
        target = self.conn(plan.target.name)
        copies = plan.copies
        names = jobs.migration_flag_names(
            copies_disks=bool(copies),
            shared_disks=len(copies) < len(plan.disks),
            auto_converge=self.auto_converge,
            post_copy=self.post_copy,
        )
        flags = 0
        for flag in names:
            flags |= getattr(sdk.libvirt, f"VIR_MIGRATE_{flag}")
        params: dict[str, object] = {}
        if (mib := jobs.bandwidth_mib_s(spec.bandwidth_bytes_per_s)) is not None:
            params[sdk.libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = mib
        if copies:
            params[sdk.libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = [d.dev for d in copies]
            new_paths = {d.dev: d.target_path for d in copies if d.target_path != d.source_path}
            if new_paths:
                with errors(f"cannot read the definition of {vm.name}", MigrationFailed):
                    live = vm.dom.XMLDesc(sdk.libvirt.VIR_DOMAIN_XML_MIGRATABLE)
                    persistent = vm.dom.XMLDesc(
                        sdk.libvirt.VIR_DOMAIN_XML_MIGRATABLE | sdk.libvirt.VIR_DOMAIN_XML_INACTIVE
                    )
                params[sdk.libvirt.VIR_MIGRATE_PARAM_DEST_XML] = lxml.with_disk_paths(live, new_paths)
                params[sdk.libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = lxml.with_disk_paths(persistent, new_paths)
        if spec.max_downtime_ms:
            with errors(f"cannot set the maximum downtime of {vm.name}", MigrationFailed):
                vm.dom.migrateSetMaxDowntime(int(spec.max_downtime_ms), 0)

        created = self._create_target_volumes(plan, target)
        watch = JobWatch()
        callbacks = self._register(
            vm.conn,
            vm.dom,
            watch,
            (
                (sdk.libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, on_iteration),
                (sdk.libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, on_job_completed),
                (sdk.libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle),
            ),
        )
        call = threading.Thread(
            target=self._migration_call,
            args=(vm.dom, plan.target.migration_uri, params, flags, watch),
            name=f"libvirt-migrate-{vm.name}",
            daemon=True,
        )
        stop = ""
        try:
            call.start()
            stop = self._follow_migration(plan, watch, tracker, on_progress, cancel, deadline)
        except BaseException:
            # Our own caller broke (e.g. on_progress raised): never leave a job running unattended.
            self._abort(vm.dom)
            call.join()
            if not watch.returned:
                self._delete_volumes(target, created)
            raise
        finally:
            call.join()
            self._deregister(vm.conn, callbacks)
        if not watch.returned:
            self._delete_volumes(target, created)
            raise self._job_error(plan, watch.error, stop)
        if stop:
            log.info("migration of %s finished before the %s took effect", vm.name, stop)
        on_progress(tracker.switchover())
        return self._downtime(plan, target, watch)

    @staticmethod
    def _migration_call(dom: sdk.libvirt.virDomain, uri: str, params: dict, flags: int, watch: JobWatch) -> None:
        """Runs in a helper thread: the blocking peer-to-peer migration call."""
        try:
            dom.migrateToURI3(uri, params, flags)
            watch.returned = True
        except sdk.libvirt.libvirtError as err:
            watch.error = err
        finally:
            watch.finished = True
            watch.note()

    def _job_error(self, plan: Plan, err: sdk.libvirt.libvirtError | None, stop: str) -> DriverError:
        where = f"{plan.vm.name} stays on {plan.source.name}"
        if stop == "cancel":
            return MigrationCancelled(
                f"migration of {plan.vm.name} cancelled; {where}",
                hypervisor_message=err.get_error_message() if err else "",
            )
        if stop == "timeout":
            return MigrationTimedOut(
                f"migration of {plan.vm.name} did not finish in time and was aborted; {where}",
                hypervisor_message=err.get_error_message() if err else "",
            )
        if err is None:
            return MigrationFailed(f"migration of {plan.vm.name} ended without a result; {where}")
        return translate(err, f"migration of {plan.vm.name} to {plan.target.name} failed; {where}", MigrationFailed)

    def _downtime(self, plan: Plan, target: sdk.libvirt.virConnect, watch: JobWatch) -> float | None:
        """The measured downtime: from the destination's record of the finished job, else from
        the JOB_COMPLETED event (which may trail the call's return)."""
        with contextlib.suppress(sdk.libvirt.libvirtError):
            stats = target.lookupByUUIDString(plan.vm.uuid).jobStats(sdk.libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            if "downtime" in stats:
                return float(stats["downtime"])
        if "downtime" not in watch.completed:
            watch.wake.clear()
            watch.wake.wait(1.0)
        return float(watch.completed["downtime"]) if "downtime" in watch.completed else None

    # A storage migration on one host ---------------------------------------------------------
    def _block_copy(
        self,
        plan: Plan,
        tracker: jobs.ProgressTracker,
        on_progress: ProgressCallback,
        cancel: threading.Event,
        deadline: float,
    ) -> float | None:
        vm, spec = plan.vm, plan.spec
        created = self._create_target_volumes(plan, vm.conn)
        params = (
            {sdk.libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: int(spec.bandwidth_bytes_per_s)}
            if spec.bandwidth_bytes_per_s
            else {}
        )
        flags = sdk.libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | sdk.libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        watch = JobWatch()
        callbacks = self._register(
            vm.conn, vm.dom, watch, ((sdk.libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, on_block_job),)
        )
        running: list[DiskMove] = []
        try:
            for move in plan.copies:
                with errors(f"cannot start copying {vm.name}'s {move.dev} to {move.target_ds}", MigrationFailed):
                    vm.dom.blockCopy(
                        move.dev, lxml.block_copy_destination_xml(move.target_path, move.fmt), params, flags
                    )
                running.append(move)
            stop = self._follow_block_copies(plan, running, watch, tracker, on_progress, cancel, deadline)
            if stop:
                self._cancel_block_copies(vm.dom, running)
                running = []
                raise self._job_error(plan, None, stop)
            on_progress(tracker.switchover("pivoting to the new volumes"))
            started = time.monotonic()
            for move in list(running):
                with errors(f"cannot switch {vm.name}'s {move.dev} to {move.target_ds}", MigrationFailed):
                    vm.dom.blockJobAbort(move.dev, sdk.libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                running.remove(move)
                created.remove(move.target_path)  # in use now: never clean this one up
            return round(1000.0 * (time.monotonic() - started), 1)  # the pivot is the only I/O pause
        except BaseException:
            self._cancel_block_copies(vm.dom, running)
            self._delete_volumes(vm.conn, created)
            raise
        finally:
            self._deregister(vm.conn, callbacks)

    @staticmethod
    def _cancel_block_copies(dom: sdk.libvirt.virDomain, running: list[DiskMove]) -> None:
        for move in running:
            try:
                dom.blockJobAbort(move.dev, 0)  # no PIVOT: the guest keeps its old disk
            except sdk.libvirt.libvirtError as err:
                log.warning("blockJobAbort(%s) failed: %s", move.dev, err.get_error_message())
        running.clear()

    # A move another process started (its worker was lost) -------------------------------------
    abort_wait_s = 30.0  # how long cancel_task waits for an aborted job to end

    def cancel_task(self, task_id: str) -> TaskInfo:
        """Abort a move by its task id, from any process (crash recovery: its worker is lost): the
        migration job on the task's source host (``abortJob``), else the block copies of the VM's
        disks without a pivot (the guest keeps its old disks). Waits up to ``abort_wait_s`` for the
        job to end and returns the task's state then: CANCELLED when this call stopped it and the
        VM is not where the task was moving it; a task that had already ended keeps its state."""
        parts = task_id.split("/", 4)
        if len(parts) != 5 or parts[0] not in self.hosts:
            return TaskInfo(task_id, TaskState.UNKNOWN, "not a libvirt task id")
        source, uuid = parts[0], parts[1]
        try:
            dom = self.conn(source).lookupByUUIDString(uuid)
        except sdk.libvirt.libvirtError as err:
            if error_code(err) != jobs.ERR_NO_DOMAIN:
                raise translate(err, f"cannot look up the VM of task {task_id} on {source}", ConnectionFailed) from err
            return self.task_info(task_id)  # no longer on its source: the move ended (see task_info)
        # The job's end wakes the wait (JOB_COMPLETED for a migration, BLOCK_JOB_2 for a copy);
        # registered before the abort, so an end that comes at once is not missed.
        conn, watch = self.conn(source), JobWatch()
        callbacks = self._register(conn, dom, watch, (
            (sdk.libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, on_job_completed),
            (sdk.libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, on_block_job),
        ))
        try:
            aborted = self._abort_jobs(dom)
            deadline = time.monotonic() + self.abort_wait_s
            info = self.task_info(task_id)
            while info.state == TaskState.RUNNING and time.monotonic() < deadline:
                watch.wake.wait(self.poll_interval)  # the event, or a look again (an event may be lost)
                watch.wake.clear()
                info = self.task_info(task_id)
        finally:
            self._deregister(conn, callbacks)
        if aborted and info.state == TaskState.FAILED:
            return TaskInfo(task_id, TaskState.CANCELLED, f"aborted; {info.message}")
        return info

    def _abort_jobs(self, dom: sdk.libvirt.virDomain) -> bool:
        """Abort what runs on the domain: its migration job, or else its disks' block copies.
        True when something was asked to stop."""
        with errors("cannot read the jobs of the VM", ConnectionFailed):
            if not dom.isActive():
                return False
            if dom.jobStats(0).get("type") in ACTIVE_JOB_TYPES:
                return self._abort(dom)  # refused: the task's own end tells what became of it
            copying = [d.dev for d in lxml.parse_domain(dom.XMLDesc(0)).disks if dom.blockJobInfo(d.dev, 0)]
        aborted = False
        for dev in copying:
            try:
                dom.blockJobAbort(dev, 0)  # no PIVOT: the guest keeps its old disk
                aborted = True
            except sdk.libvirt.libvirtError as err:
                log.warning("blockJobAbort(%s) failed (the copy may have just ended): %s", dev, err.get_error_message())
        return aborted

    # Volumes ------------------------------------------------------------------------------------
    def _create_target_volumes(self, plan: Plan, conn: sdk.libvirt.virConnect) -> list[str]:
        """Create the destination volume of every copied disk whose path changes (libvirt itself
        creates a missing one only at the same path). Returns every target path this move may
        leave behind on failure, created here or by libvirt, for clean-up."""
        created = [move.target_path for move in plan.copies]  # _check_room saw none of them exist
        try:
            for move in plan.copies:
                if move.target_path == move.source_path:
                    continue
                with errors(f"cannot create {move.target_path} on {plan.target.name}", MigrationFailed):
                    pool = conn.storagePoolLookupByName(move.target_pool)
                    pool.createXML(lxml.volume_xml(os.path.basename(move.target_path), move.capacity, move.fmt), 0)
        except DriverError:
            self._delete_volumes(conn, created)
            raise
        return created

    @staticmethod
    def _delete_volumes(conn: sdk.libvirt.virConnect, paths: list[str]) -> None:
        for path in paths:
            try:
                conn.storageVolLookupByPath(path).delete(0)
            except sdk.libvirt.libvirtError as err:
                if error_code(err) != jobs.ERR_NO_STORAGE_VOL:
                    log.warning("could not remove %s after a failed move: %s", path, err.get_error_message())

    def _delete_sources(self, plan: Plan) -> None:
        """After a successful move the copied-from images are unused: remove them (a failure here
        is logged, not raised: the VM did move)."""
        try:
            conn = self.conn(plan.source.name)
        except ConnectionFailed as err:
            log.warning("source images of %s left on %s: %s", plan.vm.name, plan.source.name, err.explanation())
            return
        for move in plan.copies:
            try:
                conn.storageVolLookupByPath(move.source_path).delete(0)
            except sdk.libvirt.libvirtError as err:
                log.warning("could not remove the old image %s: %s", move.source_path, err.get_error_message())
