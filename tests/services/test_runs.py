"""Execution: the worker claims a queued run, drives the simulator, records numbered progress, and
finishes with the true outcome, placement and audit entries. Never starts a run twice."""

from __future__ import annotations

import threading
import time

import pytest

from migrations_app.choices import AuditAction, MigrationKind, Phase, RequestStatus
from migrations_app.models import AuditEntry, Datastore, MigrationRequest, MigrationRun, RunEvent, VirtualMachine
from migrations_app.services import requests as svc
from migrations_app.services.errors import ActionRefused
from migrations_app.services.runs import migration_run_execute, queueing
from tests.conftest import approved_run, other_host_same_cluster, running_vm

S = RequestStatus

pytestmark = pytest.mark.usefixtures("review_everything")


@pytest.mark.django_db
def test_compute_run_succeeds_moves_the_vm_and_numbers_its_events(datacenter, users):
    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    target = run.request.target_host
    migration_run_execute(run_id=run.pk, worker="w1")

    run.refresh_from_db()
    vm.refresh_from_db()
    run.request.refresh_from_db()
    assert run.request.status == S.SUCCEEDED
    assert vm.host == target
    assert (run.phase, run.percent, run.worker) == (Phase.DONE, 100.0, "w1")
    assert run.task_id.startswith("sim-task-") and run.finished_at and run.downtime_ms is not None
    seqs = list(RunEvent.objects.filter(run=run).values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1)) and run.last_seq == seqs[-1]
    percents = list(RunEvent.objects.filter(run=run).values_list("percent", flat=True))
    assert percents == sorted(percents)
    phases = set(RunEvent.objects.filter(run=run).values_list("phase", flat=True))
    assert {Phase.PRECHECK, Phase.MEMORY_PRECOPY, Phase.SWITCHOVER, Phase.DONE} <= phases
    done = AuditEntry.objects.get(request=run.request, action=AuditAction.RUN_SUCCEEDED)
    assert done.before["host"] != done.after["host"] == target.name and done.task_id == run.task_id


@pytest.mark.django_db
def test_storage_run_moves_disks_and_free_space(datacenter, users):
    vm = running_vm(datacenter)
    target = Datastore.objects.filter(hosts=vm.host).exclude(pk__in=vm.datastore_ids()).order_by("-free_bytes").first()
    free_before = target.free_bytes
    run = approved_run(users["alice"], users["erin"], vm, kind=MigrationKind.STORAGE, target_datastore=target)
    migration_run_execute(run_id=run.pk, worker="w1")
    assert MigrationRequest.objects.get(pk=run.request_id).status == S.SUCCEEDED
    assert vm.datastore_ids() == {target.pk}
    target.refresh_from_db()
    assert target.free_bytes == free_before - vm.disk_bytes
    assert RunEvent.objects.filter(run=run, phase=Phase.DISK_COPY).exists()


@pytest.mark.django_db
def test_a_run_is_never_started_twice(datacenter, users):
    run = approved_run(users["alice"], users["erin"], running_vm(datacenter))
    migration_run_execute(run_id=run.pk, worker="w1")
    started = MigrationRun.objects.get(pk=run.pk).started_at
    migration_run_execute(run_id=run.pk, worker="w2")  # a redelivered message
    run.refresh_from_db()
    assert (run.worker, run.started_at) == ("w1", started)
    assert AuditEntry.objects.filter(request=run.request, action=AuditAction.RUN_STARTED).count() == 1


@pytest.mark.django_db
def test_hypervisor_failure_at_switchover_is_failed_with_its_explanation(datacenter, users):
    vm = VirtualMachine.objects.get(connection=datacenter, tags__icontains="sim:fail-at-switchover")
    vm.owner_group = users["alice"].groups.get(name="team-web")
    vm.save()
    source = vm.host
    run = approved_run(users["alice"], users["erin"], vm)
    migration_run_execute(run_id=run.pk, worker="w1")
    run.refresh_from_db()
    vm.refresh_from_db()
    assert run.request.status == S.FAILED
    assert "switchover" in run.explanation and "Failed to resume" in run.explanation
    assert vm.host == source and not run.traceback
    assert AuditEntry.objects.filter(request=run.request, action=AuditAction.RUN_FAILED).exists()


@pytest.mark.django_db
def test_a_bug_in_the_driver_is_errored_with_a_traceback(datacenter, users, monkeypatch):
    from drivers.simulator import SimulatorDriver

    def broken(self, spec, *, on_progress, cancel):
        raise ZeroDivisionError("driver bug")

    monkeypatch.setattr(SimulatorDriver, "migrate", broken)
    run = approved_run(users["alice"], users["erin"], running_vm(datacenter))
    migration_run_execute(run_id=run.pk, worker="w1")
    run.refresh_from_db()
    assert run.request.status == S.ERRORED
    assert "ZeroDivisionError" in run.traceback and "internal error" in run.explanation


@pytest.mark.django_db
def test_nonsense_from_the_driver_is_clamped_not_trusted(datacenter, users, monkeypatch):
    from drivers import base as drv
    from drivers.simulator import SimulatorDriver

    real = SimulatorDriver.migrate

    def noisy(self, spec, *, on_progress, cancel):
        on_progress(drv.ProgressUpdate(drv.Phase.DISK_COPY, 250.0, bytes_done=-5))
        on_progress("not an update")
        on_progress(drv.ProgressUpdate(drv.Phase.DISK_COPY, 10.0))
        return real(self, spec, on_progress=on_progress, cancel=cancel)

    monkeypatch.setattr(SimulatorDriver, "migrate", noisy)
    run = approved_run(users["alice"], users["erin"], running_vm(datacenter))
    migration_run_execute(run_id=run.pk, worker="w1")
    percents = list(RunEvent.objects.filter(run=run).values_list("percent", flat=True))
    assert max(percents) == 100.0 and percents == sorted(percents)
    assert RunEvent.objects.filter(run=run, bytes_done__lt=0).count() == 0


@pytest.mark.django_db(transaction=True)
def test_cancel_while_running_aborts_and_the_vm_stays(datacenter, users):
    vm = VirtualMachine.objects.get(connection=datacenter, tags__icontains="sim:never-converge")
    vm.owner_group = users["alice"].groups.get(name="team-web")
    vm.save()
    source = vm.host
    run = approved_run(users["alice"], users["erin"], vm)
    def work():
        from django.db import connection

        try:
            migration_run_execute(run_id=run.pk, worker="w1")
        finally:
            connection.close()  # as Celery does after each task

    worker = threading.Thread(target=work)
    worker.start()
    deadline = time.monotonic() + 20
    while MigrationRun.objects.get(pk=run.pk).percent <= 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    svc.migration_request_cancel(request=run.request, actor=users["alice"], reason="wrong VM")
    assert MigrationRequest.objects.get(pk=run.request_id).status == S.CANCELLING
    worker.join(20)
    assert not worker.is_alive()
    run.refresh_from_db()
    vm.refresh_from_db()
    assert run.request.status == S.CANCELLED and vm.host == source
    actions = list(AuditEntry.objects.filter(request=run.request).values_list("action", flat=True))
    assert AuditAction.RUN_CANCEL_REQUESTED in actions and AuditAction.RUN_CANCELLED in actions


@pytest.mark.django_db(transaction=True)
def test_concurrent_approvals_give_exactly_one_transition(datacenter, users):
    from django.db import connection

    assert connection.vendor == "postgresql", "this test needs real row locks"
    mr = svc.migration_request_submit(requester=users["alice"], vm=running_vm(datacenter), kind="compute",
                                      target_host=other_host_same_cluster(running_vm(datacenter)), reason="x")
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def approve(name):
        from django.db import connection as conn

        barrier.wait()
        try:
            svc.migration_request_approve(request=mr, actor=users[name])
            outcomes.append("ok")
        except ActionRefused as exc:
            outcomes.append(exc.message)
        finally:
            conn.close()

    threads = [threading.Thread(target=approve, args=(n,)) for n in ("erin", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes)[0] == "ok" and outcomes.count("ok") == 1, outcomes
    assert MigrationRun.objects.filter(request=mr).count() == 1
    assert AuditEntry.objects.filter(request=mr, action=AuditAction.REQUEST_APPROVED, outcome="success").count() == 1


@pytest.mark.django_db
def test_a_lost_queue_message_is_sent_again_but_not_every_pass(datacenter, users, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    from migrations_app.services import runs as run_services

    sent = []
    monkeypatch.setattr(queueing, "dispatch", lambda run_id, task_id: sent.append(run_id))
    run = approved_run(users["alice"], users["erin"], running_vm(datacenter))
    assert run_services.migration_run_redispatch_stale(older_than_s=300) == 0  # just sent
    MigrationRun.objects.filter(pk=run.pk).update(dispatched_at=timezone.now() - timedelta(minutes=6))
    assert run_services.migration_run_redispatch_stale(older_than_s=300) == 1 and sent == [run.pk]
    assert run_services.migration_run_redispatch_stale(older_than_s=300) == 0  # not again right away


@pytest.mark.django_db
def test_admission_control_holds_a_run_back_says_why_and_starts_it_when_room_frees(datacenter, users,
                                                                                   monkeypatch):
    from migrations_app.services import runs as run_services

    datacenter.options = {**datacenter.options, "admission": {"host_max": 1}}  # one move per host at a time
    datacenter.save()
    sent = []
    monkeypatch.setattr(queueing, "dispatch", lambda run_id, task_id: sent.append(run_id))
    vms = [vm for vm in VirtualMachine.objects.filter(connection=datacenter, power_state="on").order_by("pk")
           if not any(t.startswith("sim:") for t in vm.tags)]
    first_vm = next(v for v in vms if any(w.host_id == v.host_id for w in vms if w != v))
    second_vm = next(v for v in vms if v.host_id == first_vm.host_id and v != first_vm)
    first = approved_run(users["carol"], users["erin"], first_vm)  # an admin may request any VM
    second = approved_run(users["carol"], users["erin"], second_vm)
    assert run_services._claim(first.pk, "w1") is not None  # the host is free: it starts
    assert run_services._claim(second.pk, "w2") is None  # the same host is busy: it waits
    second.refresh_from_db()
    assert second.request.status == RequestStatus.QUEUED
    busy = {first_vm.host.name, first.request.target_host.name}
    host = second.wait_reason.split(":")[0].removeprefix("host ")
    assert host in busy, second.wait_reason
    assert second.wait_reason == f"host {host}: cost 1 of 1 in use (1 compute move running) (place 1 in line)"
    assert RunEvent.objects.filter(run=second, message__startswith="waiting: host").exists()
    # The first finishes; the second is handed to the workers and can start.
    run_services.migration_run_finish(run=first, outcome=run_services._Outcome(error=drv_failed()))
    assert run_services.dispatch_admissible(datacenter.pk) == 1 and sent[-1] == second.pk
    assert run_services._claim(second.pk, "w2") is not None


def drv_failed():
    from drivers.base import MigrationFailed

    return MigrationFailed("test: the hypervisor said no")


@pytest.mark.django_db
def test_a_run_whose_target_changed_after_approval_stops_at_start_with_the_reason(datacenter, users):
    from migrations_app.models import Host

    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    target = run.request.target_host
    Host.objects.filter(pk=target.pk).update(maintenance=True)  # as the next inventory sync would record
    migration_run_execute(run_id=run.pk, worker="w1")
    run.refresh_from_db()
    vm.refresh_from_db()
    assert run.request.status == RequestStatus.FAILED
    assert run.explanation == (f"Pre-flight at start failed, the world changed: {target.name} is in maintenance mode. "
                               "Nothing was moved.")
    assert vm.host != target and not run.task_id


@pytest.mark.django_db
def test_a_claim_judges_a_run_as_the_whole_queue_would_from_the_runs_ahead_of_it(datacenter, users, monkeypatch):
    from migrations_app.services import runs as run_services

    datacenter.options = {**datacenter.options, "admission": {"host_max": 1}}  # one move per host at a time
    datacenter.save()
    monkeypatch.setattr(queueing, "dispatch", lambda run_id, task_id: None)
    vms = [vm for vm in VirtualMachine.objects.filter(connection=datacenter, power_state="on").order_by("pk")
           if not any(t.startswith("sim:") for t in vm.tags)]
    runs = [approved_run(users["carol"], users["erin"], vm) for vm in vms[:6]]
    assert run_services._claim(runs[0].pk, "w1") is not None
    whole, _ = run_services.admission_decision(datacenter)
    assert whole.waiting, "the test needs runs that wait"
    for run in runs[1:]:
        mine, _ = run_services.admission_decision(datacenter, up_to=run.pk)
        rid = run.request_id
        assert (rid in {m.id for m in mine.admitted}) == (rid in {m.id for m in whole.admitted}), run.pk
        assert (mine.waiting.get(rid), mine.place.get(rid)) == (whole.waiting.get(rid), whole.place.get(rid)), run.pk
