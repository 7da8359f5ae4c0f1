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

The cost side: the CPU each program spends per move (the Python processes, PostgreSQL's backends
of the benchmark's database, this vcsim; from /proc), how busy the machine was, the database
queries a worker makes per move, and the ceiling that cost sets: the rate if every core ran the
portal at its CPU per move. Options for looking closer: BENCH_PROFILE=DIR writes each worker's
cProfile (CPU time) there; BENCH_NO_LIMITS=1 lifts admission control's limits (no run held back).
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


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process: PostgreSQL and vcsim included)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _cpu_per_pid() -> dict[int, float]:
    """CPU seconds (user + system) each live process has used so far, from /proc."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        rest = text[text.rindex(")") + 2:].split()
        out[int(stat.parent.name)] = (int(rest[11]) + int(rest[12])) / tick
    return out


def _vcsim_pids() -> set[int]:
    """This benchmark's vcsim (started by running_vcsim in a vcsim-bench-* run directory)."""
    pids = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args[0].endswith(b"/vcsim") and any(b"vcsim-bench-" in a for a in args):
            pids.add(int(cmdline.parent.name))
    return pids


def _backend_pids() -> set[int]:
    """The PostgreSQL backends serving the benchmark's database (its own connections only)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        return {pid for (pid,) in cursor.fetchall()}


def _cpu_by_program(before: dict[int, float], pids: dict[str, set[int]]) -> dict[str, float]:
    """CPU seconds each program's processes used since ``before`` (a process born since counts whole)."""
    now = _cpu_per_pid()
    return {name: sum(now.get(pid, 0.0) - before.get(pid, 0.0) for pid in group) for name, group in pids.items()}


def _worker(broker, handled, cpu_out) -> None:
    """One worker process: run each message's runs (as the execute_run / execute_runs tasks do)
    and say so on ``handled``, until told to stop; report the CPU it used."""
    from django.db import connection

    from migrations_app.services.runs import migration_runs_execute

    profile = None
    if os.environ.get("BENCH_PROFILE"):
        import cProfile

        profile = cProfile.Profile(time.process_time)
        profile.enable()
    cpu = time.process_time()
    counts = [0, 0.0]

    def counted(execute, sql, params, many, context):
        counts[0] += 1
        t = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            counts[1] += time.perf_counter() - t

    try:
        with connection.execute_wrapper(counted):
            while (run_ids := broker.get()) is not None:
                migration_runs_execute(run_ids=run_ids, worker=f"bench-{os.getpid()}")
                handled.put(len(run_ids))
    finally:
        connection.close()
        cpu_out.put((time.process_time() - cpu, *counts))
        if profile:
            profile.disable()
            profile.dump_stats(f"{os.environ['BENCH_PROFILE']}/worker-{os.getpid()}.prof")


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
        if os.environ.get("BENCH_NO_LIMITS"):
            conn.options = {"admission": {"host_max": 10000, "network_max": 10000}}
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
            cpu, busy, per_pid = time.process_time(), _machine_busy_s(), _cpu_per_pid()
            plain_s = plain_loop(vm, [first, cluster.host[1]], cluster.resourcePool, N)
            plain_cpu_s, plain_busy_s = time.process_time() - cpu, _machine_busy_s() - busy
            plain_programs = _cpu_by_program(per_pid, {"python": {os.getpid()}, "postgres": set(),
                                                       "vcsim": _vcsim_pids()})
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
        started, cpu, busy, per_pid = time.perf_counter(), time.process_time(), _machine_busy_s(), _cpu_per_pid()
        for worker in workers:
            worker.start()
        submit(vms)
        submitted_s, submit_cpu_s = time.perf_counter() - started, time.process_time() - cpu
        # Every request ends in some worker's message: look again each time one was handled.
        while MigrationRequest.objects.exclude(status__in=TERMINAL).exists():
            handled.get(timeout=120)
        portal_s, portal_busy_s = time.perf_counter() - started, _machine_busy_s() - busy
        portal_programs = _cpu_by_program(per_pid, {"python": {os.getpid(), *(w.pid for w in workers)},
                                                    "postgres": _backend_pids(), "vcsim": _vcsim_pids()})
        for _ in workers:
            broker.put(None)
        reports = [children_cpu.get() for _ in workers]
        execute_cpu_s = sum(r[0] for r in reports)
        worker_queries, worker_query_s = sum(r[1] for r in reports), sum(r[2] for r in reports)
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
    print(f"worker database queries per move: {worker_queries / moves:.1f} "
          f"({1000 * worker_query_s / moves:.1f} ms of wall time in them)")
    # The cost side: every program's CPU per move (the Python processes, PostgreSQL's backends of
    # the benchmark's database, this vcsim), and the best rate that cost allows on this machine.
    cores = os.cpu_count()
    print("CPU per move, by program (its own processes only):")
    for label, per, n in (("plain loop", plain_programs, N), ("portal", portal_programs, moves)):
        total = sum(per.values())
        print(f"  {label:10} {1000 * total / n:5.1f} ms = " + " + ".join(
            f"{name} {1000 * per[name] / n:.1f}" for name in ("python", "postgres", "vcsim")))
    portal_cost_s = sum(portal_programs.values()) / moves
    print(f"machine busy (every process): plain loop {100 * plain_busy_s / plain_s / cores:.0f} % of {cores} cores, "
          f"portal {100 * portal_busy_s / portal_s / cores:.0f} %")
    print(f"ceiling: with all {cores} cores running the portal at its CPU per move, {cores / portal_cost_s:.0f} "
          f"migrations/s, a ratio of {cores / portal_cost_s / (N / plain_s):.2f}")


if __name__ == "__main__":
    main()
