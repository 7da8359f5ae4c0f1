"""Crash recovery: runs whose worker went silent are settled with what the hypervisor says."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.utils import timezone

from drivers.base import MigrationSpec
from migrations_app.choices import AuditAction, RequestStatus
from migrations_app.models import AuditEntry, MigrationRequest, MigrationRun
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
