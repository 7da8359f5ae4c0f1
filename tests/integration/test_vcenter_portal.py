"""The portal against vcsim: a vCenter connection added the admin's way, synced, a request submitted,
approved and executed by the worker's service, the result read back independently with pyvmomi;
and the bad cases (wrong credentials, unreachable URL, VM deleted after sync, datastore removed)
end with a clear reason on the request and in the audit log, nothing stuck."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from drivers import base as drv
from drivers import registry
from migrations_app.choices import AuditAction, MigrationKind, RequestStatus
from migrations_app.models import AuditEntry, Datastore, HypervisorConnection, MigrationRequest, VirtualMachine
from migrations_app.services import requests as svc
from migrations_app.services.inventory import inventory_sync
from migrations_app.services.runs import migration_run_execute
from tests.conftest import other_host_same_cluster
from tests.drivers.peer_vcenter import REPO, _vcsim

S = RequestStatus
pytestmark = [pytest.mark.django_db, pytest.mark.peer("vcenter"), pytest.mark.usefixtures("review_everything")]


@pytest.fixture(scope="module")
def vcsim():
    (REPO / "lab" / "run").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vcsim-portal-", dir=REPO / "lab" / "run") as run_dir:
        url = urlsplit(_vcsim("start", "-dc", "1", "-cluster", "1", "-host", "3", "-standalone", "0", "-vm", "2",
                              "-ds", "3", run_dir=run_dir))
        ca = Path(run_dir, "cert.pem").read_text()
        observer = SmartConnect(host=url.hostname, port=url.port, user=url.username, pwd=url.password,
                                sslContext=ssl.create_default_context(cadata=ca))
        try:
            yield {"url": f"https://{url.hostname}:{url.port}{url.path}", "user": url.username,
                   "password": url.password, "ca": ca, "si": observer, "port": url.port}
        finally:
            Disconnect(observer)
            registry.close_all()
            _vcsim("stop", run_dir=run_dir)


def add_connection(vcsim, *, password=None, url=None) -> HypervisorConnection:
    conn = HypervisorConnection(name=f"vc-{HypervisorConnection.objects.count()}", kind="vcenter",
                                url=url or vcsim["url"], username=vcsim["user"], ca_bundle=vcsim["ca"])
    conn.set_password(password if password is not None else vcsim["password"])
    conn.save()
    return conn


def observed(vcsim, vm: VirtualMachine) -> tuple[str, set[str]]:
    """Host name and datastore names of a VM, read by our own pyvmomi session."""
    obj = vim.VirtualMachine(vm.ref, vcsim["si"]._stub)
    stores = {dev.backing.datastore.name for dev in obj.config.hardware.device if isinstance(dev, vim.vm.device.VirtualDisk)}
    return obj.runtime.host.name, stores


def run_request(users, vm, **targets) -> MigrationRequest:
    kind = MigrationKind.BOTH if len(targets) == 2 else (
        MigrationKind.COMPUTE if "target_host" in targets else MigrationKind.STORAGE)
    mr = svc.migration_request_submit(requester=users["carol"], vm=vm, kind=kind, reason="vcsim", **targets)
    svc.migration_request_approve(request=mr, actor=users["erin"])
    migration_run_execute(run_id=mr.run.pk, worker="test-worker")
    mr.refresh_from_db()
    return mr


def test_compute_storage_and_both_through_the_portal_match_vcenter(vcsim, users):
    conn = add_connection(vcsim)
    counts = inventory_sync(connection=conn)
    assert counts["vms"] == 6 and counts["hosts"] == 3
    vms = list(VirtualMachine.objects.filter(connection=conn, power_state="on").order_by("name"))

    vm = vms[0]
    target = other_host_same_cluster(vm)
    mr = run_request(users, vm, target_host=target)
    assert mr.status == S.SUCCEEDED, mr.run.explanation
    assert observed(vcsim, vm)[0] == target.name == VirtualMachine.objects.get(pk=vm.pk).host.name

    vm = vms[1]
    store = Datastore.objects.filter(connection=conn, hosts=vm.host).exclude(pk__in=vm.datastore_ids()).first()
    mr = run_request(users, vm, target_datastore=store)
    assert mr.status == S.SUCCEEDED, mr.run.explanation
    assert observed(vcsim, vm)[1] == {store.name}
    assert VirtualMachine.objects.get(pk=vm.pk).datastore_ids() == {store.pk}

    vm = vms[2]
    target = other_host_same_cluster(vm)
    store = Datastore.objects.filter(connection=conn, hosts=target).exclude(pk__in=vm.datastore_ids()).first()
    mr = run_request(users, vm, target_host=target, target_datastore=store)
    assert mr.status == S.SUCCEEDED, mr.run.explanation
    assert observed(vcsim, vm) == (target.name, {store.name})
    assert mr.run.task_id.startswith("task-")
    done = AuditEntry.objects.get(request=mr, action=AuditAction.RUN_SUCCEEDED)
    assert done.after["host"] == target.name and done.task_id == mr.run.task_id

    # A second sync agrees with what the portal recorded.
    inventory_sync(connection=conn)
    assert VirtualMachine.objects.get(pk=vm.pk).host == target


def test_wrong_credentials_and_unreachable_url_are_clear_and_audited(vcsim, users):
    bad = add_connection(vcsim, password="wrong-password")
    with pytest.raises(drv.AuthenticationFailed):
        inventory_sync(connection=bad)
    bad.refresh_from_db()
    assert "user name or password" in bad.last_sync_error and "wrong-password" not in bad.last_sync_error
    assert AuditEntry.objects.filter(action=AuditAction.INVENTORY_SYNC_FAILED, object_id=str(bad.pk)).exists()

    gone = add_connection(vcsim, url="https://127.0.0.1:9/sdk")
    with pytest.raises(drv.ConnectionFailed):
        inventory_sync(connection=gone)
    gone.refresh_from_db()
    assert gone.last_sync_error


def test_vm_deleted_after_sync_fails_the_run_with_a_reason(vcsim, users):
    conn = add_connection(vcsim)
    inventory_sync(connection=conn)
    vm = VirtualMachine.objects.filter(connection=conn, power_state="on").order_by("-name").first()
    target = other_host_same_cluster(vm)
    obj = vim.VirtualMachine(vm.ref, vcsim["si"]._stub)
    WaitForTask(obj.PowerOffVM_Task())
    WaitForTask(obj.Destroy_Task())
    mr = run_request(users, vm, target_host=target)
    assert mr.status == S.FAILED
    assert "does not exist in vCenter" in mr.run.explanation
    assert AuditEntry.objects.filter(request=mr, action=AuditAction.RUN_FAILED).exists()
    # The next sync marks it gone; it can no longer be requested.
    assert inventory_sync(connection=conn)["vms_gone"] >= 1
    assert not VirtualMachine.objects.get(pk=vm.pk).present


def test_target_datastore_removed_after_sync_fails_the_run_with_a_reason(vcsim, users):
    conn = add_connection(vcsim)
    inventory_sync(connection=conn)
    vm = VirtualMachine.objects.filter(connection=conn, power_state="on").order_by("name").first()
    store = Datastore.objects.filter(connection=conn, hosts=vm.host).exclude(pk__in=vm.datastore_ids()).first()
    # The datastore disappears from vCenter after the portal's sync.
    Datastore.objects.filter(pk=store.pk).update(ref="datastore-that-was-removed")
    mr = run_request(users, vm, target_datastore=Datastore.objects.get(pk=store.pk))
    assert mr.status == S.FAILED and mr.run.explanation
    assert mr.run.finished_at is not None
