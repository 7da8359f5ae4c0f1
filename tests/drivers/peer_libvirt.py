"""Contract-suite peer: two real libvirt daemons with QEMU (TCG) guests, from lab/kvm/lab.sh.

The factory installs what the lab needs, starts it from scratch (down, then up) so every run sees
the same four guests on hosta, and tears it down at the end. It never skips: if the lab cannot
start, the lab's own error fails the tests. The harness reads placement through connections of its
own (not through the driver) and proves a guest kept running by reading the tick counter the
lab's boot-sector guest increments at guest-physical 0x10000 about 1000 times a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from drivers.base import ConnectionConfig, MigrationSpec, Placement
from drivers.libvirt import LibvirtDriver, ensure_event_loop, load_sdk
from drivers.libvirt.xml import parse_domain, pool_target_path
from tests.drivers.harness import Harness

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab" / "kvm" / "lab.sh"
TICK_ADDR = 0x10000  # lab/kvm/guest.asm
NEVER_CONVERGE = "lab:never-converge"
SLOW_BANDWIDTH = 4 * 1024**2  # bytes/s: 64 MiB of guest RAM takes ~16 s, plenty of time to cancel

# libvirt-python, bound once the factory has installed it (this module is imported at collection,
# before the lab's install step ran on a fresh machine).
libvirt: Any = None


def lab(command: str) -> str:
    """Run one lab.sh command; its stderr goes to the test log, a failure raises."""
    return subprocess.run([str(LAB), command], check=True, stdout=subprocess.PIPE, text=True).stdout


def lab_env() -> dict[str, str]:
    env = {}
    for line in lab("env").splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.strip("'")
    return env


class LibvirtHarness(Harness):
    kind = "libvirt"

    def __init__(self, driver: LibvirtDriver, options: dict):
        super().__init__(driver)
        self.shared_pools = set(options.get("shared_pools", ()))
        self.uris = {h["name"]: h["uri"] for h in options["hosts"]}
        self._conns: dict[str, libvirt.virConnect] = {}

    # -- independent reads -----------------------------------------------------------------
    def conn(self, host: str) -> libvirt.virConnect:
        conn = self._conns.get(host)
        if conn is None or not conn.isAlive():
            conn = self._conns[host] = libvirt.open(self.uris[host])
        return conn

    def domain(self, vm_ref: str) -> tuple[str, libvirt.virDomain]:
        """(host, domain) where the VM runs, by UUID, preferring a running copy."""
        uuid = vm_ref.removeprefix("uuid:")
        found = []
        for host in self.uris:
            try:
                dom = self.conn(host).lookupByUUIDString(uuid)
            except libvirt.libvirtError:
                continue
            state, reason = dom.state()
            rank = 2 if state == libvirt.VIR_DOMAIN_RUNNING else 1 if dom.isActive() else 0
            found.append((rank, host, dom))
        if not found:
            raise LookupError(f"no host has {vm_ref}")
        _, host, dom = max(found, key=lambda f: f[0])
        return host, dom

    def independent_placement(self, vm_ref: str) -> Placement:
        host, dom = self.domain(vm_ref)
        pools = {}
        for pool in self.conn(host).listAllStoragePools(0):
            name = pool.name()
            ref = f"pool/{name}" if name in self.shared_pools else f"{host}/pool/{name}"
            pools[pool_target_path(pool.XMLDesc(0))] = ref
        disks = parse_domain(dom.XMLDesc(0)).disks
        return Placement(
            host, {d.dev: pools.get(os.path.dirname(d.path), f"{host}/dir{os.path.dirname(d.path)}") for d in disks}
        )

    def ticks(self, vm_ref: str) -> int:
        _, dom = self.domain(vm_ref)
        return int.from_bytes(dom.memoryPeek(TICK_ADDR, 4, libvirt.VIR_MEMORY_PHYSICAL), "little")

    def guest_alive(self, vm_ref: str) -> bool:
        before = self.ticks(vm_ref)
        time.sleep(0.3)
        return self.ticks(vm_ref) > before

    def volume_exists(self, host: str, path: str) -> bool:
        for pool in self.conn(host).listAllStoragePools(0):
            pool.refresh(0)  # see the directory as it is now
        try:
            self.conn(host).storageVolLookupByPath(path)
        except libvirt.libvirtError:
            return False
        return True

    # -- picks -------------------------------------------------------------------------------
    def _running_vms(self, inv):
        # The never-converging guest is kept for the slow and timeout cases.
        return [vm for vm in super()._running_vms(inv) if not any(t.startswith("lab:") for t in vm.tags)]

    def vm_named(self, name: str):
        return next(vm for vm in self.driver.inventory().vms if vm.name == name)

    def other_host(self, host: str) -> str:
        return next(h for h in self.uris if h != host)

    def slow_spec(self) -> MigrationSpec:
        vm = next(vm for vm in self.driver.inventory().vms if NEVER_CONVERGE in vm.tags)
        return MigrationSpec(vm.ref, target_host_ref=self.other_host(vm.host_ref), bandwidth_bytes_per_s=SLOW_BANDWIDTH)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


def harness_factory():
    global libvirt
    lab("install")
    libvirt = load_sdk()
    lab("down")  # a known start: the four guests on hosta, nothing moved
    started = time.monotonic()
    lab("up")
    try:
        options = json.loads(lab_env()["LAB_KVM_DRIVER_OPTIONS"])
        ensure_event_loop()  # before any connection of this process opens
        driver = LibvirtDriver(
            ConnectionConfig(kind="libvirt", is_lab=True, options={**options, "poll_interval_s": 0.1})
        )
        harness = LibvirtHarness(driver, options)
        harness.lab_up_s = time.monotonic() - started
        yield harness
        harness.close()
        driver.close()
    finally:
        lab("down")


harness_factory.capabilities = LibvirtDriver.capabilities
