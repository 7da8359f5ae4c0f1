"""Reading vCenter's inventory: bulk PropertyCollector retrievals (one ``RetrievePropertiesEx``
over a container view, continued while vCenter pages) and their mapping to the portal's
Inventory, Placement and Disks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pyVmomi import vim, vmodl

from drivers.base import (
    Cluster,
    Datacenter,
    Datastore,
    Disk,
    Host,
    Inventory,
    Network,
    NotFound,
    Placement,
    PowerState,
    VirtualMachine,
)
from drivers.vmware.session import _Session
from drivers.vmware.vm_listing import DEVICE_PATH, VmRecord, read_vms

PC = vmodl.query.PropertyCollector
KiB = 1024
MiB = 1024**2

OWNER_FIELD = "owner"  # custom attribute holding the owning team
_POWER = {"poweredOn": PowerState.ON, "poweredOff": PowerState.OFF, "suspended": PowerState.SUSPENDED}

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
}
# The VMs' properties, read by vm_listing (not decoded by pyvmomi): see there why.
_VM_PROPS = [
    "name",
    "parent",
    "resourcePool",
    "runtime.host",
    "runtime.powerState",
    "config.template",
    "config.hardware.memoryMB",
    "config.hardware.numCPU",
    "customValue",
    DEVICE_PATH,
]


def retrieve(session: _Session, specs: list, *, page_size: int) -> list:
    """RetrievePropertiesEx, following vCenter's paging to the end. Returns ObjectContents."""
    collector = session.content.propertyCollector
    result = collector.RetrievePropertiesEx(specSet=specs, options=PC.RetrieveOptions(maxObjects=page_size))
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


def props_of(content: Any) -> dict[str, Any]:
    return {p.name: p.val for p in content.propSet or ()}


def read_inventory(session: _Session, *, page_size: int) -> Inventory:
    """The whole inventory over a container view (created on the session's first call and kept
    with it): one retrieval of the VMs read by ``vm_listing``, one of everything else (and the
    custom attribute definitions) decoded by pyvmomi."""
    content = session.content
    if session.view is None:
        session.view = content.viewManager.CreateContainerView(
            container=content.rootFolder, type=[*_INVENTORY_PROPS, vim.VirtualMachine], recursive=True
        )
    over_view = PC.ObjectSpec(
        obj=session.view, skip=True, selectSet=[PC.TraversalSpec(type=vim.view.ContainerView, path="view")]
    )
    object_specs = [over_view]
    prop_specs = [PC.PropertySpec(type=t, pathSet=paths) for t, paths in _INVENTORY_PROPS.items()]
    if content.customFieldsManager is not None:
        # The custom attribute definitions ride along in the same request.
        object_specs.append(PC.ObjectSpec(obj=content.customFieldsManager))
        prop_specs.append(PC.PropertySpec(type=vim.CustomFieldsManager, pathSet=["field"]))
    objects = retrieve(session, [PC.FilterSpec(objectSet=object_specs, propSet=prop_specs)], page_size=page_size)
    collector = content.propertyCollector
    vms = read_vms(
        collector,
        collector._stub,
        PC.FilterSpec(objectSet=[over_view], propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=_VM_PROPS)]),
        page_size=page_size,
    )
    return _InventoryBuilder(objects, vms).build()


PLACEMENT_PATHS = ["runtime.host", "config.hardware.device"]


def read_placement(session: _Session, vm_ref: str, *, stub: Any, page_size: int) -> Placement:
    """Where a VM runs now: its host and the datastore of each disk."""
    spec = PC.FilterSpec(
        objectSet=[PC.ObjectSpec(obj=vim.VirtualMachine(vm_ref, stub))],
        propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=PLACEMENT_PATHS)],
    )
    objects = retrieve(session, [spec], page_size=page_size)
    return placement_of(vm_ref, props_of(objects[0]) if objects else {})


def placement_of(vm_ref: str, props: Mapping[str, Any]) -> Placement:
    """A VM's placement from its PLACEMENT_PATHS properties."""
    host = props.get("runtime.host")
    if host is None:
        raise NotFound(f"VM {vm_ref} has no host in vCenter (it is being created, or orphaned)")
    return Placement(host._moId, {d.key: d.datastore_ref for d in disks_of(props.get("config.hardware.device"))})


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


def _mounted_hosts(mounts: Iterable[Any] | None) -> tuple[str, ...]:
    """Hosts that have a datastore mounted (a mount vCenter reports as unmounted does not count)."""
    refs = []
    for mount in mounts or ():
        info = mount.mountInfo
        if info is None or info.mounted is not False:
            refs.append(mount.key._moId)
    return tuple(refs)


class _InventoryBuilder:
    """Turns the ObjectContents of one inventory retrieval into the portal's Inventory."""

    def __init__(self, objects: list, vms: Mapping[str, VmRecord]):
        self.vms = vms
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

    def _folder_path(self, ref: str) -> str:
        """The VM folder's inventory path, "/DC0/vm/team-web" (govc's notation)."""
        names = []
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
        for ref, record in self.vms.items():
            vm = self._vm(ref, record, fields)
            if vm is not None:
                vms.append(vm)
        return Inventory(
            tuple(datacenters), tuple(clusters), tuple(hosts), tuple(datastores), tuple(networks), tuple(vms)
        )

    def _vm(self, ref: str, record: VmRecord, fields: Mapping[int, str]) -> VirtualMachine | None:
        props = record.props
        host = props.get("runtime.host")
        if not host or props.get("config.template") or "config.hardware.numCPU" not in props:
            return None  # templates, VMs being created, orphaned VMs: nothing to migrate
        values = {fields[key]: value for key, value in props.get("customValue") or () if key in fields and value}
        return VirtualMachine(
            ref=ref,
            name=props.get("name", ref),
            host_ref=host,
            power_state=_POWER.get(str(props.get("runtime.powerState")), PowerState.OFF),
            memory_bytes=int(props.get("config.hardware.memoryMB") or 0) * MiB,
            vcpus=int(props.get("config.hardware.numCPU") or 0),
            disks=record.disks,
            owner=values.pop(OWNER_FIELD, ""),
            tags=tuple(f"{name}:{value}" for name, value in sorted(values.items())),
            folder=self._folder_path(props.get("parent") or ""),
            pool_ref=props.get("resourcePool") or "",
        )
