"""Relocation throughput against vcsim: a plain pyvmomi loop (RelocateVM_Task + WaitForTask) versus
the same number of moves through VCenterDriver.migrate, in the same run, on the same vcsim.

    .venv/bin/python bench/vcsim_relocate_baseline.py [N]      # N moves each (default 300)

Compute moves of one VM, alternating between two hosts of its cluster. Uses VCSIM_URL (and
VCSIM_CA) if set, else starts a 10,000-VM vcsim like bench/vcsim_sync.py. The lab notes give about
90 relocations/s for the plain loop on these machines.
"""

from __future__ import annotations

import ssl
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from pyVim.connect import Disconnect, SmartConnect  # noqa: E402
from pyVim.task import WaitForTask  # noqa: E402
from pyVmomi import vim  # noqa: E402

from bench.vcsim_sync import driver_for, running_vcsim  # noqa: E402
from drivers.base import MigrationSpec  # noqa: E402


def pick_vm_and_hosts(si) -> tuple[vim.VirtualMachine, vim.HostSystem, vim.HostSystem]:
    """A powered-on VM on a cluster host, and two hosts of that cluster (its own first)."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.ClusterComputeResource], True)
    try:
        cluster = next(c for c in view.view if len(c.host) >= 2)
    finally:
        view.Destroy()
    first, second = cluster.host[0], cluster.host[1]
    vm = next(v for v in first.vm if v.runtime.powerState == "poweredOn")
    return vm, first, second


def plain_loop(vm, hosts, pool, n: int) -> float:
    """n relocations the way a pyvmomi script does them; returns seconds."""
    started = time.perf_counter()
    for i in range(n):
        task = vm.RelocateVM_Task(vim.vm.RelocateSpec(host=hosts[(i + 1) % 2], pool=pool))
        WaitForTask(task)
    return time.perf_counter() - started


def driver_loop(driver, vm_ref: str, host_refs: list[str], n: int) -> float:
    """n relocations through the portal's driver (checks, progress, result placement included)."""
    cancel = threading.Event()
    started = time.perf_counter()
    for i in range(n):
        driver.migrate(
            MigrationSpec(vm_ref, target_host_ref=host_refs[(i + 1) % 2]), on_progress=lambda u: None, cancel=cancel
        )
    return time.perf_counter() - started


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    with running_vcsim() as (url, ca_pem):
        parts = urlsplit(url)
        context = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl._create_unverified_context()
        si = SmartConnect(
            host=parts.hostname, port=parts.port, user=parts.username, pwd=parts.password, sslContext=context
        )
        driver = driver_for(url, ca_pem)
        try:
            vm, first, second = pick_vm_and_hosts(si)
            what = f"{vm.name} between {first.name} and {second.name}"
            # Warm both paths up (sessions, connections) before timing.
            plain_loop(vm, [first, second], vm.resourcePool, 2)
            driver_loop(driver, vm._moId, [first._moId, second._moId], 2)

            # Two rounds, alternating, so that a drift of vcsim (it keeps every task) hits both alike.
            plain_s = driver_s = 0.0
            trips = driver.round_trips
            for _ in range(2):
                plain_s += plain_loop(vm, [first, second], vm.resourcePool, n // 2)
                driver_s += driver_loop(driver, vm._moId, [first._moId, second._moId], n // 2)
            trips = driver.round_trips - trips
            n = 2 * (n // 2)
        finally:
            driver.close()
            Disconnect(si)
        plain_rate, driver_rate = n / plain_s, n / driver_s
        print(f"{n} compute relocations of {what}")
        print(f"plain pyvmomi RelocateVM_Task + WaitForTask: {plain_rate:7.1f} relocations/s")
        print(
            f"VCenterDriver.migrate:                        {driver_rate:7.1f} relocations/s "
            f"({trips / n:.1f} SOAP round trips per move)"
        )
        print(f"driver / plain: {driver_rate / plain_rate:.2f}")


if __name__ == "__main__":
    main()
