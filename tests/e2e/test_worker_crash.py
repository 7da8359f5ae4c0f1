"""kill -9 the worker in the middle of a migration: nothing is lost, nothing runs twice, and the
reconciler settles the run with what the hypervisor confirms."""

from __future__ import annotations

import os
import signal
import time

import pytest

from migrations_app.choices import AuditAction, Role
from migrations_app.models import AuditEntry, HypervisorConnection, MigrationRequest, MigrationRun, VirtualMachine
from migrations_app.services.inventory import driver_for, inventory_sync
from migrations_app.services.recovery import migration_run_reconcile_stale
from tests.conftest import make_user, other_host_same_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("review_everything")]


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def reconcile(**kwargs) -> dict:
    """Run the reconciler as beat would: in its own thread (this one holds Playwright's event loop)."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    def call():
        try:
            return migration_run_reconcile_stale(**kwargs)
        finally:
            connection.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result()


def test_killed_worker_mid_migration_is_settled_truthfully(api, live_portal, tmp_path, settings):
    from django.conf import global_settings

    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS
    conn = HypervisorConnection.objects.create(
        name="crash", kind="simulator",
        options={"speed": 1, "tick_s": 0.1, "vms": 12, "state_file": str(tmp_path / "sim.json")},
    )
    inventory_sync(connection=conn)
    for name, role in (("alice", Role.REQUESTER), ("bob", Role.APPROVER)):
        user = make_user(name, role, teams=("team-web",))
        user.set_password("pw-" + name)
        user.save()
    # The never-converging VM keeps pre-copying until something stops it.
    vm = VirtualMachine.objects.get(connection=conn, tags__icontains="sim:never-converge")
    vm.owner_group = user.groups.get(name="team-web")
    vm.save(update_fields=["owner_group"])
    source = vm.host

    created = api("alice", "pw-alice")("/api/requests/", {
        "vm_id": vm.pk, "target_host_id": other_host_same_cluster(vm).pk, "reason": "crash test"})
    api("bob", "pw-bob")(f"/api/requests/{created['id']}/approve/", {})
    run = wait_for(lambda: MigrationRun.objects.filter(request_id=created["id"], percent__gt=0).first(),
                   what="the run to make progress")
    assert MigrationRequest.objects.get(pk=created["id"]).status == "running"

    worker = live_portal["procs"]["worker"]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    time.sleep(0.6)  # older than the reconciler's threshold below

    counts = reconcile(stale_after_s=0.5)
    assert counts["failed"] == 1, counts
    request = MigrationRequest.objects.get(pk=created["id"])
    run.refresh_from_db()
    assert request.status == "failed" and "worker was lost" in run.explanation
    # The hypervisor confirms: the VM never left its source.
    assert driver_for(conn).placement(vm.ref).host_ref == source.ref
    assert VirtualMachine.objects.get(pk=vm.pk).host == source
    actions = list(AuditEntry.objects.filter(request=request).values_list("action", flat=True))
    assert actions.count(AuditAction.RUN_STARTED) == 1
    assert AuditAction.RUN_RECONCILED in actions and AuditAction.RUN_FAILED in actions
    # A second pass finds nothing left to settle.
    assert reconcile(stale_after_s=0.5)["failed"] == 0
