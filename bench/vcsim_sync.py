"""Inventory sync against a 10,000-VM vcsim: how long VCenterDriver.inventory() takes and how many
SOAP round trips it needs, where the time goes (the VMs decoded by pyvmomi, as before, against
the streamed read the driver uses now; the other objects), and the portal's
database write of the result (first sync into an empty database, then an unchanged one) and
inventory_sync end to end. The portal part uses PostgreSQL (database $BENCH_DB, default
portal_bench, recreated).

    .venv/bin/python bench/vcsim_sync.py              # starts its own vcsim (~12 s), stops it after
    VCSIM_URL=https://user:pass@127.0.0.1:PORT/sdk VCSIM_CA=lab/run/vcsim/cert.pem \\
        .venv/bin/python bench/vcsim_sync.py          # uses a running one

Without VCSIM_CA a given VCSIM_URL is used as a lab connection (TLS not verified).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

from drivers.base import ConnectionConfig  # noqa: E402
from drivers.vmware import VCenterDriver  # noqa: E402

VCSIM = REPO / "lab" / "vcsim" / "vcsim.sh"
# 2 clusters x 5 hosts x 1,000 VMs = 10,000 VMs over 4 datastores.
TEN_THOUSAND = ["-dc", "1", "-cluster", "2", "-host", "5", "-standalone", "0", "-vm", "1000", "-ds", "4"]


@contextlib.contextmanager
def running_vcsim(flags: list[str] = TEN_THOUSAND) -> Iterator[tuple[str, str]]:
    """(url, CA PEM or "") of VCSIM_URL, or of a vcsim started here (and stopped afterwards)."""
    if os.environ.get("VCSIM_URL"):
        ca = os.environ.get("VCSIM_CA", "")
        yield os.environ["VCSIM_URL"], Path(ca).read_text() if ca else ""
        return
    (REPO / "lab" / "run").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vcsim-bench-", dir=REPO / "lab" / "run") as run_dir:
        env = {**os.environ, "VCSIM_RUN_DIR": run_dir}
        started = time.perf_counter()
        url = subprocess.run([str(VCSIM), "start", *flags], env=env, capture_output=True, text=True)
        if url.returncode:
            raise RuntimeError(f"vcsim did not start (exit {url.returncode}): {url.stderr.strip()}")
        print(f"vcsim {' '.join(flags)} up in {time.perf_counter() - started:.1f} s")
        try:
            yield url.stdout.strip(), Path(run_dir, "cert.pem").read_text()
        finally:
            subprocess.run([str(VCSIM), "stop"], env=env, check=True)


def driver_for(url: str, ca_pem: str) -> VCenterDriver:
    """A driver the way the portal would configure it: credentials apart from the URL."""
    parts = urlsplit(url)
    return VCenterDriver(
        ConnectionConfig(
            kind="vcenter",
            url=f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}",
            username=parts.username or "",
            password=parts.password or "",
            ca_bundle=ca_pem,
            verify_tls=bool(ca_pem),
            is_lab=not ca_pem,
        )
    )


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def driver_parts(driver: VCenterDriver) -> None:
    """The two retrievals of an inventory read, apart, and the VMs decoded by pyvmomi as before."""
    from pyVmomi import vim

    from drivers.vmware.inventory import _INVENTORY_PROPS, _VM_PROPS, PC, retrieve
    from drivers.vmware.vm_listing import read_vms

    session = driver._session
    over_view = PC.ObjectSpec(
        obj=session.view, skip=True, selectSet=[PC.TraversalSpec(type=vim.view.ContainerView, path="view")]
    )
    vms = PC.FilterSpec(objectSet=[over_view], propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=_VM_PROPS)])
    others = PC.FilterSpec(
        objectSet=[over_view], propSet=[PC.PropertySpec(type=t, pathSet=p) for t, p in _INVENTORY_PROPS.items()]
    )
    collector = session.content.propertyCollector
    decoded, old_s = _timed(lambda: retrieve(session, [vms], page_size=driver.page_size))
    streamed, new_s = _timed(lambda: read_vms(collector, collector._stub, vms, page_size=driver.page_size))
    _, others_s = _timed(lambda: retrieve(session, [others], page_size=driver.page_size))
    print(f"  VMs (with their device lists) decoded by pyvmomi (before): {old_s:6.2f} s ({len(decoded)} VMs)")
    print(f"  VMs streamed, disks only (now):                            {new_s:6.2f} s ({len(streamed)} VMs, "
          f"{sum(len(vm.disks) for vm in streamed.values())} disks)")
    print(f"  hosts, datastores, clusters, folders decoded by pyvmomi:   {others_s:6.2f} s")


def portal_write(url: str, ca_pem: str, inv) -> None:
    """The portal's side: the database write of the inventory, and inventory_sync end to end."""
    from bench.django_env import django_on_fresh_database

    django_on_fresh_database()
    from django.db import transaction

    from migrations_app.models import HypervisorConnection
    from migrations_app.services.inventory import _mirror, inventory_sync

    parts = urlsplit(url)
    conn = HypervisorConnection(name="bench", kind="vcenter", url=f"https://{parts.hostname}:{parts.port}{parts.path}",
                                username=parts.username or "", ca_bundle=ca_pem, is_lab=not ca_pem)
    conn.set_password(parts.password or "")
    conn.save()
    for label in ("first sync, empty database", "unchanged inventory"):
        def write():
            with transaction.atomic():
                return _mirror(conn, inv)

        _, write_s = _timed(write)
        print(f"portal database write, {label}: {write_s:6.2f} s")
    counts, sync_s = _timed(lambda: inventory_sync(connection=conn))
    print(f"inventory_sync end to end (own login, fetch, write, audit): {sync_s:6.2f} s, {counts['vms']} VMs")


def main() -> None:
    with running_vcsim() as (url, ca_pem):
        driver = driver_for(url, ca_pem)
        try:
            inv = None
            for label in ("cold (login + container view)", "warm (session reused)"):
                before = driver.round_trips
                inv, elapsed = _timed(driver.inventory)
                print(
                    f"inventory {label}: {elapsed:.2f} s, {len(inv.vms)} VMs "
                    f"({sum(len(vm.disks) for vm in inv.vms)} disks), {len(inv.hosts)} hosts, "
                    f"{len(inv.datastores)} datastores, {len(inv.clusters)} clusters, "
                    f"{driver.round_trips - before} SOAP round trips"
                )
            driver_parts(driver)
        finally:
            driver.close()
        portal_write(url, ca_pem, inv)


if __name__ == "__main__":
    main()
