"""vCenter's pre-flight of a batch: a fault in one move's checks fails that move alone."""
from pyVmomi import vim

from drivers import base as drv
from drivers.vmware.driver import VCenterDriver


def test_one_moves_vcenter_check_fault_fails_that_move_alone(monkeypatch):
    d = VCenterDriver(drv.ConnectionConfig(kind="vcenter", url="https://vc.example.com/sdk"))
    specs = [drv.MigrationSpec(vm_ref="vm-1", target_host_ref="host-1"),
             drv.MigrationSpec(vm_ref="vm-2", target_host_ref="host-1")]
    monkeypatch.setattr(VCenterDriver, "_facts_many", lambda self, s: ["facts-1", "facts-2"])

    def checks(self, spec, facts, *, cold=False):
        if facts == "facts-2":  # CheckRelocate_Task for vm-2 raised a fault (e.g. the VM is busy)
            raise vim.fault.InvalidState(msg="vm-2 is busy")
        return (drv.PreflightCheck("vcenter-check", True, "ok"),)

    monkeypatch.setattr(VCenterDriver, "_checks", checks)
    out = d.preflight_many(specs)
    assert out[0] == (drv.PreflightCheck("vcenter-check", True, "ok"),)
    assert isinstance(out[1], drv.InvalidState) and "vm-2 is busy" in out[1].explanation()
