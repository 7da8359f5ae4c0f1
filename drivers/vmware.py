"""vCenter driver (pyvmomi): inventory, placement, pre-flight checks and live migration by
``RelocateVM_Task`` (vMotion, Storage vMotion, or both at once).

How it talks to vCenter:

- **One session per driver instance**, opened on first use and reused; the registry keeps one
  driver per process and connection. When vCenter says the session expired (``NotAuthenticated``)
  the driver logs in once more and repeats the operation. ``close()`` logs out.
- **TLS is verified** against the system trust store or ``ConnectionConfig.ca_bundle`` (PEM text
  or a path). Plain http and unverified TLS are accepted only for lab connections (``is_lab``).
- **Reads are bulk**: the whole inventory is one ``RetrievePropertiesEx`` over a container view
  (continued with ``ContinueRetrievePropertiesEx`` while vCenter pages), never a call per object.
  ``round_trips`` counts every SOAP request, for the benchmarks.
- **Waiting uses the SDK's own primitive**: a property filter per task and
  ``WaitForUpdatesEx`` with a short ``maxWaitSeconds``, so a cancel request or a timeout is
  noticed between waits without polling loops.
- **Faults are translated in one place** (``domain_error``) into the portal's errors, keeping
  vCenter's own message as ``hypervisor_message``.

Managed object ids (``vm-42``, ``host-21``, ...) are the refs; the portal treats them as opaque.
"""

from __future__ import annotations

import functools
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit
from xml.parsers.expat import ExpatError

from pyVmomi import SoapStubAdapter, VmomiSupport, vim, vmodl

from drivers.base import (
    AuthenticationFailed,
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
    MigrationKind,
    MigrationResult,
    MigrationSpec,
    MigrationTimedOut,
    Network,
    NotFound,
    PermissionDenied,
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

T = TypeVar("T")
PC = vmodl.query.PropertyCollector
KiB = 1024
MiB = 1024**2

# The wire API version the driver speaks. vSphere 6.5 has every call used here and every
# supported vCenter (6.5 to 8.x, and vcsim) serves it; pinning it saves a version probe.
DEFAULT_API_VERSION = "vim25/6.5"
OWNER_FIELD = "owner"  # custom attribute holding the owning team
TASK_PATHS = ["info.state", "info.progress", "info.error", "info.cancelable"]
_CONNECTION_ERRORS = (OSError, HTTPException, ExpatError)  # ssl.SSLError is an OSError
_POWER = {"poweredOn": PowerState.ON, "poweredOff": PowerState.OFF, "suspended": PowerState.SUSPENDED}


# --------------------------------------------------------------------------------------------
# Pure helpers (unit-tested without a vCenter)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where the SDK lives, with the credentials to use. The password stays out of the repr."""

    scheme: str
    host: str
    port: int
    path: str
    username: str
    password: str = field(repr=False)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


def parse_endpoint(config: ConnectionConfig) -> Endpoint:
    """Read ``config.url`` (``https://vcenter.example.com/sdk``; a bare host name means that) and
    enforce the TLS rules: plain http or unverified TLS only for a lab connection. Credentials
    embedded in the URL (the lab's vcsim prints them so) are used when the config has none."""
    raw = config.url.strip()
    if "://" not in raw:
        raw = f"https://{raw}"
    parts = urlsplit(raw)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConnectionFailed(f"not a vCenter URL: {parts.scheme}://{parts.hostname or ''}", code="bad-url")
    if not config.is_lab and (parts.scheme == "http" or not config.verify_tls):
        raise ConnectionFailed(
            "plain http and unverified TLS are allowed only for lab connections; "
            "give the vCenter's CA certificate as ca_bundle instead",
            code="insecure-config",
        )
    return Endpoint(
        scheme=parts.scheme,
        host=parts.hostname,
        port=parts.port or (443 if parts.scheme == "https" else 80),
        path=parts.path if parts.path not in ("", "/") else "/sdk",
        username=config.username or unquote(parts.username or ""),
        password=config.password or unquote(parts.password or ""),
    )


def ssl_context(config: ConnectionConfig) -> ssl.SSLContext:
    """The TLS context: verified against ``ca_bundle`` (PEM text or a file path) or the system
    store; unverified only for a lab connection that asked for it (``verify_tls`` False)."""
    if not config.verify_tls and config.is_lab:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    bundle = config.ca_bundle.strip()
    if not bundle:
        return ssl.create_default_context()
    if "-----BEGIN" in bundle:
        return ssl.create_default_context(cadata=bundle)
    return ssl.create_default_context(cafile=bundle)


def abort_reason(*, cancel_requested: bool, elapsed_s: float, timeout_s: float | None) -> str | None:
    """Why a running migration must be aborted now: "cancel", "timeout", or None to go on."""
    if cancel_requested:
        return "cancel"
    if timeout_s is not None and elapsed_s > timeout_s:
        return "timeout"
    return None


def progress_percent(task_progress: int | None, previous: float) -> float:
    """Overall percent from vCenter's task progress: never backwards, below 100 until the driver
    has confirmed the result (DONE reports the 100)."""
    if task_progress is None:
        return previous
    return max(previous, min(float(task_progress), 99.0))


def task_state(state: str | None, error: vmodl.MethodFault | None = None) -> TaskState:
    """The portal's task state for a vCenter ``TaskInfo.state`` (and error, to spot cancels)."""
    if state in ("queued", "running"):
        return TaskState.RUNNING
    if state == "success":
        return TaskState.SUCCEEDED
    if state == "error":
        return TaskState.CANCELLED if isinstance(error, vmodl.fault.RequestCanceled) else TaskState.FAILED
    return TaskState.UNKNOWN


def fault_text(fault: BaseException) -> str:
    """vCenter's own words for a fault: its localized message, else its fault messages."""
    msg = getattr(fault, "msg", "") or ""
    if not msg:
        msg = "; ".join(m.message for m in getattr(fault, "faultMessage", None) or () if m.message)
    return msg or getattr(fault, "_wsdlName", type(fault).__name__)


_KIND_WORDS = {"VirtualMachine": "VM", "HostSystem": "host", "Datastore": "datastore", "Task": "task"}


def domain_error(
    fault: vmodl.MethodFault, *, default: type[DriverError] = DriverError, context: str = ""
) -> DriverError:
    """The one place where vCenter faults become the portal's errors.

    ``default`` is the error for anything not listed (reads: DriverError; a failed relocation
    task: MigrationFailed). ``context`` says what the driver was doing."""
    text = fault_text(fault)
    code = getattr(fault, "_wsdlName", type(fault).__name__)
    prefix = f"{context}: " if context else ""
    if isinstance(fault, vim.fault.InvalidLogin):
        return AuthenticationFailed(
            f"{prefix}vCenter refused the user name or password", hypervisor_message=text, code=code
        )
    if isinstance(fault, vim.fault.NotAuthenticated):
        return AuthenticationFailed(
            f"{prefix}the vCenter session is no longer valid", hypervisor_message=text, code=code
        )
    if isinstance(fault, vim.fault.NoPermission):
        return PermissionDenied(
            f"{prefix}the vCenter account lacks privilege {fault.privilegeId or '?'}",
            hypervisor_message=text,
            code=code,
        )
    if isinstance(fault, vmodl.fault.ManagedObjectNotFound):
        obj = fault.obj
        what = _KIND_WORDS.get(getattr(obj, "_wsdlName", ""), "object")
        ref = getattr(obj, "_moId", "?")
        return NotFound(f"{prefix}{what} {ref} does not exist in vCenter", hypervisor_message=text, code=code)
    if isinstance(fault, (vim.fault.InsufficientResourcesFault, vim.fault.NoDiskSpace)):
        return InsufficientResources(f"{prefix}{text}", hypervisor_message=text, code=code)
    if isinstance(fault, vim.fault.InvalidState):
        return InvalidState(f"{prefix}{text}", hypervisor_message=text, code=code)
    if isinstance(fault, vmodl.fault.RequestCanceled):
        return MigrationCancelled(f"{prefix}vCenter cancelled the task", hypervisor_message=text, code=code)
    if isinstance(fault, (vmodl.fault.MethodNotFound, vmodl.fault.NotImplemented, vmodl.fault.NotSupported)):
        return Unsupported(f"{prefix}this vCenter does not support the call", hypervisor_message=text, code=code)
    return default(f"{prefix}{text}", hypervisor_message=text, code=code)


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


def assess_move(facts: MoveFacts, spec: MigrationSpec) -> tuple[MoveCheck, ...]:
    """The inventory rules for a live relocation, in the order migrate enforces them. These are
    also the pre-flight report where vCenter has no CheckRelocate_Task (vcsim)."""
    vm, host, ds = facts.vm, facts.host, facts.datastore
    checks = [
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


def disks_of(devices: Iterable[Any]) -> tuple[Disk, ...]:
    """The virtual disks among a VM's devices, with the datastore of each backing."""
    disks = []
    for device in devices or ():
        if not isinstance(device, vim.vm.device.VirtualDisk):
            continue
        backing = device.backing
        datastore = getattr(backing, "datastore", None)
        disks.append(
            Disk(
                key=str(device.key),
                label=device.deviceInfo.label if device.deviceInfo else f"disk {device.key}",
                datastore_ref=datastore._moId if datastore is not None else "",
                capacity_bytes=device.capacityInBytes or (device.capacityInKB or 0) * KiB,
                path=getattr(backing, "fileName", "") or "",
            )
        )
    return tuple(disks)


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------


class _CountingStub(SoapStubAdapter):
    """pyvmomi's SOAP stub, counting requests (the benchmarks report them)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.round_trips = 0
        self._count_lock = threading.Lock()

    def InvokeMethod(self, mo, info, args, outerStub=None):  # noqa: N802 - pyvmomi's name
        with self._count_lock:
            self.round_trips += 1
        return super().InvokeMethod(mo, info, args, outerStub)


@dataclass
class _Session:
    """One login. Its property collectors and container view die with it."""

    content: Any  # vim.ServiceInstanceContent
    view: Any = None  # container view over the inventory, created on first inventory()
    idle_collectors: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)


def _translated(default: type[DriverError] = DriverError, context: str = ""):
    """Decorator: vCenter faults and connection errors leave public methods as DriverErrors."""

    def wrap(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def run(self: VCenterDriver, *args: Any, **kwargs: Any) -> T:
            try:
                return method(self, *args, **kwargs)
            except DriverError:
                raise
            except vmodl.MethodFault as fault:
                raise domain_error(fault, default=default, context=context) from None
            except ssl.SSLCertVerificationError as exc:
                raise ConnectionFailed(
                    f"the certificate of {self.endpoint.host} is not trusted ({exc.verify_message}); "
                    "give its CA as ca_bundle",
                    code="tls-verify",
                ) from None
            except _CONNECTION_ERRORS as exc:
                raise ConnectionFailed(
                    f"cannot talk to vCenter at {self.endpoint}: {exc.__class__.__name__}: {exc}", code="connection"
                ) from None

        return run

    return wrap


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class VCenterDriver(Driver):
    """vCenter through pyvmomi. Options (``ConnectionConfig.options``):

    - ``page_size`` (1000): objects per RetrievePropertiesEx page;
    - ``task_wait_s`` (1): longest WaitForUpdatesEx, i.e. how soon a cancel or timeout is seen;
    - ``abort_grace_s`` (120): how long to wait for vCenter to end a task after CancelTask;
    - ``http_timeout_s`` (60), ``api_version`` ("vim25/6.5").
    """

    kind = "vcenter"
    capabilities = (
        Capability.COMPUTE_MIGRATION
        | Capability.STORAGE_MIGRATION
        | Capability.COMBINED_MIGRATION
        | Capability.PROGRESS
        | Capability.TASK_LOOKUP
    )

    def __init__(self, config: ConnectionConfig):
        super().__init__(config)
        self.endpoint = parse_endpoint(config)
        opts = dict(config.options)
        self.page_size = int(opts.get("page_size", 1000))
        self.task_wait_s = max(1, int(opts.get("task_wait_s", 1)))
        self.abort_grace_s = float(opts.get("abort_grace_s", 120))
        self.http_timeout_s = float(opts.get("http_timeout_s", 60))
        api_version = str(opts.get("api_version", DEFAULT_API_VERSION))
        if api_version not in VmomiSupport.versionMap:
            raise ConnectionFailed(f"pyvmomi does not know vSphere API version {api_version!r}", code="bad-config")
        self.api_version = VmomiSupport.versionMap[api_version]
        self._lock = threading.Lock()
        self._stub: _CountingStub | None = None
        self._session: _Session | None = None
        self._check_api: bool | None = None  # CheckRelocate_Task available? None = not tried yet

    def __repr__(self) -> str:
        return f"<VCenterDriver {self.endpoint.username}@{self.endpoint.host}:{self.endpoint.port}>"

    @property
    def round_trips(self) -> int:
        """SOAP requests sent so far on this driver's connection (logins included)."""
        return self._stub.round_trips if self._stub is not None else 0

    # -- session ----------------------------------------------------------------------------
    def _login(self, expired: _Session | None) -> _Session:
        """The current session, logging in if there is none or if ``expired`` is still current."""
        with self._lock:
            if self._session is not None and self._session is not expired:
                return self._session
            if self._stub is None:
                self._stub = _CountingStub(
                    host=self.endpoint.host,
                    port=self.endpoint.port if self.endpoint.scheme == "https" else -self.endpoint.port,
                    path=self.endpoint.path,
                    version=self.api_version,
                    sslContext=ssl_context(self.config) if self.endpoint.scheme == "https" else None,
                    httpConnectionTimeout=self.http_timeout_s,
                )
            content = (
                expired.content if expired else vim.ServiceInstance("ServiceInstance", self._stub).RetrieveContent()
            )
            content.sessionManager.Login(self.endpoint.username, self.endpoint.password)
            log.info("logged in to %s as %s%s", self.endpoint, self.endpoint.username, " again" if expired else "")
            self._session = _Session(content)
            return self._session

    def _run(self, operation: Callable[[_Session], T]) -> T:
        """Run one operation in the session; if vCenter says the session expired, log in again
        and run it once more. A call refused with NotAuthenticated did not run, so repeating it
        is safe; an operation of several calls must be safe to start over (reads, a task wait)."""
        session = self._session or self._login(None)
        try:
            return operation(session)
        except vim.fault.NotAuthenticated:
            log.info("vCenter session expired; logging in again")
            return operation(self._login(session))

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            stub = self._stub
        if session is None or stub is None:
            return
        try:
            session.content.sessionManager.Logout()  # also frees its views and collectors
        except (vmodl.MethodFault, *_CONNECTION_ERRORS) as exc:
            log.warning("logout from %s failed: %s", self.endpoint, exc)
        stub.DropConnections()

    @_translated()
    def describe(self) -> str:
        about = self._run(lambda s: s.content.about)
        return f"{about.fullName} at {self.endpoint.host}"

    # -- reading ----------------------------------------------------------------------------
    def _retrieve(self, session: _Session, specs: list) -> list:
        """RetrievePropertiesEx, following vCenter's paging to the end. Returns ObjectContents."""
        collector = session.content.propertyCollector
        result = collector.RetrievePropertiesEx(specSet=specs, options=PC.RetrieveOptions(maxObjects=self.page_size))
        objects = []
        while result is not None:
            objects.extend(result.objects or ())
            result = collector.ContinueRetrievePropertiesEx(token=result.token) if result.token else None
        for content in objects:
            for missing in content.missingSet or ():
                # vcsim answers an expired session with per-property NotAuthenticated instead of a
                # fault: raise it so _run logs in again, as for vCenter's fault.
                if isinstance(missing.fault, vim.fault.NotAuthenticated):
                    raise missing.fault
        return objects

    @staticmethod
    def _props(content: Any) -> dict[str, Any]:
        return {p.name: p.val for p in content.propSet or ()}

    _INVENTORY_PROPS = {
        vim.Folder: ["name", "parent"],
        vim.Datacenter: ["name", "parent"],
        vim.ComputeResource: ["name", "parent"],  # ClusterComputeResource included
        vim.HostSystem: [
            "name",
            "parent",
            "runtime.connectionState",
            "runtime.inMaintenanceMode",
            "hardware.memorySize",
            "summary.hardware.cpuModel",
        ],
        vim.Datastore: ["name", "summary.capacity", "summary.freeSpace", "summary.accessible", "host"],
        vim.Network: ["name", "host"],
        vim.VirtualMachine: [
            "name",
            "parent",
            "resourcePool",
            "runtime.host",
            "runtime.powerState",
            "config.template",
            "config.hardware.memoryMB",
            "config.hardware.numCPU",
            "config.hardware.device",
            "customValue",
        ],
    }

    @_translated(context="reading the vCenter inventory")
    def inventory(self) -> Inventory:
        return self._run(self._inventory)

    def _inventory(self, session: _Session) -> Inventory:
        content = session.content
        if session.view is None:
            session.view = content.viewManager.CreateContainerView(
                container=content.rootFolder, type=list(self._INVENTORY_PROPS), recursive=True
            )
        object_specs = [
            PC.ObjectSpec(
                obj=session.view, skip=True, selectSet=[PC.TraversalSpec(type=vim.view.ContainerView, path="view")]
            )
        ]
        prop_specs = [PC.PropertySpec(type=t, pathSet=paths) for t, paths in self._INVENTORY_PROPS.items()]
        if content.customFieldsManager is not None:
            # The custom attribute definitions ride along in the same request.
            object_specs.append(PC.ObjectSpec(obj=content.customFieldsManager))
            prop_specs.append(PC.PropertySpec(type=vim.CustomFieldsManager, pathSet=["field"]))
        objects = self._retrieve(session, [PC.FilterSpec(objectSet=object_specs, propSet=prop_specs)])
        return _InventoryBuilder(objects).build()

    @_translated(context="reading the VM's placement")
    def placement(self, vm_ref: str) -> Placement:
        return self._run(lambda s: self._placement(s, vm_ref))

    def _placement(self, session: _Session, vm_ref: str) -> Placement:
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=vim.VirtualMachine(vm_ref, self._stub))],
            propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["runtime.host", "config.hardware.device"])],
        )
        objects = self._retrieve(session, [spec])
        props = self._props(objects[0]) if objects else {}
        host = props.get("runtime.host")
        if host is None:
            raise NotFound(f"VM {vm_ref} has no host in vCenter (it is being created, or orphaned)")
        return Placement(host._moId, {d.key: d.datastore_ref for d in disks_of(props.get("config.hardware.device"))})

    @_translated(context="looking up the vCenter task")
    def task_info(self, task_id: str) -> TaskInfo:
        try:
            objects = self._run(
                lambda s: self._retrieve(s, [_task_spec(vim.Task(task_id, self._stub), ["info.state", "info.error"])])
            )
        except vmodl.fault.ManagedObjectNotFound:
            # vCenter forgets finished tasks after a while (and on restart).
            return TaskInfo(task_id, TaskState.UNKNOWN, "vCenter no longer knows this task")
        props = self._props(objects[0]) if objects else {}
        error = props.get("info.error")
        return TaskInfo(task_id, task_state(props.get("info.state"), error), fault_text(error) if error else "")

    # -- judging a move ---------------------------------------------------------------------
    def _move_facts(self, session: _Session, spec: MigrationSpec) -> MoveFacts:
        """Everything the rules need, in one RetrievePropertiesEx: the VM (and through its pool,
        its cluster), the target host (and its cluster), the target datastore.
        The VM's device list, by far the largest property, is read only when disks move."""
        stub = self._stub
        vm_spec = PC.ObjectSpec(
            obj=vim.VirtualMachine(spec.vm_ref, stub),
            selectSet=[
                PC.TraversalSpec(
                    type=vim.VirtualMachine,
                    path="resourcePool",
                    skip=False,
                    selectSet=[PC.TraversalSpec(type=vim.ResourcePool, path="owner", skip=False)],
                ),
            ],
        )
        object_specs = [vm_spec]
        if spec.target_host_ref:
            object_specs.append(
                PC.ObjectSpec(
                    obj=vim.HostSystem(spec.target_host_ref, stub),
                    selectSet=[PC.TraversalSpec(type=vim.HostSystem, path="parent", skip=False)],
                )
            )
        if spec.target_datastore_ref:
            object_specs.append(PC.ObjectSpec(obj=vim.Datastore(spec.target_datastore_ref, stub)))
        vm_paths = ["name", "runtime.host", "runtime.powerState", "resourcePool", "datastore"]
        if spec.target_datastore_ref:
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
        objects = self._retrieve(session, [PC.FilterSpec(objectSet=object_specs, propSet=prop_specs)])
        by_ref = {o.obj._moId: self._props(o) for o in objects}
        vm = by_ref.get(spec.vm_ref)
        if vm is None or vm.get("runtime.host") is None:
            raise NotFound(f"VM {spec.vm_ref} does not exist in vCenter or has no host")
        pool_ref = vm["resourcePool"]._moId if vm.get("resourcePool") is not None else ""
        owner = by_ref.get(pool_ref, {}).get("owner")
        disks = disks_of(vm.get("config.hardware.device"))
        vm_facts = VmFacts(
            ref=spec.vm_ref,
            name=vm.get("name", spec.vm_ref),
            power=str(vm.get("runtime.powerState")),
            host_ref=vm["runtime.host"]._moId,
            pool_ref=pool_ref,
            cluster_ref=owner._moId if owner is not None else "",
            disks=disks,
            datastore_refs=tuple(ds._moId for ds in vm.get("datastore") or ()),
        )
        host_facts = None
        if spec.target_host_ref:
            host = by_ref[spec.target_host_ref]
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
            ds = by_ref[spec.target_datastore_ref]
            ds_facts = DatastoreFacts(
                ref=spec.target_datastore_ref,
                name=ds.get("name", spec.target_datastore_ref),
                free_bytes=int(ds.get("summary.freeSpace") or 0),
                accessible=bool(ds.get("summary.accessible")),
                host_refs=_mounted_hosts(ds.get("host")),
            )
        return MoveFacts(vm_facts, host_facts, ds_facts)

    @_translated(context="checking the move")
    def preflight(self, spec: MigrationSpec) -> tuple[PreflightCheck, ...]:
        """The inventory rules, plus vCenter's own CheckRelocate_Task where the endpoint has it
        (vcsim has not: the driver notices once and stops asking)."""
        facts = self._run(lambda s: self._move_facts(s, spec))
        checks = [PreflightCheck(c.name, c.ok, c.message if not c.ok else "passed") for c in assess_move(facts, spec)]
        if self._check_api is not False:
            checks.extend(self._check_relocate(facts))
        return tuple(checks)

    def _check_relocate(self, facts: MoveFacts) -> list[PreflightCheck]:
        content = self._run(lambda s: s.content)
        checker = content.vmProvisioningChecker
        if checker is None:
            self._check_api = False
            return []
        try:
            task = checker.CheckRelocate_Task(
                vm=vim.VirtualMachine(facts.vm.ref, self._stub), spec=relocate_spec(facts, self._stub)
            )
        except (vmodl.fault.MethodNotFound, vmodl.fault.NotImplemented, vmodl.fault.NotSupported) as fault:
            log.info(
                "%s has no CheckRelocate_Task (%s); pre-flight uses inventory rules only",
                self.endpoint,
                fault_text(fault),
            )
            self._check_api = False
            return []
        self._check_api = True
        end = self._run(lambda s: self._follow(s, task, paths=[*TASK_PATHS, "info.result"]))
        if end.state != "success":
            return [
                PreflightCheck("vcenter-check", False, fault_text(end.error) if end.error else "vCenter's check failed")
            ]
        checks = []
        for result in end.result or ():
            checks += [PreflightCheck("vcenter-check", False, fault_text(f)) for f in result.error or ()]
            checks += [PreflightCheck("vcenter-warning", True, fault_text(f)) for f in result.warning or ()]
        return checks or [PreflightCheck("vcenter-check", True, "vCenter found no problem")]

    # -- moving -----------------------------------------------------------------------------
    @_translated(MigrationFailed, context="migrating the VM")
    def migrate(
        self, spec: MigrationSpec, *, on_progress: ProgressCallback, cancel: threading.Event
    ) -> MigrationResult:
        started = time.monotonic()
        facts = self._run(lambda s: self._move_facts(s, spec))
        failed = next((c for c in assess_move(facts, spec) if not c.ok), None)
        if failed is not None:
            raise failed.error(failed.message, code=failed.name)

        progress = _ProgressReporter(on_progress)
        progress(Phase.PRECHECK, 0.0, message=f"moving {facts.vm.name}")
        task = self._run(
            lambda s: vim.VirtualMachine(spec.vm_ref, self._stub).RelocateVM_Task(spec=relocate_spec(facts, self._stub))
        )
        task_id = task._moId
        log.info("relocating %s (%s): %s started", facts.vm.name, spec.kind.value, task_id)
        phase = Phase.MEMORY_PRECOPY if spec.kind == MigrationKind.COMPUTE else Phase.DISK_COPY
        progress(phase, 0.0, task_id=task_id)

        def on_task_progress(value: int | None) -> None:
            progress(phase, progress_percent(value, progress.percent), task_id=task_id)

        end = self._run(
            lambda s: self._follow(
                s, task, started=started, timeout_s=spec.timeout_s, cancel=cancel, on_progress=on_task_progress
            )
        )
        if end.state != "success":
            raise self._unsuccessful(end, task_id, facts.vm.name, spec)

        placement = self._run(lambda s: self._placement(s, spec.vm_ref))
        message = f"VM {facts.vm.name} moved"
        if end.aborted:
            message += f" (the {end.aborted} came too late: vCenter no longer allowed cancelling the task)"
        progress(Phase.DONE, 100.0, task_id=task_id, message=message)
        return MigrationResult(
            placement=placement, task_id=task_id, duration_s=time.monotonic() - started, message=message
        )

    @staticmethod
    def _unsuccessful(end: _TaskEnd, task_id: str, vm_name: str, spec: MigrationSpec) -> DriverError:
        """The error for a relocation task that did not succeed."""
        said = fault_text(end.error) if end.error is not None else ""
        if end.state == "running":  # we asked for an abort and vCenter did not end the task in time
            error_class = MigrationTimedOut if end.aborted == "timeout" else MigrationCancelled
            return error_class(
                f"vCenter task {task_id} did not stop after it was cancelled; VM {vm_name} may still move",
                code="abort-unconfirmed",
            )
        if end.aborted == "timeout":
            return MigrationTimedOut(
                f"VM {vm_name} did not move within {spec.timeout_s:g} s; vCenter task {task_id} was cancelled",
                hypervisor_message=said,
            )
        if end.aborted == "cancel" or isinstance(end.error, vmodl.fault.RequestCanceled):
            return MigrationCancelled(
                f"migration of VM {vm_name} cancelled; it stays where it was", hypervisor_message=said
            )
        if end.error is not None:
            return domain_error(end.error, default=MigrationFailed, context=f"vCenter task {task_id} failed")
        return MigrationFailed(f"vCenter task {task_id} ended in state {end.state}")

    def _take_collector(self, session: _Session) -> Any:
        """A property collector of this session for one task wait. Each waiting thread needs its
        own: WaitForUpdatesEx returns the updates of every filter of the collector it is called on."""
        try:
            return session.idle_collectors.get_nowait()
        except queue.Empty:
            return session.content.propertyCollector.CreatePropertyCollector()

    def _follow(
        self,
        session: _Session,
        task: Any,
        *,
        paths: list[str] = TASK_PATHS,
        started: float = 0.0,
        timeout_s: float | None = None,
        cancel: threading.Event | None = None,
        on_progress: Callable[[int | None], None] | None = None,
    ) -> _TaskEnd:
        """Follow a task to its end with a property filter and WaitForUpdatesEx. Between waits
        (each at most task_wait_s) it checks ``cancel`` and the time budget; on either it cancels
        the task where vCenter allows it and keeps waiting for the task to end, for at most
        abort_grace_s (then the task is reported as still running)."""
        collector = self._take_collector(session)
        task_filter = collector.CreateFilter(_task_spec(task, paths), partialUpdates=False)
        info: dict[str, Any] = {}
        version = ""
        aborted: str | None = None
        abort_sent = False
        give_up_at = float("inf")
        try:
            while info.get("info.state") not in ("success", "error"):
                update = collector.WaitForUpdatesEx(
                    version=version, options=PC.WaitOptions(maxWaitSeconds=self.task_wait_s)
                )
                if update is not None:  # None: the wait ran out with nothing new
                    version = update.version
                    for filter_update in update.filterSet or ():
                        for object_update in filter_update.objectSet or ():
                            info.update((change.name, change.val) for change in object_update.changeSet or ())
                    if on_progress is not None and info.get("info.state") == "running":
                        on_progress(info.get("info.progress"))
                now = time.monotonic()
                if aborted is None:
                    aborted = abort_reason(
                        cancel_requested=cancel is not None and cancel.is_set(),
                        elapsed_s=now - started,
                        timeout_s=timeout_s,
                    )
                    if aborted:
                        log.info("aborting vCenter task %s (%s)", task._moId, aborted)
                        give_up_at = now + self.abort_grace_s
                if aborted and not abort_sent and info.get("info.cancelable"):
                    task.CancelTask()
                    abort_sent = True
                if now > give_up_at:
                    break
        finally:
            self._release(session, collector, task_filter)
        state = info.get("info.state")
        return _TaskEnd(
            state="running" if state not in ("success", "error") else state,
            error=info.get("info.error"),
            result=info.get("info.result"),
            aborted=aborted,
        )

    def _release(self, session: _Session, collector: Any, task_filter: Any) -> None:
        """Drop the task's filter and give the collector back for the next wait."""
        try:
            task_filter.DestroyPropertyFilter()
        except (vmodl.MethodFault, *_CONNECTION_ERRORS) as exc:
            # The session may have ended with the filter in it; the collector goes with it.
            log.debug("could not destroy a task filter: %s", exc)
            return
        session.idle_collectors.put(collector)


@dataclass(frozen=True)
class _TaskEnd:
    """How a followed task ended. state "running": it had not ended when the driver gave up."""

    state: str
    error: Any = None  # vmodl.MethodFault
    result: Any = None
    aborted: str | None = None  # "cancel" / "timeout" when the driver asked vCenter to stop it


def _task_spec(task: Any, paths: list[str]) -> Any:
    return PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=task)], propSet=[PC.PropertySpec(type=vim.Task, pathSet=paths)])


def _mounted_hosts(mounts: Iterable[Any] | None) -> tuple[str, ...]:
    """Hosts that have a datastore mounted (a mount vCenter reports as unmounted does not count)."""
    refs = []
    for mount in mounts or ():
        info = mount.mountInfo
        if info is None or info.mounted is not False:
            refs.append(mount.key._moId)
    return tuple(refs)


class _ProgressReporter:
    """Sends ProgressUpdates with a percent that never goes back and stays below 100 until DONE."""

    def __init__(self, callback: ProgressCallback):
        self._callback = callback
        self.percent = 0.0
        self._last: tuple[Phase, float, str] | None = None

    def __call__(self, phase: Phase, percent: float, *, task_id: str = "", message: str = "") -> None:
        self.percent = 100.0 if phase == Phase.DONE else max(self.percent, min(percent, 99.0))
        key = (phase, self.percent, task_id)
        if key == self._last and not message:
            return  # nothing new to say
        self._last = key
        self._callback(ProgressUpdate(phase, self.percent, task_id=task_id, message=message))


class _InventoryBuilder:
    """Turns the ObjectContents of one inventory retrieval into the portal's Inventory."""

    def __init__(self, objects: list):
        self.objects = [(o.obj, {p.name: p.val for p in o.propSet or ()}) for o in objects]
        self.props = {obj._moId: props for obj, props in self.objects}
        self.kind = {obj._moId: obj for obj, _ in self.objects}

    def _datacenter_of(self, ref: str) -> str:
        """Walk up the parents to the datacenter."""
        seen = set()
        while ref and ref not in seen:
            seen.add(ref)
            if isinstance(self.kind.get(ref), vim.Datacenter):
                return ref
            parent = self.props.get(ref, {}).get("parent")
            ref = parent._moId if parent is not None else ""
        return ""

    def _folder_path(self, folder: Any) -> str:
        """The VM folder's inventory path, "/DC0/vm/team-web" (govc's notation)."""
        names = []
        ref = folder._moId if folder is not None else ""
        while ref:
            props = self.props.get(ref, {})
            names.append(props.get("name", ref))
            if isinstance(self.kind.get(ref), vim.Datacenter):
                break
            parent = props.get("parent")
            ref = parent._moId if parent is not None else ""
        return "/" + "/".join(reversed(names)) if names else ""

    def build(self) -> Inventory:
        datacenters, clusters, hosts, datastores, networks, vms = [], [], [], [], [], []
        fields: dict[int, str] = {}
        for obj, props in self.objects:
            if isinstance(obj, vim.CustomFieldsManager):
                fields = {
                    f.key: f.name for f in props.get("field") or () if f.managedObjectType in (None, vim.VirtualMachine)
                }
        for obj, props in self.objects:
            ref = obj._moId
            if isinstance(obj, vim.Datacenter):
                datacenters.append(Datacenter(ref, props.get("name", ref)))
            elif isinstance(obj, vim.ComputeResource):
                clusters.append(Cluster(ref, props.get("name", ref), self._datacenter_of(ref)))
            elif isinstance(obj, vim.HostSystem):
                parent = props.get("parent")
                hosts.append(
                    Host(
                        ref=ref,
                        name=props.get("name", ref),
                        cluster_ref=parent._moId if parent is not None else "",
                        connected=props.get("runtime.connectionState") == "connected",
                        maintenance=bool(props.get("runtime.inMaintenanceMode")),
                        memory_bytes=int(props.get("hardware.memorySize") or 0),
                        cpu_model=props.get("summary.hardware.cpuModel") or "",
                    )
                )
            elif isinstance(obj, vim.Datastore):
                capacity = int(props.get("summary.capacity") or 0)
                datastores.append(
                    Datastore(
                        ref=ref,
                        name=props.get("name", ref),
                        capacity_bytes=capacity,
                        free_bytes=min(int(props.get("summary.freeSpace") or 0), capacity),
                        host_refs=_mounted_hosts(props.get("host")),
                        accessible=bool(props.get("summary.accessible")),
                    )
                )
            elif isinstance(obj, vim.Network):
                networks.append(Network(ref, props.get("name", ref), tuple(h._moId for h in props.get("host") or ())))
            elif isinstance(obj, vim.VirtualMachine):
                vm = self._vm(ref, props, fields)
                if vm is not None:
                    vms.append(vm)
        return Inventory(
            tuple(datacenters), tuple(clusters), tuple(hosts), tuple(datastores), tuple(networks), tuple(vms)
        )

    def _vm(self, ref: str, props: dict[str, Any], fields: Mapping[int, str]) -> VirtualMachine | None:
        host = props.get("runtime.host")
        if host is None or props.get("config.template") or "config.hardware.numCPU" not in props:
            return None  # templates, VMs being created, orphaned VMs: nothing to migrate
        values = {fields[v.key]: v.value for v in props.get("customValue") or () if v.key in fields and v.value}
        pool = props.get("resourcePool")
        return VirtualMachine(
            ref=ref,
            name=props.get("name", ref),
            host_ref=host._moId,
            power_state=_POWER.get(str(props.get("runtime.powerState")), PowerState.OFF),
            memory_bytes=int(props.get("config.hardware.memoryMB") or 0) * MiB,
            vcpus=int(props.get("config.hardware.numCPU") or 0),
            disks=disks_of(props.get("config.hardware.device")),
            owner=values.pop(OWNER_FIELD, ""),
            tags=tuple(f"{name}:{value}" for name, value in sorted(values.items())),
            folder=self._folder_path(props.get("parent")),
            pool_ref=pool._moId if pool is not None else "",
        )
