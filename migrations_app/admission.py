"""Admission control: which queued migrations may start now without the hypervisor queueing them.

A pure model (no database) of vCenter's migration cost limits, used for every connection kind with
its own limits: each move costs something on each host and datastore it touches; a resource whose
running moves would pass its maximum makes the move wait. Queued moves are considered in order
(priority first, then arrival); a move that must wait reserves the resources it waits for, so a
later move never overtakes it on them: nothing starves behind a stream of smaller moves.

vCenter's defaults (vSphere "Limits on Simultaneous Migrations"): per host, max cost 8, a vMotion
costs 1 and a Storage vMotion 4; per datastore, max cost 128, a vMotion 1 and a Storage vMotion 16;
per host network, 4 vMotions on 1 GbE and 8 on 10 GbE.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    host_max: int = 8
    host_compute: int = 1
    host_storage: int = 4
    datastore_max: int = 128
    datastore_compute: int = 1
    datastore_storage: int = 16
    network_max: int = 8  # concurrent vMotions per host network (10 GbE)

    @classmethod
    def for_connection(cls, kind: str, options: Mapping | None) -> Limits:
        """vCenter's model for vCenter; a small per-host default elsewhere; options override."""
        base = cls() if kind == "vcenter" else cls(host_max=2, host_compute=1, host_storage=1, datastore_max=4,
                                                   datastore_compute=1, datastore_storage=1, network_max=2)
        overrides = dict((options or {}).get("admission") or {})
        known = {k: int(v) for k, v in overrides.items() if k in cls.__dataclass_fields__}
        return cls(**{**base.__dict__, **known})


@dataclass(frozen=True)
class Move:
    """One migration as admission sees it. Hosts and datastores are names (they appear in reasons)."""

    id: int
    kind: str  # compute | storage | both
    source_host: str
    target_host: str | None = None
    datastores: frozenset[str] = frozenset()  # where its disks are now
    target_datastore: str | None = None
    priority: int = 0  # higher first
    order: int = 0  # arrival; earlier first within a priority

    def costs(self, limits: Limits) -> dict[tuple[str, str], int]:
        """Cost per resource: ("host", name), ("datastore", name), ("network", host name)."""
        storage = self.kind in ("storage", "both")
        compute = self.kind in ("compute", "both")
        host_cost = limits.host_storage if storage else limits.host_compute
        ds_cost = limits.datastore_storage if storage else limits.datastore_compute
        out: dict[tuple[str, str], int] = {}
        for host in {self.source_host, self.target_host} - {None}:
            out[("host", host)] = host_cost
            if compute:
                out[("network", host)] = 1
        for ds in set(self.datastores) | ({self.target_datastore} if self.target_datastore else set()):
            out[("datastore", ds)] = ds_cost
        return out


def _maximum(resource: tuple[str, str], limits: Limits) -> int:
    return {"host": limits.host_max, "datastore": limits.datastore_max, "network": limits.network_max}[resource[0]]


@dataclass
class Decision:
    admitted: list[Move] = field(default_factory=list)
    waiting: dict[int, str] = field(default_factory=dict)  # move id -> why it waits
    place: dict[int, int] = field(default_factory=dict)  # move id -> 1-based place among waiting


def admit(running: Iterable[Move], queued: Iterable[Move], limits: Limits) -> Decision:
    """Which queued moves may start now, and why each of the others waits."""
    use: dict[tuple[str, str], int] = {}
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for move in running:
        for res, cost in move.costs(limits).items():
            use[res] = use.get(res, 0) + cost
            counts.setdefault(res, {}).setdefault(move.kind, 0)
            counts[res][move.kind] += 1
    reserved: dict[tuple[str, str], int] = {}  # resource -> id of the earliest move waiting for it
    decision = Decision()
    for move in sorted(queued, key=lambda m: (-m.priority, m.order, m.id)):
        costs = move.costs(limits)
        blocked = [res for res in costs if res in reserved]
        full = [res for res, cost in costs.items() if use.get(res, 0) + cost > _maximum(res, limits)]
        if not blocked and not full:
            decision.admitted.append(move)
            for res, cost in costs.items():
                use[res] = use.get(res, 0) + cost
                counts.setdefault(res, {}).setdefault(move.kind, 0)
                counts[res][move.kind] += 1
            continue
        if full:
            res = full[0]
            running_here = ", ".join(f"{n} {k} move{'s' if n > 1 else ''} running" for k, n in sorted(counts.get(res, {}).items())) or "none running"
            why = f"{res[0]} {res[1]}: cost {use.get(res, 0)} of {_maximum(res, limits)} in use ({running_here})"
        else:
            why = f"{blocked[0][0]} {blocked[0][1]}: waiting behind request #{reserved[blocked[0]]}"
        decision.waiting[move.id] = why
        decision.place[move.id] = len(decision.waiting)
        for res in costs:
            reserved.setdefault(res, move.id)
    return decision
