"""Planning a move: what happens to each disk, whether the target has room for the copies, and the
checks only the hypervisors can answer (preflight)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

from drivers.base import (
    ConnectionFailed,
    DriverError,
    InsufficientResources,
    InvalidState,
    MigrationSpec,
    NotFound,
    PreflightCheck,
)
from drivers.libvirt import sdk
from drivers.libvirt import xml as lxml
from drivers.libvirt.connections import HostConfig
from drivers.libvirt.inventory import Located, Pool
from drivers.libvirt.sdk import errors


@dataclass(frozen=True)
class DiskMove:
    dev: str
    fmt: str
    capacity: int
    source_path: str
    source_ds: str
    target_path: str
    target_ds: str
    target_pool: str  # pool name on the final host ("" when the disk stays)

    @property
    def copy(self) -> bool:
        return self.target_ds != self.source_ds


@dataclass(frozen=True)
class Plan:
    spec: MigrationSpec
    vm: Located
    source: HostConfig
    target: HostConfig
    memory_bytes: int
    disks: tuple[DiskMove, ...]

    @property
    def moves_host(self) -> bool:
        return self.source.name != self.target.name

    @property
    def copies(self) -> tuple[DiskMove, ...]:
        return tuple(d for d in self.disks if d.copy)

    @property
    def copy_bytes(self) -> int:
        return sum(d.capacity for d in self.copies)


class PlanningMixin:
    """Validation and preflight of a move. Uses ``conn()`` and the host reads of InventoryMixin."""

    def preflight(self, spec: MigrationSpec) -> tuple[PreflightCheck, ...]:
        """Checks only the hypervisors can answer: the VM runs, the target is reachable, its CPU and
        machine type fit the guest, the target pool has room, the target has free memory."""
        checks: list[PreflightCheck] = []
        try:
            plan = self._plan(spec)
        except DriverError as err:
            if isinstance(err, NotFound):
                raise
            return (PreflightCheck("move", False, err.explanation()),)
        checks.append(PreflightCheck("vm-running", True, f"{plan.vm.name} runs on {plan.source.name}"))
        target = self.conn(plan.target.name)
        if plan.moves_host:
            checks.append(PreflightCheck("target-reachable", True, f"{plan.target.name} answers"))
            checks.append(self._cpu_check(plan, target))
            free = self._free_memory(target)
            checks.append(
                PreflightCheck(
                    "target-memory",
                    free is None or free >= plan.memory_bytes,
                    f"{plan.target.name} has {free / 1024**2:.0f} MiB free, the VM needs {plan.memory_bytes / 1024**2:.0f} MiB"
                    if free is not None
                    else "free memory unknown",
                )
            )
        if plan.copies:
            checks.append(PreflightCheck("pool-room", True, f"room for {plan.copy_bytes / 1024**2:.0f} MiB of disks"))
        return tuple(checks)

    @staticmethod
    def _free_memory(conn: sdk.libvirt.virConnect) -> int | None:
        try:
            return int(conn.getFreeMemory())
        except sdk.libvirt.libvirtError:
            return None

    def _cpu_check(self, plan: Plan, target: sdk.libvirt.virConnect) -> PreflightCheck:
        facts = plan.vm.facts
        try:
            # The machine type and virt type must exist on the target at all ...
            target.getDomainCapabilities(
                facts.emulator or None, facts.arch or None, facts.machine or None, facts.virt_type or None, 0
            )
            if facts.cpu_model:
                # ... and the guest's CPU model must be runnable there,
                result = target.compareHypervisorCPU(
                    facts.emulator or None,
                    facts.arch or None,
                    facts.machine or None,
                    facts.virt_type or None,
                    lxml.guest_cpu_xml(facts.cpu_model),
                    0,
                )
            else:
                # ... or, for host-model guests, the source host's CPU.
                _, cpu_xml = lxml.host_cpu(plan.vm.conn.getCapabilities())
                result = target.compareCPU(cpu_xml, 0)
        except sdk.libvirt.libvirtError as err:
            return PreflightCheck("cpu-compatible", False, err.get_error_message() or str(err))
        ok = result != sdk.libvirt.VIR_CPU_COMPARE_INCOMPATIBLE
        what = facts.cpu_model or "the source host CPU"
        return PreflightCheck("cpu-compatible", ok, f"{plan.target.name} {'can' if ok else 'cannot'} run {what}")

    # -- planning ----------------------------------------------------------------------------
    def _plan(self, spec: MigrationSpec) -> Plan:
        """Validate a move against the hosts and decide what happens to each disk."""
        vm = self._locate(spec.vm_ref)
        target = self._host(spec.target_host_ref) if spec.target_host_ref else vm.host
        ds_host, ds_pool = self._parse_datastore(spec.target_datastore_ref) if spec.target_datastore_ref else (None, "")
        if not vm.active or vm.state == sdk.libvirt.VIR_DOMAIN_PAUSED:
            raise InvalidState(f"VM {vm.name} is not running; a live migration needs it running")
        if spec.target_host_ref:
            if target.name == vm.host.name:
                raise InvalidState(f"VM {vm.name} already runs on {target.name}")
            if target.cluster != vm.host.cluster:
                raise InvalidState(
                    f"{target.name} is in cluster {target.cluster}, not {vm.host.cluster} like {vm.host.name}"
                )
            if not target.migration_uri:
                raise InvalidState(f"host {target.name} has no migration_uri configured")
        source_pools = self._pools(vm.host.name)
        target_pools = self._pools(target.name) if target is not vm.host else source_pools
        moves = []
        for disk in vm.facts.disks:
            source = self._pool_of(source_pools, disk.path)
            source_ref = self._disk_ref(vm.host.name, source_pools, disk.path)
            capacity = self._disk_capacity(vm, disk)
            if spec.target_datastore_ref:
                if ds_host is not None and ds_host != target.name:
                    raise InvalidState(f"datastore {spec.target_datastore_ref} is not on {target.name}")
                pool = target_pools.get(ds_pool)
                if pool is None or not pool.active:
                    if ds_host is None:
                        raise InvalidState(f"datastore {spec.target_datastore_ref} is not mounted on {target.name}")
                    raise NotFound(f"datastore {spec.target_datastore_ref} does not exist")
            elif (
                source is not None and (pool := target_pools.get(source.name)) is not None and pool.path == source.path
            ):
                pass  # same pool on the target: shared (no copy) or a host pool of the same path (copy)
            else:
                raise InvalidState(f"{target.name} has no pool like {source_ref}; move the storage too")
            # Already there (a shared pool, or the chosen datastore): the disk stays. Otherwise it
            # is copied, into the same path when the target pool has the source pool's path.
            stays = pool.ref == source_ref
            target_path = disk.path if stays else os.path.join(pool.path, os.path.basename(disk.path))
            moves.append(
                DiskMove(disk.dev, disk.format, capacity, disk.path, source_ref, target_path, pool.ref, pool.name)
            )
        if spec.target_datastore_ref and not any(m.copy for m in moves):
            raise InvalidState(f"every disk of {vm.name} is already on {spec.target_datastore_ref}")
        self._check_room(vm.name, target.name, target_pools, [m for m in moves if m.copy])
        with errors(f"cannot read VM {vm.name}", ConnectionFailed):
            memory = int(vm.dom.info()[1]) * 1024
        return Plan(spec, vm, vm.host, target, memory, tuple(moves))

    def _check_room(self, vm_name: str, host: str, pools: Mapping[str, Pool], copies: list[DiskMove]) -> None:
        need: dict[str, int] = {}
        for move in copies:
            pool = pools[move.target_pool]
            with contextlib.suppress(sdk.libvirt.libvirtError):
                pool.obj.storageVolLookupByName(os.path.basename(move.target_path))
                raise InvalidState(f"{host} already has a volume {move.target_path}; it would be overwritten")
            need[move.target_pool] = need.get(move.target_pool, 0) + move.capacity
        for name, size in need.items():
            if pools[name].free < size:
                raise InsufficientResources(
                    f"{pools[name].ref} has {pools[name].free / 1024**2:.0f} MiB free; {vm_name} needs {size / 1024**2:.0f} MiB"
                )
