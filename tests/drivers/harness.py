"""What the driver contract suite needs from each peer: a driver and moves that are valid on it.

Every driver kind provides a ``Harness`` subclass (see ``conftest.py``); the default picks below read
the driver's own inventory, so a harness only overrides what its peer does differently.
"""

from __future__ import annotations

import threading

from drivers.base import (
    Capability,
    Driver,
    Inventory,
    MigrationResult,
    MigrationSpec,
    Placement,
    PowerState,
    ProgressUpdate,
    VirtualMachine,
)


class Harness:
    kind = ""

    def __init__(self, driver: Driver):
        self.driver = driver

    # -- peers override these --------------------------------------------------------------
    def independent_placement(self, vm_ref: str) -> Placement:
        """Where the VM is, read without going through the driver (pyvmomi, virsh, the sim state)."""
        return self.driver.placement(vm_ref)

    def slow_spec(self) -> MigrationSpec:
        """A move that lasts several seconds, for cancel tests (drivers with CANCEL)."""
        raise NotImplementedError(f"{self.kind} harness has no slow move; it cannot test cancel")

    def guest_alive(self, vm_ref: str) -> bool:
        """Proof the guest kept running through a move (libvirt: the tick counter advances)."""
        return self.driver.placement(vm_ref) is not None

    # -- generic picks from inventory -----------------------------------------------------
    def _running_vms(self, inv: Inventory) -> list[VirtualMachine]:
        return [vm for vm in inv.vms if vm.power_state == PowerState.ON and not any(t.startswith("sim:") for t in vm.tags)]

    # Moves that change storage take VMs on storage no other host sees, and put them on such
    # storage, where there is a choice: the VMs on shared storage stay there for the compute moves
    # later tests ask for (a compute move needs storage its target host sees).
    def _storage_movers(self, inv: Inventory) -> list[VirtualMachine]:
        stores = {d.ref: d for d in inv.datastores}
        return sorted(self._running_vms(inv),
                      key=lambda vm: all(len(stores[ds].host_refs) > 1 for ds in vm.datastore_refs))

    @staticmethod
    def _unshared_first(inv: Inventory) -> list:
        return sorted(inv.datastores, key=lambda d: len(d.host_refs))

    def compute_spec(self) -> MigrationSpec:
        return self.compute_specs(1)[0]

    def compute_specs(self, n: int) -> list[MigrationSpec]:
        """Valid compute moves of ``n`` different VMs (a worker's batch)."""
        inv = self.driver.inventory()
        hosts = {h.ref: h for h in inv.hosts}
        stores = {d.ref: d for d in inv.datastores}
        specs: list[MigrationSpec] = []
        for vm in self._running_vms(inv):
            source = hosts[vm.host_ref]
            for host in inv.hosts:
                if (
                    host.ref != source.ref
                    and host.cluster_ref == source.cluster_ref
                    and host.connected
                    and not host.maintenance
                    and all(host.ref in stores[ds].host_refs for ds in vm.datastore_refs)
                ):
                    specs.append(MigrationSpec(vm.ref, target_host_ref=host.ref))
                    break
            if len(specs) == n:
                return specs
        raise AssertionError(f"the peer's inventory offers no {n} valid compute moves of different VMs")

    def storage_spec(self) -> MigrationSpec:
        inv = self.driver.inventory()
        for vm in self._storage_movers(inv):
            for ds in self._unshared_first(inv):
                if (
                    ds.ref not in vm.datastore_refs
                    and vm.host_ref in ds.host_refs
                    and ds.accessible
                    and ds.free_bytes > vm.disk_bytes
                ):
                    return MigrationSpec(vm.ref, target_datastore_ref=ds.ref)
        raise AssertionError("the peer's inventory offers no valid storage move")

    def both_spec(self) -> MigrationSpec:
        inv = self.driver.inventory()
        hosts = {h.ref: h for h in inv.hosts}
        for vm in self._storage_movers(inv):
            source = hosts[vm.host_ref]
            for host in inv.hosts:
                if host.ref == source.ref or host.cluster_ref != source.cluster_ref or host.maintenance or not host.connected:
                    continue
                for ds in self._unshared_first(inv):
                    if ds.ref not in vm.datastore_refs and host.ref in ds.host_refs and ds.free_bytes > vm.disk_bytes:
                        return MigrationSpec(vm.ref, target_host_ref=host.ref, target_datastore_ref=ds.ref)
        raise AssertionError("the peer's inventory offers no valid combined move")

    # -- running a move -------------------------------------------------------------------
    def migrate(self, spec: MigrationSpec, cancel: threading.Event | None = None) -> tuple[MigrationResult, list[ProgressUpdate]]:
        updates: list[ProgressUpdate] = []
        result = self.driver.migrate(spec, on_progress=updates.append, cancel=cancel or threading.Event())
        return result, updates

    def migrate_many(self, specs: list[MigrationSpec]) -> tuple[list, list[list[ProgressUpdate]]]:
        """A batch through ``Driver.migrate_many``: its results and each move's progress, by index."""
        updates: list[list[ProgressUpdate]] = [[] for _ in specs]
        done: list[tuple[int, object]] = []
        results = self.driver.migrate_many(specs, on_progress=lambda i, u: updates[i].append(u),
                                           cancels=[threading.Event() for _ in specs],
                                           on_done=lambda i, r: done.append((i, r)))
        # Every move is reported ended exactly once, with what the batch returns for it.
        assert sorted(i for i, _ in done) == list(range(len(specs))), done
        assert all(results[i] is r for i, r in done), (done, results)
        return results, updates


def required(capability: Capability):
    """Mark a contract test as applying only to drivers with this capability (see conftest)."""

    def mark(fn):
        fn.required_capability = capability
        return fn

    return mark
