"""The move planner: pure functions over plain dataclasses (no database, no driver).

``plan_host_evacuation`` and ``plan_datastore_evacuation`` choose a target for every VM that has to
leave, ``recommend_rebalance`` a few moves that even out a cluster's memory use. Placement is greedy
best-fit: the biggest VM first, each onto the candidate with the most free memory (or space) after
it, so the load spreads instead of filling one host. A candidate must be usable, in the same
cluster, see the VM's datastores, keep ``headroom`` of its memory free and never share a host with
a VM carrying the same ``anti-affinity:<name>`` tag. VMs that fit nowhere come back with the reason.

Where the driver can cold-move (power off, move, power on), an evacuation also proposes a cold
target for each VM that cannot move live (powered off, or no host sees its datastore: then with a
datastore the new host sees); the requester chooses that fallback per VM, or skip.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

GiB = 1024**3
ANTI_AFFINITY_PREFIX = "anti-affinity:"


@dataclass(frozen=True)
class HostCap:
    id: int
    name: str
    cluster_id: int
    memory_bytes: int
    usable: bool = True
    unusable_reason: str = ""
    datastore_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class StoreCap:
    id: int
    name: str
    free_bytes: int
    host_ids: frozenset[int] = frozenset()
    usable: bool = True


@dataclass(frozen=True)
class VMInfo:
    id: int
    name: str
    host_id: int
    memory_bytes: int
    disk_bytes: int = 0
    datastore_ids: frozenset[int] = frozenset()
    tags: tuple[str, ...] = ()
    blocker: str = ""  # a reason it cannot move at all (an open request...)
    powered_on: bool = True  # a powered-off VM cannot move live (a cold move can take it)
    # bytes per datastore, for storage moves (defaults to everything on its first datastore)
    disk_bytes_by_store: tuple[tuple[int, int], ...] = ()

    @property
    def anti_affinity(self) -> frozenset[str]:
        return frozenset(t[len(ANTI_AFFINITY_PREFIX):] for t in self.tags if t.startswith(ANTI_AFFINITY_PREFIX))

    def bytes_on(self, store_id: int) -> int:
        if self.disk_bytes_by_store:
            return sum(b for s, b in self.disk_bytes_by_store if s == store_id)
        return self.disk_bytes if store_id in self.datastore_ids else 0


@dataclass(frozen=True)
class PlannedMove:
    vm_id: int
    order: int
    target_host_id: int | None = None
    target_datastore_id: int | None = None
    why: str = ""


@dataclass
class Plan:
    moves: list[PlannedMove] = field(default_factory=list)
    unmovable: dict[int, str] = field(default_factory=dict)  # vm id -> why it cannot move live
    cold_moves: dict[int, PlannedMove] = field(default_factory=dict)  # vm id -> its cold-move target
    estimated_duration_s: float = 0.0
    imbalance_before: float | None = None
    imbalance_after: float | None = None


@dataclass(frozen=True)
class Estimator:
    """Duration of moves: memory (and copied disk) over the link, pre-copy overhead, a fixed cost
    per move, with ``parallel`` moves at once (admission control's per-host limit)."""

    bandwidth_bytes_per_s: float = 1.0 * GiB
    precopy_factor: float = 1.2  # a second pass re-sends the pages dirtied during the first
    per_move_s: float = 5.0
    parallel: int = 2

    def calibrated(self, history: Sequence[tuple[float, int]], *, min_samples: int = 3) -> Estimator:
        """The same estimator with its fixed cost per move taken from past moves on this
        connection, as (seconds taken, bytes copied): the median of what the link model leaves
        unexplained. Too little history keeps the default."""
        if len(history) < min_samples:
            return self
        rest = [max(0.0, took - self.precopy_factor * copied / self.bandwidth_bytes_per_s) for took, copied in history]
        return dataclasses.replace(self, per_move_s=statistics.median(rest))

    def move_s(self, copied_bytes: int) -> float:
        return self.per_move_s + self.precopy_factor * copied_bytes / self.bandwidth_bytes_per_s

    def total_s(self, copied: Iterable[int]) -> float:
        times = sorted((self.move_s(c) for c in copied), reverse=True)
        if not times:
            return 0.0
        # Longest first onto the lane that frees first: a fair bound for a FIFO with `parallel` slots.
        lanes = [0.0] * max(1, self.parallel)
        for t in times:
            lanes[lanes.index(min(lanes))] += t
        return max(lanes)


def _gib(n: float) -> str:
    return f"{n / GiB:,.1f} GiB"


class _HostLoad:
    """Memory committed and anti-affinity groups per host, as moves are planned."""

    def __init__(self, hosts: Sequence[HostCap], vms: Sequence[VMInfo], headroom: float):
        self.hosts = {h.id: h for h in hosts}
        self.headroom = headroom
        self.used: dict[int, int] = {h.id: 0 for h in hosts}
        self.groups: dict[int, dict[str, int]] = {h.id: {} for h in hosts}
        for vm in vms:
            if vm.host_id in self.used:
                self.add(vm, vm.host_id)

    def limit(self, host_id: int) -> float:
        return self.hosts[host_id].memory_bytes * (1.0 - self.headroom)

    def free_after(self, vm: VMInfo, host_id: int) -> float:
        return self.limit(host_id) - self.used[host_id] - vm.memory_bytes

    def add(self, vm: VMInfo, host_id: int) -> None:
        self.used[host_id] += vm.memory_bytes
        for g in vm.anti_affinity:
            self.groups[host_id][g] = self.groups[host_id].get(g, 0) + 1

    def remove(self, vm: VMInfo, host_id: int) -> None:
        self.used[host_id] -= vm.memory_bytes
        for g in vm.anti_affinity:
            self.groups[host_id][g] -= 1

    def why_not(self, vm: VMInfo, host: HostCap, *, check_stores: bool = True) -> str:
        """'' when ``vm`` may go to ``host`` now, else the reason."""
        if not host.usable:
            return f"{host.name} is {host.unusable_reason or 'not usable'}"
        if check_stores and not vm.datastore_ids <= host.datastore_ids:
            return f"{host.name} does not see its datastore"
        clash = sorted(g for g in vm.anti_affinity if self.groups[host.id].get(g, 0) > 0)
        if clash:
            return f"{host.name} already runs a VM of anti-affinity group {clash[0]}"
        if self.free_after(vm, host.id) < 0:
            free = max(0.0, self.limit(host.id) - self.used[host.id])
            return f"{host.name} has {_gib(free)} free (after headroom); it needs {_gib(vm.memory_bytes)}"
        return ""

    def utilisation(self, host_ids: Iterable[int]) -> list[float]:
        return [100.0 * self.used[h] / self.hosts[h].memory_bytes for h in host_ids if self.hosts[h].memory_bytes]


def imbalance(load: _HostLoad, host_ids: Sequence[int]) -> float:
    """Population std-dev of memory utilisation (percent) over the hosts."""
    values = load.utilisation(host_ids)
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def _summarise(reasons: list[str]) -> str:
    if not reasons:
        return "no other usable host in its cluster"
    return "no host fits: " + "; ".join(reasons)


def plan_host_evacuation(
    *, source_host_id: int, hosts: Sequence[HostCap], vms: Sequence[VMInfo], headroom: float = 0.1,
    estimator: Estimator | None = None, cold_stores: Sequence[StoreCap] | None = None,
) -> Plan:
    """A target host for every VM on ``source_host_id`` (live compute moves within its cluster).
    With ``cold_stores`` (the driver can cold-move), a cold target for each VM that cannot move live."""
    source = next(h for h in hosts if h.id == source_host_id)
    cluster = [h for h in hosts if h.cluster_id == source.cluster_id and h.id != source_host_id]
    leaving = [vm for vm in vms if vm.host_id == source_host_id]
    # VMs already elsewhere count on their hosts; the leaving ones count nowhere while re-placed.
    load = _HostLoad(cluster, [vm for vm in vms if vm.host_id != source_host_id], headroom)
    plan = Plan()
    cold_candidates: list[VMInfo] = []
    for vm in sorted(leaving, key=lambda v: (-v.memory_bytes, v.name, v.id)):
        if vm.blocker:
            plan.unmovable[vm.id] = vm.blocker
            continue
        if not vm.powered_on:
            plan.unmovable[vm.id] = "powered off; a live migration needs it running"
            cold_candidates.append(vm)
            continue
        reasons, fits = [], []
        for host in cluster:
            why = load.why_not(vm, host)
            (reasons.append(why) if why else fits.append(host))
        if not fits:
            plan.unmovable[vm.id] = _summarise(reasons)
            cold_candidates.append(vm)
            continue
        best = max(fits, key=lambda h: (load.free_after(vm, h.id), -h.id))
        free = load.free_after(vm, best.id)
        load.add(vm, best.id)
        plan.moves.append(PlannedMove(vm_id=vm.id, order=len(plan.moves) + 1, target_host_id=best.id,
                                      why=f"most free memory after the move ({_gib(free)} left)"))
    if cold_stores is not None:
        _plan_cold(plan, cold_candidates, cluster, load, cold_stores)
    memory = {vm.id: vm.memory_bytes for vm in vms}
    plan.estimated_duration_s = (estimator or Estimator()).total_s(memory[m.vm_id] for m in plan.moves)
    return plan


def _plan_cold(plan: Plan, candidates: Sequence[VMInfo], cluster: Sequence[HostCap], load: _HostLoad,
               stores: Sequence[StoreCap]) -> None:
    """Cold targets after the live ones took their room: a host by the same rules except datastore
    visibility; when it does not see the VM's datastores, also the datastore it sees with the most
    free space (the disks are copied while the VM is off)."""
    free = {s.id: float(s.free_bytes) for s in stores if s.usable}
    for vm in candidates:
        options = []
        for host in cluster:
            if load.why_not(vm, host, check_stores=False):
                continue
            store = None
            if not vm.datastore_ids <= host.datastore_ids:
                seen = [s for s in stores if s.id in free and host.id in s.host_ids and free[s.id] >= vm.disk_bytes]
                if not seen:
                    continue
                store = max(seen, key=lambda s: (free[s.id], -s.id))
            options.append((load.free_after(vm, host.id), -host.id, host, store))
        if not options:
            continue
        left, _, host, store = max(options, key=lambda o: (o[0], o[1]))
        load.add(vm, host.id)
        if store is not None:
            free[store.id] -= vm.disk_bytes
        where = f"{host.name}" + (f" with its disks on {store.name}" if store else "")
        plan.cold_moves[vm.id] = PlannedMove(vm_id=vm.id, order=0, target_host_id=host.id,
                                             target_datastore_id=store.id if store else None,
                                             why=f"cold move to {where} ({_gib(left)} left)")


def plan_datastore_evacuation(
    *, source_datastore_id: int, stores: Sequence[StoreCap], vms: Sequence[VMInfo], reserve: float = 0.05,
    capacities: dict[int, int] | None = None, estimator: Estimator | None = None, cold: bool = False,
) -> Plan:
    """A target datastore for every VM with disks on ``source_datastore_id`` (live storage moves):
    one its host sees, with the most free space after the copy (keeping ``reserve`` of capacity)."""
    others = [s for s in stores if s.id != source_datastore_id]
    free = {s.id: float(s.free_bytes) - reserve * (capacities or {}).get(s.id, 0) for s in others}
    plan = Plan()
    copied: list[int] = []
    affected = [vm for vm in vms if source_datastore_id in vm.datastore_ids]
    for vm in sorted(affected, key=lambda v: (-v.bytes_on(source_datastore_id), v.name, v.id)):
        if vm.blocker:
            plan.unmovable[vm.id] = vm.blocker
            continue
        # A storage move puts every disk of the VM on the target: all but what is already there is copied.
        def need(store: StoreCap, vm: VMInfo = vm) -> int:
            return vm.disk_bytes - vm.bytes_on(store.id)

        reasons, fits = [], []
        for store in others:
            if not store.usable:
                reasons.append(f"{store.name} is not accessible")
            elif vm.host_id not in store.host_ids:
                reasons.append(f"its host does not see {store.name}")
            elif free[store.id] < need(store):
                reasons.append(f"{store.name} has {_gib(max(0.0, free[store.id]))} free; it needs {_gib(need(store))}")
            else:
                fits.append(store)
        if not fits:
            plan.unmovable[vm.id] = "no datastore fits: " + "; ".join(reasons) if reasons else "no other datastore"
            continue
        best = max(fits, key=lambda s: (free[s.id] - need(s), -s.id))
        if not vm.powered_on:  # it cannot move live; with a cold-moving driver it can go there cold
            plan.unmovable[vm.id] = "powered off; a live migration needs it running"
            if not cold:
                continue
        free[best.id] -= need(best)
        why = f"most free space after the copy ({_gib(free[best.id])} left)"
        if not vm.powered_on:
            plan.cold_moves[vm.id] = PlannedMove(vm_id=vm.id, order=0, target_datastore_id=best.id,
                                                 why=f"cold move to {best.name}, {why}")
            continue
        copied.append(need(best))
        plan.moves.append(PlannedMove(vm_id=vm.id, order=len(plan.moves) + 1, target_datastore_id=best.id,
                                      why=why))
    plan.estimated_duration_s = (estimator or Estimator()).total_s(copied)
    return plan


def recommend_rebalance(
    *, hosts: Sequence[HostCap], vms: Sequence[VMInfo], headroom: float = 0.1, min_gain: float = 0.5,
    max_moves: int = 10, estimator: Estimator | None = None,
) -> Plan:
    """Greedy: repeatedly take the single move (each VM at most once) that lowers the imbalance
    (std-dev of memory use, in percent) the most; stop when the gain is below ``min_gain`` points
    or after ``max_moves``. Returns the moves and the imbalance before and after."""
    usable = [h for h in hosts if h.usable]
    ids = [h.id for h in usable]
    load = _HostLoad(usable, vms, headroom)
    plan = Plan()
    plan.imbalance_before = current = imbalance(load, ids)
    moved: set[int] = set()
    candidates = [vm for vm in vms if vm.host_id in load.hosts and not vm.blocker and vm.powered_on]
    while len(plan.moves) < max_moves:
        best: tuple[float, VMInfo, HostCap] | None = None
        for vm in candidates:
            if vm.id in moved:
                continue
            load.remove(vm, vm.host_id)  # judge the target as if the VM had left its host
            for host in usable:
                if host.id == vm.host_id or load.why_not(vm, host):
                    continue
                load.add(vm, host.id)
                score = imbalance(load, ids)
                load.remove(vm, host.id)
                if best is None or score < best[0] - 1e-9:
                    best = (score, vm, host)
            load.add(vm, vm.host_id)
        if best is None or current - best[0] < min_gain:
            break
        score, vm, host = best
        load.remove(vm, vm.host_id)
        load.add(vm, host.id)
        moved.add(vm.id)
        plan.moves.append(PlannedMove(vm_id=vm.id, order=len(plan.moves) + 1, target_host_id=host.id,
                                      why=f"imbalance {current:.1f} -> {score:.1f} points"))
        current = score
    plan.imbalance_after = current
    memory = {vm.id: vm.memory_bytes for vm in vms}
    plan.estimated_duration_s = (estimator or Estimator()).total_s(memory[m.vm_id] for m in plan.moves)
    return plan
