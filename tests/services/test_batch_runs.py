"""A worker's batch of runs: each run is settled on its own, as soon as its move ends; a cancel
stops one run of the batch and the aborting run keeps proving its worker alive; a run settled
elsewhere while the batch was prepared is never started. Real worker threads against the
simulator, with the database committed (the worker reads what the test wrote)."""
from __future__ import annotations

import threading
import time

import pytest
from django.utils import timezone

from drivers import base as drv
from migrations_app.choices import AuditAction, RequestStatus
from migrations_app.models import AuditEntry, MigrationRequest, MigrationRun, VirtualMachine
from migrations_app.services import requests as svc
from migrations_app.services.runs import migration_runs_execute
from tests.conftest import approved_run, running_vm

S = RequestStatus
pytestmark = pytest.mark.usefixtures("review_everything")


def _in_thread(fn):
    def work():
        from django.db import connection
        try:
            fn()
        finally:
            connection.close()
    t = threading.Thread(target=work)
    t.start()
    return t


@pytest.mark.django_db(transaction=True)
def test_a_cancelled_run_keeps_heartbeating_while_its_driver_is_still_aborting(datacenter, users, monkeypatch):
    """An abort can take minutes on vCenter (ABORT_GRACE_S above STALE_AFTER_S): until its move
    has returned, the run heartbeats, so the reconciler never judges its live worker lost."""
    from drivers.simulator import SimulatorDriver

    moving, aborting, released = threading.Event(), threading.Event(), threading.Event()

    def slow_abort(self, spec, *, on_progress, cancel):
        on_progress(drv.ProgressUpdate(drv.Phase.MEMORY_PRECOPY, 5.0, task_id="sim-task-slow"))
        moving.set()
        cancel.wait(20)
        aborting.set()  # the worker saw the cancel at a heartbeat and asked for the abort
        released.wait(20)  # the hypervisor takes a while to end the aborted job; no progress meanwhile
        raise drv.MigrationCancelled("aborted")

    monkeypatch.setattr(SimulatorDriver, "migrate", slow_abort)
    vm = running_vm(datacenter)
    run = approved_run(users["alice"], users["erin"], vm)
    worker = _in_thread(lambda: migration_runs_execute(run_ids=[run.pk], worker="w1"))
    assert moving.wait(20), "the move never started"
    svc.migration_request_cancel(request=run.request, actor=users["alice"], reason="stop")
    assert aborting.wait(20), "the worker never passed the cancel to the driver"
    before = MigrationRun.objects.get(pk=run.pk).heartbeat_at
    time.sleep(1.5)  # the window watched: ~7 heartbeats of 0.2 s while the abort goes on
    after = MigrationRun.objects.get(pk=run.pk).heartbeat_at
    age = (timezone.now() - after).total_seconds()
    released.set()
    worker.join(20)
    assert after > before, f"heartbeat not renewed for {age:.1f}s while the worker was alive and aborting"


def _team_web_vms(conn, n):
    from migrations_app.models import Host
    out = []
    for vm in VirtualMachine.objects.filter(connection=conn, power_state="on", owner_group__name="team-web").order_by("pk"):
        if any(t.startswith("sim:") for t in vm.tags):
            continue
        if Host.objects.filter(cluster=vm.host.cluster).exclude(pk=vm.host_id).exists():
            out.append(vm)
    return out[:n]


@pytest.mark.django_db(transaction=True)
def test_a_cancel_stops_one_run_of_a_batch_and_each_run_is_settled_once(datacenter, users):
    from migrations_app.models import RunEvent
    from migrations_app.services.audit import audit_verify_chain

    vms = _team_web_vms(datacenter, 3)
    assert len(vms) == 3
    # a never-converging VM as the middle one so that its cancel lands while it moves
    slow = VirtualMachine.objects.get(connection=datacenter, tags__icontains="sim:never-converge")
    slow.owner_group = users["alice"].groups.get(name="team-web")
    slow.save()
    runs = [approved_run(users["alice"], users["erin"], vm) for vm in (vms[0], slow, vms[1])]
    ids = [r.pk for r in runs]
    worker = _in_thread(lambda: migration_runs_execute(run_ids=ids, worker="w1"))
    deadline = time.monotonic() + 20
    while MigrationRun.objects.get(pk=ids[1]).percent <= 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    svc.migration_request_cancel(request=runs[1].request, actor=users["alice"], reason="stop")
    worker.join(30)
    assert not worker.is_alive()
    statuses = [MigrationRequest.objects.get(pk=r.request_id).status for r in runs]
    assert statuses[1] == S.CANCELLED
    for r in runs:
        seqs = list(RunEvent.objects.filter(run_id=r.pk).order_by("seq").values_list("seq", flat=True))
        assert seqs == list(range(1, len(seqs) + 1))
        terminal = AuditEntry.objects.filter(request_id=r.request_id, action__in=[
            AuditAction.RUN_SUCCEEDED, AuditAction.RUN_FAILED, AuditAction.RUN_CANCELLED, AuditAction.RUN_ERRORED])
        assert terminal.count() == 1
    assert audit_verify_chain().ok


@pytest.mark.django_db(transaction=True)
def test_a_finished_move_is_settled_without_waiting_for_the_rest_of_its_batch(datacenter, users, monkeypatch):
    from drivers.simulator import SimulatorDriver

    real = SimulatorDriver.migrate
    released = threading.Event()
    vms = _team_web_vms(datacenter, 2)
    slow_ref = vms[1].ref

    def migrate(self, spec, *, on_progress, cancel):
        if spec.vm_ref == slow_ref:
            on_progress(drv.ProgressUpdate(drv.Phase.MEMORY_PRECOPY, 1.0, task_id="sim-task-slow"))
            released.wait(20)  # a long move (hours on a real vCenter for a big storage vMotion)
        return real(self, spec, on_progress=on_progress, cancel=cancel)

    monkeypatch.setattr(SimulatorDriver, "migrate", migrate)
    fast, slow = (approved_run(users["alice"], users["erin"], vm) for vm in vms)
    worker = _in_thread(lambda: migration_runs_execute(run_ids=[fast.pk, slow.pk], worker="w1"))
    deadline = time.monotonic() + 5
    status = None
    while time.monotonic() < deadline:
        status = MigrationRequest.objects.get(pk=fast.request_id).status
        if status == S.SUCCEEDED:
            break
        time.sleep(0.1)
    fast_run = MigrationRun.objects.get(pk=fast.pk)
    released.set()
    worker.join(30)
    assert status == S.SUCCEEDED, (
        f"fast run still {status} (phase {fast_run.phase}, {fast_run.percent}%) 5 s after its move ended: "
        "it is settled only when the slowest move of its batch ends")


@pytest.mark.django_db(transaction=True)
def test_a_run_settled_during_preparation_is_not_started_and_the_other_is(datacenter, users, monkeypatch):
    from drivers.simulator import SimulatorDriver
    from migrations_app.services.runs import _Outcome, migration_run_finish

    vms = _team_web_vms(datacenter, 2)
    a, b = (approved_run(users["alice"], users["erin"], vm) for vm in vms)
    real_pf, real_mig = SimulatorDriver.preflight, SimulatorDriver.migrate
    started = []

    def preflight(self, spec):
        if spec.vm_ref == vms[0].ref:
            migration_run_finish(run=MigrationRun.objects.get(pk=a.pk),
                                 outcome=_Outcome(error=drv.MigrationFailed("judged lost")), reconciled_by="test")
        return real_pf(self, spec)

    def migrate(self, spec, *, on_progress, cancel):
        started.append(spec.vm_ref)
        return real_mig(self, spec, on_progress=on_progress, cancel=cancel)

    monkeypatch.setattr(SimulatorDriver, "preflight", preflight)
    monkeypatch.setattr(SimulatorDriver, "migrate", migrate)
    migration_runs_execute(run_ids=[a.pk, b.pk], worker="w1")
    assert started == [vms[1].ref]
    assert MigrationRequest.objects.get(pk=a.request_id).status == S.FAILED
    assert MigrationRequest.objects.get(pk=b.request_id).status == S.SUCCEEDED
    assert AuditEntry.objects.filter(request_id=a.request_id, action=AuditAction.RUN_FAILED).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_broken_run_errors_alone_and_its_batch_mates_move(datacenter, users, monkeypatch):
    from drivers.simulator import SimulatorDriver
    from migrations_app.services.runs import execute

    vms = _team_web_vms(datacenter, 3)
    spec_broken, check_broken, fine = (approved_run(users["alice"], users["erin"], vm) for vm in vms)
    real_spec, real_preflight = execute._spec, SimulatorDriver.preflight

    def spec(run):
        if run.pk == spec_broken.pk:
            raise ValueError("no such option")  # this run's data is broken
        return real_spec(run)

    def preflight(self, s):
        if s.vm_ref == vms[1].ref:
            raise KeyError("the check itself broke")  # the portal's bug, for this move alone
        return real_preflight(self, s)

    monkeypatch.setattr(execute, "_spec", spec)
    monkeypatch.setattr(SimulatorDriver, "preflight", preflight)
    migration_runs_execute(run_ids=[spec_broken.pk, check_broken.pk, fine.pk], worker="w1")
    statuses = {r.pk: MigrationRun.objects.select_related("request").get(pk=r.pk) for r in (spec_broken, check_broken, fine)}
    assert statuses[spec_broken.pk].request.status == S.ERRORED
    assert "no such option" in statuses[spec_broken.pk].traceback
    assert statuses[check_broken.pk].request.status == S.ERRORED
    assert "the check itself broke" in statuses[check_broken.pk].traceback
    assert statuses[fine.pk].request.status == S.SUCCEEDED
    assert VirtualMachine.objects.get(pk=vms[2].pk).host_id == statuses[fine.pk].request.target_host_id
    assert VirtualMachine.objects.get(pk=vms[0].pk).host_id == vms[0].host_id  # the broken ones did not move
    assert VirtualMachine.objects.get(pk=vms[1].pk).host_id == vms[1].host_id


@pytest.mark.django_db(transaction=True)
def test_an_endpoint_lost_during_the_batch_preflight_fails_every_run_and_leaves_none_running(datacenter, users,
                                                                                             monkeypatch):
    from drivers.simulator import SimulatorDriver

    def unreachable(self, specs, **kwargs):
        raise drv.ConnectionFailed("cannot talk to the simulator: connection refused")

    monkeypatch.setattr(SimulatorDriver, "preflight_many", unreachable)
    runs = [approved_run(users["alice"], users["erin"], vm) for vm in _team_web_vms(datacenter, 2)]
    migration_runs_execute(run_ids=[r.pk for r in runs], worker="w1")
    for run in MigrationRun.objects.filter(pk__in=[r.pk for r in runs]).select_related("request"):
        assert run.request.status == S.FAILED
        assert "connection refused" in run.explanation


@pytest.mark.django_db(transaction=True)
def test_a_batch_put_back_in_line_while_its_worker_hung_in_preflight_is_moved_once_by_the_next_worker(
        datacenter, users, monkeypatch):
    """Committed transactions and real threads: the first worker hangs in its batch pre-flight, is
    judged lost, its runs go back in line together and a second worker moves them; when the first
    wakes up, its start gate finds its claims gone and starts nothing."""
    from datetime import timedelta

    from drivers.simulator import SimulatorDriver
    from migrations_app.services.recovery import migration_run_reconcile_stale

    real_pf, real_mig = SimulatorDriver.preflight_many, SimulatorDriver.migrate
    hung, wake = threading.Event(), threading.Event()
    moves = []

    def preflight_many(self, specs, **kwargs):
        if not hung.is_set():
            hung.set()
            wake.wait(20)  # the first worker: stuck talking to the hypervisor
        return real_pf(self, specs, **kwargs)

    def migrate(self, spec, *, on_progress, cancel):
        moves.append(spec.vm_ref)
        return real_mig(self, spec, on_progress=on_progress, cancel=cancel)

    monkeypatch.setattr(SimulatorDriver, "preflight_many", preflight_many)
    monkeypatch.setattr(SimulatorDriver, "migrate", migrate)
    vms = _team_web_vms(datacenter, 2)
    runs = [approved_run(users["alice"], users["erin"], vm) for vm in vms]
    ids = [r.pk for r in runs]
    first = _in_thread(lambda: migration_runs_execute(run_ids=ids, worker="w1"))
    assert hung.wait(20)
    MigrationRun.objects.filter(pk__in=ids).update(heartbeat_at=timezone.now() - timedelta(minutes=10))
    assert migration_run_reconcile_stale(stale_after_s=60)["requeued"] == 2
    assert {MigrationRequest.objects.get(pk=r.request_id).status for r in runs} == {S.QUEUED}
    migration_runs_execute(run_ids=ids, worker="w2")
    wake.set()
    first.join(30)
    assert not first.is_alive()
    assert sorted(moves) == sorted(vm.ref for vm in vms)  # each VM moved, once
    for r in runs:
        request = MigrationRequest.objects.get(pk=r.request_id)
        assert request.status == S.SUCCEEDED
        actions = list(AuditEntry.objects.filter(request=request).order_by("pk").values_list("action", flat=True))
        assert actions.count(AuditAction.RUN_REQUEUED) == 1 and actions.count(AuditAction.RUN_STARTED) == 2
        assert actions.count(AuditAction.RUN_SUCCEEDED) == 1 and AuditAction.RUN_FAILED not in actions
    assert set(MigrationRun.objects.filter(pk__in=ids).values_list("worker", flat=True)) == {"w2"}
