"""Inventory sync: mirror a hypervisor manager's inventory into the portal, in one transaction."""

from __future__ import annotations

import logging
import os
import re

from django.conf import settings
from django.contrib.auth.models import Group
from django.db import transaction
from django.utils import timezone

from drivers import base as drv
from drivers import registry
from migrations_app.bulk import update_objects
from migrations_app.choices import AuditAction, AuditOutcome
from migrations_app.models import (
    Cluster,
    Datacenter,
    Datastore,
    Host,
    HypervisorConnection,
    Network,
    VirtualDisk,
    VirtualMachine,
)
from migrations_app.services.audit import audit_record

log = logging.getLogger(__name__)


def connection_config(connection: HypervisorConnection) -> drv.ConnectionConfig:
    """The driver's view of a connection. The simulator gets a state file shared by all processes."""
    options = dict(connection.options or {})
    if connection.kind == "simulator" and not options.get("state_file"):
        state_dir = settings.PORTAL["SIMULATOR_STATE_DIR"]
        os.makedirs(state_dir, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", connection.name)
        options["state_file"] = os.path.join(state_dir, f"{connection.pk}-{slug}.json")
    return drv.ConnectionConfig(
        kind=connection.kind,
        url=connection.url,
        username=connection.username,
        password=connection.get_password(),
        verify_tls=connection.verify_tls,
        ca_bundle=connection.ca_bundle,
        is_lab=connection.is_lab,
        options=options,
    )


def driver_for(connection: HypervisorConnection) -> drv.Driver:
    return registry.open_driver(connection_config(connection))


def inventory_sync(*, connection: HypervisorConnection, actor=None) -> dict:
    """Read the whole inventory from the driver and mirror it. Objects the hypervisor no longer
    reports are marked absent (never deleted: requests and audit entries point at them).
    Returns counts. A driver error is recorded on the connection and in the audit log, then raised."""
    try:
        inv = driver_for(connection).inventory()
    except drv.DriverError as exc:
        with transaction.atomic():
            HypervisorConnection.objects.filter(pk=connection.pk).update(last_sync_error=exc.explanation())
            audit_record(actor=actor, action=AuditAction.INVENTORY_SYNC_FAILED, outcome=AuditOutcome.FAILURE,
                         object_type="connection", object_id=str(connection.pk), reason=exc.explanation())
        raise
    with transaction.atomic():
        # One sync per connection at a time (beat and "Sync now" may overlap): the second waits here.
        HypervisorConnection.objects.select_for_update().filter(pk=connection.pk).first()
        counts = _mirror(connection, inv)
        connection.last_sync_at = timezone.now()
        connection.last_sync_error = ""
        connection.save(update_fields=["last_sync_at", "last_sync_error"])
        audit_record(actor=actor, action=AuditAction.INVENTORY_SYNCED, object_type="connection",
                     object_id=str(connection.pk), data=counts)
    return counts


def _upsert(model, lookup: dict, values: dict, existing: dict):
    obj = existing.get(lookup["ref"])
    if obj is None:
        return model.objects.create(**lookup, **values)
    changed = [k for k, v in values.items() if getattr(obj, k) != v]
    for k in changed:
        setattr(obj, k, values[k])
    if changed:
        obj.save(update_fields=changed)
    return obj


# Rows written per statement by the bulk writes of VMs and disks.
_BATCH = 1000


def _changed_fields(obj, values: dict) -> list[str]:
    """Set the values that differ on obj (foreign keys given as ``<name>_id``); their names."""
    changed = [k for k, v in values.items() if getattr(obj, k) != v]
    for k in changed:
        setattr(obj, k, values[k])
    return changed


def _bulk_update(model, changed: dict) -> None:
    """One UPDATE per set of changed fields and batch (after a move, typically just ``host_id``)."""
    by_fields: dict[tuple[str, ...], list] = {}
    for obj, fields in changed.values():
        by_fields.setdefault(tuple(sorted(fields)), []).append(obj)
    for fields, objs in by_fields.items():
        objs.sort(key=lambda obj: obj.pk)  # rows locked in id order, as every bulk writer does
        for start in range(0, len(objs), _BATCH):
            update_objects(objs[start:start + _BATCH], fields)


def _mirror_vms(conn: HypervisorConnection, inv: drv.Inventory, hosts: dict, stores: dict) -> None:
    """VMs and their disks, written in bulk: new rows inserted in batches, changed rows updated
    (only the fields that changed), nothing written for what did not change. Foreign keys are
    compared by id, so nothing is loaded row by row."""
    groups = {g.name: g for g in Group.objects.all()}
    vms = {v.ref: v for v in VirtualMachine.objects.filter(connection=conn)}
    new_vms, changed_vms = [], {}
    for v in inv.vms:
        owner_id = None
        if v.owner:
            if v.owner not in groups:
                groups[v.owner] = Group.objects.create(name=v.owner)
            owner_id = groups[v.owner].pk
        values = {"name": v.name, "host_id": hosts[v.host_ref].pk, "power_state": v.power_state.value,
                  "memory_bytes": v.memory_bytes, "vcpus": v.vcpus, "owner_group_id": owner_id, "tags": list(v.tags),
                  "folder": v.folder, "present": True}
        vm = vms.get(v.ref)
        if vm is None:
            vms[v.ref] = vm = VirtualMachine(connection=conn, ref=v.ref, **values)
            new_vms.append(vm)
        elif fields := _changed_fields(vm, values):
            changed_vms[vm.pk] = (vm, fields)
    VirtualMachine.objects.bulk_create(new_vms, batch_size=_BATCH)  # sets their pks (PostgreSQL, SQLite)
    _bulk_update(VirtualMachine, changed_vms)

    have: dict[tuple[int, str], VirtualDisk] = {
        (d.vm_id, d.key): d for d in VirtualDisk.objects.filter(vm__connection=conn)
    }
    new_disks, changed_disks = [], {}
    for v in inv.vms:
        vm_id = vms[v.ref].pk
        for d in v.disks:
            values = {"label": d.label, "datastore_id": stores[d.datastore_ref].pk, "capacity_bytes": d.capacity_bytes,
                      "path": d.path}
            disk = have.pop((vm_id, d.key), None)
            if disk is None:
                new_disks.append(VirtualDisk(vm_id=vm_id, key=d.key, **values))
            elif fields := _changed_fields(disk, values):
                changed_disks[disk.pk] = (disk, fields)
    # The disks of VMs still reported that no longer have them; a VM gone keeps its rows.
    reported = {vms[v.ref].pk for v in inv.vms}
    dropped = [d.pk for (vm_id, _), d in have.items() if vm_id in reported]
    if dropped:
        VirtualDisk.objects.filter(pk__in=dropped).delete()
    VirtualDisk.objects.bulk_create(new_disks, batch_size=_BATCH)
    _bulk_update(VirtualDisk, changed_disks)


def _mirror(conn: HypervisorConnection, inv: drv.Inventory) -> dict:
    dcs = {d.ref: d for d in Datacenter.objects.filter(connection=conn)}
    for d in inv.datacenters:
        dcs[d.ref] = _upsert(Datacenter, {"connection": conn, "ref": d.ref}, {"name": d.name}, dcs)

    clusters = {c.ref: c for c in Cluster.objects.filter(datacenter__connection=conn)}
    for c in inv.clusters:
        dc = dcs[c.datacenter_ref]
        obj = clusters.get(c.ref)
        if obj is None:
            clusters[c.ref] = Cluster.objects.create(datacenter=dc, ref=c.ref, name=c.name)
        elif obj.name != c.name or obj.datacenter_id != dc.pk:
            obj.name, obj.datacenter = c.name, dc
            obj.save(update_fields=["name", "datacenter"])

    hosts = {h.ref: h for h in Host.objects.filter(connection=conn)}
    for h in inv.hosts:
        hosts[h.ref] = _upsert(
            Host,
            {"connection": conn, "ref": h.ref},
            {"cluster": clusters[h.cluster_ref], "name": h.name, "connected": h.connected,
             "maintenance": h.maintenance, "memory_bytes": h.memory_bytes, "cpu_model": h.cpu_model, "present": True},
            hosts,
        )
    seen_hosts = {h.ref for h in inv.hosts}
    Host.objects.filter(connection=conn).exclude(ref__in=seen_hosts).update(present=False)

    stores = {d.ref: d for d in Datastore.objects.filter(connection=conn)}
    for d in inv.datastores:
        obj = _upsert(
            Datastore,
            {"connection": conn, "ref": d.ref},
            {"name": d.name, "capacity_bytes": d.capacity_bytes, "free_bytes": d.free_bytes,
             "accessible": d.accessible, "present": True},
            stores,
        )
        obj.hosts.set([hosts[r] for r in d.host_refs if r in hosts])
        stores[d.ref] = obj
    Datastore.objects.filter(connection=conn).exclude(ref__in={d.ref for d in inv.datastores}).update(present=False)

    nets = {n.ref: n for n in Network.objects.filter(connection=conn)}
    for n in inv.networks:
        obj = _upsert(Network, {"connection": conn, "ref": n.ref}, {"name": n.name}, nets)
        obj.hosts.set([hosts[r] for r in n.host_refs if r in hosts])

    _mirror_vms(conn, inv, hosts, stores)
    gone = VirtualMachine.objects.filter(connection=conn, present=True).exclude(ref__in={v.ref for v in inv.vms})
    gone_count = gone.update(present=False)
    return {
        "datacenters": len(inv.datacenters),
        "clusters": len(inv.clusters),
        "hosts": len(inv.hosts),
        "datastores": len(inv.datastores),
        "vms": len(inv.vms),
        "vms_gone": gone_count,
    }
