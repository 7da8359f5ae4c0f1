"""What LibvirtDriver.migrate costs over a bare libvirt-python call, on the KVM lab.

For the same guest (app-1, on the shared pool) and the same bandwidth cap, each round times a
plain ``migrateToURI3`` there and back, then ``LibvirtDriver.migrate`` there and back (with its
progress sampling, events, validation and placement read). Prints both and the overhead.

    .venv/bin/python bench/libvirt_overhead.py [--rounds 3] [--bandwidth-mib 64] [--keep-lab]

Starts the lab if it is down (and stops it again at the end unless --keep-lab).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drivers.base import ConnectionConfig, MigrationSpec  # noqa: E402
from drivers.libvirt import LibvirtDriver, load_sdk  # noqa: E402
from drivers.libvirt.jobs import migration_flag_names  # noqa: E402

LAB = REPO / "lab" / "kvm" / "lab.sh"
GUEST = "app-1"


def lab(command: str) -> str:
    return subprocess.run([str(LAB), command], check=True, stdout=subprocess.PIPE, text=True).stdout


def lab_is_up() -> bool:
    return "libvirtd pid" in lab("status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bandwidth-mib", type=int, default=64)
    parser.add_argument("--keep-lab", action="store_true")
    args = parser.parse_args()

    was_up = lab_is_up()
    if not was_up:
        lab("install")
        lab("up")
    try:
        env = dict(line.removeprefix("export ").split("=", 1) for line in lab("env").splitlines())
        options = json.loads(env["LAB_KVM_DRIVER_OPTIONS"].strip("'"))
        driver = LibvirtDriver(ConnectionConfig(kind="libvirt", is_lab=True, options=options))
        libvirt = load_sdk()
        hosts = {h["name"]: h for h in options["hosts"]}
        vm = next(v for v in driver.inventory().vms if v.name == GUEST)
        bandwidth = args.bandwidth_mib * 1024**2

        flags = 0
        for name in migration_flag_names(copies_disks=False, shared_disks=True, auto_converge=False, post_copy=False):
            flags |= getattr(libvirt, f"VIR_MIGRATE_{name}")

        def plain(target: str) -> float:
            """The bare call the driver wraps: same flags, same cap, nothing else."""
            source = driver.placement(vm.ref).host_ref
            dom = driver.conn(source).lookupByUUIDString(vm.ref.removeprefix("uuid:"))
            started = time.perf_counter()
            dom.migrateToURI3(
                hosts[target]["migration_uri"], {libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: args.bandwidth_mib}, flags
            )
            return time.perf_counter() - started

        def through_driver(target: str) -> float:
            updates: list = []
            started = time.perf_counter()
            driver.migrate(
                MigrationSpec(vm.ref, target_host_ref=target, bandwidth_bytes_per_s=bandwidth),
                on_progress=updates.append,
                cancel=threading.Event(),
            )
            return time.perf_counter() - started

        home = driver.placement(vm.ref).host_ref
        away = next(h for h in hosts if h != home)
        plain_s: list[float] = []
        driver_s: list[float] = []
        for n in range(args.rounds):
            plain_s += [plain(away), plain(home)]
            driver_s += [through_driver(away), through_driver(home)]
            print(
                f"round {n + 1}: plain {plain_s[-2]:.3f} s, {plain_s[-1]:.3f} s; driver {driver_s[-2]:.3f} s, {driver_s[-1]:.3f} s"
            )
        p, d = statistics.median(plain_s), statistics.median(driver_s)
        print(
            f"guest {GUEST} (64 MiB RAM, disk on the shared pool), cap {args.bandwidth_mib} MiB/s, {len(plain_s)} moves each"
        )
        print(f"plain migrateToURI3:    median {p:.3f} s  (min {min(plain_s):.3f}, max {max(plain_s):.3f})")
        print(f"LibvirtDriver.migrate:  median {d:.3f} s  (min {min(driver_s):.3f}, max {max(driver_s):.3f})")
        print(f"overhead: {1000 * (d - p):+.0f} ms per migration, ratio {d / p:.3f}")
        driver.close()
    finally:
        if not was_up and not args.keep_lab:
            lab("down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
