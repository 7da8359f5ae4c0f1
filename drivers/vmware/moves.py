"""Judging a move: the facts it is judged on (read in one retrieval), the inventory rules in the
order migrate (and cold_move) enforces them, and the ``RelocateSpec`` for ``RelocateVM_Task``
(vMotion, Storage vMotion, both at once, or the relocation of a powered-off VM)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from drivers.base import Disk, DriverError, InsufficientResources, InvalidState, MigrationSpec, NotFound
from drivers.vmware.inventory import PC, MiB, _mounted_hosts, disks_of, props_of, retrieve
from drivers.vmware.session import _Session

# -- the facts a move is judged on, and the judgement -----------------------------------------


@dataclass(frozen=True)
class VmFacts:
    ref: str
    name: str
    power: str  # vCenter's runtime.powerState
    host_ref: str
    pool_ref: str
    cluster_ref: str  # owner of the VM's resource pool = the cluster of its host
    disks: tuple[Disk, ...]  # read only for moves with a target datastore (the costly property)
    datastore_refs: tuple[str, ...]  # every datastore holding a file of the VM
    tools_running: bool = False  # guest.toolsRunningStatus: a cold move may ask the guest to shut down


@dataclass(frozen=True)
class HostFacts:
    ref: str
    name: str
    cluster_ref: str
    cluster_pool_ref: str  # root resource pool of the host's cluster
    connected: bool
    maintenance: bool
    datastore_refs: tuple[str, ...]  # datastores available on the host


@dataclass(frozen=True)
class DatastoreFacts:
    ref: str
    name: str
    free_bytes: int
    accessible: bool
    host_refs: tuple[str, ...]


@dataclass(frozen=True)
class MoveFacts:
    vm: VmFacts
    host: HostFacts | None
    datastore: DatastoreFacts | None


@dataclass(frozen=True)
class MoveCheck:
    """One rule a move must pass; ``error`` is what migrate raises when it does not."""

    name: str
    ok: bool
    message: str
    error: type[DriverError] = InvalidState


def assess_move(facts: MoveFacts, spec: MigrationSpec, *, cold: bool = False) -> tuple[MoveCheck, ...]:
    """The inventory rules for a live relocation, in the order migrate enforces them (a ``cold``
    one, whatever the VM's power state, the same rules but that one). These are also the
    pre-flight report where vCenter has no CheckRelocate_Task (vcsim)."""
    vm, host, ds = facts.vm, facts.host, facts.datastore
    checks = [] if cold else [
        MoveCheck("vm-powered-on", vm.power == "poweredOn", f"VM {vm.name} is {vm.power}; a live move needs it running")
    ]
    if host is not None:
        checks += [
            MoveCheck("target-is-another-host", host.ref != vm.host_ref, f"VM {vm.name} already runs on {host.name}"),
            MoveCheck(
                "same-cluster",
                host.cluster_ref == vm.cluster_ref,
                f"{host.name} is in another cluster than VM {vm.name}",
            ),
            MoveCheck("host-connected", host.connected, f"host {host.name} is not connected to vCenter"),
            MoveCheck("host-not-in-maintenance", not host.maintenance, f"host {host.name} is in maintenance mode"),
        ]
    final_host = host.ref if host is not None else vm.host_ref
    final_name = host.name if host is not None else "the VM's host"
    if ds is not None:
        moving = sum(d.capacity_bytes for d in vm.disks if d.datastore_ref != ds.ref)
        checks += [
            # Moving the host with disks already on the target datastore is a plain compute move.
            MoveCheck(
                "disks-not-already-there",
                moving > 0 or host is not None,
                f"every disk of VM {vm.name} is already on {ds.name}",
            ),
            MoveCheck("datastore-accessible", ds.accessible, f"datastore {ds.name} is not accessible"),
            MoveCheck(
                "datastore-mounted-on-host",
                final_host in ds.host_refs,
                f"datastore {ds.name} is not mounted on {final_name}",
            ),
            MoveCheck(
                "datastore-has-room",
                ds.free_bytes >= moving,
                f"datastore {ds.name} has {ds.free_bytes / MiB:.0f} MiB free; VM {vm.name} needs {moving / MiB:.0f} MiB",
                InsufficientResources,
            ),
        ]
    elif host is not None:
        unseen = sorted(ref for ref in vm.datastore_refs if ref not in host.datastore_refs)
        checks.append(
            MoveCheck(
                "host-sees-vm-datastores",
                not unseen,
                f"{final_name} does not mount datastore(s) {', '.join(unseen)} of VM {vm.name}; move the storage too",
            )
        )
    return tuple(checks)


def judge_move(facts: MoveFacts, spec: MigrationSpec, *, cold: bool = False) -> None:
    """Raise the error of the first rule the move breaks (``assess_move``), before anything moves."""
    failed = next((c for c in assess_move(facts, spec, cold=cold) if not c.ok), None)
    if failed is not None:
        raise failed.error(failed.message, code=failed.name)


def relocate_spec(facts: MoveFacts, stub: Any) -> vim.vm.RelocateSpec:
    """The RelocateSpec for a judged move: host + resource pool, datastore + a locator per disk."""
    spec = vim.vm.RelocateSpec()
    if facts.host is not None:
        spec.host = vim.HostSystem(facts.host.ref, stub)
        # Inside its cluster the VM keeps its own pool (a child pool included); elsewhere it joins
        # the root pool of the target's cluster.
        same = facts.host.cluster_ref == facts.vm.cluster_ref
        spec.pool = vim.ResourcePool(facts.vm.pool_ref if same else facts.host.cluster_pool_ref, stub)
    if facts.datastore is not None:
        spec.datastore = vim.Datastore(facts.datastore.ref, stub)
        spec.disk = [
            vim.vm.RelocateSpec.DiskLocator(diskId=int(d.key), datastore=spec.datastore) for d in facts.vm.disks
        ]
    return spec


def read_move_facts(session: _Session, spec: MigrationSpec, *, stub: Any, page_size: int) -> MoveFacts:
    """Everything the rules need, in one RetrievePropertiesEx: the VM (and through its pool,
    its cluster), the target host (and its cluster), the target datastore.
    The VM's device list, by far the largest property, is read only when disks move."""
    facts = read_moves_facts(session, [spec], stub=stub, page_size=page_size)[0]
    if isinstance(facts, DriverError):
        raise facts
    return facts


def read_moves_facts(session: _Session, specs: Sequence[MigrationSpec], *, stub: Any,
                     page_size: int) -> list[MoveFacts | DriverError]:
    """``read_move_facts`` for several moves in one RetrievePropertiesEx (a worker's batch): item i
    is specs[i]'s facts, or NotFound when its VM is gone. The device lists are read when any move
    of the batch moves disks."""
    object_specs, seen = [], set()

    def add(ref: str, obj_spec) -> None:
        if ref not in seen:
            seen.add(ref)
            object_specs.append(obj_spec)

    for spec in specs:
        add(spec.vm_ref, PC.ObjectSpec(
            obj=vim.VirtualMachine(spec.vm_ref, stub),
            selectSet=[
                PC.TraversalSpec(
                    type=vim.VirtualMachine,
                    path="resourcePool",
                    skip=False,
                    selectSet=[PC.TraversalSpec(type=vim.ResourcePool, path="owner", skip=False)],
                ),
            ],
        ))
        if spec.target_host_ref:
            add(spec.target_host_ref, PC.ObjectSpec(
                obj=vim.HostSystem(spec.target_host_ref, stub),
                selectSet=[PC.TraversalSpec(type=vim.HostSystem, path="parent", skip=False)],
            ))
        if spec.target_datastore_ref:
            add(spec.target_datastore_ref, PC.ObjectSpec(obj=vim.Datastore(spec.target_datastore_ref, stub)))
    vm_paths = ["name", "runtime.host", "runtime.powerState", "resourcePool", "datastore", "guest.toolsRunningStatus"]
    if any(spec.target_datastore_ref for spec in specs):
        vm_paths.append("config.hardware.device")
    prop_specs = [
        PC.PropertySpec(type=vim.VirtualMachine, pathSet=vm_paths),
        PC.PropertySpec(type=vim.ResourcePool, pathSet=["owner"]),
        PC.PropertySpec(type=vim.ComputeResource, pathSet=["resourcePool"]),
        PC.PropertySpec(
            type=vim.HostSystem,
            pathSet=["name", "parent", "runtime.connectionState", "runtime.inMaintenanceMode", "datastore"],
        ),
        PC.PropertySpec(type=vim.Datastore, pathSet=["name", "summary.freeSpace", "summary.accessible", "host"]),
    ]
    objects = retrieve(session, [PC.FilterSpec(objectSet=object_specs, propSet=prop_specs)], page_size=page_size)
    by_ref = {o.obj._moId: props_of(o) for o in objects}
    out: list[MoveFacts | DriverError] = []
    for spec in specs:
        try:
            out.append(_facts_of(spec, by_ref))
        except NotFound as exc:
            out.append(exc)
    return out


def _facts_of(spec: MigrationSpec, by_ref: dict[str, dict]) -> MoveFacts:
    vm = by_ref.get(spec.vm_ref)
    if vm is None or vm.get("runtime.host") is None:
        raise NotFound(f"VM {spec.vm_ref} does not exist in vCenter or has no host")
    pool_ref = vm["resourcePool"]._moId if vm.get("resourcePool") is not None else ""
    owner = by_ref.get(pool_ref, {}).get("owner")
    disks = disks_of(vm.get("config.hardware.device")) if spec.target_datastore_ref else ()
    vm_facts = VmFacts(
        ref=spec.vm_ref,
        name=vm.get("name", spec.vm_ref),
        power=str(vm.get("runtime.powerState")),
        host_ref=vm["runtime.host"]._moId,
        pool_ref=pool_ref,
        cluster_ref=owner._moId if owner is not None else "",
        disks=disks,
        datastore_refs=tuple(ds._moId for ds in vm.get("datastore") or ()),
        tools_running=vm.get("guest.toolsRunningStatus") == "guestToolsRunning",
    )
    host_facts = None
    if spec.target_host_ref:
        host = by_ref.get(spec.target_host_ref)
        if host is None or host.get("parent") is None:
            raise NotFound(f"host {spec.target_host_ref} does not exist in vCenter")
        cluster_ref = host["parent"]._moId
        cluster_pool = by_ref.get(cluster_ref, {}).get("resourcePool")
        host_facts = HostFacts(
            ref=spec.target_host_ref,
            name=host.get("name", spec.target_host_ref),
            cluster_ref=cluster_ref,
            cluster_pool_ref=cluster_pool._moId if cluster_pool is not None else "",
            connected=host.get("runtime.connectionState") == "connected",
            maintenance=bool(host.get("runtime.inMaintenanceMode")),
            datastore_refs=tuple(ds._moId for ds in host.get("datastore") or ()),
        )
    ds_facts = None
    if spec.target_datastore_ref:
        ds = by_ref.get(spec.target_datastore_ref)
        if ds is None:
            raise NotFound(f"datastore {spec.target_datastore_ref} does not exist in vCenter")
        ds_facts = DatastoreFacts(
            ref=spec.target_datastore_ref,
            name=ds.get("name", spec.target_datastore_ref),
            free_bytes=int(ds.get("summary.freeSpace") or 0),
            accessible=bool(ds.get("summary.accessible")),
            host_refs=_mounted_hosts(ds.get("host")),
        )
    return MoveFacts(vm_facts, host_facts, ds_facts)
