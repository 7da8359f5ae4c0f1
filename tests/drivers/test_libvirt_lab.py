"""libvirt-specific moves on the KVM lab, beyond the contract: each proves the guest kept running
(its tick counter advanced across the move) and reads the final placement through the harness's
own connections. They share the contract suite's lab (one start per session) and run only when
DRIVER_KINDS selects libvirt."""

from __future__ import annotations

import threading
import time

import pytest

from drivers.base import (
    DriverError,
    MigrationCancelled,
    MigrationSpec,
    MigrationTimedOut,
    Phase,
    ProgressUpdate,
    TaskState,
)
from tests import peers
from tests.drivers.test_contract import assert_progress_well_formed

pytestmark = pytest.mark.peer("libvirt")


@pytest.fixture(scope="session")
def lab(request):
    """The libvirt harness, started once and shared with the contract suite."""
    return peers.start("libvirt", request.session.config)


def pools_of(lab, host: str) -> list[str]:
    return [d.ref for d in lab.driver.inventory().datastores if d.host_refs == (host,) and d.accessible]


def migrate_in_background(lab, spec: MigrationSpec, cancel: threading.Event):
    seen: list[ProgressUpdate] = []
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = lab.driver.migrate(spec, on_progress=seen.append, cancel=cancel)
        except DriverError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    return worker, seen, outcome


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_live_migration_copies_host_local_disks_to_the_target(lab):
    vm = lab.vm_named("db-1")
    before = lab.independent_placement(vm.ref)
    (source_ds,) = before.datastore_refs
    source_path = vm.disks[0].path
    target = lab.other_host(before.host_ref)
    ticks = lab.ticks(vm.ref)

    result, updates = lab.migrate(MigrationSpec(vm.ref, target_host_ref=target))

    after = lab.independent_placement(vm.ref)
    pool = source_ds.rsplit("/", 1)[1]
    assert after.host_ref == target
    assert set(after.disk_datastores.values()) == {f"{target}/pool/{pool}"}
    assert result.placement == after
    assert_progress_well_formed(updates)
    assert Phase.DISK_COPY in {u.phase for u in updates}
    assert result.downtime_ms is not None and result.downtime_ms > 0
    assert lab.ticks(vm.ref) > ticks and lab.guest_alive(vm.ref)
    assert not lab.volume_exists(before.host_ref, source_path), "the copied-from image was left behind"


def test_combined_migration_lands_in_the_chosen_pool(lab):
    vm = lab.vm_named("db-1")
    before = lab.independent_placement(vm.ref)
    target = lab.other_host(before.host_ref)
    pool = next(ref for ref in pools_of(lab, target) if not ref.endswith("/images"))
    ticks = lab.ticks(vm.ref)

    result, updates = lab.migrate(MigrationSpec(vm.ref, target_host_ref=target, target_datastore_ref=pool))

    after = lab.independent_placement(vm.ref)
    assert after.host_ref == target and set(after.disk_datastores.values()) == {pool}
    assert_progress_well_formed(updates)
    assert lab.ticks(vm.ref) > ticks and lab.guest_alive(vm.ref)
    _, dom = lab.domain(vm.ref)
    import libvirt

    persistent = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert result.placement.disk_datastores["vda"] == pool
    assert "/archive/" in persistent, "the persistent definition still names the old disk path"


def test_shared_storage_live_migration_keeps_the_disks_and_honours_the_caps(lab):
    vm = lab.vm_named("app-2")
    before = lab.independent_placement(vm.ref)
    assert before.datastore_refs == ("pool/shared",)
    target = lab.other_host(before.host_ref)
    ticks = lab.ticks(vm.ref)
    spec = MigrationSpec(vm.ref, target_host_ref=target, bandwidth_bytes_per_s=32 * 1024**2, max_downtime_ms=100)

    result, updates = lab.migrate(spec)

    after = lab.independent_placement(vm.ref)
    assert after.host_ref == target and after.disk_datastores == before.disk_datastores
    assert_progress_well_formed(updates)
    assert Phase.DISK_COPY not in {u.phase for u in updates}
    assert any(u.phase == Phase.MEMORY_PRECOPY and u.iteration for u in updates)
    # 64 MiB of filled guest RAM at 32 MiB/s cannot take much less than 2 s.
    assert result.duration_s > 1.5, result.duration_s
    assert result.downtime_ms is not None
    assert lab.ticks(vm.ref) > ticks and lab.guest_alive(vm.ref)


def test_live_storage_migration_copies_and_pivots_on_the_same_host(lab):
    vm = lab.vm_named("db-1")
    before = lab.independent_placement(vm.ref)
    (source_ds,) = before.datastore_refs
    old_path = lab.vm_named("db-1").disks[0].path
    pool = next(ref for ref in pools_of(lab, before.host_ref) if ref != source_ds)
    ticks = lab.ticks(vm.ref)

    result, updates = lab.migrate(MigrationSpec(vm.ref, target_datastore_ref=pool, bandwidth_bytes_per_s=64 * 1024**2))

    after = lab.independent_placement(vm.ref)
    assert after.host_ref == before.host_ref and set(after.disk_datastores.values()) == {pool}
    assert_progress_well_formed(updates)
    assert [u.phase for u in updates if u.phase not in (Phase.PRECHECK, Phase.DONE)][0] == Phase.DISK_COPY
    assert Phase.SWITCHOVER in {u.phase for u in updates}
    assert lab.ticks(vm.ref) > ticks and lab.guest_alive(vm.ref)
    assert not lab.volume_exists(before.host_ref, old_path)
    _, dom = lab.domain(vm.ref)
    import libvirt

    assert pool.rsplit("/", 1)[1] in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).split("<source file='")[1]
    assert result.downtime_ms is not None and result.downtime_ms < 5000


def test_cancel_during_the_disk_copy_leaves_the_guest_running_on_the_source(lab):
    vm = lab.vm_named("db-1")
    before = lab.independent_placement(vm.ref)
    target = lab.other_host(before.host_ref)
    (source_ds,) = before.datastore_refs
    target_path = f"{target}/pool/{source_ds.rsplit('/', 1)[1]}"
    ticks = lab.ticks(vm.ref)
    cancel = threading.Event()
    spec = MigrationSpec(vm.ref, target_host_ref=target, bandwidth_bytes_per_s=2 * 1024**2)

    worker, seen, outcome = migrate_in_background(lab, spec, cancel)
    wait_until(lambda: any(u.phase == Phase.DISK_COPY and u.percent > 0 for u in seen))
    cancel.set()
    worker.join(30)

    assert not worker.is_alive(), "cancel was not honoured within 30 s"
    assert isinstance(outcome.get("error"), MigrationCancelled), outcome
    assert lab.independent_placement(vm.ref) == before
    assert lab.ticks(vm.ref) > ticks and lab.guest_alive(vm.ref)
    assert not lab.volume_exists(target, vm.disks[0].path), f"a half copy was left in {target_path}"
    task_id = next(u.task_id for u in seen if u.task_id)
    assert lab.driver.task_info(task_id).state in (TaskState.CANCELLED, TaskState.FAILED)


def test_cancel_during_a_block_copy_keeps_the_old_disk(lab):
    vm = lab.vm_named("db-1")
    before = lab.independent_placement(vm.ref)
    (source_ds,) = before.datastore_refs
    pool = next(ref for ref in pools_of(lab, before.host_ref) if ref != source_ds)
    cancel = threading.Event()
    spec = MigrationSpec(vm.ref, target_datastore_ref=pool, bandwidth_bytes_per_s=1024**2)

    worker, seen, outcome = migrate_in_background(lab, spec, cancel)
    wait_until(lambda: any(u.phase == Phase.DISK_COPY and u.percent > 0 for u in seen))
    cancel.set()
    worker.join(30)

    assert isinstance(outcome.get("error"), MigrationCancelled), outcome
    assert lab.independent_placement(vm.ref) == before
    assert lab.guest_alive(vm.ref)
    new_path = vm.disks[0].path.replace(f"/{source_ds.rsplit('/', 1)[1]}/", f"/{pool.rsplit('/', 1)[1]}/")
    assert not lab.volume_exists(before.host_ref, new_path), "the cancelled copy's volume was left behind"


def test_a_block_copy_aborted_by_task_id_from_elsewhere_ends_cancelled_and_keeps_the_old_disk(lab):
    # Crash recovery's abort (cancel_task) of a storage move whose worker is lost, here while the
    # move's own call still runs in this process: both ends must agree it was cancelled.
    vm = lab.vm_named("db-1")
    before = lab.independent_placement(vm.ref)
    (source_ds,) = before.datastore_refs
    pool = next(ref for ref in pools_of(lab, before.host_ref) if ref != source_ds)
    spec = MigrationSpec(vm.ref, target_datastore_ref=pool, bandwidth_bytes_per_s=1024**2)

    worker, seen, outcome = migrate_in_background(lab, spec, threading.Event())
    wait_until(lambda: any(u.phase == Phase.DISK_COPY and u.percent > 0 for u in seen))
    task_id = next(u.task_id for u in seen if u.task_id)
    info = lab.driver.cancel_task(task_id)
    worker.join(30)

    assert not worker.is_alive(), "the move did not stop after its copy was aborted"
    assert info.state == TaskState.CANCELLED, info
    assert isinstance(outcome.get("error"), MigrationCancelled), outcome
    assert lab.independent_placement(vm.ref) == before
    assert lab.guest_alive(vm.ref)
    new_path = vm.disks[0].path.replace(f"/{source_ds.rsplit('/', 1)[1]}/", f"/{pool.rsplit('/', 1)[1]}/")
    assert not lab.volume_exists(before.host_ref, new_path), "the aborted copy's volume was left behind"
    # Asked again, nothing runs to abort: the task stays ended, not where it was moving the VM.
    assert lab.driver.cancel_task(task_id).state in (TaskState.CANCELLED, TaskState.FAILED)


def test_a_guest_that_never_converges_times_out_and_stays_on_the_source(lab):
    vm = next(v for v in lab.driver.inventory().vms if "lab:never-converge" in v.tags)
    before = lab.independent_placement(vm.ref)
    ticks = lab.ticks(vm.ref)
    spec = MigrationSpec(
        vm.ref, target_host_ref=lab.other_host(before.host_ref), bandwidth_bytes_per_s=16 * 1024**2, timeout_s=8
    )
    started = time.monotonic()
    updates: list[ProgressUpdate] = []

    with pytest.raises(MigrationTimedOut) as err:
        lab.driver.migrate(spec, on_progress=updates.append, cancel=threading.Event())

    assert 8 <= time.monotonic() - started < 20
    assert err.value.explanation()
    assert max(u.iteration or 0 for u in updates) >= 2, "pre-copy never started a second pass"
    assert all(u.percent < 100 for u in updates)
    assert lab.independent_placement(vm.ref) == before
    assert lab.ticks(vm.ref) > ticks and lab.guest_alive(vm.ref)


def test_preflight_checks_pass_for_a_valid_move(lab):
    vm = lab.vm_named("app-1")
    target = lab.other_host(lab.independent_placement(vm.ref).host_ref)
    checks = lab.driver.preflight(MigrationSpec(vm.ref, target_host_ref=target))
    assert {c.name for c in checks} >= {"vm-running", "target-reachable", "cpu-compatible", "target-memory"}
    assert all(c.ok for c in checks), checks


def test_the_copied_libvirt_constants_match_the_sdk(lab):
    import libvirt

    from drivers.libvirt import jobs as libvirt_jobs

    for name in dir(libvirt_jobs):
        if name.startswith("ERR_"):
            assert getattr(libvirt, f"VIR_{name}") == getattr(libvirt_jobs, name), name
        elif name.startswith("FROM_"):
            assert getattr(libvirt, f"VIR_{name}") == getattr(libvirt_jobs, name), name
    for flag in libvirt_jobs.migration_flag_names(
        copies_disks=True, shared_disks=True, auto_converge=True, post_copy=True
    ):
        assert hasattr(libvirt, f"VIR_MIGRATE_{flag}"), flag


def test_post_copy_moves_a_guest_that_never_converges(lab, caplog):
    from drivers.base import ConnectionConfig
    from drivers.libvirt import LibvirtDriver

    config = lab.driver.config
    driver = LibvirtDriver(
        ConnectionConfig(
            kind="libvirt", is_lab=True, options={**config.options, "post_copy": True, "post_copy_after_iterations": 1}
        )
    )
    vm = next(v for v in driver.inventory().vms if "lab:never-converge" in v.tags)
    before = lab.independent_placement(vm.ref)
    target = lab.other_host(before.host_ref)
    ticks = lab.ticks(vm.ref)
    updates: list[ProgressUpdate] = []
    caplog.set_level("INFO", logger="drivers.libvirt")
    try:
        spec = MigrationSpec(vm.ref, target_host_ref=target, bandwidth_bytes_per_s=32 * 1024**2, timeout_s=60)
        result = driver.migrate(spec, on_progress=updates.append, cancel=threading.Event())
    finally:
        driver.close()
    assert result.placement.host_ref == target == lab.independent_placement(vm.ref).host_ref
    assert "switched to post-copy" in caplog.text, "it converged by itself: the case proves nothing"
    assert_progress_well_formed(updates)
    assert lab.ticks(vm.ref) > ticks and lab.guest_alive(vm.ref)


def test_a_dead_connection_is_reopened(lab):
    conn = lab.driver.conn("hosta")
    conn.close()  # the handle the driver holds is now dead, as after a daemon restart
    assert lab.driver.inventory().vms
    assert lab.driver.conn("hosta") is not conn
