"""The hypervisor driver contract.

A driver is an adapter between the portal and one hypervisor manager (vCenter, a set of libvirt
hosts, the built-in simulator). The portal only ever talks to drivers through this module: frozen
dataclasses in and out, domain exceptions, capability flags. Nothing here (or in any driver) imports
Django; hypervisor identifiers (managed object ids, libvirt URIs, domain UUIDs) travel as opaque
``ref`` strings that only the driver interprets.

The flow of one migration::

    driver = registry.open_driver(config)          # one per worker process and connection
    driver.migrate(spec, on_progress=cb, cancel=event)   # blocks; reports through cb
      -> MigrationResult                            # or raises a DriverError subclass
"""

from __future__ import annotations

import abc
import enum
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------
# Capabilities
# --------------------------------------------------------------------------------------------


class Capability(enum.Flag):
    """What a driver can do; the portal hides or refuses what a driver lacks."""

    NONE = 0
    COMPUTE_MIGRATION = enum.auto()  # live move of a running VM to another host (vMotion)
    STORAGE_MIGRATION = enum.auto()  # live move of a VM's disks to another datastore (svMotion)
    COMBINED_MIGRATION = enum.auto()  # both in one operation
    CANCEL = enum.auto()  # a running migration can be aborted and the VM stays on the source
    PROGRESS = enum.auto()  # reports intermediate progress (not only start and end)
    CHECK_API = enum.auto()  # the endpoint has its own pre-flight check (CheckRelocate_Task)
    TASK_LOOKUP = enum.auto()  # a stored task id can be looked up after a worker crash
    # A compute move copies disks the target host cannot see into its own storage of the same name
    # (libvirt NON_SHARED_DISK); without it, a compute move needs storage the target host sees.
    COMPUTE_COPIES_LOCAL_DISKS = enum.auto()
    # The hypervisor lists a VM's migration tasks: crash recovery finds a move whose worker died
    # before it stored the task id (``migration_tasks``).
    TASKS_BY_VM = enum.auto()
    # A migration task can be aborted by its id from another process (``cancel_task``): the
    # watchdog stops a lost worker's move that passed its budget.
    TASK_ABORT = enum.auto()
    # Power a VM off, move it (host and/or storage) and power it on again (``Driver.cold_move``):
    # the fallback a move plan offers for a VM that cannot move live. The guest is down meanwhile.
    COLD_MOVE = enum.auto()


# --------------------------------------------------------------------------------------------
# Connection and inventory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionConfig:
    """How to reach one hypervisor manager. ``options`` carries driver-specific settings."""

    kind: str  # registry key: "simulator", "vcenter", "libvirt"
    url: str = ""
    username: str = ""
    password: str = field(default="", repr=False)  # never printed, never logged
    verify_tls: bool = True
    ca_bundle: str = ""  # PEM text or a path; empty = system trust store
    is_lab: bool = False  # only a lab connection may use plain http / skip TLS checks
    options: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Datacenter:
    ref: str
    name: str


@dataclass(frozen=True)
class Cluster:
    ref: str
    name: str
    datacenter_ref: str


@dataclass(frozen=True)
class Host:
    ref: str
    name: str
    cluster_ref: str  # hosts outside any cluster get a cluster of their own (as vCenter does)
    connected: bool = True
    maintenance: bool = False
    memory_bytes: int = 0
    cpu_model: str = ""


@dataclass(frozen=True)
class Datastore:
    ref: str
    name: str
    capacity_bytes: int
    free_bytes: int
    host_refs: tuple[str, ...]  # hosts that mount / see this datastore
    accessible: bool = True

    @property
    def shared(self) -> bool:
        return len(self.host_refs) > 1


@dataclass(frozen=True)
class Network:
    ref: str
    name: str
    host_refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Disk:
    key: str  # stable per VM: vCenter device key, libvirt target dev ("vda")
    label: str
    datastore_ref: str
    capacity_bytes: int
    path: str = ""  # "[LocalDS_0] vm/vm.vmdk", "/var/lib/libvirt/images/vm.qcow2"


class PowerState(enum.StrEnum):
    ON = "on"
    OFF = "off"
    SUSPENDED = "suspended"


@dataclass(frozen=True)
class VirtualMachine:
    ref: str
    name: str
    host_ref: str
    power_state: PowerState
    memory_bytes: int
    vcpus: int
    disks: tuple[Disk, ...]
    owner: str = ""  # owning team (vCenter custom attribute / folder, libvirt metadata)
    tags: tuple[str, ...] = ()
    folder: str = ""
    pool_ref: str = ""  # resource pool (vCenter); empty where the concept does not exist

    @property
    def datastore_refs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d.datastore_ref for d in self.disks))

    @property
    def disk_bytes(self) -> int:
        return sum(d.capacity_bytes for d in self.disks)


@dataclass(frozen=True)
class Inventory:
    """One consistent snapshot of everything the portal shows and places against."""

    datacenters: tuple[Datacenter, ...]
    clusters: tuple[Cluster, ...]
    hosts: tuple[Host, ...]
    datastores: tuple[Datastore, ...]
    networks: tuple[Network, ...]
    vms: tuple[VirtualMachine, ...]


@dataclass(frozen=True)
class Placement:
    """Where a VM is right now: its host and the datastore of each disk (by disk key)."""

    host_ref: str
    disk_datastores: Mapping[str, str]  # disk key -> datastore ref

    @property
    def datastore_refs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.disk_datastores.values()))


# --------------------------------------------------------------------------------------------
# Migration in and out
# --------------------------------------------------------------------------------------------


class MigrationKind(enum.StrEnum):
    COMPUTE = "compute"  # vMotion / libvirt live migration
    STORAGE = "storage"  # Storage vMotion / libvirt blockCopy + pivot
    BOTH = "both"  # both at once (vMotion with storage, migration with NON_SHARED_DISK)


@dataclass(frozen=True)
class MigrationSpec:
    """What to move where. At least one of the two targets is set."""

    vm_ref: str
    target_host_ref: str | None = None
    target_datastore_ref: str | None = None  # every disk goes there
    bandwidth_bytes_per_s: int | None = None  # cap on the copy, where the driver can set one
    max_downtime_ms: int | None = None
    timeout_s: float | None = None  # completion budget; the driver aborts when it passes

    def __post_init__(self) -> None:
        if not self.vm_ref:
            raise ValueError("a migration needs a VM")
        if not self.target_host_ref and not self.target_datastore_ref:
            raise ValueError("a migration needs a target host, a target datastore, or both")

    @property
    def kind(self) -> MigrationKind:
        if self.target_host_ref and self.target_datastore_ref:
            return MigrationKind.BOTH
        return MigrationKind.COMPUTE if self.target_host_ref else MigrationKind.STORAGE


class Phase(enum.StrEnum):
    """The phases every driver reports, in this order (a driver may skip some)."""

    PRECHECK = "precheck"  # validating the move with the hypervisor
    DISK_COPY = "disk_copy"  # copying disk blocks (storage moves, non-shared-disk moves)
    MEMORY_PRECOPY = "memory_precopy"  # iterative copy of guest memory while it runs
    SWITCHOVER = "switchover"  # guest paused, last dirty pages sent, resumed on the target
    DONE = "done"


PHASE_ORDER: tuple[Phase, ...] = tuple(Phase)


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress report. ``percent`` never goes down within one migration."""

    phase: Phase
    percent: float  # 0..100 over the whole migration
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bytes_per_s: float = 0.0
    eta_s: float | None = None
    iteration: int | None = None  # memory pre-copy pass number
    remaining_bytes: int | None = None  # memory still dirty in this pass
    task_id: str = ""  # the hypervisor's own task id, as soon as it is known
    message: str = ""


ProgressCallback = Callable[[ProgressUpdate], None]


@dataclass(frozen=True)
class MigrationResult:
    placement: Placement
    task_id: str = ""
    downtime_ms: float | None = None
    duration_s: float = 0.0
    message: str = ""


class TaskState(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"  # the hypervisor no longer knows the task (expired, restarted)


@dataclass(frozen=True)
class TaskInfo:
    task_id: str
    state: TaskState
    message: str = ""


@dataclass(frozen=True)
class PreflightCheck:
    """One line of a pre-flight report: ``ok`` False blocks the move."""

    name: str
    ok: bool
    message: str


# --------------------------------------------------------------------------------------------
# Errors: what went wrong, in the portal's words, keeping the hypervisor's own message
# --------------------------------------------------------------------------------------------


class DriverError(Exception):
    """Base of every error a driver raises. ``hypervisor_message`` keeps the peer's own words."""

    default_message = "the hypervisor reported an error"

    def __init__(self, message: str = "", *, hypervisor_message: str = "", code: str = ""):
        self.message = message or self.default_message
        self.hypervisor_message = hypervisor_message
        self.code = code
        super().__init__(self.message)

    def explanation(self) -> str:
        if self.hypervisor_message and self.hypervisor_message not in self.message:
            return f"{self.message} (hypervisor: {self.hypervisor_message})"
        return self.message


class ConnectionFailed(DriverError):
    default_message = "cannot reach the hypervisor manager"


class AuthenticationFailed(DriverError):
    default_message = "the hypervisor manager refused the credentials"


class PermissionDenied(DriverError):
    default_message = "the hypervisor account lacks a permission for this operation"


class NotFound(DriverError):
    default_message = "the object no longer exists on the hypervisor"


class InvalidState(DriverError):
    default_message = "the object is not in a state that allows this operation"


class InsufficientResources(DriverError):
    default_message = "the target lacks the resources (memory, CPU, disk space) for this VM"


class Unsupported(DriverError):
    default_message = "this driver or endpoint does not support the operation"


class MigrationFailed(DriverError):
    default_message = "the hypervisor failed the migration"


class MigrationCancelled(DriverError):
    default_message = "the migration was cancelled; the VM stays where it was"


class MigrationTimedOut(DriverError):
    default_message = "the migration did not finish within its time budget and was aborted"


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class Driver(abc.ABC):
    """Base class of every hypervisor driver.

    A driver instance holds one session to one connection and may be reused for many operations in
    one process. ``migrate`` blocks the calling thread; it must be safe to call ``migrate`` from
    several threads at once for different VMs, and it must watch ``cancel`` and abort the
    hypervisor job promptly (within a second or two) when it is set.
    """

    kind: str = ""
    capabilities: Capability = Capability.NONE

    def __init__(self, config: ConnectionConfig):
        self.config = config

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities

    # -- session ---------------------------------------------------------------------------
    def check_connection(self) -> str:
        """Log in (or reuse the session) and return a one-line description of the endpoint."""
        return self.describe()

    @abc.abstractmethod
    def describe(self) -> str:
        """A short human description of the endpoint (product, version)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Log out and release connections. Idempotent."""

    # -- read side -------------------------------------------------------------------------
    @abc.abstractmethod
    def inventory(self) -> Inventory:
        """The whole inventory in as few round trips as the endpoint allows."""

    @abc.abstractmethod
    def placement(self, vm_ref: str) -> Placement:
        """Where the VM is now, read from the hypervisor. Raises NotFound."""

    def preflight(self, spec: MigrationSpec) -> tuple[PreflightCheck, ...]:
        """Endpoint-side checks beyond what the portal computes from inventory. Default: none."""
        return ()

    def task_info(self, task_id: str) -> TaskInfo:
        """The state of a migration task started earlier (crash recovery)."""
        raise Unsupported("this driver cannot look up earlier tasks")

    def migration_tasks(self, vm_ref: str, *, since: float) -> tuple[TaskInfo, ...]:
        """The migration tasks the hypervisor started on this VM since ``since`` (Unix time), oldest
        first. Crash recovery asks it when a worker died before it could record the task id: did
        the move start? Drivers with TASKS_BY_VM implement it."""
        raise Unsupported("this driver cannot list a VM's tasks")

    def cancel_task(self, task_id: str) -> TaskInfo:
        """Ask the hypervisor to abort a migration task whose worker is lost, and wait a short
        while for it to end. Returns the task's state then (RUNNING: it has not ended yet; a task
        that had already ended keeps its state). Drivers with TASK_ABORT implement it."""
        raise Unsupported("this driver cannot abort a task started by another process")

    # -- write side ------------------------------------------------------------------------
    @abc.abstractmethod
    def migrate(
        self,
        spec: MigrationSpec,
        *,
        on_progress: ProgressCallback,
        cancel: threading.Event,
    ) -> MigrationResult:
        """Run one live migration to the end. Raises a DriverError subclass on failure,
        MigrationCancelled when ``cancel`` was set, MigrationTimedOut past ``spec.timeout_s``."""

    def cold_move(
        self,
        spec: MigrationSpec,
        *,
        on_progress: ProgressCallback,
        cancel: threading.Event,
    ) -> MigrationResult:
        """Move a VM that cannot move live: power it off (if it runs), move it to the target host
        and/or datastore, power it on again (if it ran). Drivers with ``Capability.COLD_MOVE``
        override this; the others refuse. Same errors and progress rules as ``migrate``."""
        raise Unsupported("this hypervisor driver cannot cold-move a VM")

    # -- batches ---------------------------------------------------------------------------
    # A worker that claims several runs at once hands them to the driver together, so a driver
    # whose endpoint can answer for many objects in one call (vCenter's PropertyCollector) pays
    # its round trips once per batch rather than once per move. The defaults call the one-move
    # methods, each move in its own thread, so every driver supports batches.

    def preflight_many(
        self, specs: Sequence[MigrationSpec], *, cold: frozenset[int] = frozenset()
    ) -> list[tuple[PreflightCheck, ...] | Exception]:
        """``preflight`` for several moves: item i is specs[i]'s checks, or the exception that
        kept them from being made (a DriverError, or any other: the portal's bug), for that move alone.
        The indexes in ``cold`` are cold moves (``cold_move``), which the live checks would refuse
        (a powered-off VM, say): by default they get no checks here, since ``cold_move`` judges its
        move when it starts; a driver with checks of its own for cold moves answers them."""
        out: list[tuple[PreflightCheck, ...] | Exception] = []
        for i, spec in enumerate(specs):
            try:
                out.append(() if i in cold else self.preflight(spec))
            except Exception as exc:  # noqa: BLE001 - handed to the caller, which tells bugs apart
                out.append(exc)
        return out

    def migrate_many(
        self,
        specs: Sequence[MigrationSpec],
        *,
        on_progress: Callable[[int, ProgressUpdate], None],
        cancels: Sequence[threading.Event],
        cold: frozenset[int] = frozenset(),
        on_done: Callable[[int, MigrationResult | BaseException], None] | None = None,
    ) -> list[MigrationResult | BaseException]:
        """Run several moves, each to its end, each as ``migrate`` (``cold_move`` for the indexes
        in ``cold``) would: item i is specs[i]'s result or the exception it ended with (a
        DriverError, or any other exception: the portal's bug). ``on_progress(i, update)``
        reports move i; ``cancels[i]`` stops move i alone; ``on_done(i, result)`` is called as
        soon as move i has ended, so a caller need not wait for the batch's slowest move to
        record the others. Blocks until every move has ended."""
        if len(cancels) != len(specs):
            raise ValueError(f"{len(specs)} moves but {len(cancels)} cancel events")
        results: list[MigrationResult | BaseException | None] = [None] * len(specs)

        def one(i: int) -> None:
            move = self.cold_move if i in cold else self.migrate
            try:
                results[i] = move(specs[i], on_progress=lambda update: on_progress(i, update), cancel=cancels[i])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, which tells bugs apart
                results[i] = exc
            if on_done is not None:
                on_done(i, results[i])

        if len(specs) == 1:
            one(0)
        else:
            threads = [threading.Thread(target=one, args=(i,), name=f"migrate-{i}", daemon=True)
                       for i in range(len(specs))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return [r if r is not None else RuntimeError("the move ended without a result") for r in results]
