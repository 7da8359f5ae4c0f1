"""Pre-flight checks computed from the portal's inventory (the same rules the Migrate form shows).

The hypervisor re-checks at run time; these catch what we can know before anyone approves.
"""

from __future__ import annotations

from drivers.base import Capability
from migrations_app.choices import MigrationKind, PowerState
from migrations_app.models import Datastore, Host, VirtualMachine
from migrations_app.services.errors import ActionRefused


def check_move(vm: VirtualMachine, kind: str, target_host: Host | None, target_datastore: Datastore | None, *,
               cold: bool = False, mounts: dict[int, set[int]] | None = None) -> None:
    """Raise ActionRefused with the first reason the move is impossible; return when it is valid.
    A ``cold`` move (power off, move, power on: a move plan's fallback) needs a driver with
    ``Capability.COLD_MOVE`` and a VM that is not suspended (its memory state would be lost);
    everything else is judged the same.

    ``mounts`` (host id -> the datastore ids it mounts, from ``host_mounts``) spares the query for
    the move's host when a batch read them all at once. Pass the VM with its disks prefetched too."""
    if kind not in MigrationKind.values:
        raise ActionRefused(f"unknown migration kind {kind!r}", field="kind")
    wants_host = kind in (MigrationKind.COMPUTE, MigrationKind.BOTH)
    wants_ds = kind in (MigrationKind.STORAGE, MigrationKind.BOTH)
    if wants_host and target_host is None:
        raise ActionRefused("choose a target host", field="target_host")
    if wants_ds and target_datastore is None:
        raise ActionRefused("choose a target datastore", field="target_datastore")
    if not wants_host and target_host is not None:
        raise ActionRefused("a storage move keeps the VM on its host; do not choose a host", field="target_host")
    if not wants_ds and target_datastore is not None:
        raise ActionRefused("a compute move keeps the disks in place; do not choose a datastore", field="target_datastore")
    if not vm.present:
        raise ActionRefused(f"{vm.name} is no longer in the hypervisor's inventory", field="vm")
    if cold and not vm.connection.supports(Capability.COLD_MOVE):
        raise ActionRefused(f"{vm.connection.name} cannot cold-move a VM")
    if cold and vm.power_state == PowerState.SUSPENDED:
        raise ActionRefused(f"{vm.name} is suspended; resume or power it off before a cold move")
    if not cold and vm.power_state != PowerState.ON:
        raise ActionRefused(f"{vm.name} is {vm.get_power_state_display().lower()}; a live migration needs it running")

    host = vm.host
    if target_host is not None:
        if target_host.connection_id != vm.connection_id:
            raise ActionRefused("the target host belongs to another hypervisor manager", field="target_host")
        if target_host.pk == vm.host_id:
            raise ActionRefused(f"{vm.name} already runs on {target_host.name}", field="target_host")
        if target_host.cluster_id != vm.host.cluster_id:
            raise ActionRefused(
                f"{target_host.name} is in cluster {target_host.cluster.name}; "
                f"{vm.name} can only move live within {vm.host.cluster.name}",
                field="target_host",
            )
        if not target_host.usable:
            raise ActionRefused(f"{target_host.name} is {target_host.unusable_reason()}", field="target_host")
        host = target_host

    seen = mounts[host.pk] if mounts is not None else set(host.datastores.values_list("pk", flat=True))
    if target_datastore is not None:
        if target_datastore.connection_id != vm.connection_id:
            raise ActionRefused("the datastore belongs to another hypervisor manager", field="target_datastore")
        current = vm.datastore_ids()
        if current == {target_datastore.pk}:
            raise ActionRefused(f"{vm.name}'s disks are already on {target_datastore.name}", field="target_datastore")
        if target_datastore.pk not in seen:
            raise ActionRefused(f"{target_datastore.name} is not mounted on {host.name}", field="target_datastore")
        if not target_datastore.present or not target_datastore.accessible:
            raise ActionRefused(f"{target_datastore.name} is not accessible", field="target_datastore")
        moving = sum(d.capacity_bytes for d in vm.disks.all() if d.datastore_id != target_datastore.pk)
        if target_datastore.free_bytes < moving:
            raise ActionRefused(
                f"{target_datastore.name} has {target_datastore.free_bytes / 1024**3:,.0f} GiB free; "
                f"{vm.name} needs {moving / 1024**3:,.0f} GiB",
                field="target_datastore",
            )
    elif not vm.datastore_ids() <= seen and (cold or not vm.connection.supports(Capability.COMPUTE_COPIES_LOCAL_DISKS)):
        raise ActionRefused(
            f"{host.name} does not see {vm.name}'s datastore; choose a compute and storage move",
            field="target_host",
        )


def host_mounts(host_ids) -> dict[int, set[int]]:
    """Host id -> the ids of the datastores it mounts, for many hosts in one query."""
    out: dict[int, set[int]] = {pk: set() for pk in host_ids}
    rows = Datastore.hosts.through.objects.filter(host_id__in=out).values_list("host_id", "datastore_id")
    for host_id, datastore_id in rows:
        out[host_id].add(datastore_id)
    return out
