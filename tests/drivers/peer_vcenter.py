"""Contract-suite peer: the vCenter driver against vcsim (lab/vcsim), a real vSphere SOAP endpoint.

The session starts its own vcsim (built once, cached) in a private run directory, connects the way
production does (https, certificate verified against the lab's CA bundle, credentials apart from
the URL) and stops vcsim at the end. If vcsim cannot be built or started the factory raises: the
tests fail with the lab's own error, they never skip.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from drivers.base import ConnectionConfig, Placement
from drivers.vmware import VCenterDriver, disks_of
from tests.drivers.harness import Harness

REPO = Path(__file__).resolve().parents[2]
VCSIM = REPO / "lab" / "vcsim" / "vcsim.sh"
# 1 datacenter, 2 clusters x 3 hosts, 1 standalone host, 2 VMs per host over 3 datastores
# (every host mounts every datastore, as the simulator models a datacenter). Each host's first VM
# has VMware Tools running (a cold move shuts its guest down; the others are powered off), and
# one VM is powered off (only a cold move can take it).
INVENTORY_FLAGS = ["-dc", "1", "-cluster", "2", "-host", "3", "-standalone", "1", "-vm", "2", "-ds", "3",
                   "-tools", "*_VM0", "-off", "DC0_C1_H2_VM1"]


class VCenterHarness(Harness):
    kind = "vcenter"

    def __init__(self, driver: VCenterDriver, observer):
        super().__init__(driver)
        self.observer = observer  # a second pyvmomi session, not the driver's

    def independent_placement(self, vm_ref: str) -> Placement:
        vm = vim.VirtualMachine(vm_ref, self.observer._stub)
        disks = disks_of(vm.config.hardware.device)
        return Placement(vm.runtime.host._moId, {d.key: d.datastore_ref for d in disks})

    def guest_alive(self, vm_ref: str) -> bool:
        # vcsim has no guest to ask; the VM still being powered on is what it can prove.
        return vim.VirtualMachine(vm_ref, self.observer._stub).runtime.powerState == "poweredOn"


def _vcsim(*args: str, run_dir: str) -> str:
    result = subprocess.run(
        [str(VCSIM), *args],
        env={**os.environ, "VCSIM_RUN_DIR": run_dir},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"lab/vcsim/vcsim.sh {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout.strip()


def harness_factory():
    (REPO / "lab" / "run").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vcsim-contract-", dir=REPO / "lab" / "run") as run_dir:
        try:
            url = urlsplit(_vcsim("start", *INVENTORY_FLAGS, run_dir=run_dir))
            ca_bundle = Path(run_dir, "cert.pem").read_text()
            driver = VCenterDriver(
                ConnectionConfig(
                    kind="vcenter",
                    url=f"https://{url.hostname}:{url.port}{url.path}",
                    username=url.username or "",
                    password=url.password or "",
                    ca_bundle=ca_bundle,
                )
            )
            observer = SmartConnect(
                host=url.hostname,
                port=url.port,
                user=url.username,
                pwd=url.password,
                sslContext=ssl.create_default_context(cadata=ca_bundle),
            )
            try:
                yield VCenterHarness(driver, observer)
            finally:
                driver.close()
                Disconnect(observer)
        finally:
            _vcsim("stop", run_dir=run_dir)


harness_factory.capabilities = VCenterDriver.capabilities
