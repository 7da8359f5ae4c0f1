"""Contract-suite peer: the simulator, fast (speed x400)."""

from __future__ import annotations

from drivers.base import ConnectionConfig, MigrationSpec, Placement
from drivers.simulator import TAG_NEVER_CONVERGE, SimulatorDriver
from tests.drivers.harness import Harness


class SimulatorHarness(Harness):
    kind = "simulator"

    def independent_placement(self, vm_ref: str) -> Placement:
        # Read the state file directly through a second driver instance: another "process".
        other = SimulatorDriver(self.driver.config)
        return other.placement(vm_ref)

    def slow_spec(self) -> MigrationSpec:
        inv = self.driver.inventory()
        vm = next(v for v in inv.vms if TAG_NEVER_CONVERGE in v.tags)
        hosts = {h.ref: h for h in inv.hosts}
        target = next(
            h for h in inv.hosts
            if h.ref != vm.host_ref and h.cluster_ref == hosts[vm.host_ref].cluster_ref and not h.maintenance
        )
        return MigrationSpec(vm.ref, target_host_ref=target.ref)


def harness_factory():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        driver = SimulatorDriver(
            ConnectionConfig(kind="simulator", options={"speed": 400, "tick_s": 0.02, "state_file": f"{tmp}/sim.json"})
        )
        yield SimulatorHarness(driver)
        driver.close()


harness_factory.capabilities = SimulatorDriver.capabilities
