"""The portal on the KVM lab: a storage move, a cancel mid-copy and a timeout, each requested,
approved and executed by the worker's service. After each, the guest's tick counter proves it kept
running, the hypervisor's placement (read with our own libvirt connections) is the one the portal
shows, and the request ends in the right status with a reason."""

from __future__ import annotations

import json
import threading
import time

import pytest
from django.db import connection

from migrations_app.choices import AuditAction, MigrationKind, RequestStatus
from migrations_app.models import AuditEntry, Datastore, HypervisorConnection, MigrationRun, VirtualMachine
from migrations_app.selectors import host_choices
from migrations_app.services import requests as svc
from migrations_app.services.inventory import inventory_sync
from migrations_app.services.runs import migration_run_execute
from tests import peers

S = RequestStatus
MiB = 1024**2
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.peer("libvirt"), pytest.mark.usefixtures("review_everything")]


@pytest.fixture
def kvm(request):
    from tests.drivers.peer_libvirt import lab_env

    lab = peers.start("libvirt", request.session.config)
    options = json.loads(lab_env()["LAB_KVM_DRIVER_OPTIONS"])

    def connect(**extra) -> HypervisorConnection:
        conn = HypervisorConnection.objects.create(name=f"kvm-{HypervisorConnection.objects.count()}",
                                                   kind="libvirt", is_lab=True, options={**options, **extra})
        inventory_sync(connection=conn)
        return conn

    return lab, connect


def portal_placement(vm: VirtualMachine) -> tuple[str, set[str]]:
    vm.refresh_from_db()
    return vm.host.ref, {d.datastore.ref for d in vm.disks.select_related("datastore")}


def approve(users, vm, **targets):
    kind = MigrationKind.STORAGE if "target_datastore" in targets and "target_host" not in targets else MigrationKind.COMPUTE
    mr = svc.migration_request_submit(requester=users["carol"], vm=vm, kind=kind, reason="kvm lab", **targets)
    svc.migration_request_approve(request=mr, actor=users["erin"])
    return MigrationRun.objects.get(request=mr)


def execute_in_background(run) -> threading.Thread:
    def work():
        try:
            migration_run_execute(run_id=run.pk, worker="test-worker")
        finally:
            connection.close()

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_a_live_storage_move_through_the_portal(kvm, users):
    lab, connect = kvm
    conn = connect()
    vm = VirtualMachine.objects.get(connection=conn, name="db-1")
    target = Datastore.objects.filter(connection=conn, hosts=vm.host, accessible=True).exclude(
        pk__in=vm.datastore_ids()).exclude(ref__startswith="pool/").first()
    ticks = lab.ticks(vm.ref)
    run = approve(users, vm, target_datastore=target)
    migration_run_execute(run_id=run.pk, worker="test-worker")
    run.refresh_from_db()
    assert run.request.status == S.SUCCEEDED, run.explanation
    truth = lab.independent_placement(vm.ref)
    assert set(truth.disk_datastores.values()) == {target.ref}
    assert portal_placement(vm) == (truth.host_ref, {target.ref})
    assert lab.ticks(vm.ref) > ticks and lab.guest_alive(vm.ref)


def test_cancel_mid_copy_through_the_portal_leaves_the_guest_on_its_source(kvm, users):
    lab, connect = kvm
    conn = connect(bandwidth_bytes_per_s=4 * MiB)  # slow enough to cancel mid-copy
    vm = next(v for v in VirtualMachine.objects.filter(connection=conn, power_state="on").order_by("name")
              if any(c.valid for c in host_choices(v)) and not any(t.startswith("lab:") for t in v.tags))
    before = portal_placement(vm)
    ticks = lab.ticks(vm.ref)
    run = approve(users, vm, target_host=next(c.obj for c in host_choices(vm) if c.valid))
    worker = execute_in_background(run)
    deadline = time.monotonic() + 30
    while MigrationRun.objects.get(pk=run.pk).percent <= 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert MigrationRun.objects.get(pk=run.pk).percent > 1, "the migration never made progress"
    svc.migration_request_cancel(request=run.request, actor=users["carol"], reason="wrong window")
    worker.join(60)
    assert not worker.is_alive()
    run.refresh_from_db()
    assert run.request.status == S.CANCELLED, run.explanation
    assert "cancelled" in run.explanation
    assert lab.independent_placement(vm.ref).host_ref == before[0] == portal_placement(vm)[0]
    assert lab.ticks(vm.ref) > ticks and lab.guest_alive(vm.ref)
    assert AuditEntry.objects.filter(request=run.request, action=AuditAction.RUN_CANCELLED).exists()


def test_a_guest_that_never_converges_hits_its_budget_and_stays(kvm, users, settings):
    lab, connect = kvm
    # A budget of a few seconds instead of 800 s per GiB: the guest dirties memory faster than 4 MiB/s.
    settings.PORTAL = {**settings.PORTAL, "TIMEOUT_MIN_S": 6.0, "TIMEOUT_S_PER_GIB": 1.0}
    conn = connect(bandwidth_bytes_per_s=4 * MiB)
    vm = VirtualMachine.objects.get(connection=conn, tags__icontains="lab:never-converge")
    source = portal_placement(vm)[0]
    ticks = lab.ticks(vm.ref)
    run = approve(users, vm, target_host=next(c.obj for c in host_choices(vm) if c.valid))
    started = time.monotonic()
    migration_run_execute(run_id=run.pk, worker="test-worker")
    run.refresh_from_db()
    assert run.request.status == S.FAILED, run.explanation
    assert "in time" in run.explanation and 5 < time.monotonic() - started < 60
    assert lab.independent_placement(vm.ref).host_ref == source == portal_placement(vm)[0]
    assert lab.ticks(vm.ref) > ticks and lab.guest_alive(vm.ref)


def test_a_live_migration_that_copies_host_local_disks_through_the_portal(kvm, users):
    lab, connect = kvm
    conn = connect()
    vm = VirtualMachine.objects.get(connection=conn, name="db-1")  # its disk is on its host's own pool
    choice = next(c for c in host_choices(vm) if c.valid)
    ticks = lab.ticks(vm.ref)
    run = approve(users, vm, target_host=choice.obj)
    migration_run_execute(run_id=run.pk, worker="test-worker")
    run.refresh_from_db()
    assert run.request.status == S.SUCCEEDED, run.explanation
    truth = lab.independent_placement(vm.ref)
    assert truth.host_ref == choice.obj.ref
    assert portal_placement(vm) == (truth.host_ref, set(truth.disk_datastores.values()))
    assert lab.ticks(vm.ref) > ticks and lab.guest_alive(vm.ref)
    assert run.downtime_ms is not None
