"""Crash recovery: runs whose worker went silent before handing them to the hypervisor go back in
line; the others are settled with what the hypervisor says."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from drivers.base import ConnectionFailed, MigrationCancelled, MigrationSpec, TaskState
from migrations_app.choices import AuditAction, RequestStatus
from migrations_app.models import AuditEntry, MigrationRequest, MigrationRun, VirtualMachine
from migrations_app.services import requests as svc
from migrations_app.services import runs
from migrations_app.services.inventory import driver_for
from migrations_app.services.recovery import migration_run_reconcile_stale
from migrations_app.services.runs import _claim
from migrations_app.services.runs.execute import _start_gate
from tests.conftest import running_vm
from tests.services.test_runs import approved_run

S = RequestStatus
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("review_everything")]


def stale(run):
    MigrationRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=10))


def hand_over(run) -> None:
    """What the worker's start gate does just before it calls the driver: mark the run handed."""
    run = MigrationRun.objects.get(pk=run.pk)
    handed, refused = _start_gate([run], {run.pk: run.worker_task_id})
    assert [r.pk for r in handed] == [run.pk] and not refused, refused


def test_a_move_the_hypervisor_completed_after_the_worker_died_is_recorded_as_succeeded(datacenter, users):
    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    _claim(run.pk, "lost-worker")
    hand_over(run)
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


def test_a_handed_run_the_hypervisor_never_started_is_failed_after_asking_it_not_put_back_in_line(
        datacenter, users, monkeypatch):
    vm = running_vm(datacenter)
    source = vm.host
    run = approved_run(users["alice"], users["erin"], vm)
    _claim(run.pk, "lost-worker")
    hand_over(run)  # the worker died between its start gate and the driver's answer
    asked = []
    driver_type = type(driver_for(datacenter))
    real_tasks = driver_type.migration_tasks
    monkeypatch.setattr(driver_type, "migration_tasks",
                        lambda self, ref, since: asked.append(ref) or real_tasks(self, ref, since=since))
    stale(run)
    counts = migration_run_reconcile_stale(stale_after_s=60)
    assert counts["failed"] == 1 and counts["requeued"] == 0, counts
    assert asked == [vm.ref]  # the hypervisor was asked what became of the move
    request = MigrationRequest.objects.get(pk=run.request_id)
    run.refresh_from_db()
    vm.refresh_from_db()
    assert request.status == S.FAILED and vm.host == source
    assert "worker was lost" in run.explanation
    assert AuditEntry.objects.filter(request=request, action=AuditAction.RUN_STARTED).count() == 1
    assert not AuditEntry.objects.filter(request=request, action=AuditAction.RUN_REQUEUED).exists()


def test_a_run_an_older_worker_handed_over_without_recording_it_is_not_put_back_in_line(datacenter, users):
    # A rolling deploy: a worker of the release before handed_at started the move and died; its
    # run has no handed_at, but the driver had reported a task and a phase: the hypervisor is asked.
    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    _claim(run.pk, "old-worker")
    MigrationRun.objects.filter(pk=run.pk).update(task_id="task-from-an-old-worker", phase="memory_precopy")
    stale(run)
    counts = migration_run_reconcile_stale(stale_after_s=60)
    assert counts["requeued"] == 0 and counts["failed"] == 1, counts
    request = MigrationRequest.objects.get(pk=run.request_id)
    assert request.status == S.FAILED
    assert not AuditEntry.objects.filter(request=request, action=AuditAction.RUN_REQUEUED).exists()
    assert AuditEntry.objects.filter(request=request, action=AuditAction.RUN_RECONCILED).exists()


def test_a_claimed_run_never_handed_to_the_hypervisor_goes_back_in_line_and_a_later_worker_moves_it(
        datacenter, users, monkeypatch, django_capture_on_commit_callbacks):
    from migrations_app.services import recovery

    sent = []
    monkeypatch.setattr(recovery, "dispatch_many", lambda runs: sent.extend(runs))
    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    first_message = run.worker_task_id
    _claim(run.pk, "lost-worker")  # the worker died during its pre-flight: the driver was never asked to move
    stale(run)
    with django_capture_on_commit_callbacks(execute=True):
        counts = migration_run_reconcile_stale(stale_after_s=60)
    assert counts["requeued"] == 1 and counts["failed"] == 0, counts
    run.refresh_from_db()
    request = MigrationRequest.objects.get(pk=run.request_id)
    assert request.status == S.QUEUED
    assert (run.worker, run.started_at, run.heartbeat_at, run.handed_at, run.phase) == ("", None, None, None, "waiting")
    assert run.requeues == 1 and run.worker_task_id != first_message
    assert sent == [(run.pk, datacenter.pk, run.worker_task_id)]  # back to the workers, under its new claim
    requeued = AuditEntry.objects.get(request=request, action=AuditAction.RUN_REQUEUED)
    assert requeued.reason == "worker lost before the move started; nothing was moved; back in line"
    assert run.events.order_by("-seq").first().message == requeued.reason
    driver = driver_for(datacenter)
    assert driver.migration_tasks(vm.ref, since=0) == ()

    runs.migration_run_execute(run_id=run.pk, worker="next-worker")
    request.refresh_from_db()
    vm.refresh_from_db()
    assert request.status == S.SUCCEEDED and vm.host == request.target_host
    assert len(driver.migration_tasks(vm.ref, since=0)) == 1
    actions = list(AuditEntry.objects.filter(request=request).order_by("pk").values_list("action", flat=True))
    assert actions.count(AuditAction.RUN_STARTED) == 2 and actions.count(AuditAction.RUN_SUCCEEDED) == 1
    assert actions.index(AuditAction.RUN_REQUEUED) < actions.index(AuditAction.RUN_SUCCEEDED)
    assert not any(a in actions for a in (AuditAction.RUN_FAILED, AuditAction.RUN_RECONCILED))


def test_a_run_whose_worker_is_lost_before_the_move_too_often_fails_instead_of_looping(datacenter, users, settings):
    settings.PORTAL = {**settings.PORTAL, "MAX_REQUEUES": 2}
    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    for _ in range(2):
        assert _claim(run.pk, "lost-worker") is not None
        stale(run)
        assert migration_run_reconcile_stale(stale_after_s=60)["requeued"] == 1
    _claim(run.pk, "lost-worker")
    stale(run)
    counts = migration_run_reconcile_stale(stale_after_s=60)
    assert counts["failed"] == 1 and counts["requeued"] == 0, counts
    run.refresh_from_db()
    request = MigrationRequest.objects.get(pk=run.request_id)
    assert request.status == S.FAILED
    assert "lost before the move started 3 times; nothing was moved" in run.explanation
    assert AuditEntry.objects.filter(request=request, action=AuditAction.RUN_REQUEUED).count() == 2
    assert AuditEntry.objects.get(request=request, action=AuditAction.RUN_RECONCILED).reason == (
        "worker lost before the move started; nothing was moved")
    assert driver_for(datacenter).migration_tasks(vm.ref, since=0) == ()


def test_a_cancelling_run_whose_worker_was_lost_before_the_move_is_cancelled_without_asking_the_hypervisor(
        datacenter, users, monkeypatch):
    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    _claim(run.pk, "lost-worker")
    svc.migration_request_cancel(request=MigrationRequest.objects.get(pk=run.request_id), actor=users["alice"],
                                 reason="not now")
    monkeypatch.setattr(type(driver_for(datacenter)), "placement",
                        lambda self, ref: pytest.fail("the hypervisor need not be asked"))
    stale(run)
    counts = migration_run_reconcile_stale(stale_after_s=60)
    assert counts["cancelled"] == 1 and counts["requeued"] == 0, counts
    run.refresh_from_db()
    request = MigrationRequest.objects.get(pk=run.request_id)
    assert request.status == S.CANCELLED
    assert "nothing was moved" in run.explanation
    assert AuditEntry.objects.filter(request=request, action=AuditAction.RUN_CANCELLED).count() == 1
    assert not AuditEntry.objects.filter(request=request, action=AuditAction.RUN_REQUEUED).exists()


def test_a_run_handed_over_after_the_reconciler_listed_it_is_not_put_back_in_line(datacenter, users, monkeypatch):
    from migrations_app.services import recovery

    run = approved_run(users["alice"], users["erin"], running_vm(datacenter))
    _claim(run.pk, "slow-worker")
    stale(run)
    real = recovery._reconcile_never_handed

    def gate_first(run_ids, cutoff, now):
        # The slow worker's start gate takes the locks first: handed, heartbeat renewed.
        hand_over(run)
        return real(run_ids, cutoff, now)

    monkeypatch.setattr(recovery, "_reconcile_never_handed", gate_first)
    counts = migration_run_reconcile_stale(stale_after_s=60)
    assert not any(counts.values()), counts
    assert MigrationRequest.objects.get(pk=run.request_id).status == S.RUNNING
    assert not AuditEntry.objects.filter(request_id=run.request_id, action=AuditAction.RUN_REQUEUED).exists()


def test_fresh_heartbeats_are_left_alone(datacenter, users):
    run = approved_run(users["alice"], users["erin"], running_vm(datacenter))
    _claim(run.pk, "busy-worker")
    assert not any(migration_run_reconcile_stale(stale_after_s=60).values())
    assert MigrationRequest.objects.get(pk=run.request_id).status == S.RUNNING


def claimed(users, vm) -> MigrationRun:
    """A run claimed and handed to the hypervisor by a worker that is then lost."""
    run = approved_run(users["alice"], users["erin"], vm)
    _claim(run.pk, "lost-worker")
    hand_over(run)
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


def test_a_slow_worker_whose_run_was_put_back_in_line_during_preflight_does_not_start_it(
        datacenter, users, monkeypatch):
    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    driver = driver_for(datacenter)
    real_preflight = type(driver).preflight

    def slow_preflight(self, spec):
        # While this worker is still checking, the reconciler judges it lost and puts the run back in line.
        stale(run)
        assert migration_run_reconcile_stale(stale_after_s=60)["requeued"] == 1
        return real_preflight(self, spec)

    monkeypatch.setattr(type(driver), "preflight", slow_preflight)
    runs.migration_run_execute(run_id=run.pk, worker="slow-worker")
    assert driver.migration_tasks(vm.ref, since=0) == ()  # the hypervisor was never asked
    run.refresh_from_db()
    assert MigrationRequest.objects.get(pk=run.request_id).status == S.QUEUED
    assert run.handed_at is None and run.worker == ""
    assert not AuditEntry.objects.filter(request_id=run.request_id, action__in=[
        AuditAction.RUN_FAILED, AuditAction.RUN_ERRORED, AuditAction.RUN_CANCELLED]).exists()


def test_a_run_put_back_in_line_and_claimed_again_is_started_by_its_new_claim_only(datacenter, users, monkeypatch):
    """The slow worker and the one that claims the run again share a name (threads of one process):
    the claim, not the worker's name, decides who may start it."""
    from migrations_app.services.runs import execute

    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    driver = driver_for(datacenter)
    real_preflight, real_migrate = type(driver).preflight, type(driver).migrate
    moves, second_claim = [], {}

    def slow_preflight(self, spec):
        if not second_claim:
            # Judged lost mid-check: the run goes back in line and another thread claims it.
            stale(run)
            assert migration_run_reconcile_stale(stale_after_s=60)["requeued"] == 1
            second_claim[run.pk] = _claim(run.pk, "host:1").worker_task_id
        return real_preflight(self, spec)

    def migrate(self, spec, **kwargs):
        moves.append(spec.vm_ref)
        return real_migrate(self, spec, **kwargs)

    monkeypatch.setattr(type(driver), "preflight", slow_preflight)
    monkeypatch.setattr(type(driver), "migrate", migrate)
    runs.migration_run_execute(run_id=run.pk, worker="host:1")
    # The slow thread reached its start gate with the run running under the other claim: not started, not settled.
    assert moves == []
    reloaded = MigrationRun.objects.select_related("request").get(pk=run.pk)
    assert reloaded.request.status == S.RUNNING and reloaded.handed_at is None
    # The other thread goes on from its claim and moves the VM, once.
    execute._execute([reloaded], claims=second_claim)
    assert moves == [vm.ref] and len(driver.migration_tasks(vm.ref, since=0)) == 1
    request = MigrationRequest.objects.get(pk=run.request_id)
    assert request.status == S.SUCCEEDED
    actions = list(AuditEntry.objects.filter(request=request).order_by("pk").values_list("action", flat=True))
    assert actions.count(AuditAction.RUN_STARTED) == 2 and actions.count(AuditAction.RUN_SUCCEEDED) == 1


def test_a_slow_worker_does_not_settle_a_run_claimed_again_by_another_worker(datacenter, users, monkeypatch):
    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    driver = driver_for(datacenter)

    def preflight_fails_late(self, spec):
        stale(run)
        assert migration_run_reconcile_stale(stale_after_s=60)["requeued"] == 1
        assert _claim(run.pk, "other-worker") is not None  # the run is the other worker's now
        raise ConnectionFailed("the slow worker lost its session")

    monkeypatch.setattr(type(driver), "preflight", preflight_fails_late)
    runs.migration_run_execute(run_id=run.pk, worker="slow-worker")
    run.refresh_from_db()
    assert MigrationRequest.objects.get(pk=run.request_id).status == S.RUNNING
    assert run.worker == "other-worker" and run.explanation == ""
    assert not AuditEntry.objects.filter(request_id=run.request_id, action=AuditAction.RUN_FAILED).exists()


def test_a_cancel_during_preflight_ends_the_run_before_the_hypervisor_is_asked(datacenter, users, monkeypatch):
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
    # The driver's own words on where the VM is are kept (a cold move says whether it runs again).
    assert run.explanation.endswith(f"so the portal aborted it: migration of {vm.name} cancelled; it stays where it was")
    assert driver.placement(vm.ref).host_ref == vm.host.ref
