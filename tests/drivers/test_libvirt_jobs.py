"""The libvirt driver's pure decisions (progress, budgets, flags, errors, XML), without the SDK.

These run in every DRIVER_KINDS selection: nothing here imports libvirt."""

from __future__ import annotations

import pytest

from drivers.base import (
    ConnectionFailed,
    InsufficientResources,
    InvalidState,
    MigrationCancelled,
    MigrationFailed,
    NotFound,
    Phase,
)
from drivers.libvirt import jobs
from drivers.libvirt import xml as lxml

MiB = 1024**2
GiB = 1024**3


# -- progress --------------------------------------------------------------------------------


def test_percent_counts_memory_at_most_once_when_later_passes_resend_pages():
    # 64 MiB disk done, memory sent 1.5 times over: still below 100 until the call returns.
    assert jobs.migration_percent(64 * MiB, 64 * MiB, 96 * MiB, 64 * MiB) == jobs.MAX_RUNNING_PERCENT
    assert jobs.migration_percent(32 * MiB, 64 * MiB, 0, 64 * MiB) == 25.0
    assert jobs.migration_percent(0, 0, 0, 0) == 0.0


def test_tracker_uses_the_memory_hint_until_libvirt_reports_memory_total():
    # The disk phase reports data_total = disk only; measured against disk + RAM it is half way.
    tracker = jobs.ProgressTracker("t", mem_total_hint=64 * MiB, disk_total_hint=64 * MiB)
    update = tracker.migration({"disk_total": 64 * MiB, "disk_processed": 64 * MiB}, 1.0, copies_disks=True)
    assert update.phase == Phase.DISK_COPY and update.percent == 50.0
    assert update.bytes_total == 128 * MiB


def test_tracker_never_goes_back_in_percent_or_phase():
    tracker = jobs.ProgressTracker("t", mem_total_hint=64 * MiB)
    samples = [
        {"memory_total": 64 * MiB, "memory_processed": 40 * MiB, "memory_iteration": 1},
        # memory_total grows (hot-plug, rounding): the raw percent drops, the reported one does not.
        {"memory_total": 128 * MiB, "memory_processed": 41 * MiB, "memory_iteration": 1},
        {"memory_total": 128 * MiB, "memory_processed": 0, "memory_iteration": 0},
    ]
    updates = [tracker.migration(s, float(i), copies_disks=False) for i, s in enumerate(samples)]
    percents = [u.percent for u in updates]
    assert percents == sorted(percents) and percents[0] == 62.5
    assert {u.phase for u in updates} == {Phase.MEMORY_PRECOPY}
    assert tracker.switchover().phase == Phase.SWITCHOVER
    after = tracker.migration(samples[0], 9.0, copies_disks=False)
    assert after.phase == Phase.SWITCHOVER, "a late sample must not move the phase back"


def test_tracker_reports_iteration_remaining_rate_and_eta():
    tracker = jobs.ProgressTracker("task-1", mem_total_hint=64 * MiB)
    update = tracker.migration(
        {
            "memory_total": 64 * MiB,
            "memory_processed": 32 * MiB,
            "memory_remaining": 32 * MiB,
            "data_remaining": 32 * MiB,
            "memory_bps": 16 * MiB,
            "memory_iteration": 2,
        },
        5.0,
        copies_disks=False,
    )
    assert (update.iteration, update.remaining_bytes, update.rate_bytes_per_s, update.eta_s) == (
        2,
        32 * MiB,
        16 * MiB,
        2.0,
    )
    assert update.task_id == "task-1"


def test_tracker_derives_a_rate_when_libvirt_gives_none():
    tracker = jobs.ProgressTracker("t", disk_total_hint=100 * MiB)
    tracker.block_copy([(0, 100 * MiB)], 0.0)
    update = tracker.block_copy([(50 * MiB, 100 * MiB)], 1.0)
    assert update.rate_bytes_per_s == 50 * MiB and update.eta_s == 1.0 and update.percent == 50.0


def test_block_copy_percent_stays_below_100_until_the_pivot():
    assert jobs.block_copy_percent([(10, 10), (5, 10)]) == 75.0
    assert jobs.block_copy_percent([(10, 10)]) == jobs.MAX_RUNNING_PERCENT
    assert jobs.block_copy_percent([]) == 0.0


def test_done_is_100_and_switchover_keeps_the_last_byte_counts():
    tracker = jobs.ProgressTracker("t", mem_total_hint=10)
    tracker.migration({"memory_total": 10, "memory_processed": 10}, 0.0, copies_disks=False)
    switch = tracker.switchover()
    assert switch.percent < 100 and (switch.bytes_done, switch.bytes_total) == (10, 10)
    assert tracker.done(10).percent == 100.0 and tracker.done(10).phase == Phase.DONE


# -- budgets and decisions -------------------------------------------------------------------


def test_completion_budget_follows_novas_rule():
    # RAM counts as at least 2 GiB; 800 s per GiB of RAM + disk.
    assert jobs.completion_budget_s(64 * MiB, 0) == 1600.0
    assert jobs.completion_budget_s(4 * GiB, 6 * GiB) == 8000.0
    assert jobs.completion_budget_s(4 * GiB, GiB, per_gib_s=10) == 50.0


def test_the_specs_timeout_wins_over_the_budget():
    assert jobs.effective_timeout_s(30, 1600.0) == 30.0
    assert jobs.effective_timeout_s(None, 1600.0) == 1600.0
    assert jobs.timed_out(31, 30) and not jobs.timed_out(30, 30)


def test_postcopy_switches_only_after_the_allowed_passes():
    assert not jobs.postcopy_due(2, 2)
    assert jobs.postcopy_due(3, 2)
    assert not jobs.postcopy_due(10, -1), "a negative setting means never"


def test_bandwidth_is_rounded_up_to_whole_mib_and_never_zero():
    assert jobs.bandwidth_mib_s(None) is None
    assert jobs.bandwidth_mib_s(1) == 1
    assert jobs.bandwidth_mib_s(64 * MiB) == 64
    assert jobs.bandwidth_mib_s(64 * MiB + 1) == 65


@pytest.mark.parametrize(
    ("copies", "shared", "extra"),
    [
        (False, True, {"UNSAFE"}),
        (True, False, {"NON_SHARED_DISK"}),
        (True, True, {"NON_SHARED_DISK", "UNSAFE"}),
    ],
)
def test_migration_flags(copies, shared, extra):
    names = jobs.migration_flag_names(copies_disks=copies, shared_disks=shared, auto_converge=False, post_copy=False)
    assert set(names) == {"LIVE", "PEER2PEER", "PERSIST_DEST", "UNDEFINE_SOURCE"} | extra


def test_auto_converge_and_post_copy_are_options():
    names = jobs.migration_flag_names(copies_disks=False, shared_disks=False, auto_converge=True, post_copy=True)
    assert {"AUTO_CONVERGE", "POSTCOPY"} <= set(names)


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "domain", "message", "expected"),
    [
        (78, 10, "operation aborted: migration out job: canceled by client", MigrationCancelled),
        (81, 10, "Unsafe migration: Migration without shared storage is unsafe", InvalidState),
        (42, 10, "Domain not found: no domain with matching uuid", NotFound),
        (50, 18, "Storage volume not found", NotFound),
        (1, 10, "internal error: Attempt to migrate guest to the same host 6c61...", InvalidState),
        (38, 18, "cannot write /x: No space left on device", InsufficientResources),
        (38, 7, "Cannot recv data: Connection reset by peer", ConnectionFailed),
        (39, 7, "End of file while reading data: Input/output error", ConnectionFailed),
        (5, 0, "no connection driver available", ConnectionFailed),
        (1, 10, "internal error: qemu unexpectedly closed the monitor", MigrationFailed),
    ],
)
def test_libvirt_errors_map_to_domain_errors(code, domain, message, expected):
    assert jobs.classify_error(code, domain, message, MigrationFailed) is expected


# -- XML -------------------------------------------------------------------------------------

DOMAIN = """<domain type='qemu'>
  <name>db-1</name>
  <metadata><portal:vm xmlns:portal="urn:migration-portal:vm:1"><portal:owner>team-data</portal:owner>
    <portal:tags>env:production lab:x</portal:tags></portal:vm></metadata>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/db-1.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='hdc' bus='ide'/></disk>
  </devices>
</domain>"""


def test_domain_facts_come_from_the_xml():
    facts = lxml.parse_domain(DOMAIN)
    assert facts.disks == (lxml.DomainDisk("vda", "/var/lib/libvirt/images/db-1.qcow2", "qcow2"),)
    assert (facts.owner, facts.tags) == ("team-data", ("env:production", "lab:x"))
    assert (facts.cpu_model, facts.arch, facts.machine, facts.virt_type) == (
        "qemu64",
        "x86_64",
        "pc-i440fx-7.2",
        "qemu",
    )


def test_disk_paths_are_rewritten_for_the_destination_only_where_asked():
    moved = lxml.parse_domain(lxml.with_disk_paths(DOMAIN, {"vda": "/var/lib/libvirt/archive/db-1.qcow2"}))
    assert moved.disks[0].path == "/var/lib/libvirt/archive/db-1.qcow2"
    assert moved.owner == "team-data", "metadata must survive the rewrite"


def test_documents_sent_to_libvirt_are_escaped():
    assert "<name>a&amp;b</name>" in lxml.volume_xml("a&b", 10, "qcow2")
    assert 'source file="/x/it\'s.qcow2"' in lxml.block_copy_destination_xml("/x/it's.qcow2", "qcow2")
    assert lxml.pool_target_path("<pool type='dir'><target><path>/a/b/</path></target></pool>") == "/a/b"
