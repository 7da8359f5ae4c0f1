"""Inventory sync against a 10,000-VM vcsim: how long VCenterDriver.inventory() takes and how many
SOAP round trips it needs.

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
        url = subprocess.run([str(VCSIM), "start", *flags], env=env, check=True, capture_output=True, text=True)
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


def main() -> None:
    with running_vcsim() as (url, ca_pem):
        driver = driver_for(url, ca_pem)
        try:
            for label in ("cold (login + container view)", "warm (session reused)"):
                before = driver.round_trips
                started = time.perf_counter()
                inv = driver.inventory()
                elapsed = time.perf_counter() - started
                print(
                    f"inventory {label}: {elapsed:.2f} s, {len(inv.vms)} VMs, {len(inv.hosts)} hosts, "
                    f"{len(inv.datastores)} datastores, {len(inv.clusters)} clusters, "
                    f"{driver.round_trips - before} SOAP round trips"
                )
        finally:
            driver.close()


if __name__ == "__main__":
    main()
