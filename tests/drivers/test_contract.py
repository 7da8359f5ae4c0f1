"""The driver contract: every driver (simulator, vCenter via vcsim, libvirt via the KVM lab) passes
these same tests against a real peer. See conftest.py for how peers are chosen and started."""

from __future__ import annotations

import threading
import time

import pytest

from drivers.base import (
    PHASE_ORDER,
    Capability,
    DriverError,
    InvalidState,
    MigrationCancelled,
    MigrationResult,
    MigrationSpec,
    NotFound,
    Phase,
    ProgressUpdate,
    TaskState,
)
from tests.drivers.harness import required


def assert_progress_well_formed(updates: list[ProgressUpdate]) -> None:
    assert updates, "the driver reported no progress at all"
    percents = [u.percent for u in updates]
    assert all(0.0 <= p <= 100.0 for p in percents), percents
    assert percents == sorted(percents), f"percent went backwards: {percents}"
    phases = [PHASE_ORDER.index(u.phase) for u in updates]
    assert phases == sorted(phases), f"phases out of order: {[u.phase for u in updates]}"
    assert updates[-1].phase == Phase.DONE and updates[-1].percent == 100.0
    assert all(u.percent < 100.0 for u in updates[:-1]), "100 % reported before the end"


def test_inventory_is_self_consistent(harness):
    inv = harness.driver.inventory()
    clusters = {c.ref for c in inv.clusters}
    hosts = {h.ref for h in inv.hosts}
    stores = {d.ref for d in inv.datastores}
    assert inv.hosts and inv.datastores and inv.vms
    assert all(h.cluster_ref in clusters for h in inv.hosts)
    assert all(c.datacenter_ref in {d.ref for d in inv.datacenters} for c in inv.clusters)
    for ds in inv.datastores:
        assert 0 <= ds.free_bytes <= ds.capacity_bytes, ds
        assert set(ds.host_refs) <= hosts, ds
    for vm in inv.vms:
        assert vm.host_ref in hosts, vm
        assert vm.memory_bytes > 0 and vm.vcpus > 0, vm
        assert vm.disks and all(d.datastore_ref in stores and d.capacity_bytes > 0 for d in vm.disks), vm
    assert len({vm.ref for vm in inv.vms}) == len(inv.vms), "VM refs are not unique"


def test_placement_matches_inventory(harness):
    inv = harness.driver.inventory()
    vm = inv.vms[0]
    placement = harness.driver.placement(vm.ref)
    assert placement.host_ref == vm.host_ref
    assert dict(placement.disk_datastores) == {d.key: d.datastore_ref for d in vm.disks}


def test_placement_of_unknown_vm_raises_not_found(harness):
    with pytest.raises(NotFound):
        harness.driver.placement("no-such-vm-ref")


@required(Capability.COMPUTE_MIGRATION)
def test_compute_migration_moves_the_vm_and_reports_progress(harness):
    spec = harness.compute_spec()
    before = harness.independent_placement(spec.vm_ref)
    result, updates = harness.migrate(spec)
    after = harness.independent_placement(spec.vm_ref)
    assert after.host_ref == spec.target_host_ref != before.host_ref
    assert dict(after.disk_datastores) == dict(before.disk_datastores)
    assert result.placement.host_ref == spec.target_host_ref
    assert_progress_well_formed(updates)
    assert harness.guest_alive(spec.vm_ref)


@required(Capability.STORAGE_MIGRATION)
def test_storage_migration_moves_every_disk(harness):
    spec = harness.storage_spec()
    before = harness.independent_placement(spec.vm_ref)
    result, updates = harness.migrate(spec)
    after = harness.independent_placement(spec.vm_ref)
    assert after.host_ref == before.host_ref
    assert set(after.disk_datastores.values()) == {spec.target_datastore_ref}
    assert dict(result.placement.disk_datastores) == dict(after.disk_datastores)
    assert_progress_well_formed(updates)
    assert harness.guest_alive(spec.vm_ref)


@required(Capability.COMBINED_MIGRATION)
def test_combined_migration_moves_host_and_disks(harness):
    spec = harness.both_spec()
    _, updates = harness.migrate(spec)
    after = harness.independent_placement(spec.vm_ref)
    assert after.host_ref == spec.target_host_ref
    assert set(after.disk_datastores.values()) == {spec.target_datastore_ref}
    assert_progress_well_formed(updates)


@required(Capability.COMPUTE_MIGRATION)
def test_a_batch_moves_each_vm_and_reports_each_move_by_its_index(harness):
    specs = harness.compute_specs(2)
    before = [harness.independent_placement(spec.vm_ref) for spec in specs]
    results, updates = harness.migrate_many(specs)
    assert len(results) == 2
    for spec, was, result, reported in zip(specs, before, results, updates, strict=True):
        assert isinstance(result, MigrationResult), result
        after = harness.independent_placement(spec.vm_ref)
        assert after.host_ref == result.placement.host_ref == spec.target_host_ref != was.host_ref
        assert dict(after.disk_datastores) == dict(was.disk_datastores)
        assert_progress_well_formed(reported)
        assert {u.task_id for u in reported if u.task_id} <= {result.task_id}
        assert harness.guest_alive(spec.vm_ref)


@required(Capability.COMPUTE_MIGRATION)
def test_a_bad_move_in_a_batch_fails_alone(harness):
    good = harness.compute_spec()
    here = harness.independent_placement(good.vm_ref).host_ref
    specs = [MigrationSpec("no-such-vm-ref", target_host_ref=good.target_host_ref), good,
             MigrationSpec("gone-" + good.vm_ref, target_host_ref=here)]
    results, updates = harness.migrate_many(specs)
    assert isinstance(results[0], NotFound) and results[0].explanation().strip()
    assert isinstance(results[1], MigrationResult), results[1]
    assert isinstance(results[2], NotFound)
    assert harness.independent_placement(good.vm_ref).host_ref == good.target_host_ref
    assert_progress_well_formed(updates[1])
    assert not updates[0] and not updates[2]


def test_preflight_of_a_batch_answers_as_each_move_alone(harness):
    good = harness.compute_spec()
    here = harness.independent_placement(good.vm_ref).host_ref
    specs = [good, MigrationSpec(good.vm_ref, target_host_ref=here), MigrationSpec("no-such-vm-ref", target_host_ref=here)]
    alone = []
    for spec in specs:
        try:
            alone.append(harness.driver.preflight(spec))
        except DriverError as exc:
            alone.append(exc)
    together = harness.driver.preflight_many(specs)
    assert len(together) == len(specs)
    for one, many in zip(alone, together, strict=True):
        if isinstance(one, DriverError):
            assert type(many) is type(one), (one, many)
        else:
            assert many == one
    assert all(c.ok for c in together[0]) if isinstance(together[0], tuple) else False


def test_migration_to_unknown_host_raises_not_found_and_moves_nothing(harness):
    spec = harness.compute_spec()
    before = harness.independent_placement(spec.vm_ref)
    with pytest.raises(NotFound):
        harness.migrate(MigrationSpec(spec.vm_ref, target_host_ref="no-such-host-ref"))
    assert harness.independent_placement(spec.vm_ref) == before


def test_migration_of_unknown_vm_raises_not_found(harness):
    spec = harness.compute_spec()
    with pytest.raises(NotFound):
        harness.migrate(MigrationSpec("no-such-vm-ref", target_host_ref=spec.target_host_ref))


def test_migration_to_the_current_host_is_refused(harness):
    spec = harness.compute_spec()
    here = harness.independent_placement(spec.vm_ref).host_ref
    with pytest.raises(InvalidState):
        harness.migrate(MigrationSpec(spec.vm_ref, target_host_ref=here))
    assert harness.independent_placement(spec.vm_ref).host_ref == here


def test_errors_carry_a_human_explanation(harness):
    with pytest.raises(DriverError) as err:
        harness.migrate(MigrationSpec("no-such-vm-ref", target_datastore_ref="no-such-ds"))
    assert err.value.explanation().strip()


@required(Capability.CANCEL)
def test_cancel_aborts_and_the_vm_stays_on_the_source(harness):
    spec = harness.slow_spec()
    before = harness.independent_placement(spec.vm_ref)
    cancel = threading.Event()
    seen: list[ProgressUpdate] = []
    outcome: dict = {}
    moving = threading.Event()

    def report(update: ProgressUpdate) -> None:
        seen.append(update)
        if update.percent > 0:
            moving.set()

    def run():
        try:
            harness.driver.migrate(spec, on_progress=report, cancel=cancel)
        except MigrationCancelled as exc:
            outcome["cancelled"] = exc
        except DriverError as exc:  # pragma: no cover - reported by the assertion below
            outcome["other"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    moving.wait(60)
    assert seen, "the slow migration never reported progress"
    cancel.set()
    worker.join(30)
    assert not worker.is_alive(), "the driver did not honour cancel within 30 s"
    assert "cancelled" in outcome, outcome
    assert harness.independent_placement(spec.vm_ref) == before
    assert harness.guest_alive(spec.vm_ref)
    task_id = next((u.task_id for u in seen if u.task_id), "")
    if harness.driver.supports(Capability.TASK_LOOKUP) and task_id:
        assert harness.driver.task_info(task_id).state in (TaskState.CANCELLED, TaskState.FAILED)


@required(Capability.TASK_LOOKUP)
def test_a_finished_task_can_be_looked_up(harness):
    spec = harness.compute_spec()
    result, updates = harness.migrate(spec)
    task_id = result.task_id or next(u.task_id for u in updates if u.task_id)
    assert harness.driver.task_info(task_id).state == TaskState.SUCCEEDED
    assert harness.driver.task_info("no-such-task").state == TaskState.UNKNOWN


@required(Capability.TASKS_BY_VM)
def test_the_hypervisor_lists_the_migration_tasks_started_on_a_vm(harness):
    spec = harness.compute_spec()
    since = time.time() - 5  # the peer's clock is this machine's
    earlier = {t.task_id for t in harness.driver.migration_tasks(spec.vm_ref, since=since)}
    result, updates = harness.migrate(spec)
    task_id = result.task_id or next(u.task_id for u in updates if u.task_id)
    tasks = [t for t in harness.driver.migration_tasks(spec.vm_ref, since=since) if t.task_id not in earlier]
    assert [t.task_id for t in tasks] == [task_id]
    assert tasks[0].state == TaskState.SUCCEEDED
    assert harness.driver.migration_tasks(spec.vm_ref, since=time.time() + 60) == ()


@required(Capability.TASK_ABORT)
def test_aborting_a_task_that_already_ended_changes_nothing(harness):
    spec = harness.compute_spec()
    result, updates = harness.migrate(spec)
    task_id = result.task_id or next(u.task_id for u in updates if u.task_id)
    assert harness.driver.cancel_task(task_id).state == TaskState.SUCCEEDED
    assert harness.independent_placement(spec.vm_ref) == result.placement


@required(Capability.TASK_ABORT | Capability.CANCEL)  # CANCEL: the peer has a slow move to abort
def test_a_running_task_aborted_by_id_from_elsewhere_ends_and_the_vm_stays(harness):
    spec = harness.slow_spec()
    before = harness.independent_placement(spec.vm_ref)
    seen: list[ProgressUpdate] = []
    outcome: dict = {}
    started = threading.Event()

    def report(update: ProgressUpdate) -> None:
        seen.append(update)
        # Under way: the hypervisor runs the task (a task id may be named before its job starts,
        # as libvirt's is; an abort then would find nothing to stop).
        if update.task_id and update.phase != Phase.PRECHECK:
            started.set()

    def run():
        try:
            harness.driver.migrate(spec, on_progress=report, cancel=threading.Event())
        except DriverError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    started.wait(60)
    task_id = next(u.task_id for u in seen if u.task_id)
    info = harness.driver.cancel_task(task_id)
    worker.join(30)
    assert not worker.is_alive(), "the move did not stop after its task was aborted"
    assert info.state == TaskState.CANCELLED and isinstance(outcome.get("error"), MigrationCancelled), (info, outcome)
    assert harness.independent_placement(spec.vm_ref) == before
def test_cold_move_is_declared_exactly_where_it_is_implemented(harness):
    from drivers.base import Driver, Unsupported

    if harness.driver.supports(Capability.COLD_MOVE):
        assert type(harness.driver).cold_move is not Driver.cold_move
        return
    spec = harness.compute_spec()
    before = harness.independent_placement(spec.vm_ref)
    with pytest.raises(Unsupported):
        harness.driver.cold_move(spec, on_progress=lambda u: None, cancel=threading.Event())
    assert harness.independent_placement(spec.vm_ref) == before


@required(Capability.COLD_MOVE)
def test_cold_move_moves_host_and_disks_and_restores_the_power_state(harness):
    from drivers.base import PowerState

    spec = harness.both_spec()
    updates: list[ProgressUpdate] = []
    since = time.time() - 5
    result = harness.driver.cold_move(spec, on_progress=updates.append, cancel=threading.Event())
    after = harness.independent_placement(spec.vm_ref)
    assert after.host_ref == spec.target_host_ref == result.placement.host_ref
    if harness.driver.supports(Capability.TASKS_BY_VM):  # crash recovery finds a cold move by its VM too
        assert result.task_id in {t.task_id for t in harness.driver.migration_tasks(spec.vm_ref, since=since)}
    assert set(after.disk_datastores.values()) == {spec.target_datastore_ref}
    assert_progress_well_formed(updates)
    inv = harness.driver.inventory()
    assert next(v for v in inv.vms if v.ref == spec.vm_ref).power_state == PowerState.ON

    # A powered-off VM (no live move possible) moves too, and stays off.
    hosts = {h.ref: h for h in inv.hosts}
    stores = {d.ref: d for d in inv.datastores}
    off = next(v for v in inv.vms if v.power_state == PowerState.OFF)
    target = next(h for h in inv.hosts if h.ref != off.host_ref and h.connected and not h.maintenance
                  and hosts[off.host_ref].cluster_ref == h.cluster_ref
                  and all(h.ref in stores[d].host_refs for d in off.datastore_refs))
    harness.driver.cold_move(MigrationSpec(off.ref, target_host_ref=target.ref), on_progress=lambda u: None,
                             cancel=threading.Event())
    moved = next(v for v in harness.driver.inventory().vms if v.ref == off.ref)
    assert moved.host_ref == target.ref and moved.power_state == PowerState.OFF
