"""Evacuating a vCenter host (vcsim) whose VMs cannot move live: one runs on a datastore only its
host sees, one is powered off. The admin chooses the cold-move fallback for both, the approver
approves the plan in the browser, the portal's Celery worker runs the moves, and vCenter itself
(read through a separate pyvmomi session) shows each VM on its target with its power state as it
was: the running one shut down through VMware Tools, moved with its disks and powered on again,
the powered-off one moved and still off."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from migrations_app.choices import PlanItemStatus, PlanKind, PlanStatus, RequestStatus, Role
from migrations_app.models import Host, HypervisorConnection, MovePlan, RunEvent, VirtualMachine
from migrations_app.services import plans as svc
from migrations_app.services.inventory import inventory_sync
from tests.conftest import make_user
from tests.drivers.peer_vcenter import REPO, _vcsim
from tests.e2e.test_evacuation import in_thread

pytestmark = [pytest.mark.e2e, pytest.mark.peer("vcenter"), pytest.mark.usefixtures("review_everything")]


def find(content, kind, name: str):
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return next(obj for obj in view.view if obj.name == name)
    finally:
        view.Destroy()


def disk_stores(vm) -> set[str]:
    return {d.backing.datastore.name for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)}


def events_of(content, vm) -> list[str]:
    spec = vim.event.EventFilterSpec(entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self"))
    return [type(e).__name__.rsplit(".", 1)[-1] for e in content.eventManager.QueryEvents(spec)]


def test_a_cold_move_plan_on_vcenter_runs_through_the_worker_and_restores_each_power_state(
        live_portal, login, settings):
    from django.conf import global_settings
    from django.db import connection

    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS  # the portal's processes verify for real
    (REPO / "lab" / "run").mkdir(parents=True, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="vcsim-cold-plan-", dir=REPO / "lab" / "run")
    url = urlsplit(_vcsim("start", "-cluster", "1", "-host", "3", "-standalone", "0", "-vm", "2", "-ds", "2",
                          "-tools", "*_VM0", "-off", "DC0_C0_H0_VM1", run_dir=run_dir))
    ca = Path(run_dir, "cert.pem").read_text()
    si = SmartConnect(host=url.hostname, port=url.port, user=url.username, pwd=url.password,
                      sslContext=ssl.create_default_context(cadata=ca))
    try:
        content = si.RetrieveContent()
        run_cold_plan(content, url, ca, Path(run_dir), login, live_portal)
    finally:
        connection.close()  # Playwright's loop holds this thread: close the ORM's connection here
        Disconnect(si)
        _vcsim("stop", run_dir=run_dir)


def run_cold_plan(content, url, ca: str, run_dir: Path, login, live_portal) -> None:
    # vCenter's side: a datastore only DC0_C0_H0 mounts, and the running VM's disk moved onto it
    # (a Storage vMotion): no other host sees it, so it cannot move live.
    source = find(content, vim.HostSystem, "DC0_C0_H0")
    (run_dir / "local-h0").mkdir()
    local = source.configManager.datastoreSystem.CreateLocalDatastore(name="LocalOnly_H0",
                                                                      path=str(run_dir / "local-h0"))
    running, off = find(content, vim.VirtualMachine, "DC0_C0_H0_VM0"), find(content, vim.VirtualMachine,
                                                                             "DC0_C0_H0_VM1")
    disks = [d for d in running.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    WaitForTask(running.RelocateVM_Task(spec=vim.vm.RelocateSpec(datastore=local, disk=[
        vim.vm.RelocateSpec.DiskLocator(diskId=d.key, datastore=local) for d in disks])))
    assert [h.key for h in local.host] == [source] and disk_stores(running) == {"LocalOnly_H0"}
    assert (running.runtime.powerState, off.runtime.powerState) == ("poweredOn", "poweredOff")
    assert running.guest.toolsRunningStatus == "guestToolsRunning"

    # The portal's side: the connection, its inventory, the users.
    conn = HypervisorConnection(name="vc-cold", kind="vcenter", url=f"https://{url.hostname}:{url.port}{url.path}",
                                username=url.username, ca_bundle=ca)
    conn.set_password(url.password)
    conn.save()
    inventory_sync(connection=conn)
    carol, erin = make_user("carol", Role.ADMIN), make_user("erin", Role.APPROVER)
    for user in (carol, erin):
        user.set_password("pw-" + user.username)
        user.save()

    # The admin's plan: both VMs flagged, each with a cold target the planner found; the admin
    # chooses the cold move for both and submits.
    src = Host.objects.get(connection=conn, name="DC0_C0_H0")
    plan = in_thread(lambda: svc.move_plan_build(requester=carol, kind=PlanKind.EVACUATE_HOST, host=src,
                                                 reason="firmware upgrade"))
    items = {i.vm.name: i for i in plan.items.select_related("vm", "target_host", "target_datastore")}
    assert set(items) == {"DC0_C0_H0_VM0", "DC0_C0_H0_VM1"} and not any(i.movable for i in items.values())
    assert "does not see its datastore" in items["DC0_C0_H0_VM0"].blocker, items["DC0_C0_H0_VM0"].blocker
    assert items["DC0_C0_H0_VM1"].blocker.startswith("powered off"), items["DC0_C0_H0_VM1"].blocker
    assert items["DC0_C0_H0_VM0"].kind == "both" and items["DC0_C0_H0_VM1"].kind == "compute"
    for item in items.values():
        in_thread(lambda item=item: svc.move_plan_set_fallback(plan=plan, actor=carol, item=item,
                                                               fallback="cold_move"))
    in_thread(lambda: svc.move_plan_submit(plan=plan, actor=carol))

    # The approver approves in the browser; the worker runs both moves.
    page = login("erin", "pw-erin")
    page.goto(f"{live_portal['url']}/plans/{plan.pk}/")
    page.wait_for_selector("#live-state.on")
    page.click("#plan-approve")
    page.wait_for_selector(", ".join(f"#plan-status[data-status={s}]" for s in ("done", "partially_done", "failed")),
                           timeout=60_000)

    plan = MovePlan.objects.get(pk=plan.pk)
    explanations = [(i.vm.name, i.request.run.explanation) for i in plan.items.select_related("vm", "request__run")]
    assert plan.status == PlanStatus.DONE, (plan.summary, explanations)
    assert plan.summary == "2 moved, 0 skipped, 0 not moved.", plan.summary
    for item in plan.items.select_related("vm", "request__run", "target_host", "target_datastore"):
        run = item.request.run
        assert item.status == PlanItemStatus.SUCCEEDED and item.request.cold, item
        assert item.request.status == RequestStatus.SUCCEEDED, run.explanation
        assert VirtualMachine.objects.get(pk=item.vm_id).host_id == item.target_host_id
        vm = find(content, vim.VirtualMachine, item.vm.name)
        assert vm.runtime.host.name == item.target_host.name  # vCenter's word, not the portal's
        if item.target_datastore is not None:
            assert disk_stores(vm) == {item.target_datastore.name}
        # The run recorded the relocation's vCenter task, the one vCenter lists for the VM.
        assert run.task_id in {t.info.key for t in content.taskManager.recentTask
                               if t.info.entity == vm and t.info.descriptionId == "VirtualMachine.relocateVm"}
        phases = list(RunEvent.objects.filter(run=run).order_by("seq").values_list("phase", flat=True))
        assert phases[-1] == "done" and "disk_copy" in phases, phases

    # Each power state as it was: the running VM's guest was shut down through Tools, and it runs
    # again at its target; the powered-off VM moved without being powered on.
    running, off = find(content, vim.VirtualMachine, "DC0_C0_H0_VM0"), find(content, vim.VirtualMachine,
                                                                             "DC0_C0_H0_VM1")
    assert (running.runtime.powerState, off.runtime.powerState) == ("poweredOn", "poweredOff")
    assert "VmGuestShutdownEvent" in events_of(content, running)
    assert "VmPoweredOnEvent" not in events_of(content, off)  # the lab created it off; nothing powered it on
    cold_running = plan.items.select_related("request__run").get(vm__name="DC0_C0_H0_VM0").request.run
    assert RunEvent.objects.filter(run=cold_running, phase="switchover", message__contains="powering").exists()
