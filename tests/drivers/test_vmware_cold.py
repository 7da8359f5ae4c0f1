"""The vCenter driver's cold move against vcsim, in the cases the contract suite does not reach:
a guest shut down through VMware Tools or powered off (Tools not running, ShutdownGuest refused, the
guest still up at the bound), a relocation that fails after the power-off (the VM runs again on its
source, and the error says so), a power-on that fails too (the error says where the VM is left
powered off), an already-off VM that stays off, a cancel before the relocation, a cold move next to
a live one in one batch, and the cold pre-flight.

A vcsim of its own (lab/vcsim) gives each case its VM by name: Tools running on some VMs, a
powered-off VM, and VMs whose RelocateVM_Task, PowerOnVM_Task or ShutdownGuest vCenter refuses with
MethodDisabled, as it does for methods a backup tool has disabled. Every outcome is read back
through a second pyvmomi session, not through the driver."""

from __future__ import annotations

import ssl
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from drivers.base import (
    ConnectionConfig,
    InvalidState,
    MigrationCancelled,
    MigrationFailed,
    MigrationResult,
    MigrationSpec,
    Phase,
    ProgressUpdate,
)
from drivers.vmware import VCenterDriver
from drivers.vmware.tasks import wait_for_power_state
from tests.drivers.peer_vcenter import REPO, _vcsim
from tests.drivers.test_contract import assert_progress_well_formed

pytestmark = pytest.mark.peer("vcenter")

FLAGS = ["-dc", "1", "-cluster", "1", "-host", "3", "-standalone", "0", "-vm", "4", "-ds", "2",
         "-tools", "*_VM[03]",
         "-off", "DC0_C0_H2_VM2",
         "-disable", "DC0_C0_H1_VM1=RelocateVM_Task",
         "-disable", "DC0_C0_H1_VM2=RelocateVM_Task,PowerOnVM_Task",
         "-disable", "DC0_C0_H0_VM3=ShutdownGuest"]


@pytest.fixture(scope="module")
def lab():
    (REPO / "lab" / "run").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vcsim-cold-", dir=REPO / "lab" / "run") as run_dir:
        url = urlsplit(_vcsim("start", *FLAGS, run_dir=run_dir))
        try:
            ca = Path(run_dir, "cert.pem").read_text()
            driver = VCenterDriver(ConnectionConfig(
                kind="vcenter", url=f"https://{url.hostname}:{url.port}{url.path}", username=url.username or "",
                password=url.password or "", ca_bundle=ca))
            observer = SmartConnect(host=url.hostname, port=url.port, user=url.username, pwd=url.password,
                                    sslContext=ssl.create_default_context(cadata=ca))
            try:
                yield SimpleNamespace(driver=driver, si=observer, content=observer.RetrieveContent())
            finally:
                driver.close()
                Disconnect(observer)
        finally:
            _vcsim("stop", run_dir=run_dir)


def find(lab, kind, name: str):
    view = lab.content.viewManager.CreateContainerView(lab.content.rootFolder, [kind], True)
    try:
        return next(obj for obj in view.view if obj.name == name)
    finally:
        view.Destroy()


def other_host(lab, vm):
    return next(h for h in vm.runtime.host.parent.host if h != vm.runtime.host)


def other_datastore(lab, vm):
    return next(ds for ds in vm.runtime.host.datastore if ds not in vm.datastore)


def disk_stores(vm) -> set[str]:
    return {d.backing.datastore.name for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)}


def events_of(lab, vm) -> list[str]:
    """The names of the events vCenter posted about the VM, oldest first."""
    spec = vim.event.EventFilterSpec(entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self"))
    return [type(e).__name__.rsplit(".", 1)[-1] for e in sorted(lab.content.eventManager.QueryEvents(spec),
                                                                 key=lambda e: e.key)]


def task_ids(lab) -> set[str]:
    """The tasks vCenter lists now (its recent tasks): what a test compares against afterwards."""
    return {t._moId for t in lab.content.taskManager.recentTask}


def power_tasks_since(lab, vm, before: set[str]) -> list[str]:
    """The power and relocation tasks vCenter ran on the VM since ``before`` (``task_ids``), as
    descriptionIds, oldest first."""
    tasks = [t for t in lab.content.taskManager.recentTask if t._moId not in before and t.info.entity == vm
             and t.info.descriptionId.split(".")[-1] in ("powerOn", "powerOff", "relocateVm")]
    return [t.info.descriptionId for t in sorted(tasks, key=lambda t: (t.info.queueTime, int(t._moId.split("-")[1])))]


def cold_move(lab, spec: MigrationSpec, cancel: threading.Event | None = None,
              on_update=None) -> tuple[MigrationResult | Exception, list[ProgressUpdate]]:
    updates: list[ProgressUpdate] = []

    def record(update: ProgressUpdate) -> None:
        updates.append(update)
        if on_update is not None:
            on_update(update)

    try:
        result = lab.driver.cold_move(spec, on_progress=record, cancel=cancel or threading.Event())
    except Exception as exc:  # noqa: BLE001 - the test asserts on it
        return exc, updates
    return result, updates


def test_a_guest_with_tools_is_shut_down_and_one_without_is_powered_off_and_both_run_again_at_the_target(lab):
    for name, expected in (("DC0_C0_H0_VM0", "VmGuestShutdownEvent"), ("DC0_C0_H0_VM1", "VmPoweredOffEvent")):
        vm = find(lab, vim.VirtualMachine, name)
        target, store = other_host(lab, vm), other_datastore(lab, vm)
        before = len(events_of(lab, vm))
        result, updates = cold_move(lab, MigrationSpec(vm._moId, target_host_ref=target._moId,
                                                       target_datastore_ref=store._moId))
        assert isinstance(result, MigrationResult), result
        assert (vm.runtime.host, disk_stores(vm), vm.runtime.powerState) == (target, {store.name}, "poweredOn")
        went_down = [e for e in events_of(lab, vm)[before:] if e in ("VmGuestShutdownEvent", "VmPoweredOffEvent")]
        assert went_down[0] == expected, went_down  # vcsim posts a VmPoweredOffEvent after a guest shutdown too
        assert_progress_well_formed(updates)
        assert [u.phase for u in updates if u.task_id] == [Phase.DISK_COPY, Phase.SWITCHOVER, Phase.DONE]
        assert {u.task_id for u in updates if u.task_id} == {result.task_id}
        assert result.downtime_ms is not None and result.downtime_ms > 0


def test_a_guest_that_cannot_be_asked_to_shut_down_is_powered_off(lab):
    vm = find(lab, vim.VirtualMachine, "DC0_C0_H0_VM3")  # Tools run, but vCenter refuses ShutdownGuest
    assert vm.guest.toolsRunningStatus == "guestToolsRunning"
    target = other_host(lab, vm)
    before, shown = task_ids(lab), len(events_of(lab, vm))
    result, updates = cold_move(lab, MigrationSpec(vm._moId, target_host_ref=target._moId))
    assert isinstance(result, MigrationResult), result
    assert (vm.runtime.host, vm.runtime.powerState) == (target, "poweredOn")
    assert power_tasks_since(lab, vm, before) == [
        "VirtualMachine.powerOff", "VirtualMachine.relocateVm", "VirtualMachine.powerOn"]
    assert "VmGuestShutdownEvent" not in events_of(lab, vm)[shown:]
    assert any("could not ask its guest to shut down" in u.message and "ShutdownGuest" in u.message
               for u in updates), [u.message for u in updates]


def test_a_guest_still_up_at_the_bound_is_powered_off_and_a_vm_off_by_then_is_fine(lab, monkeypatch):
    """vcsim's guests shut down within ShutdownGuest; here the wait for it is told the VM is still
    on when its bound passes, as with a guest that ignores the request. The driver then powers the
    VM off; vcsim refuses (InvalidPowerState: it is off by now, as a guest that finished shutting
    down just after the bound would be), and the driver, seeing the VM off, goes on."""
    from drivers.vmware import cold

    real = cold.wait_for_power_state
    bounds: list[float] = []

    def guest_ignores_the_request(session, vm, wanted, *, task_wait_s, bound_s):
        if bound_s == 0:  # the driver's own look at the power state
            return real(session, vm, wanted, task_wait_s=task_wait_s, bound_s=bound_s)
        bounds.append(bound_s)
        return "poweredOn"

    monkeypatch.setattr(cold, "wait_for_power_state", guest_ignores_the_request)
    vm = find(lab, vim.VirtualMachine, "DC0_C0_H1_VM3")
    target = other_host(lab, vm)
    before = task_ids(lab)
    result, updates = cold_move(lab, MigrationSpec(vm._moId, target_host_ref=target._moId))
    assert isinstance(result, MigrationResult), result
    assert bounds == [lab.driver.guest_shutdown_s]
    assert any(f"did not shut down within {lab.driver.guest_shutdown_s:g} s" in u.message for u in updates)
    assert (vm.runtime.host, vm.runtime.powerState) == (target, "poweredOn")
    powered_off = [t for t in lab.content.taskManager.recentTask if t._moId not in before and t.info.entity == vm
                   and t.info.descriptionId == "VirtualMachine.powerOff"]
    assert [t.info.state for t in powered_off] == ["error"]  # asked after the bound; the VM was off already


def test_a_failed_relocation_after_the_power_off_powers_the_vm_on_again_on_its_source(lab):
    vm = find(lab, vim.VirtualMachine, "DC0_C0_H1_VM1")  # vCenter refuses its RelocateVM_Task
    source, stores = vm.runtime.host, disk_stores(vm)
    before = task_ids(lab)
    error, _ = cold_move(lab, MigrationSpec(vm._moId, target_host_ref=other_host(lab, vm)._moId))
    assert isinstance(error, MigrationFailed), error
    assert (vm.runtime.host, disk_stores(vm), vm.runtime.powerState) == (source, stores, "poweredOn")
    assert power_tasks_since(lab, vm, before) == ["VirtualMachine.powerOff", "VirtualMachine.powerOn"]
    said = error.explanation()
    assert "method is disabled: RelocateVM_Task" in said, said  # vCenter's own words
    assert "was powered off for" in said and f"runs again on its source host {source.name}" in said, said


def test_a_connection_lost_while_powering_off_powers_the_vm_on_again_or_says_it_keeps_running(lab, monkeypatch):
    # The shutdown or power-off may have been sent when the answer is lost: the VM's owner learns
    # where it is, and a VM that went down runs again on its source.
    from drivers.vmware.cold import ColdMoves

    real_power_off = ColdMoves._power_off
    went_down = find(lab, vim.VirtualMachine, "DC0_C0_H1_VM0")
    stayed_up = find(lab, vim.VirtualMachine, "DC0_C0_H2_VM3")

    def lost_after(self, facts, progress, source):
        if facts.vm.ref == went_down._moId:
            real_power_off(self, facts, progress, source)
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(ColdMoves, "_power_off", lost_after)
    for vm, expected in ((went_down, "runs again on its source host"), (stayed_up, "keeps running on its source host")):
        source, before = vm.runtime.host, task_ids(lab)
        error, _ = cold_move(lab, MigrationSpec(vm._moId, target_host_ref=other_host(lab, vm)._moId))
        assert not isinstance(error, MigrationResult), error
        said = error.explanation()
        assert f"{expected} {source.name}" in said, said
        assert (vm.runtime.host, vm.runtime.powerState) == (source, "poweredOn")
        assert "VirtualMachine.relocateVm" not in power_tasks_since(lab, vm, before)


def test_when_the_power_on_fails_too_the_error_says_where_the_vm_is_left_powered_off(lab):
    vm = find(lab, vim.VirtualMachine, "DC0_C0_H1_VM2")  # vCenter refuses RelocateVM_Task and PowerOnVM_Task
    source = vm.runtime.host
    error, _ = cold_move(lab, MigrationSpec(vm._moId, target_host_ref=other_host(lab, vm)._moId))
    assert isinstance(error, MigrationFailed), error
    assert (vm.runtime.host, vm.runtime.powerState) == (source, "poweredOff")
    said = error.explanation()
    assert "powering it on again failed" in said and "PowerOnVM_Task" in said, said
    assert f"is left powered off on its source host {source.name}" in said, said


def test_an_already_off_vm_moves_without_a_power_operation_and_stays_off(lab):
    vm = find(lab, vim.VirtualMachine, "DC0_C0_H2_VM2")
    assert vm.runtime.powerState == "poweredOff"
    target, store = other_host(lab, vm), other_datastore(lab, vm)
    spec = MigrationSpec(vm._moId, target_host_ref=target._moId, target_datastore_ref=store._moId)
    # The live checks refuse it; the cold ones pass.
    live, cold = lab.driver.preflight_many([spec, spec], cold=frozenset({1}))
    assert [c.name for c in live if not c.ok] == ["vm-powered-on"] and all(c.ok for c in cold), (live, cold)
    before = task_ids(lab)
    result, updates = cold_move(lab, spec)
    assert isinstance(result, MigrationResult), result
    assert (vm.runtime.host, disk_stores(vm), vm.runtime.powerState) == (target, {store.name}, "poweredOff")
    assert power_tasks_since(lab, vm, before) == ["VirtualMachine.relocateVm"]
    assert result.downtime_ms is None and "stays poweredOff" in result.message
    assert_progress_well_formed(updates)
    assert Phase.SWITCHOVER not in {u.phase for u in updates}


def test_a_cancel_before_the_relocation_powers_the_vm_on_again_and_moves_nothing(lab):
    vm = find(lab, vim.VirtualMachine, "DC0_C0_H2_VM1")
    source, stores = vm.runtime.host, disk_stores(vm)
    cancel = threading.Event()
    since, before = time.time() - 1, task_ids(lab)

    def cancel_once_off(update: ProgressUpdate) -> None:
        if "powered off" in update.message:  # the VM is down; the relocation has not started
            cancel.set()

    error, updates = cold_move(lab, MigrationSpec(vm._moId, target_host_ref=other_host(lab, vm)._moId,
                                                  target_datastore_ref=other_datastore(lab, vm)._moId),
                               cancel=cancel, on_update=cancel_once_off)
    assert cancel.is_set() and isinstance(error, MigrationCancelled), error
    assert (vm.runtime.host, disk_stores(vm), vm.runtime.powerState) == (source, stores, "poweredOn")
    assert power_tasks_since(lab, vm, before) == ["VirtualMachine.powerOff", "VirtualMachine.powerOn"]
    assert not lab.driver.migration_tasks(vm._moId, since=since)
    said = error.explanation()
    assert "cancelled before it moved" in said and f"runs again on its source host {source.name}" in said, said
    assert not any(u.task_id for u in updates)


def test_a_batch_runs_its_cold_move_cold_and_its_live_move_live(lab):
    live_vm, cold_vm = find(lab, vim.VirtualMachine, "DC0_C0_H2_VM0"), find(lab, vim.VirtualMachine, "DC0_C0_H0_VM2")
    specs = [MigrationSpec(live_vm._moId, target_host_ref=other_host(lab, live_vm)._moId),
             MigrationSpec(cold_vm._moId, target_host_ref=other_host(lab, cold_vm)._moId)]
    targets = [other_host(lab, live_vm), other_host(lab, cold_vm)]
    before = task_ids(lab)
    updates: list[list[ProgressUpdate]] = [[], []]
    results = lab.driver.migrate_many(specs, on_progress=lambda i, u: updates[i].append(u),
                                      cancels=[threading.Event(), threading.Event()], cold=frozenset({1}))
    assert all(isinstance(r, MigrationResult) for r in results), results
    assert [live_vm.runtime.host, cold_vm.runtime.host] == targets
    assert live_vm.runtime.powerState == cold_vm.runtime.powerState == "poweredOn"
    assert power_tasks_since(lab, live_vm, before) == ["VirtualMachine.relocateVm"]
    assert power_tasks_since(lab, cold_vm, before) == [
        "VirtualMachine.powerOff", "VirtualMachine.relocateVm", "VirtualMachine.powerOn"]
    for each in updates:
        assert_progress_well_formed(each)


def test_a_cold_move_is_judged_before_anything_is_powered_off(lab):
    vm = find(lab, vim.VirtualMachine, "DC0_C0_H0_VM1")
    before = task_ids(lab)
    with pytest.raises(InvalidState, match="already runs on"):
        lab.driver.cold_move(MigrationSpec(vm._moId, target_host_ref=vm.runtime.host._moId),
                             on_progress=lambda u: None, cancel=threading.Event())
    assert vm.runtime.powerState == "poweredOn" and not power_tasks_since(lab, vm, before)


# -- waiting for a guest to shut down (no vcsim: its ShutdownGuest powers off at once) ----------


class PowerCollector:
    """Answers WaitForUpdatesEx with the VM's power state: ``states`` in turn, then nothing new."""

    def __init__(self, states: list[str]):
        self.states = list(states)
        self.waits = 0

    def CreateFilter(self, spec, partialUpdates):  # noqa: N802 - pyvmomi's names
        return SimpleNamespace(DestroyPropertyFilter=lambda: None)

    def WaitForUpdatesEx(self, version, options):  # noqa: N802
        self.waits += 1
        if not self.states:
            time.sleep(min(options.maxWaitSeconds, 0.05))  # a wait that ran out (shortened for the test)
            return None
        change = SimpleNamespace(name="runtime.powerState", val=self.states.pop(0))
        return SimpleNamespace(version=str(self.waits), filterSet=[
            SimpleNamespace(objectSet=[SimpleNamespace(changeSet=[change])])])


def session_with(collector: PowerCollector):
    import queue

    idle: queue.Queue = queue.Queue()
    idle.put(collector)
    return SimpleNamespace(idle_collectors=idle)


def test_the_wait_for_a_guest_shutdown_ends_when_the_vm_is_off():
    collector = PowerCollector(["poweredOn", "poweredOn", "poweredOff"])
    assert wait_for_power_state(session_with(collector), vim.VirtualMachine("vm-1", None), "poweredOff", task_wait_s=1, bound_s=60) == "poweredOff"
    assert collector.waits == 3


def test_the_wait_for_a_guest_shutdown_gives_up_at_its_bound_with_the_state_it_last_saw():
    collector = PowerCollector(["poweredOn"])
    started = time.monotonic()
    assert wait_for_power_state(session_with(collector), vim.VirtualMachine("vm-1", None), "poweredOff", task_wait_s=1, bound_s=0.3) == "poweredOn"
    assert 0.3 <= time.monotonic() - started < 2 and collector.waits > 1
