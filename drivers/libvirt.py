"""libvirt driver: live migration, live storage migration and both, between libvirt/QEMU hosts.

The portal manages a set of libvirt daemons ("hosts") through one connection config; there is no
manager above them, so this driver is the manager: it groups hosts into clusters, sees the storage
pools of every host as datastores, finds a domain by its UUID wherever it runs, and drives
peer-to-peer migrations between daemons.

Options (``ConnectionConfig.options``)::

    {
      "hosts": [                                   # required, at least one
        {"name": "hosta",                          # host ref and label; unique
         "uri": "qemu+unix:///system?socket=/run/libvirt/libvirt-sock",  # how *this process* connects
         "migration_uri": "qemu+tcp://10.213.77.1/system",  # how the *other daemons* reach it
         "cluster": "lab"},                        # same cluster name = may trade VMs (default: own)
        ...
      ],
      "shared_pools": ["shared"],        # pool names that are one shared directory on every host
                                         # defining them (libvirt cannot tell a directory is shared);
                                         # a path that differs between hosts marks it not accessible
      "datacenter": "libvirt",           # name of the one datacenter shown
      "keepalive_interval_s": 5, "keepalive_count": 3,   # dead connections are noticed and reopened
      "poll_interval_s": 0.25,           # jobStats / blockJobInfo sampling while a job runs
      "completion_timeout_per_gib_s": 800,  # budget when spec.timeout_s is not given (Nova's rule)
      "auto_converge": false,            # VIR_MIGRATE_AUTO_CONVERGE: throttle a guest that dirties fast
      "post_copy": false,                # VIR_MIGRATE_POSTCOPY, switched on after ...
      "post_copy_after_iterations": 2,   # ... this many pre-copy passes (no cancel after the switch)
    }

Refs (opaque to the portal): host ``hosta``; cluster ``cluster/lab``; datacenter ``dc/libvirt``;
datastore ``hosta/pool/images`` (a host's own pool) or ``pool/shared`` (a shared pool); VM
``uuid:<domain uuid>`` (the same on every host); network ``hosta/net/default``; task id
``<source host>/<uuid>/<start, UTC>/<target host or ->/<target datastore or ->``.

How moves map to libvirt:

- compute: ``migrateToURI3`` peer-to-peer with LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE; disks on
  a shared pool stay (+UNSAFE), disks on a host pool are copied into the pool of the same name and
  path on the target (+NON_SHARED_DISK) and the source copy is deleted after success;
- storage: per disk, a volume is created in the target pool, ``blockCopy`` (REUSE_EXT|TRANSIENT_JOB)
  mirrors into it, ``blockJobAbort(PIVOT)`` switches over, the old volume is deleted;
- both: the target volume is created in the chosen pool on the target host, then a migration with
  NON_SHARED_DISK copies into it (destination and persistent XML name the new paths).

Progress comes from ``jobStats()`` / ``blockJobInfo()`` sampled by the calling thread while a
helper thread sits in the blocking libvirt call (libvirt-python releases the GIL there), woken
early by MIGRATION_ITERATION, JOB_COMPLETED, LIFECYCLE and BLOCK_JOB_2 events, so ``on_progress``
runs in the caller's thread. The percent, budget and error decisions live in ``libvirt_jobs``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from drivers import libvirt_jobs as jobs
from drivers import libvirt_xml as lxml
from drivers.base import (
    Capability,
    Cluster,
    ConnectionConfig,
    ConnectionFailed,
    Datacenter,
    Datastore,
    Disk,
    Driver,
    DriverError,
    Host,
    InsufficientResources,
    InvalidState,
    Inventory,
    MigrationCancelled,
    MigrationFailed,
    MigrationResult,
    MigrationSpec,
    MigrationTimedOut,
    Network,
    NotFound,
    Phase,
    Placement,
    PowerState,
    PreflightCheck,
    ProgressCallback,
    ProgressUpdate,
    TaskInfo,
    TaskState,
    Unsupported,
    VirtualMachine,
)

log = logging.getLogger(__name__)

VM_PREFIX = "uuid:"
SHARED_PREFIX = "pool/"
_ACTIVE_JOB_TYPES = (jobs.JOB_BOUNDED, jobs.JOB_UNBOUNDED)

# The SDK, bound by load_sdk() when the first driver is made: the registry and the test suite
# read this module's capabilities on machines where libvirt-python is not installed (yet).
libvirt: Any = None


def load_sdk() -> Any:
    """Import libvirt-python (once) and return it. Raises Unsupported when it is missing."""
    global libvirt
    if libvirt is None:
        try:
            import libvirt as sdk
        except ImportError as err:
            raise Unsupported(
                "libvirt-python is not installed; run lab/kvm/lab.sh install or pip install -r requirements-lab.txt",
                hypervisor_message=str(err),
            ) from err
        libvirt = sdk
    return libvirt


# --------------------------------------------------------------------------------------------
# Process-wide event loop
# --------------------------------------------------------------------------------------------

_loop_lock = threading.Lock()
_loop_started = False


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error on stderr by default; they reach us as exceptions anyway."""


def _run_event_loop() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            log.error("libvirt event loop iteration failed")
            time.sleep(0.5)  # do not spin if the loop keeps failing


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread, once per process.

    It must exist before any connection is opened: connections opened earlier never deliver
    events and cannot use keep-alive.
    """
    global _loop_started
    load_sdk()
    with _loop_lock:
        if _loop_started:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-event-loop", daemon=True).start()
        _loop_started = True


# --------------------------------------------------------------------------------------------
# Errors: one place turns libvirt's into the portal's
# --------------------------------------------------------------------------------------------


def _translate(err: libvirt.libvirtError, message: str, default: type[DriverError]) -> DriverError:
    said = err.get_error_message() or str(err)
    cls = jobs.classify_error(err.get_error_code() or 0, err.get_error_domain() or 0, said, default)
    return cls(message, hypervisor_message=said, code=f"libvirt:{err.get_error_code()}")


@contextlib.contextmanager
def _errors(message: str, default: type[DriverError] = MigrationFailed) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as err:
        raise _translate(err, message, default) from err


def _code(err: libvirt.libvirtError) -> int:
    return err.get_error_code() or 0


# --------------------------------------------------------------------------------------------
# Configuration and connections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostConfig:
    name: str
    uri: str
    migration_uri: str
    cluster: str


def _parse_hosts(options: Mapping[str, object]) -> dict[str, HostConfig]:
    raw = options.get("hosts")
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError("libvirt options need a non-empty 'hosts' list")
    hosts: dict[str, HostConfig] = {}
    for item in raw:
        if not isinstance(item, Mapping) or not item.get("name") or not item.get("uri"):
            raise ValueError(f"each libvirt host needs 'name' and 'uri': {item!r}")
        name = str(item["name"])
        if name in hosts or "/" in name:
            raise ValueError(f"libvirt host names must be unique and contain no '/': {name!r}")
        hosts[name] = HostConfig(
            name=name,
            uri=str(item["uri"]),
            migration_uri=str(item.get("migration_uri") or ""),
            cluster=str(item.get("cluster") or name),
        )
    return hosts


class _Connections:
    """One connection per host, opened on first use, reopened when it died (keep-alive)."""

    def __init__(self, hosts: Mapping[str, HostConfig], interval: int, count: int):
        self._hosts = hosts
        self._interval = interval
        self._count = count
        self._conns: dict[str, libvirt.virConnect] = {}
        self._locks = {name: threading.Lock() for name in hosts}

    def get(self, name: str) -> libvirt.virConnect:
        host = self._hosts[name]
        with self._locks[name]:
            conn = self._conns.get(name)
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except libvirt.libvirtError:
                    pass  # as dead as isAlive() == 0: reopen below
                log.warning("connection to %s died; reconnecting", name)
                self._forget(name)
            with _errors(f"cannot connect to libvirt host {name}", ConnectionFailed):
                conn = libvirt.open(host.uri)
            try:
                conn.setKeepAlive(self._interval, self._count)
                conn.registerCloseCallback(self._closed, name)
            except libvirt.libvirtError as err:
                log.warning("no keep-alive on %s: %s", name, err.get_error_message())
            self._conns[name] = conn
            return conn

    def _closed(self, conn: libvirt.virConnect, reason: int, name: str) -> None:
        """Close callback (event loop thread): drop the dead connection; the next get() reopens."""
        log.warning("libvirt connection to %s closed (reason %s)", name, reason)
        if self._conns.get(name) is conn:
            self._conns.pop(name, None)

    def _forget(self, name: str) -> None:
        conn = self._conns.pop(name, None)
        if conn is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def close(self) -> None:
        for name in list(self._conns):
            with self._locks[name]:
                self._forget(name)


# --------------------------------------------------------------------------------------------
# What the driver reads from a host
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pool:
    name: str
    path: str
    ref: str
    capacity: int
    free: int
    active: bool
    obj: libvirt.virStoragePool = field(compare=False, repr=False)


@dataclass(frozen=True)
class _Located:
    """A domain as found on one host."""

    host: HostConfig
    conn: libvirt.virConnect = field(repr=False)
    dom: libvirt.virDomain = field(repr=False)
    uuid: str
    name: str
    facts: lxml.DomainFacts
    state: int
    reason: int

    @property
    def active(self) -> bool:
        return self.state not in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED, libvirt.VIR_DOMAIN_NOSTATE)

    @property
    def rank(self) -> int:
        """Which copy of a domain is "the" VM while it exists on two hosts (during a migration)."""
        if self.state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
            return 3
        if self.state == libvirt.VIR_DOMAIN_PAUSED and self.reason != libvirt.VIR_DOMAIN_PAUSED_MIGRATION:
            return 2
        return 1 if self.active else 0


@dataclass(frozen=True)
class _DiskMove:
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
class _Plan:
    spec: MigrationSpec
    vm: _Located
    source: HostConfig
    target: HostConfig
    memory_bytes: int
    disks: tuple[_DiskMove, ...]

    @property
    def moves_host(self) -> bool:
        return self.source.name != self.target.name

    @property
    def copies(self) -> tuple[_DiskMove, ...]:
        return tuple(d for d in self.disks if d.copy)

    @property
    def copy_bytes(self) -> int:
        return sum(d.capacity for d in self.copies)


class _JobWatch:
    """What a running job shares between libvirt's event thread, the call thread and the caller.
    Every writer sets ``wake`` so the caller's wait ends early."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.returned = False  # the blocking call came back without an error
        self.finished = False  # the blocking call came back, one way or the other
        self.error: libvirt.libvirtError | None = None
        self.iteration = 0
        self.switching = False
        self.completed: dict = {}
        self.block_status: dict[str, int] = {}

    def note(self) -> None:
        self.wake.set()


# Event callbacks run in the event loop thread; they only record and wake the caller.
def _on_iteration(_conn, _dom, iteration, watch: _JobWatch) -> None:
    watch.iteration = int(iteration)
    watch.note()


def _on_job_completed(_conn, _dom, params, watch: _JobWatch) -> None:
    watch.completed = dict(params or {})
    watch.note()


def _on_lifecycle(_conn, _dom, event, detail, watch: _JobWatch) -> None:
    if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED and detail in (
        libvirt.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED,
        libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY,
    ):
        watch.switching = True  # the source paused: last pages are being sent
        watch.note()


def _on_block_job(_conn, _dom, disk, _type, status, watch: _JobWatch) -> None:
    watch.block_status[str(disk)] = int(status)
    watch.note()


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class LibvirtDriver(Driver):
    """A set of libvirt/QEMU hosts managed as one endpoint (see the module docstring)."""

    kind = "libvirt"
    capabilities = (
        Capability.COMPUTE_MIGRATION
        | Capability.STORAGE_MIGRATION
        | Capability.COMBINED_MIGRATION
        | Capability.CANCEL
        | Capability.PROGRESS
        | Capability.TASK_LOOKUP
    )

    def __init__(self, config: ConnectionConfig):
        super().__init__(config)
        opts = dict(config.options)
        self.hosts = _parse_hosts(opts)
        self.shared_pools = frozenset(str(p) for p in opts.get("shared_pools", ()) or ())
        self.datacenter = str(opts.get("datacenter") or "libvirt")
        self.poll_interval = float(opts.get("poll_interval_s", 0.25))
        self.per_gib_s = float(opts.get("completion_timeout_per_gib_s", jobs.COMPLETION_TIMEOUT_PER_GIB_S))
        self.auto_converge = bool(opts.get("auto_converge", False))
        self.post_copy = bool(opts.get("post_copy", False))
        self.post_copy_after = int(opts.get("post_copy_after_iterations", 2))
        ensure_event_loop()  # before the first connection opens
        self._conns = _Connections(
            self.hosts, int(opts.get("keepalive_interval_s", 5)), int(opts.get("keepalive_count", 3))
        )

    # -- session ---------------------------------------------------------------------------
    def conn(self, host: str) -> libvirt.virConnect:
        """The open connection to one host (reopened if it died). Raises ConnectionFailed."""
        return self._conns.get(host)

    def describe(self) -> str:
        for name in self.hosts:
            try:
                conn = self.conn(name)
            except ConnectionFailed:
                continue
            with _errors(f"cannot read the version of {name}", ConnectionFailed):
                lib = conn.getLibVersion()
                hv = conn.getVersion()
            return (
                f"libvirt {lib // 1000000}.{lib // 1000 % 1000}.{lib % 1000}, "
                f"QEMU {hv // 1000000}.{hv // 1000 % 1000}.{hv % 1000}; hosts {', '.join(self.hosts)}"
            )
        raise ConnectionFailed(f"no libvirt host is reachable ({', '.join(self.hosts)})")

    def close(self) -> None:
        self._conns.close()

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

    def _pools(self, host: str) -> dict[str, _Pool]:
        conn = self.conn(host)
        pools = {}
        with _errors(f"cannot list the storage pools of {host}", ConnectionFailed):
            for obj in conn.listAllStoragePools(0):
                path = lxml.pool_target_path(obj.XMLDesc(0))
                if not path:
                    continue  # not a file-based pool: no place for a disk image
                active = bool(obj.isActive())
                _, capacity, _, available = obj.info() if active else (0, 0, 0, 0)
                name = obj.name()
                pools[name] = _Pool(name, path, self._pool_ref(host, name), capacity, available, active, obj)
        return pools

    @staticmethod
    def _pool_of(pools: Mapping[str, _Pool], path: str) -> _Pool | None:
        folder = os.path.dirname(path).rstrip("/")
        return next((p for p in pools.values() if p.path == folder), None)

    def _disk_ref(self, host: str, pools: Mapping[str, _Pool], path: str) -> str:
        pool = self._pool_of(pools, path)
        # A disk outside every pool gets a datastore of its own, shown as not accessible.
        return pool.ref if pool else f"{host}/dir{os.path.dirname(path)}"

    def _domains(self, host: str) -> list[_Located]:
        conn = self.conn(host)
        found = []
        with _errors(f"cannot list the domains of {host}", ConnectionFailed):
            doms = conn.listAllDomains(0)
        for dom in doms:
            try:
                found.append(self._located(self.hosts[host], conn, dom))
            except libvirt.libvirtError as err:
                if _code(err) != jobs.ERR_NO_DOMAIN:  # gone meanwhile (a migration ended): skip it
                    raise _translate(err, f"cannot read a domain on {host}", ConnectionFailed) from err
        return found

    @staticmethod
    def _located(host: HostConfig, conn: libvirt.virConnect, dom: libvirt.virDomain) -> _Located:
        state, reason = dom.state(0)
        return _Located(
            host=host,
            conn=conn,
            dom=dom,
            uuid=dom.UUIDString(),
            name=dom.name(),
            facts=lxml.parse_domain(dom.XMLDesc(0)),
            state=state,
            reason=reason,
        )

    def _locate(self, vm_ref: str) -> _Located:
        """The domain's best copy over every reachable host (see ``_Located.rank``)."""
        if not vm_ref.startswith(VM_PREFIX):
            raise NotFound(f"VM {vm_ref!r} does not exist")
        uuid = vm_ref[len(VM_PREFIX) :]
        best: _Located | None = None
        for name, host in self.hosts.items():
            try:
                conn = self.conn(name)
                dom = conn.lookupByUUIDString(uuid)
                here = self._located(host, conn, dom)
            except ConnectionFailed:
                continue  # a host that is down cannot run the VM we are looking for
            except libvirt.libvirtError as err:
                if _code(err) in (jobs.ERR_NO_DOMAIN, jobs.ERR_INVALID_ARG):
                    continue
                raise _translate(err, f"cannot look up VM {vm_ref} on {name}", ConnectionFailed) from err
            if best is None or here.rank > best.rank:
                best = here
        if best is None:
            raise NotFound(f"VM {vm_ref!r} does not exist on any libvirt host")
        return best

    def _disk_capacity(self, vm: _Located, disk: lxml.DomainDisk) -> int:
        try:
            if vm.active:
                return int(vm.dom.blockInfo(disk.dev, 0)[0])
            return int(vm.conn.storageVolLookupByPath(disk.path).info()[1])
        except libvirt.libvirtError:
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
                with _errors(f"cannot read host {name}", ConnectionFailed):
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
                with contextlib.suppress(libvirt.libvirtError):
                    if pool.active:
                        pool.obj.refresh(0)  # volumes created behind libvirt's back (lab setup)
                        _, pool_capacity, _, pool_free = pool.obj.info()
                        pool = _Pool(pool.name, pool.path, pool.ref, pool_capacity, pool_free, True, pool.obj)
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
                with _errors(f"cannot read VM {vm.name} on {name}", ConnectionFailed):
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
    def _networks(host: str, conn: libvirt.virConnect) -> list[Network]:
        try:
            return [Network(f"{host}/net/{n.name()}", n.name(), (host,)) for n in conn.listAllNetworks(0)]
        except libvirt.libvirtError:
            return []  # no network driver on this host (the lab has none): networks are optional

    def placement(self, vm_ref: str) -> Placement:
        vm = self._locate(vm_ref)
        pools = self._pools(vm.host.name)
        return Placement(vm.host.name, {d.dev: self._disk_ref(vm.host.name, pools, d.path) for d in vm.facts.disks})

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
    def _free_memory(conn: libvirt.virConnect) -> int | None:
        try:
            return int(conn.getFreeMemory())
        except libvirt.libvirtError:
            return None

    def _cpu_check(self, plan: _Plan, target: libvirt.virConnect) -> PreflightCheck:
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
        except libvirt.libvirtError as err:
            return PreflightCheck("cpu-compatible", False, err.get_error_message() or str(err))
        ok = result != libvirt.VIR_CPU_COMPARE_INCOMPATIBLE
        what = facts.cpu_model or "the source host CPU"
        return PreflightCheck("cpu-compatible", ok, f"{plan.target.name} {'can' if ok else 'cannot'} run {what}")

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
        with _errors(f"cannot read the jobs of {vm.name}", ConnectionFailed):
            stats = vm.dom.jobStats(0) if vm.active else {}
            blocks = [vm.dom.blockJobInfo(d.dev, 0) for d in vm.facts.disks] if vm.active else []
        if stats.get("type") in _ACTIVE_JOB_TYPES or any(blocks):
            return TaskInfo(task_id, TaskState.RUNNING, f"a job runs on {vm.name} at {vm.host.name}")
        placement = self.placement(VM_PREFIX + uuid)
        host_ok = target_host == "-" or placement.host_ref == target_host
        ds_ok = target_ds == "-" or set(placement.datastore_refs) == {target_ds}
        if host_ok and ds_ok:
            return TaskInfo(task_id, TaskState.SUCCEEDED, f"{vm.name} is on {placement.host_ref}")
        with contextlib.suppress(libvirt.libvirtError):
            last = vm.dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) if vm.active else {}
            if last.get("type") == libvirt.VIR_DOMAIN_JOB_CANCELLED:
                return TaskInfo(task_id, TaskState.CANCELLED, f"{vm.name} stayed on {placement.host_ref}: cancelled")
        return TaskInfo(task_id, TaskState.FAILED, f"{vm.name} is not where the task was moving it")

    # -- planning ----------------------------------------------------------------------------
    def _plan(self, spec: MigrationSpec) -> _Plan:
        """Validate a move against the hosts and decide what happens to each disk."""
        vm = self._locate(spec.vm_ref)
        target = self._host(spec.target_host_ref) if spec.target_host_ref else vm.host
        ds_host, ds_pool = self._parse_datastore(spec.target_datastore_ref) if spec.target_datastore_ref else (None, "")
        if not vm.active or vm.state == libvirt.VIR_DOMAIN_PAUSED:
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
                _DiskMove(disk.dev, disk.format, capacity, disk.path, source_ref, target_path, pool.ref, pool.name)
            )
        if spec.target_datastore_ref and not any(m.copy for m in moves):
            raise InvalidState(f"every disk of {vm.name} is already on {spec.target_datastore_ref}")
        self._check_room(vm.name, target.name, target_pools, [m for m in moves if m.copy])
        with _errors(f"cannot read VM {vm.name}", ConnectionFailed):
            memory = int(vm.dom.info()[1]) * 1024
        return _Plan(spec, vm, vm.host, target, memory, tuple(moves))

    def _check_room(self, vm_name: str, host: str, pools: Mapping[str, _Pool], copies: list[_DiskMove]) -> None:
        need: dict[str, int] = {}
        for move in copies:
            pool = pools[move.target_pool]
            with contextlib.suppress(libvirt.libvirtError):
                pool.obj.storageVolLookupByName(os.path.basename(move.target_path))
                raise InvalidState(f"{host} already has a volume {move.target_path}; it would be overwritten")
            need[move.target_pool] = need.get(move.target_pool, 0) + move.capacity
        for name, size in need.items():
            if pools[name].free < size:
                raise InsufficientResources(
                    f"{pools[name].ref} has {pools[name].free / 1024**2:.0f} MiB free; {vm_name} needs {size / 1024**2:.0f} MiB"
                )

    # -- write side --------------------------------------------------------------------------
    def migrate(
        self, spec: MigrationSpec, *, on_progress: ProgressCallback, cancel: threading.Event
    ) -> MigrationResult:
        plan = self._plan(spec)
        started = time.monotonic()
        task_id = "/".join(
            (
                plan.source.name,
                plan.vm.uuid,
                datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ"),
                spec.target_host_ref or "-",
                spec.target_datastore_ref or "-",
            )
        )
        budget = jobs.completion_budget_s(plan.memory_bytes if plan.moves_host else 0, plan.copy_bytes, self.per_gib_s)
        deadline = started + jobs.effective_timeout_s(spec.timeout_s, budget)
        tracker = jobs.ProgressTracker(task_id, plan.memory_bytes if plan.moves_host else 0, plan.copy_bytes)
        on_progress(ProgressUpdate(Phase.PRECHECK, 0.0, task_id=task_id, message=f"moving {plan.vm.name}"))
        if plan.moves_host:
            downtime = self._live_migrate(plan, tracker, on_progress, cancel, deadline)
        else:
            downtime = self._block_copy(plan, tracker, on_progress, cancel, deadline)
        self._delete_sources(plan)
        placement = self.placement(spec.vm_ref)
        on_progress(tracker.done(plan.copy_bytes + (plan.memory_bytes if plan.moves_host else 0)))
        where = f"{placement.host_ref}, {', '.join(placement.datastore_refs)}"
        return MigrationResult(
            placement=placement,
            task_id=task_id,
            downtime_ms=downtime,
            duration_s=time.monotonic() - started,
            message=f"{plan.vm.name} moved to {where}",
        )

    # A live migration (compute or both) ------------------------------------------------------
    def _live_migrate(
        self,
        plan: _Plan,
        tracker: jobs.ProgressTracker,
        on_progress: ProgressCallback,
        cancel: threading.Event,
        deadline: float,
    ) -> float | None:
        spec, vm = plan.spec, plan.vm
        target = self.conn(plan.target.name)
        copies = plan.copies
        names = jobs.migration_flag_names(
            copies_disks=bool(copies),
            shared_disks=len(copies) < len(plan.disks),
            auto_converge=self.auto_converge,
            post_copy=self.post_copy,
        )
        flags = 0
        for flag in names:
            flags |= getattr(libvirt, f"VIR_MIGRATE_{flag}")
        params: dict[str, object] = {}
        if (mib := jobs.bandwidth_mib_s(spec.bandwidth_bytes_per_s)) is not None:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = mib
        if copies:
            params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = [d.dev for d in copies]
            new_paths = {d.dev: d.target_path for d in copies if d.target_path != d.source_path}
            if new_paths:
                with _errors(f"cannot read the definition of {vm.name}", MigrationFailed):
                    live = vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
                    persistent = vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_INACTIVE)
                params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = lxml.with_disk_paths(live, new_paths)
                params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = lxml.with_disk_paths(persistent, new_paths)
        if spec.max_downtime_ms:
            with _errors(f"cannot set the maximum downtime of {vm.name}", MigrationFailed):
                vm.dom.migrateSetMaxDowntime(int(spec.max_downtime_ms), 0)

        created = self._create_target_volumes(plan, target)
        watch = _JobWatch()
        callbacks = self._register(
            vm.conn,
            vm.dom,
            watch,
            (
                (libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, _on_iteration),
                (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, _on_job_completed),
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, _on_lifecycle),
            ),
        )
        call = threading.Thread(
            target=self._migration_call,
            args=(vm.dom, plan.target.migration_uri, params, flags, watch),
            name=f"libvirt-migrate-{vm.name}",
            daemon=True,
        )
        stop = ""
        try:
            call.start()
            stop = self._follow_migration(plan, watch, tracker, on_progress, cancel, deadline)
        except BaseException:
            # Our own caller broke (e.g. on_progress raised): never leave a job running unattended.
            self._abort(vm.dom)
            call.join()
            if not watch.returned:
                self._delete_volumes(target, created)
            raise
        finally:
            call.join()
            self._deregister(vm.conn, callbacks)
        if not watch.returned:
            self._delete_volumes(target, created)
            raise self._job_error(plan, watch.error, stop)
        if stop:
            log.info("migration of %s finished before the %s took effect", vm.name, stop)
        on_progress(tracker.switchover())
        return self._downtime(plan, target, watch)

    @staticmethod
    def _migration_call(dom: libvirt.virDomain, uri: str, params: dict, flags: int, watch: _JobWatch) -> None:
        """Runs in a helper thread: the blocking peer-to-peer migration call."""
        try:
            dom.migrateToURI3(uri, params, flags)
            watch.returned = True
        except libvirt.libvirtError as err:
            watch.error = err
        finally:
            watch.finished = True
            watch.note()

    def _follow_migration(
        self,
        plan: _Plan,
        watch: _JobWatch,
        tracker: jobs.ProgressTracker,
        on_progress: ProgressCallback,
        cancel: threading.Event,
        deadline: float,
    ) -> str:
        """Report progress until the migration call returns; abort it on cancel or past the
        deadline. Returns why it was aborted ("cancel", "timeout") or ""."""
        dom = plan.vm.dom
        stop = ""
        postcopy_started = False
        while True:
            watch.wake.wait(self.poll_interval)  # an event, the call's end, or the next sample
            watch.wake.clear()
            if watch.finished:
                return stop
            if stop:
                continue  # aborted: wait for the call to come back
            if cancel.is_set() or jobs.timed_out(time.monotonic(), deadline):
                stop = "cancel" if cancel.is_set() else "timeout"
                self._abort(dom)
                continue
            try:
                stats = dom.jobStats(0)
            except libvirt.libvirtError:
                continue  # the job is ending; the call's outcome tells what happened
            if stats.get("type") not in _ACTIVE_JOB_TYPES:
                continue
            on_progress(
                tracker.migration(
                    stats, time.monotonic(), copies_disks=bool(plan.copies), switching_over=watch.switching
                )
            )
            iteration = max(watch.iteration, int(stats.get("memory_iteration", 0)))
            if self.post_copy and not postcopy_started and jobs.postcopy_due(iteration, self.post_copy_after):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.migrateStartPostCopy(0)
                    postcopy_started = True
                    log.info("migration of %s switched to post-copy after %s passes", plan.vm.name, iteration)

    @staticmethod
    def _abort(dom: libvirt.virDomain) -> None:
        try:
            dom.abortJob()
        except libvirt.libvirtError as err:
            log.warning("abortJob failed (the job may have just ended): %s", err.get_error_message())

    def _job_error(self, plan: _Plan, err: libvirt.libvirtError | None, stop: str) -> DriverError:
        where = f"{plan.vm.name} stays on {plan.source.name}"
        if stop == "cancel":
            return MigrationCancelled(
                f"migration of {plan.vm.name} cancelled; {where}",
                hypervisor_message=err.get_error_message() if err else "",
            )
        if stop == "timeout":
            return MigrationTimedOut(
                f"migration of {plan.vm.name} did not finish in time and was aborted; {where}",
                hypervisor_message=err.get_error_message() if err else "",
            )
        if err is None:
            return MigrationFailed(f"migration of {plan.vm.name} ended without a result; {where}")
        return _translate(err, f"migration of {plan.vm.name} to {plan.target.name} failed; {where}", MigrationFailed)

    def _downtime(self, plan: _Plan, target: libvirt.virConnect, watch: _JobWatch) -> float | None:
        """The measured downtime: from the destination's record of the finished job, else from
        the JOB_COMPLETED event (which may trail the call's return)."""
        with contextlib.suppress(libvirt.libvirtError):
            stats = target.lookupByUUIDString(plan.vm.uuid).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            if "downtime" in stats:
                return float(stats["downtime"])
        if "downtime" not in watch.completed:
            watch.wake.clear()
            watch.wake.wait(1.0)
        return float(watch.completed["downtime"]) if "downtime" in watch.completed else None

    # A storage migration on one host ---------------------------------------------------------
    def _block_copy(
        self,
        plan: _Plan,
        tracker: jobs.ProgressTracker,
        on_progress: ProgressCallback,
        cancel: threading.Event,
        deadline: float,
    ) -> float | None:
        vm, spec = plan.vm, plan.spec
        created = self._create_target_volumes(plan, vm.conn)
        params = (
            {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: int(spec.bandwidth_bytes_per_s)}
            if spec.bandwidth_bytes_per_s
            else {}
        )
        flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        watch = _JobWatch()
        callbacks = self._register(vm.conn, vm.dom, watch, ((libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, _on_block_job),))
        running: list[_DiskMove] = []
        try:
            for move in plan.copies:
                with _errors(f"cannot start copying {vm.name}'s {move.dev} to {move.target_ds}", MigrationFailed):
                    vm.dom.blockCopy(
                        move.dev, lxml.block_copy_destination_xml(move.target_path, move.fmt), params, flags
                    )
                running.append(move)
            stop = self._follow_block_copies(plan, running, watch, tracker, on_progress, cancel, deadline)
            if stop:
                self._cancel_block_copies(vm.dom, running)
                running = []
                raise self._job_error(plan, None, stop)
            on_progress(tracker.switchover("pivoting to the new volumes"))
            started = time.monotonic()
            for move in list(running):
                with _errors(f"cannot switch {vm.name}'s {move.dev} to {move.target_ds}", MigrationFailed):
                    vm.dom.blockJobAbort(move.dev, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                running.remove(move)
                created.remove(move.target_path)  # in use now: never clean this one up
            return round(1000.0 * (time.monotonic() - started), 1)  # the pivot is the only I/O pause
        except BaseException:
            self._cancel_block_copies(vm.dom, running)
            self._delete_volumes(vm.conn, created)
            raise
        finally:
            self._deregister(vm.conn, callbacks)

    def _follow_block_copies(
        self,
        plan: _Plan,
        running: list[_DiskMove],
        watch: _JobWatch,
        tracker: jobs.ProgressTracker,
        on_progress: ProgressCallback,
        cancel: threading.Event,
        deadline: float,
    ) -> str:
        """Report progress until every copy is ready to pivot; "cancel"/"timeout" when told to stop."""
        dom = plan.vm.dom
        complete: dict[str, bool] = {}
        while True:
            if cancel.is_set():
                return "cancel"
            if jobs.timed_out(time.monotonic(), deadline):
                return "timeout"
            infos = {}
            for move in running:
                with _errors(f"cannot follow the copy of {plan.vm.name}'s {move.dev}", MigrationFailed):
                    infos[move.dev] = dom.blockJobInfo(move.dev, 0)
            for move in running:
                status = watch.block_status.get(move.dev, watch.block_status.get(move.source_path))
                if (
                    status in (libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED, libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED)
                    or not infos[move.dev]
                ):
                    raise MigrationFailed(
                        f"the copy of {plan.vm.name}'s {move.dev} to {move.target_ds} stopped; it stays where it was"
                    )
            on_progress(tracker.block_copy([(int(i["cur"]), int(i["end"])) for i in infos.values()], time.monotonic()))
            # Ready = the BLOCK_JOB_2 READY event; a copy seen complete on two samples in a row
            # counts too, in case the event was lost (a reconnect drops registrations).
            ready = [
                watch.block_status.get(m.dev, watch.block_status.get(m.source_path))
                == libvirt.VIR_DOMAIN_BLOCK_JOB_READY
                or (complete.get(m.dev, False) and 0 < int(infos[m.dev]["end"]) == int(infos[m.dev]["cur"]))
                for m in running
            ]
            if all(ready):
                return ""
            complete = {dev: 0 < int(i["end"]) == int(i["cur"]) for dev, i in infos.items()}
            watch.wake.wait(self.poll_interval)
            watch.wake.clear()

    @staticmethod
    def _cancel_block_copies(dom: libvirt.virDomain, running: list[_DiskMove]) -> None:
        for move in running:
            try:
                dom.blockJobAbort(move.dev, 0)  # no PIVOT: the guest keeps its old disk
            except libvirt.libvirtError as err:
                log.warning("blockJobAbort(%s) failed: %s", move.dev, err.get_error_message())
        running.clear()

    # Volumes and events ------------------------------------------------------------------------
    def _create_target_volumes(self, plan: _Plan, conn: libvirt.virConnect) -> list[str]:
        """Create the destination volume of every copied disk whose path changes (libvirt itself
        creates a missing one only at the same path). Returns every target path this move may
        leave behind on failure, created here or by libvirt, for clean-up."""
        created = [move.target_path for move in plan.copies]  # _check_room saw none of them exist
        try:
            for move in plan.copies:
                if move.target_path == move.source_path:
                    continue
                with _errors(f"cannot create {move.target_path} on {plan.target.name}", MigrationFailed):
                    pool = conn.storagePoolLookupByName(move.target_pool)
                    pool.createXML(lxml.volume_xml(os.path.basename(move.target_path), move.capacity, move.fmt), 0)
        except DriverError:
            self._delete_volumes(conn, created)
            raise
        return created

    @staticmethod
    def _delete_volumes(conn: libvirt.virConnect, paths: list[str]) -> None:
        for path in paths:
            try:
                conn.storageVolLookupByPath(path).delete(0)
            except libvirt.libvirtError as err:
                if _code(err) != jobs.ERR_NO_STORAGE_VOL:
                    log.warning("could not remove %s after a failed move: %s", path, err.get_error_message())

    def _delete_sources(self, plan: _Plan) -> None:
        """After a successful move the copied-from images are unused: remove them (a failure here
        is logged, not raised: the VM did move)."""
        try:
            conn = self.conn(plan.source.name)
        except ConnectionFailed as err:
            log.warning("source images of %s left on %s: %s", plan.vm.name, plan.source.name, err.explanation())
            return
        for move in plan.copies:
            try:
                conn.storageVolLookupByPath(move.source_path).delete(0)
            except libvirt.libvirtError as err:
                log.warning("could not remove the old image %s: %s", move.source_path, err.get_error_message())

    @staticmethod
    def _register(conn: libvirt.virConnect, dom: libvirt.virDomain, watch: _JobWatch, events) -> list[int]:
        ids = []
        for event_id, callback in events:
            try:
                ids.append(conn.domainEventRegisterAny(dom, event_id, callback, watch))
            except libvirt.libvirtError as err:
                log.warning("no event %s: %s (progress falls back to sampling)", event_id, err.get_error_message())
        return ids

    @staticmethod
    def _deregister(conn: libvirt.virConnect, ids: list[int]) -> None:
        for callback_id in ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)


def _power_state(state: int) -> PowerState:
    if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
        return PowerState.SUSPENDED
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return PowerState.ON
    return PowerState.OFF
