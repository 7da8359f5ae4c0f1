"""Inventory sync's mirror: the portal's rows follow the hypervisor's inventory (new, changed,
disks added, moved and removed, VMs gone), and an unchanged inventory costs a fixed number of
queries whatever the number of VMs (bulk reads and writes, nothing row by row)."""

from __future__ import annotations

import dataclasses

import pytest
from django.db import transaction

from drivers import base as drv
from migrations_app.models import HypervisorConnection, VirtualDisk, VirtualMachine
from migrations_app.services.inventory import _mirror

pytestmark = pytest.mark.django_db


def inventory(n_vms: int) -> drv.Inventory:
    hosts = (drv.Host("h1", "esx1", "c1"), drv.Host("h2", "esx2", "c1"))
    stores = (drv.Datastore("ds1", "DS1", 100 * 2**30, 50 * 2**30, ("h1", "h2")),
              drv.Datastore("ds2", "DS2", 100 * 2**30, 50 * 2**30, ("h1", "h2")))
    vms = tuple(
        drv.VirtualMachine(
            ref=f"vm-{i}", name=f"vm{i:05}", host_ref="h1", power_state=drv.PowerState.ON, memory_bytes=2**30, vcpus=2,
            disks=(drv.Disk("2000", "Hard disk 1", "ds1", 2**30, f"[DS1] vm{i}/disk1.vmdk"),),
            owner="team-web" if i % 2 else "team-data", tags=("env:prod",), folder="/DC0/vm",
        )
        for i in range(n_vms)
    )
    return drv.Inventory((drv.Datacenter("dc1", "DC1"),), (drv.Cluster("c1", "C1", "dc1"),), hosts, stores,
                         (drv.Network("n1", "VM Network", ("h1", "h2")),), vms)


def mirror(conn, inv) -> dict:
    with transaction.atomic():
        return _mirror(conn, inv)


def snapshot(conn) -> dict:
    return {
        vm.ref: (vm.name, vm.host.ref, vm.power_state, vm.owner_group.name if vm.owner_group else None, vm.tags,
                 vm.present, sorted((d.key, d.label, d.datastore.ref, d.capacity_bytes, d.path) for d in vm.disks.all()))
        for vm in VirtualMachine.objects.filter(connection=conn).select_related("host", "owner_group")
        .prefetch_related("disks__datastore")
    }


def expected(inv: drv.Inventory, gone: tuple[str, ...] = ()) -> dict:
    return {
        vm.ref: (vm.name, vm.host_ref, vm.power_state.value, vm.owner or None, list(vm.tags), vm.ref not in gone,
                 sorted((d.key, d.label, d.datastore_ref, d.capacity_bytes, d.path) for d in vm.disks))
        for vm in inv.vms
    }


def test_a_first_sync_writes_every_vm_and_disk_and_a_second_sync_changes_follow():
    conn = HypervisorConnection.objects.create(name="vc", kind="vcenter", url="https://vc/sdk")
    inv = inventory(30)
    mirror(conn, inv)
    assert snapshot(conn) == expected(inv)

    vms = list(inv.vms)
    vms[0] = dataclasses.replace(vms[0], host_ref="h2")  # moved
    vms[1] = dataclasses.replace(vms[1], disks=(dataclasses.replace(vms[1].disks[0], datastore_ref="ds2"),))  # storage move
    vms[2] = dataclasses.replace(vms[2], disks=vms[2].disks + (drv.Disk("2001", "Hard disk 2", "ds2", 5 * 2**30),))
    vms[3] = dataclasses.replace(vms[3], disks=())  # its disk removed
    vms[4] = dataclasses.replace(vms[4], owner="team-new", tags=(), power_state=drv.PowerState.OFF)
    vm_gone = vms.pop(5)
    vms.append(dataclasses.replace(vms[6], ref="vm-new", name="fresh"))
    changed = dataclasses.replace(inv, vms=tuple(vms))
    counts = mirror(conn, changed)
    assert counts["vms_gone"] == 1
    assert snapshot(conn) == {**expected(changed), vm_gone.ref: expected(inv, gone=(vm_gone.ref,))[vm_gone.ref]}
    # The VM gone keeps its disk rows (requests and audit entries point at them).
    assert VirtualDisk.objects.filter(vm__ref=vm_gone.ref).count() == 1


def test_an_unchanged_inventory_costs_the_same_queries_for_10_or_200_vms(django_assert_max_num_queries):
    small, large = (HypervisorConnection.objects.create(name=f"vc{n}", kind="vcenter", url="https://vc/sdk")
                    for n in (10, 200))
    mirror(small, inventory(10))
    mirror(large, inventory(200))
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as few:
        mirror(small, inventory(10))
    with django_assert_max_num_queries(len(few.captured_queries)):
        mirror(large, inventory(200))
