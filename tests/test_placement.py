"""The pure move planner: targets, reasons, order, estimates, and invariants under random input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from migrations_app.placement import (
    Estimator,
    GiB,
    HostCap,
    StoreCap,
    VMInfo,
    plan_datastore_evacuation,
    plan_host_evacuation,
    recommend_rebalance,
)

SHARED = frozenset({100})


def host(i, mem_gib=64, cluster=1, **kw):
    return HostCap(id=i, name=f"h{i}", cluster_id=cluster, memory_bytes=mem_gib * GiB,
                   datastore_ids=kw.pop("datastore_ids", SHARED), **kw)


def vm(i, host_id, mem_gib=4, tags=(), stores=SHARED, **kw):
    return VMInfo(id=i, name=f"vm{i:02d}", host_id=host_id, memory_bytes=mem_gib * GiB, disk_bytes=10 * GiB,
                  datastore_ids=frozenset(stores), tags=tuple(tags), **kw)


def test_evacuation_spreads_biggest_first_onto_most_free_memory():
    hosts = [host(1), host(2), host(3, mem_gib=128)]
    vms = [vm(1, 1, 16), vm(2, 1, 8), vm(3, 1, 4), vm(10, 3, 64)]
    plan = plan_host_evacuation(source_host_id=1, hosts=hosts, vms=vms, headroom=0.0)
    assert [m.vm_id for m in plan.moves] == [1, 2, 3]  # biggest first, order numbered from 1
    assert [m.order for m in plan.moves] == [1, 2, 3]
    # h2 and h3 both have 64 GiB free: the tie goes to the lower id; then h3 (64) beats h2 (48),
    # and after it took 8 GiB h3 (56) still beats h2 (48).
    assert [m.target_host_id for m in plan.moves] == [2, 3, 3]
    assert plan.unmovable == {}
    assert plan.estimated_duration_s > 0


def test_evacuation_flags_the_vm_whose_datastore_no_other_host_sees():
    hosts = [host(1, datastore_ids=frozenset({100, 7})), host(2)]
    plan = plan_host_evacuation(source_host_id=1, hosts=hosts, vms=[vm(1, 1), vm(2, 1, stores={7})])
    assert [m.vm_id for m in plan.moves] == [1]
    assert "does not see its datastore" in plan.unmovable[2]


def test_evacuation_respects_anti_affinity_and_host_state_and_cluster():
    hosts = [host(1), host(2), host(3, usable=False, unusable_reason="in maintenance mode"), host(4, cluster=2)]
    vms = [vm(1, 1, tags=["anti-affinity:db"]), vm(2, 2, tags=["anti-affinity:db"])]
    plan = plan_host_evacuation(source_host_id=1, hosts=hosts, vms=vms)
    assert plan.moves == []
    assert "anti-affinity group db" in plan.unmovable[1] and "maintenance" in plan.unmovable[1]
    assert "h4" not in plan.unmovable[1]  # another cluster is never a candidate


def test_cold_targets_for_a_powered_off_vm_and_one_on_local_storage():
    hosts = [host(1, datastore_ids=frozenset({100, 7})), host(2), host(3, mem_gib=8)]
    stores = [StoreCap(100, "shared", 500 * GiB, frozenset({1, 2, 3})), StoreCap(7, "local", 50 * GiB, frozenset({1}))]
    vms = [vm(1, 1, 4, powered_on=False), vm(2, 1, 4, stores={7}), vm(3, 1, 4, blocker="open request #9")]
    plan = plan_host_evacuation(source_host_id=1, hosts=hosts, vms=vms, cold_stores=stores)
    assert plan.moves == [] and set(plan.unmovable) == {1, 2, 3}
    assert plan.unmovable[1].startswith("powered off")
    assert (plan.cold_moves[1].target_host_id, plan.cold_moves[1].target_datastore_id) == (2, None)
    # vm 2's disks live where no other host looks: cold, with them copied to the shared store.
    assert (plan.cold_moves[2].target_host_id, plan.cold_moves[2].target_datastore_id) == (2, 100)
    assert "with its disks on shared" in plan.cold_moves[2].why
    assert 3 not in plan.cold_moves  # an open request blocks any move
    assert plan_host_evacuation(source_host_id=1, hosts=hosts, vms=vms).cold_moves == {}  # driver cannot


def test_evacuation_keeps_headroom_and_reports_blockers():
    hosts = [host(1), host(2, mem_gib=10)]
    vms = [vm(1, 1, 9), vm(2, 1, 1, blocker="powered off; a live migration needs it running")]
    plan = plan_host_evacuation(source_host_id=1, hosts=hosts, vms=vms, headroom=0.2)
    assert "needs 9.0 GiB" in plan.unmovable[1]
    assert plan.unmovable[2].startswith("powered off")


def test_datastore_evacuation_picks_a_visible_store_with_room():
    stores = [StoreCap(1, "old", 0, frozenset({1, 2})), StoreCap(2, "small", 5 * GiB, frozenset({1, 2})),
              StoreCap(3, "big", 100 * GiB, frozenset({1})), StoreCap(4, "other", 500 * GiB, frozenset({9}))]
    vms = [vm(1, 1, stores={1}), vm(2, 2, stores={1}), vm(3, 1, stores={3})]
    plan = plan_datastore_evacuation(source_datastore_id=1, stores=stores, vms=vms)
    assert [(m.vm_id, m.target_datastore_id) for m in plan.moves] == [(1, 3)]
    assert "small has 5.0 GiB free" in plan.unmovable[2] and "does not see big" in plan.unmovable[2]


def test_rebalance_lowers_imbalance_and_reports_before_and_after():
    hosts = [host(1), host(2), host(3)]
    vms = [vm(i, 1, 8) for i in range(1, 6)]
    plan = recommend_rebalance(hosts=hosts, vms=vms)
    assert plan.imbalance_before > 25 and plan.imbalance_after < plan.imbalance_before
    assert 1 <= len(plan.moves) <= 4 and {m.target_host_id for m in plan.moves} <= {2, 3}
    balanced = recommend_rebalance(hosts=hosts, vms=[vm(1, 1), vm(2, 2), vm(3, 3)])
    assert balanced.moves == [] and balanced.imbalance_after == balanced.imbalance_before == 0


def test_estimator_runs_parallel_lanes():
    est = Estimator(bandwidth_bytes_per_s=GiB, precopy_factor=1.0, per_move_s=0.0, parallel=2)
    assert est.total_s([4 * GiB, 2 * GiB, 2 * GiB]) == 4.0
    assert est.total_s([]) == 0.0


def test_estimator_calibrates_its_fixed_cost_on_past_moves():
    est = Estimator(bandwidth_bytes_per_s=GiB, precopy_factor=1.0, per_move_s=5.0, parallel=1)
    assert est.calibrated([(3.0, GiB), (4.0, GiB)]) is est  # too little history: the default stays
    tuned = est.calibrated([(3.0, GiB), (1.5, GiB), (2.0, 2 * GiB), (0.5, 4 * GiB), (2.5, GiB)])
    assert tuned.per_move_s == 0.5  # median of 2, 0.5, 0, 0, 1.5
    assert tuned.total_s([GiB]) == 1.5


# -- invariants under random clusters -----------------------------------------------------------

@st.composite
def clusters(draw):
    n_hosts = draw(st.integers(2, 6))
    hosts = [host(i, mem_gib=draw(st.sampled_from([16, 32, 64])),
                  usable=draw(st.booleans()) or i == 1, unusable_reason="in maintenance mode",
                  datastore_ids=frozenset({100} | draw(st.sets(st.sampled_from([7, 8]), max_size=2))))
             for i in range(1, n_hosts + 1)]
    vms = []
    for i in range(draw(st.integers(0, 25))):
        h = draw(st.sampled_from(hosts))
        stores = {100} if draw(st.booleans()) else set(h.datastore_ids)
        tags = draw(st.lists(st.sampled_from(["anti-affinity:a", "anti-affinity:b", "env:x"]), max_size=2, unique=True))
        vms.append(vm(i + 1, h.id, draw(st.sampled_from([1, 2, 4, 8])), tags=tags, stores=stores))
    return hosts, vms


def _placement_after(plan, vms):
    where = {v.id: v.host_id for v in vms}
    for m in [*plan.moves, *plan.cold_moves.values()]:
        where[m.vm_id] = m.target_host_id
    return where


def _groups_ok(where, vms, hosts_checked):
    """No two VMs that share an anti-affinity tag end on one host, unless they already shared it."""
    before = {v.id: v.host_id for v in vms}
    for a in vms:
        for b in vms:
            if a.id < b.id and a.anti_affinity & b.anti_affinity and where[a.id] == where[b.id]:
                moved = where[a.id] != before[a.id] or where[b.id] != before[b.id]
                if moved and where[a.id] in hosts_checked:
                    return False
    return True


@settings(max_examples=150, deadline=None)
@given(clusters(), st.sampled_from([0.0, 0.1, 0.25]))
def test_evacuation_never_breaks_capacity_visibility_or_anti_affinity(cluster, headroom):
    hosts, vms = cluster
    stores = [StoreCap(d, f"ds{d}", 30 * GiB, frozenset(h.id for h in hosts if d in h.datastore_ids))
              for d in (100, 7, 8)]
    plan = plan_host_evacuation(source_host_id=1, hosts=hosts, vms=vms, headroom=headroom, cold_stores=stores)
    by_id = {h.id: h for h in hosts}
    leaving = {v.id for v in vms if v.host_id == 1}
    assert {m.vm_id for m in plan.moves} | set(plan.unmovable) == leaving  # every VM answered once
    assert not {m.vm_id for m in plan.moves} & set(plan.unmovable)
    assert set(plan.cold_moves) <= set(plan.unmovable)  # cold only where live is impossible
    where = _placement_after(plan, vms)
    for m in plan.moves:
        target = by_id[m.target_host_id]
        moving = next(v for v in vms if v.id == m.vm_id)
        assert target.usable and target.id != 1 and moving.datastore_ids <= target.datastore_ids
    copied: dict[int, int] = {}
    for m in plan.cold_moves.values():
        target = by_id[m.target_host_id]
        moving = next(v for v in vms if v.id == m.vm_id)
        assert target.usable and target.id != 1
        if m.target_datastore_id is None:
            assert moving.datastore_ids <= target.datastore_ids
        else:
            assert m.target_datastore_id in target.datastore_ids
            copied[m.target_datastore_id] = copied.get(m.target_datastore_id, 0) + moving.disk_bytes
    assert all(b <= 30 * GiB for b in copied.values())
    for h in hosts:
        arriving = [v for v in vms if v.host_id != h.id and where[v.id] == h.id]
        if arriving:
            total = sum(v.memory_bytes for v in vms if where[v.id] == h.id)
            assert total <= h.memory_bytes * (1 - headroom)
    assert _groups_ok(where, vms, set(by_id))


@settings(max_examples=100, deadline=None)
@given(clusters())
def test_rebalance_never_worsens_balance_or_breaks_rules(cluster):
    hosts, vms = cluster
    plan = recommend_rebalance(hosts=hosts, vms=vms, headroom=0.1)
    assert plan.imbalance_after <= plan.imbalance_before + 1e-9
    assert len({m.vm_id for m in plan.moves}) == len(plan.moves)
    by_id = {h.id: h for h in hosts}
    where = _placement_after(plan, vms)
    for m in plan.moves:
        assert by_id[m.target_host_id].usable
    for h in hosts:
        if any(v.host_id != h.id and where[v.id] == h.id for v in vms):
            assert sum(v.memory_bytes for v in vms if where[v.id] == h.id) <= h.memory_bytes * 0.9
    assert _groups_ok(where, vms, set(by_id))


@st.composite
def storage(draw):
    stores = [StoreCap(i, f"ds{i}", draw(st.integers(0, 200)) * GiB,
                       frozenset(draw(st.sets(st.integers(1, 4), min_size=1))), usable=draw(st.booleans()) or i == 1)
              for i in range(1, draw(st.integers(2, 5)) + 1)]
    vms = []
    for i in range(draw(st.integers(0, 20))):
        on = draw(st.sets(st.sampled_from([s.id for s in stores]), min_size=1, max_size=2))
        sizes = tuple((s, draw(st.integers(1, 60)) * GiB) for s in sorted(on))
        vms.append(VMInfo(id=i + 1, name=f"vm{i}", host_id=draw(st.integers(1, 4)), memory_bytes=GiB,
                          disk_bytes=sum(b for _, b in sizes), datastore_ids=frozenset(on), disk_bytes_by_store=sizes))
    return stores, vms


@settings(max_examples=100, deadline=None)
@given(storage())
def test_datastore_evacuation_never_overfills_a_store_or_picks_one_the_host_cannot_see(world):
    stores, vms = world
    plan = plan_datastore_evacuation(source_datastore_id=1, stores=stores, vms=vms)
    by_id = {s.id: s for s in stores}
    affected = {v.id for v in vms if 1 in v.datastore_ids}
    assert {m.vm_id for m in plan.moves} | set(plan.unmovable) == affected
    added: dict[int, int] = {}
    for m in plan.moves:
        vm_, target = next(v for v in vms if v.id == m.vm_id), by_id[m.target_datastore_id]
        assert target.id != 1 and target.usable and vm_.host_id in target.host_ids
        added[target.id] = added.get(target.id, 0) + vm_.disk_bytes - vm_.bytes_on(target.id)
    assert all(added[s] <= by_id[s].free_bytes for s in added)
