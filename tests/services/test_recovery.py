"""Crash recovery: runs whose worker went silent are settled with what the hypervisor says."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from drivers.base import MigrationCancelled, MigrationSpec, TaskState
from migrations_app.choices import AuditAction, RequestStatus
from migrations_app.models import AuditEntry, MigrationRequest, MigrationRun, VirtualMachine
from migrations_app.services import requests as svc
from migrations_app.services.inventory import driver_for
from migrations_app.services.recovery import migration_run_reconcile_stale
from migrations_app.services.runs import _claim
from tests.conftest import running_vm
from tests.services.test_runs import approved_run

S = RequestStatus
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("review_everything")]


def stale(run):
    MigrationRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=10))


def test_a_move_the_hypervisor_completed_after_the_worker_died_is_recorded_as_succeeded(datacenter, users):
    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    _claim(run.pk, "lost-worker")
    # The hypervisor finished the move, but the worker died before recording it.
    result = driver_for(datacenter).migrate(MigrationSpec(vm.ref, target_host_ref=run.request.target_host.ref),
                                            on_progress=lambda u: None, cancel=threading.Event())
    MigrationRun.objects.filter(pk=run.pk).update(task_id=result.task_id)
    stale(run)
    assert migration_run_reconcile_stale(stale_after_s=60)["succeeded"] == 1
    request = MigrationRequest.objects.get(pk=run.request_id)
    vm.refresh_from_db()
    assert request.status == S.SUCCEEDED and vm.host == request.target_host
    assert AuditEntry.objects.filter(request=request, action=AuditAction.RUN_RECONCILED).exists()


def test_a_run_whose_worker_died_before_the_hypervisor_moved_anything_is_failed_not_retried(datacenter, users):
    vm = running_vm(datacenter)
    source = vm.host
    run = approved_run(users["alice"], users["erin"], vm)
    _claim(run.pk, "lost-worker")
    stale(run)
    assert migration_run_reconcile_stale(stale_after_s=60)["failed"] == 1
    request = MigrationRequest.objects.get(pk=run.request_id)
    run.refresh_from_db()
    vm.refresh_from_db()
    assert request.status == S.FAILED and vm.host == source
    assert "worker was lost" in run.explanation
    assert AuditEntry.objects.filter(request=request, action=AuditAction.RUN_STARTED).count() == 1


def test_fresh_heartbeats_are_left_alone(datacenter, users):
    run = approved_run(users["alice"], users["erin"], running_vm(datacenter))
    _claim(run.pk, "busy-worker")
    assert not any(migration_run_reconcile_stale(stale_after_s=60).values())
    assert MigrationRequest.objects.get(pk=run.request_id).status == S.RUNNING


def claimed(users, vm) -> MigrationRun:
    run = approved_run(users["alice"], users["erin"], vm)
    _claim(run.pk, "lost-worker")
    return MigrationRun.objects.select_related("request").get(pk=run.pk)


def test_a_move_started_before_the_worker_stored_its_task_id_is_found_by_vm_and_never_reissued(datacenter, users):
    vm = running_vm(datacenter)
    run = claimed(users, vm)
    driver = driver_for(datacenter)
    # The worker started the move and died before the task id reached the database.
    result = driver.migrate(MigrationSpec(vm.ref, target_host_ref=run.request.target_host.ref),
                            on_progress=lambda u: None, cancel=threading.Event())
    stale(run)
    assert migration_run_reconcile_stale(stale_after_s=60)["succeeded"] == 1
    run.refresh_from_db()
    assert run.task_id == result.task_id and run.request.__class__.objects.get(pk=run.request_id).status == S.SUCCEEDED
    # The hypervisor's own record: one start for this VM, the one the worker made.
    assert [t.task_id for t in driver.migration_tasks(vm.ref, since=0)] == [result.task_id]
    done = AuditEntry.objects.get(request_id=run.request_id, action=AuditAction.RUN_SUCCEEDED)
    assert done.task_id == result.task_id
    reconciled = AuditEntry.objects.get(request_id=run.request_id, action=AuditAction.RUN_RECONCILED)
    assert f"task {result.task_id} found on the VM" in reconciled.reason


def hung_worker_move(driver, vm, target_ref):
    """A move whose worker process is alive but silent (hung): the driver keeps it running."""
    events = []
    cancel = threading.Event()
    outcome = {}

    def move():
        try:
            outcome["result"] = driver.migrate(MigrationSpec(vm.ref, target_host_ref=target_ref),
                                               on_progress=events.append, cancel=cancel)
        except Exception as exc:  # noqa: BLE001 - the test reads what the driver raised
            outcome["error"] = exc

    thread = threading.Thread(target=move, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not any(e.task_id for e in events):
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.01)
    task_id = next(e.task_id for e in events if e.task_id)
    return thread, cancel, task_id, outcome


def never_converging_vm(conn):
    return VirtualMachine.objects.get(connection=conn, tags__icontains="sim:never-converge")


def test_an_adopted_move_within_its_budget_is_followed_and_past_it_aborted_and_failed_with_the_reason(
        datacenter, users):
    vm = never_converging_vm(datacenter)
    source = vm.host
    run = claimed(users, vm)
    driver = driver_for(datacenter)
    thread, cancel, task_id, outcome = hung_worker_move(driver, vm, run.request.target_host.ref)
    try:
        MigrationRun.objects.filter(pk=run.pk).update(task_id=task_id)
        stale(run)
        # Within its budget: adopted, heartbeat renewed, the hypervisor task left alone.
        assert migration_run_reconcile_stale(stale_after_s=60)["adopted"] == 1
        assert driver.task_info(task_id).state == TaskState.RUNNING
        # Past its budget (time injected, not waited for): aborted on the hypervisor, then failed.
        run.refresh_from_db()
        later = run.started_at + timedelta(seconds=run.timeout_s + 1)
        counts = migration_run_reconcile_stale(stale_after_s=0.001, now=later)
        assert counts["failed"] == 1, counts
    finally:
        cancel.set()
        thread.join(10)
    assert driver.task_info(task_id).state == TaskState.CANCELLED
    assert isinstance(outcome.get("error"), MigrationCancelled)
    run.refresh_from_db()
    request = MigrationRequest.objects.get(pk=run.request_id)
    assert request.status == S.FAILED
    assert f"timed out after {run.timeout_s:.0f} s" in run.explanation and "stays on its source" in run.explanation
    assert driver.placement(vm.ref).host_ref == source.ref
    actions = list(AuditEntry.objects.filter(request=request).order_by("pk").values_list("action", flat=True))
    assert actions.index(AuditAction.RUN_WATCHDOG_ABORT) < actions.index(AuditAction.RUN_FAILED)
    assert actions.count(AuditAction.RUN_STARTED) == 1 and actions.count(AuditAction.RUN_FAILED) == 1


def test_a_run_stuck_in_cancelling_without_its_worker_is_aborted_and_cancelled(datacenter, users):
    vm = never_converging_vm(datacenter)
    run = claimed(users, vm)
    driver = driver_for(datacenter)
    thread, cancel, task_id, _ = hung_worker_move(driver, vm, run.request.target_host.ref)
    try:
        MigrationRun.objects.filter(pk=run.pk).update(task_id=task_id)
        svc.migration_request_cancel(request=run.request, actor=users["alice"], reason="changed my mind")
        assert MigrationRequest.objects.get(pk=run.request_id).status == S.CANCELLING
        stale(run)
        assert migration_run_reconcile_stale(stale_after_s=60)["cancelled"] == 1
    finally:
        cancel.set()
        thread.join(10)
    run.refresh_from_db()
    assert MigrationRequest.objects.get(pk=run.request_id).status == S.CANCELLED
    assert driver.task_info(task_id).state == TaskState.CANCELLED
    assert "cancel asked" in run.explanation


def test_a_worker_judged_lost_during_preflight_never_starts_the_move(datacenter, users, monkeypatch):
    from migrations_app.services import runs

    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    driver = driver_for(datacenter)
    real_preflight = type(driver).preflight

    def slow_preflight(self, spec):
        # While this worker is still checking, the reconciler judges it lost and settles the run.
        stale(run)
        assert migration_run_reconcile_stale(stale_after_s=60)["failed"] == 1
        return real_preflight(self, spec)

    monkeypatch.setattr(type(driver), "preflight", slow_preflight)
    runs.migration_run_execute(run_id=run.pk, worker="slow-worker")
    assert driver.migration_tasks(vm.ref, since=0) == ()  # the hypervisor was never asked
    request = MigrationRequest.objects.get(pk=run.request_id)
    assert request.status == S.FAILED
    assert AuditEntry.objects.filter(request=request, action=AuditAction.RUN_FAILED).count() == 1


def test_a_cancel_during_preflight_ends_the_run_before_the_hypervisor_is_asked(datacenter, users, monkeypatch):
    from migrations_app.services import runs

    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    driver = driver_for(datacenter)
    real_preflight = type(driver).preflight

    def preflight_then_cancel(self, spec):
        svc.migration_request_cancel(request=MigrationRequest.objects.get(pk=run.request_id), actor=users["alice"],
                                     reason="not now")
        return real_preflight(self, spec)

    monkeypatch.setattr(type(driver), "preflight", preflight_then_cancel)
    runs.migration_run_execute(run_id=run.pk, worker="w1")
    assert driver.migration_tasks(vm.ref, since=0) == ()
    run.refresh_from_db()
    assert MigrationRequest.objects.get(pk=run.request_id).status == S.CANCELLED
    assert "before the move started" in run.explanation


def test_a_driver_that_ignores_its_budget_is_aborted_by_its_worker_and_the_run_fails_timed_out(
        datacenter, users, settings, monkeypatch):
    from dataclasses import replace

    from migrations_app.services import runs

    settings.PORTAL = {**settings.PORTAL, "TIMEOUT_MIN_S": 1.0, "TIMEOUT_S_PER_GIB": 0.0, "ABORT_GRACE_S": 0.3}
    vm = never_converging_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    assert run.timeout_s == 1.0
    driver = driver_for(datacenter)
    real_migrate = type(driver).migrate

    def migrate_without_budget(self, spec, **kwargs):
        return real_migrate(self, replace(spec, timeout_s=None), **kwargs)

    monkeypatch.setattr(type(driver), "migrate", migrate_without_budget)
    runs.migration_run_execute(run_id=run.pk, worker="w1")
    run.refresh_from_db()
    assert MigrationRequest.objects.get(pk=run.request_id).status == S.FAILED
    assert "timed out after 1 s" in run.explanation and "the portal aborted it" in run.explanation
    assert driver.placement(vm.ref).host_ref == vm.host.ref
