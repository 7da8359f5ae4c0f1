"""Compute migrations through the whole portal versus a plain pyvmomi loop, against one vcsim, in one run.

    .venv/bin/python bench/portal_vcsim_throughput.py [N] [WORKERS]
    # default: 200 moves, 4 worker processes (Celery's default prefork pool)
    RELOCATE_DELAY_MS=300 .venv/bin/python bench/portal_vcsim_throughput.py 40
    # each RelocateVM_Task takes that long on vcsim (its moves are otherwise instant; a real
    # vMotion takes seconds): shows the rates when the hypervisor, not the portal, sets the pace

Portal path: the VM owner submits the moves in forms of SUBMIT_BATCH VMs (default 20; the batch
submit service: checks, policy, one transaction, audit) and the approver approves each form's
requests at once (the batch approve service: signatures, runs queued, handed to the workers in
messages of up to PORTAL_WORKER_BATCH runs). WORKERS worker processes take the messages from a
queue standing in for the broker, as a Celery worker of that concurrency does, and run the
worker's execution service on each (claim with SELECT FOR UPDATE and admission control, pre-flight,
the driver's migrate_many, numbered progress events, placement, audit); runs admission control
holds back are sent again through the same queue when a move ends. Submission and execution
overlap, as the web server and the workers do. Baseline: the same number of RelocateVM_Task +
WaitForTask calls in a loop. Both print moves per second; the ratio says whether the portal is the
bottleneck. It also prints the database queries and SOAP round trips one move costs in each step
when it is alone (measured on one move, through the one-move services, before the timed part).
Django runs with DEBUG off, as deployed. Uses PostgreSQL (database $BENCH_DB, default
portal_bench, recreated) as production does.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import ssl
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
WORKERS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
RELOCATE_DELAY_MS = int(os.environ.get("RELOCATE_DELAY_MS", "0"))
SUBMIT_BATCH = int(os.environ.get("SUBMIT_BATCH", "20"))  # VMs per submitted form


def _worker(broker, handled, cpu_out) -> None:
    """One worker process: run each message's runs (as the execute_run / execute_runs tasks do)
    and say so on ``handled``, until told to stop; report the CPU it used."""
    from django.db import connection

    from migrations_app.services.runs import migration_runs_execute

    cpu = time.process_time()
    try:
        while (run_ids := broker.get()) is not None:
            migration_runs_execute(run_ids=run_ids, worker=f"bench-{os.getpid()}")
            handled.put(len(run_ids))
    finally:
        connection.close()
        cpu_out.put(time.process_time() - cpu)


def main() -> None:
    from bench.django_env import django_on_fresh_database

    os.environ.setdefault("DEBUG", "0")
    os.environ.setdefault("SECRET_KEY", secrets.token_hex(32))
    django_on_fresh_database()
    from django.conf import settings
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from pyVim.connect import Disconnect, SmartConnect
    from pyVmomi import vim

    from bench.vcsim_relocate_baseline import plain_loop
    from bench.vcsim_sync import running_vcsim
    from drivers import registry
    from migrations_app.choices import TERMINAL, Role
    from migrations_app.models import Host, HypervisorConnection, MigrationRequest, RunEvent, VirtualMachine
    from migrations_app.services import requests as svc
    from migrations_app.services.inventory import inventory_sync
    from migrations_app.services.runs import migration_run_execute
    from tests.conftest import REVIEW_EVERYTHING, install_policy, make_user

    hosts_per_cluster = 4
    vms_per_host = max(1, -(-(N + 1) // hosts_per_cluster))  # one more for the measured move
    flags = ["-dc", "1", "-cluster", "1", "-host", str(hosts_per_cluster), "-standalone", "0",
             "-vm", str(vms_per_host), "-ds", "2", "-relocate-delay-ms", str(RELOCATE_DELAY_MS)]
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
            cpu = time.process_time()
            plain_s = plain_loop(vm, [first, cluster.host[1]], cluster.resourcePool, N)
            plain_cpu_s = time.process_time() - cpu
        finally:
            Disconnect(si)
        inventory_sync(connection=conn)  # the baseline moved one VM: start from the truth

        # The moves come from every host in turn (as VM owners across the cluster ask), each to
        # another host: admission control's per-host limits (vCenter's 8 vMotions) bind evenly.
        by_host: dict[int, list] = {}
        for vm in VirtualMachine.objects.filter(connection=conn, power_state="on").select_related("host").order_by("pk"):
            by_host.setdefault(vm.host_id, []).append(vm)
        vms = [vm for row in zip(*by_host.values(), strict=False) for vm in row][:N + 1]
        hosts = list(Host.objects.filter(connection=conn).order_by("name"))

        def target_of(i: int, vm) -> Host:
            return next(h for h in hosts[i % len(hosts):] + hosts if h.pk != vm.host_id)

        def submit(vms) -> None:
            # As people use the portal for many moves: the owner selects VMs and sends one form
            # (a batch of SUBMIT_BATCH), the approver approves the selected requests at once.
            for start in range(0, len(vms), SUBMIT_BATCH):
                chunk = vms[start:start + SUBMIT_BATCH]
                mrs = svc.migration_requests_submit_many(
                    requester=requester, reason="bench",
                    items=[svc.RequestedMove(vm, "compute", target_host=target_of(start + i, vm))
                           for i, vm in enumerate(chunk)])
                svc.migration_requests_approve_many(requests=mrs, actor=approver)

        # One move measured apart: what each step costs in queries and SOAP round trips.
        from migrations_app.services.inventory import driver_for

        driver = driver_for(conn)
        cost = {}
        vm = vms.pop()
        target = next(h for h in hosts if h.pk != vm.host_id)
        mr = None

        def measured(step: str, call) -> None:
            trips, cpu, wall = driver.round_trips, time.process_time(), time.perf_counter()
            with CaptureQueriesContext(connection) as queries:
                call()
            cost[step] = (len(queries), driver.round_trips - trips, time.process_time() - cpu,
                          time.perf_counter() - wall)

        def submit_one() -> None:
            nonlocal mr
            mr = svc.migration_request_submit(requester=requester, vm=vm, kind="compute", target_host=target,
                                              reason="bench")

        measured("submit", submit_one)
        measured("approve", lambda: svc.migration_request_approve(request=mr, actor=approver))
        measured("execute", lambda: migration_run_execute(run_id=mr.run.pk, worker="bench"))

        # The broker: worker messages (a run, or a batch of runs of one connection, as dispatch
        # and dispatch_many send them) go into one queue that WORKERS worker processes consume,
        # as a Celery worker of that concurrency would; a worker's finish sends the runs that
        # were waiting for its resources through the same queue. Submission runs meanwhile.
        from migrations_app.services.runs import queueing

        broker = multiprocessing.get_context("fork").Queue()
        queueing.dispatch = lambda run_id, task_id: broker.put([run_id])
        batch = settings.PORTAL["WORKER_BATCH"]
        queueing.dispatch_many = lambda runs: [broker.put([pk for pk, _, _ in runs[i:i + batch]])
                                               for i in range(0, len(runs), batch)]
        # As Celery's prefork pool: no database connection or vCenter session crosses the fork.
        connection.close()
        registry.close_all()
        ctx = multiprocessing.get_context("fork")
        children_cpu, handled = ctx.Queue(), ctx.Queue()
        workers = [ctx.Process(target=_worker, args=(broker, handled, children_cpu)) for _ in range(WORKERS)]
        started, cpu = time.perf_counter(), time.process_time()
        for worker in workers:
            worker.start()
        submit(vms)
        submitted_s, submit_cpu_s = time.perf_counter() - started, time.process_time() - cpu
        # Every request ends in some worker's message: look again each time one was handled.
        while MigrationRequest.objects.exclude(status__in=TERMINAL).exists():
            handled.get(timeout=120)
        portal_s = time.perf_counter() - started
        for _ in workers:
            broker.put(None)
        execute_cpu_s = sum(children_cpu.get() for _ in workers)
        for worker in workers:
            worker.join()
        done = MigrationRequest.objects.filter(status="succeeded").count() - 1  # the measured move
        held_back = RunEvent.objects.filter(message__startswith="waiting:").count()

    moves = len(vms)
    print(f"moves: {moves} (portal), {N} (plain loop); portal succeeded: {done}")
    print("one move, measured alone (queries, SOAP round trips, CPU of this process, wall):")
    for step, (queries, trips, cpu_s, wall_s) in cost.items():
        print(f"  {step:8} {queries:3} queries, {trips} SOAP round trips, {1000 * cpu_s:5.1f} ms CPU, "
              f"{1000 * wall_s:5.1f} ms")
    print(f"vcsim RelocateVM_Task delay: {RELOCATE_DELAY_MS} ms; runs held back by admission control "
          f"(vCenter's concurrent vMotion limits) and sent again: {held_back} times")
    print(f"plain pyvmomi loop:  {N / plain_s:7.1f} relocations/s  ({plain_s:.2f} s)")
    print(f"portal, {WORKERS} worker processes (batches of up to {settings.PORTAL['WORKER_BATCH']} runs):  {moves / portal_s:7.1f} migrations/s  ({portal_s:.2f} s, "
          f"of which submit+approve {submitted_s:.2f} s in forms of {SUBMIT_BATCH} VMs, i.e. "
          f"{1000 * submitted_s / moves:.1f} ms a move)")
    print(f"ratio portal/plain:  {(moves / portal_s) / (N / plain_s):7.2f}")
    print(f"CPU of the Python side per move (PostgreSQL and vcsim not counted): plain loop "
          f"{1000 * plain_cpu_s / N:.1f} ms; portal {1000 * (submit_cpu_s + execute_cpu_s) / moves:.1f} ms "
          f"(submit+approve {1000 * submit_cpu_s / moves:.1f}, execution {1000 * execute_cpu_s / moves:.1f})")


if __name__ == "__main__":
    main()
