"""Compute migrations through the whole portal versus a plain pyvmomi loop, against one vcsim, in one run.

    .venv/bin/python bench/portal_vcsim_throughput.py [N] [WORKERS]     # default 200 moves, 4 workers

Portal path, per move: the submit service (checks, transaction, audit), the approve service (queues
the run), then the worker's execution service (claim with SELECT FOR UPDATE, driver, numbered
progress events, placement, audit) in WORKERS threads, as a Celery worker with a thread pool of
that size runs them. Baseline: the same number of RelocateVM_Task + WaitForTask calls in a loop.
Both print moves per second; the ratio says whether the portal is the bottleneck.
Uses PostgreSQL (database portal_bench, recreated) as production does.
"""

from __future__ import annotations

import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
WORKERS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
def main() -> None:
    from bench.django_env import django_on_fresh_database

    django_on_fresh_database()
    from django.db import connection
    from pyVim.connect import Disconnect, SmartConnect
    from pyVmomi import vim

    from bench.vcsim_relocate_baseline import plain_loop
    from bench.vcsim_sync import running_vcsim
    from migrations_app.choices import Role
    from migrations_app.models import Host, HypervisorConnection, MigrationRequest, VirtualMachine
    from migrations_app.services import requests as svc
    from migrations_app.services.inventory import inventory_sync
    from migrations_app.services.runs import migration_run_execute
    from tests.conftest import REVIEW_EVERYTHING, install_policy, make_user

    hosts_per_cluster = 4
    vms_per_host = max(1, -(-N // hosts_per_cluster))
    flags = ["-dc", "1", "-cluster", "1", "-host", str(hosts_per_cluster), "-standalone", "0",
             "-vm", str(vms_per_host), "-ds", "2"]
    with running_vcsim(flags) as (url, ca):
        parts = urlsplit(url)
        conn = HypervisorConnection(name="bench", kind="vcenter", url=f"https://{parts.hostname}:{parts.port}{parts.path}",
                                    username=parts.username, ca_bundle=ca, is_lab=not ca)
        conn.set_password(parts.password)
        conn.save()
        inventory_sync(connection=conn)
        # Every move waits for one approver, so the portal path measures submit and approve (the
        # shipped policy would approve vcsim's small VMs at submission).
        install_policy(REVIEW_EVERYTHING)
        requester = make_user("bench-requester", Role.ADMIN)
        approver = make_user("bench-approver", Role.APPROVER)

        # Baseline: a plain pyvmomi loop on its own session.
        context = ssl.create_default_context(cadata=ca) if ca else ssl._create_unverified_context()
        si = SmartConnect(host=parts.hostname, port=parts.port, user=parts.username, pwd=parts.password,
                          sslContext=context)
        try:
            content = si.RetrieveContent()
            view = content.viewManager.CreateContainerView(content.rootFolder, [vim.ClusterComputeResource], True)
            cluster = view.view[0]
            view.Destroy()
            first = cluster.host[0]
            vm = next(v for v in first.vm if v.runtime.powerState == "poweredOn")
            plain_s = plain_loop(vm, [first, cluster.host[1]], cluster.resourcePool, N)
        finally:
            Disconnect(si)
        inventory_sync(connection=conn)  # the baseline moved one VM: start from the truth

        vms = list(VirtualMachine.objects.filter(connection=conn, power_state="on").select_related("host")[:N])
        hosts = list(Host.objects.filter(connection=conn).order_by("name"))
        started = time.perf_counter()
        run_ids = []
        for i, vm in enumerate(vms):
            target = next(h for h in hosts[i % len(hosts):] + hosts if h.pk != vm.host_id)
            mr = svc.migration_request_submit(requester=requester, vm=vm, kind="compute", target_host=target,
                                              reason="bench")
            svc.migration_request_approve(request=mr, actor=approver)
            run_ids.append(mr.run.pk)
        submitted_s = time.perf_counter() - started

        def work(run_id: int) -> None:
            try:
                migration_run_execute(run_id=run_id, worker="bench")
            finally:
                connection.close()

        if WORKERS == 1:
            for run_id in run_ids:  # inline: profilers see it
                migration_run_execute(run_id=run_id, worker="bench")
        else:
            with ThreadPoolExecutor(WORKERS) as pool:
                list(pool.map(work, run_ids))
        portal_s = time.perf_counter() - started
        done = MigrationRequest.objects.filter(status="succeeded").count()

    moves = len(vms)
    print(f"moves: {moves} (portal), {N} (plain loop); portal succeeded: {done}")
    print(f"plain pyvmomi loop:  {N / plain_s:7.1f} relocations/s  ({plain_s:.2f} s)")
    print(f"portal, {WORKERS} workers:  {moves / portal_s:7.1f} migrations/s  ({portal_s:.2f} s, "
          f"of which submit+approve {submitted_s:.2f} s)")
    print(f"ratio portal/plain:  {(moves / portal_s) / (N / plain_s):7.2f}")


if __name__ == "__main__":
    main()
