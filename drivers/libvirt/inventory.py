"""The read side: refs, the storage pools and domains of every host, the inventory, a VM's
placement, and what became of a task."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from drivers.base import (
    Cluster,
    ConnectionFailed,
    Datacenter,
    Datastore,
    Disk,
    Host,
    Inventory,
    Network,
    NotFound,
    Placement,
    PowerState,
    TaskInfo,
    TaskState,
    VirtualMachine,
)
from drivers.libvirt import jobs, sdk
from drivers.libvirt import xml as lxml
from drivers.libvirt.connections import HostConfig
from drivers.libvirt.progress import ACTIVE_JOB_TYPES
from drivers.libvirt.sdk import error_code, errors, translate

log = logging.getLogger(__name__)

VM_PREFIX = "uuid:"
SHARED_PREFIX = "pool/"


@dataclass(frozen=True)
class Pool:
    name: str
    path: str
    ref: str
    capacity: int
    free: int
    active: bool
    obj: sdk.libvirt.virStoragePool = field(compare=False, repr=False)


@dataclass(frozen=True)
class Located:
    """A domain as found on one host."""

    host: HostConfig
    conn: sdk.libvirt.virConnect = field(repr=False)
    dom: sdk.libvirt.virDomain = field(repr=False)
    uuid: str
    name: str
    facts: lxml.DomainFacts
    state: int
    reason: int

    @property
    def active(self) -> bool:
        return self.state not in (
            sdk.libvirt.VIR_DOMAIN_SHUTOFF,
            sdk.libvirt.VIR_DOMAIN_CRASHED,
            sdk.libvirt.VIR_DOMAIN_NOSTATE,
        )

    @property
    def rank(self) -> int:
        """Which copy of a domain is "the" VM while it exists on two hosts (during a migration)."""
        if self.state in (sdk.libvirt.VIR_DOMAIN_RUNNING, sdk.libvirt.VIR_DOMAIN_BLOCKED):
            return 3
        if self.state == sdk.libvirt.VIR_DOMAIN_PAUSED and self.reason != sdk.libvirt.VIR_DOMAIN_PAUSED_MIGRATION:
            return 2
        return 1 if self.active else 0


class InventoryMixin:
    """What LibvirtDriver reads from its hosts. Uses the driver's settings below and ``conn()``."""

    hosts: dict[str, HostConfig]
    shared_pools: frozenset[str]
    datacenter: str

    # -- reading hosts ---------------------------------------------------------------------
    def _host(self, ref: str) -> HostConfig:
        try:
            return self.hosts[ref]
        except KeyError:
            raise NotFound(f"host {ref!r} is not one of the libvirt hosts ({', '.join(self.hosts)})") from None

    def _pool_ref(self, host: str, pool: str) -> str:
        return f"{SHARED_PREFIX}{pool}" if pool in self.shared_pools else f"{host}/pool/{pool}"

    def _parse_datastore(self, ref: str) -> tuple[str | None, str]:
        """(host or None for a shared pool, pool name). Raises NotFound for anything else."""
        if ref.startswith(SHARED_PREFIX) and ref[len(SHARED_PREFIX) :] in self.shared_pools:
            return None, ref[len(SHARED_PREFIX) :]
        host, sep, pool = ref.partition("/pool/")
        if sep and host in self.hosts and pool and pool not in self.shared_pools:
            return host, pool
        raise NotFound(f"datastore {ref!r} does not exist")

    def _pools(self, host: str) -> dict[str, Pool]:
        conn = self.conn(host)
        pools = {}
        with errors(f"cannot list the storage pools of {host}", ConnectionFailed):
            for obj in conn.listAllStoragePools(0):
                path = lxml.pool_target_path(obj.XMLDesc(0))
                if not path:
                    continue  # not a file-based pool: no place for a disk image
                active = bool(obj.isActive())
                _, capacity, _, available = obj.info() if active else (0, 0, 0, 0)
                name = obj.name()
                pools[name] = Pool(name, path, self._pool_ref(host, name), capacity, available, active, obj)
        return pools

    @staticmethod
    def _pool_of(pools: Mapping[str, Pool], path: str) -> Pool | None:
        folder = os.path.dirname(path).rstrip("/")
        return next((p for p in pools.values() if p.path == folder), None)

    def _disk_ref(self, host: str, pools: Mapping[str, Pool], path: str) -> str:
        pool = self._pool_of(pools, path)
        # A disk outside every pool gets a datastore of its own, shown as not accessible.
        return pool.ref if pool else f"{host}/dir{os.path.dirname(path)}"

    def _domains(self, host: str) -> list[Located]:
        conn = self.conn(host)
        found = []
        with errors(f"cannot list the domains of {host}", ConnectionFailed):
            doms = conn.listAllDomains(0)
        for dom in doms:
            try:
                found.append(self._located(self.hosts[host], conn, dom))
            except sdk.libvirt.libvirtError as err:
                if error_code(err) != jobs.ERR_NO_DOMAIN:  # gone meanwhile (a migration ended): skip it
                    raise translate(err, f"cannot read a domain on {host}", ConnectionFailed) from err
        return found

    @staticmethod
    def _located(host: HostConfig, conn: sdk.libvirt.virConnect, dom: sdk.libvirt.virDomain) -> Located:
        state, reason = dom.state(0)
        return Located(
            host=host,
            conn=conn,
            dom=dom,
            uuid=dom.UUIDString(),
            name=dom.name(),
            facts=lxml.parse_domain(dom.XMLDesc(0)),
            state=state,
            reason=reason,
        )

    def _locate(self, vm_ref: str) -> Located:
        """The domain's best copy over every reachable host (see ``Located.rank``)."""
        if not vm_ref.startswith(VM_PREFIX):
            raise NotFound(f"VM {vm_ref!r} does not exist")
        uuid = vm_ref[len(VM_PREFIX) :]
        best: Located | None = None
        for name, host in self.hosts.items():
            try:
                conn = self.conn(name)
                dom = conn.lookupByUUIDString(uuid)
                here = self._located(host, conn, dom)
            except ConnectionFailed:
                continue  # a host that is down cannot run the VM we are looking for
            except sdk.libvirt.libvirtError as err:
                if error_code(err) in (jobs.ERR_NO_DOMAIN, jobs.ERR_INVALID_ARG):
                    continue
                raise translate(err, f"cannot look up VM {vm_ref} on {name}", ConnectionFailed) from err
            if best is None or here.rank > best.rank:
                best = here
        if best is None:
            raise NotFound(f"VM {vm_ref!r} does not exist on any libvirt host")
        return best

    def _disk_capacity(self, vm: Located, disk: lxml.DomainDisk) -> int:
        try:
            if vm.active:
                return int(vm.dom.blockInfo(disk.dev, 0)[0])
            return int(vm.conn.storageVolLookupByPath(disk.path).info()[1])
        except sdk.libvirt.libvirtError:
            return 0  # unreadable (disk being replaced); inventory stays readable

    # -- read side -------------------------------------------------------------------------
    def inventory(self) -> Inventory:
        dc_ref = f"dc/{self.datacenter}"
        clusters: dict[str, Cluster] = {}
        hosts: list[Host] = []
        stores: dict[str, dict] = {}
        vms: dict[str, tuple[int, VirtualMachine]] = {}
        networks: list[Network] = []
        for name, cfg in self.hosts.items():
            cluster_ref = f"cluster/{cfg.cluster}"
            clusters.setdefault(cluster_ref, Cluster(cluster_ref, cfg.cluster, dc_ref))
            try:
                conn = self.conn(name)
                with errors(f"cannot read host {name}", ConnectionFailed):
                    info = conn.getInfo()
                    cpu_model, _ = lxml.host_cpu(conn.getCapabilities())
                pools = self._pools(name)
                located = self._domains(name)
            except ConnectionFailed as err:
                log.warning("libvirt host %s left out of the inventory: %s", name, err.explanation())
                hosts.append(Host(name, name, cluster_ref, connected=False))
                continue
            hosts.append(Host(name, name, cluster_ref, memory_bytes=int(info[1]) * 1024**2, cpu_model=cpu_model))
            for pool in pools.values():
                with contextlib.suppress(sdk.libvirt.libvirtError):
                    if pool.active:
                        pool.obj.refresh(0)  # volumes created behind libvirt's back (lab setup)
                        _, pool_capacity, _, pool_free = pool.obj.info()
                        pool = Pool(pool.name, pool.path, pool.ref, pool_capacity, pool_free, True, pool.obj)
                entry = stores.setdefault(
                    pool.ref,
                    {
                        "name": pool.name,
                        "path": pool.path,
                        "capacity": pool.capacity,
                        "free": pool.free,
                        "hosts": [],
                        "ok": pool.active,
                    },
                )
                if entry["path"] != pool.path:
                    # Not one shared directory after all: shown, but not offered as a target.
                    log.warning(
                        "shared pool %s has path %s on %s but %s elsewhere", pool.name, pool.path, name, entry["path"]
                    )
                    entry["ok"] = False
                entry["hosts"].append(name)
            networks.extend(self._networks(name, conn))
            for vm in located:
                disks = []
                for disk in vm.facts.disks:
                    ref = self._disk_ref(name, pools, disk.path)
                    if ref not in stores:
                        stores[ref] = {
                            "name": os.path.dirname(disk.path),
                            "path": os.path.dirname(disk.path),
                            "capacity": 0,
                            "free": 0,
                            "hosts": [name],
                            "ok": False,
                        }
                    disks.append(Disk(disk.dev, disk.dev, ref, self._disk_capacity(vm, disk), disk.path))
                with errors(f"cannot read VM {vm.name} on {name}", ConnectionFailed):
                    _, max_kib, _, vcpus, _ = vm.dom.info()
                machine = VirtualMachine(
                    ref=VM_PREFIX + vm.uuid,
                    name=vm.name,
                    host_ref=name,
                    power_state=_power_state(vm.state),
                    memory_bytes=int(max_kib) * 1024,
                    vcpus=int(vcpus),
                    disks=tuple(disks),
                    owner=vm.facts.owner,
                    tags=vm.facts.tags,
                )
                if machine.ref not in vms or vm.rank > vms[machine.ref][0]:
                    vms[machine.ref] = (vm.rank, machine)
        return Inventory(
            datacenters=(Datacenter(dc_ref, self.datacenter),),
            clusters=tuple(clusters.values()),
            hosts=tuple(hosts),
            datastores=tuple(
                Datastore(ref, s["name"], s["capacity"], min(s["free"], s["capacity"]), tuple(s["hosts"]), s["ok"])
                for ref, s in stores.items()
            ),
            networks=tuple(networks),
            vms=tuple(sorted((v for _, v in vms.values()), key=lambda v: (v.name, v.ref))),
        )

    @staticmethod
    def _networks(host: str, conn: sdk.libvirt.virConnect) -> list[Network]:
        try:
            return [Network(f"{host}/net/{n.name()}", n.name(), (host,)) for n in conn.listAllNetworks(0)]
        except sdk.libvirt.libvirtError:
            return []  # no network driver on this host (the lab has none): networks are optional

    def placement(self, vm_ref: str) -> Placement:
        vm = self._locate(vm_ref)
        pools = self._pools(vm.host.name)
        return Placement(vm.host.name, {d.dev: self._disk_ref(vm.host.name, pools, d.path) for d in vm.facts.disks})

    def task_info(self, task_id: str) -> TaskInfo:
        """Answered from where the VM is now, which is what crash recovery needs soon after a
        worker died: a job still running on it, the VM at the requested place, or neither (then
        libvirt's record of its last job tells cancelled from failed while the daemon keeps it)."""
        parts = task_id.split("/", 4)
        if len(parts) != 5 or parts[0] not in self.hosts:
            return TaskInfo(task_id, TaskState.UNKNOWN, "not a libvirt task id")
        _, uuid, _, target_host, target_ds = parts
        try:
            vm = self._locate(VM_PREFIX + uuid)
        except NotFound:
            return TaskInfo(task_id, TaskState.UNKNOWN, "the VM no longer exists")
        with errors(f"cannot read the jobs of {vm.name}", ConnectionFailed):
            stats = vm.dom.jobStats(0) if vm.active else {}
            blocks = [vm.dom.blockJobInfo(d.dev, 0) for d in vm.facts.disks] if vm.active else []
        if stats.get("type") in ACTIVE_JOB_TYPES or any(blocks):
            return TaskInfo(task_id, TaskState.RUNNING, f"a job runs on {vm.name} at {vm.host.name}")
        placement = self.placement(VM_PREFIX + uuid)
        host_ok = target_host == "-" or placement.host_ref == target_host
        ds_ok = target_ds == "-" or set(placement.datastore_refs) == {target_ds}
        if host_ok and ds_ok:
            return TaskInfo(task_id, TaskState.SUCCEEDED, f"{vm.name} is on {placement.host_ref}")
        with contextlib.suppress(sdk.libvirt.libvirtError):
            last = vm.dom.jobStats(sdk.libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) if vm.active else {}
            if last.get("type") == sdk.libvirt.VIR_DOMAIN_JOB_CANCELLED:
                return TaskInfo(task_id, TaskState.CANCELLED, f"{vm.name} stayed on {placement.host_ref}: cancelled")
        return TaskInfo(task_id, TaskState.FAILED, f"{vm.name} is not where the task was moving it")


def _power_state(state: int) -> PowerState:
    if state in (sdk.libvirt.VIR_DOMAIN_PAUSED, sdk.libvirt.VIR_DOMAIN_PMSUSPENDED):
        return PowerState.SUSPENDED
    if state in (sdk.libvirt.VIR_DOMAIN_RUNNING, sdk.libvirt.VIR_DOMAIN_BLOCKED):
        return PowerState.ON
    return PowerState.OFF
