"""Issue #6, part 5, done when: evacuating a simulated host with 20 VMs and one unmovable VM
produces a plan, runs after approval within the admission limits (real Celery workers), and ends
with the host empty except for the VM whose fallback was skip, as the simulator itself reports.
The approver approves in a real browser, whose plan page follows the run live without a reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from drivers.base import ConnectionConfig
from drivers.simulator import SimulatorDriver
from migrations_app.admission import Limits
from migrations_app.choices import PlanItemStatus, PlanKind, PlanStatus, RequestStatus, Role
from migrations_app.models import Host, MigrationRun, MovePlan, RunEvent, VirtualMachine
from migrations_app.services import plans as svc
from tests.conftest import make_user
from tests.simdc import evacuation_state, simulated_connection

# One approver signs the plan (the shipped policy would approve 20 small same-cluster moves by
# itself; the policy's part of plan approval is pinned in tests/services/test_plan_approval.py).
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("review_everything")]
ROOT = Path(__file__).resolve().parents[2]
ANTI = "anti-affinity:db"


@pytest.fixture
def more_workers(live_portal, tmp_path):
    """A second worker process (4 threads) on the portal's queue: six threads in all, so admission
    control, not the number of threads, is what limits how many moves run at once."""
    db = django_settings.DATABASES["default"]
    first = live_portal["procs"]["worker"].args
    queue = first[first.index("-Q") + 1]
    env = {**os.environ,
           "DATABASE_URL": f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
           "REDIS_URL": live_portal["redis_url"], "CELERY_BROKER_URL": live_portal["redis_url"],
           "CELERY_QUEUE": queue, "CHANNEL_PREFIX": queue, "PORTAL_DATA_DIR": str(tmp_path / "data"),
           "PORTAL_HEARTBEAT_S": "0.5", "PORTAL_PROGRESS_INTERVAL_S": "0.2", "DEBUG": "1"}
    env.pop("CHANNEL_LAYER", None)
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    log = tmp_path / "worker2.log"
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "portal", "worker", "-Q", queue, "--pool",
                             "threads", "--concurrency", "4", "--without-mingle", "--without-gossip", "-n",
                             f"second-{queue}@%h", "--loglevel", "INFO"],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "ready." not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the second worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def in_thread(fn):
    """Call a service from its own thread: this one holds Playwright's event loop, and the live
    pushes a service sends on commit use async_to_sync."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    def call():
        try:
            return fn()
        finally:
            connection.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result()


def max_overlap(intervals) -> int:
    """The most intervals open at one instant (an end before a start at the same instant)."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1]))
    best = now = 0
    for _, step in points:
        now += step
        best = max(best, now)
    return best


def test_evacuate_a_host_of_20_vms_within_the_limits_leaving_only_the_skipped_vm(
        live_portal, more_workers, login, tmp_path, settings):
    from django.db import connection

    try:
        evacuate(live_portal, login, tmp_path, settings)
    finally:
        # With Playwright's loop in this thread the ORM's connection belongs to this context, not
        # to the fixtures' teardown: close it here, or the test database cannot be dropped.
        connection.close()


def evacuate(live_portal, login, tmp_path, settings):
    from django.conf import global_settings

    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS  # the portal's processes verify for real
    state = evacuation_state(20, tags={0: [ANTI], 1: [ANTI], 2: [ANTI]})
    # Each move takes a few ticks (~0.5 s): long enough to overlap, short enough for a quick test.
    conn = simulated_connection(tmp_path / "sim.json", state, name="evac-e2e", speed=10, tick_s=0.1)
    carol = make_user("carol", Role.ADMIN)
    erin = make_user("erin", Role.APPROVER)
    for user in (carol, erin):
        user.set_password("pw-" + user.username)
        user.save()
    src = Host.objects.get(connection=conn, name="src.lab")
    assert VirtualMachine.objects.filter(host=src).count() == 21

    # The admin builds the plan: 20 targets, the VM on src's local datastore flagged up front.
    plan = in_thread(lambda: svc.move_plan_build(requester=carol, kind=PlanKind.EVACUATE_HOST, host=src,
                                                 reason="BIOS upgrade"))
    stuck = plan.items.select_related("vm").get(movable=False)
    assert stuck.vm.name == "pinned-local" and "does not see its datastore" in stuck.blocker
    assert plan.items.filter(movable=True).count() == 20 and plan.estimated_duration_s > 0
    in_thread(lambda: svc.move_plan_set_fallback(plan=plan, actor=carol, item=stuck, fallback="skip"))

    # The approver's queue shows the plan as soon as it is submitted; she opens it and approves it
    # in the browser, and the plan's page then follows it live.
    page = login("erin", "pw-erin")
    frames: list[dict] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(json.loads(f))
                                          if isinstance(f, str) else None))
    page.goto(f"{live_portal['url']}/approvals/")
    page.wait_for_selector("#live-state.on")
    page.wait_for_selector("#plan-cards >> text=No plan waits for you")
    in_thread(lambda: svc.move_plan_submit(plan=plan, actor=carol))
    page.click(f"#plan-cards [data-plan-id='{plan.pk}'] >> text=Review plan #{plan.pk}")
    page.wait_for_selector("#live-state.on")
    page.wait_for_selector("#plan-stages >> text=Stage 1 of 1 (Review)")
    page.click("#plan-approve")
    page.wait_for_selector("#plan-status[data-status=running]")
    page.evaluate("window.__notReloaded = true")
    page.wait_for_selector("#plan-status[data-status=done]", timeout=90_000)
    assert page.evaluate("window.__notReloaded") is True  # followed live: no reload
    assert page.inner_text("#plan-done") == page.inner_text("#plan-total") == "21"
    assert page.locator("#plan-items .item-status:text-is('Moved')").count() == 20
    assert page.locator("#plan-items .item-status:text-is('Skipped')").count() == 1

    plan = MovePlan.objects.get(pk=plan.pk)
    assert plan.status == PlanStatus.DONE and plan.summary == "20 moved, 1 skipped, 0 not moved."
    items = list(plan.items.select_related("vm", "request__run", "target_host"))
    moved = [i for i in items if i.movable]
    assert all(i.status == PlanItemStatus.SUCCEEDED and i.request.status == RequestStatus.SUCCEEDED
               for i in moved)
    assert next(i for i in items if not i.movable).status == PlanItemStatus.SKIPPED

    # The simulator's own state: src holds only the skipped VM; every VM sits where the plan said.
    driver = SimulatorDriver(ConnectionConfig(kind="simulator", options={"state_file": str(tmp_path / "sim.json")}))
    inv = driver.inventory()
    by_ref = {v.ref: v for v in inv.vms}
    assert [v.name for v in inv.vms if v.host_ref == "host-src"] == ["pinned-local"]
    for item in moved:
        assert by_ref[item.vm.ref].host_ref == item.target_host.ref
    # Capacity (with the planner's headroom) and anti-affinity held on the hypervisor.
    headroom = django_settings.PORTAL["PLAN_HOST_HEADROOM"]
    for h in inv.hosts:
        used = sum(v.memory_bytes for v in inv.vms if v.host_ref == h.ref)
        assert h.ref == "host-src" or used <= h.memory_bytes * (1 - headroom)
    assert len({v.host_ref for v in inv.vms if ANTI in v.tags}) == 3

    # Within the limits: no instant with more runs on one host than admission allows, and the
    # limit (not the six worker threads) is what held moves back.
    limit = Limits.for_connection(conn.kind, conn.options).host_max
    runs = list(MigrationRun.objects.filter(request__plan_items__plan=plan).select_related("request__target_host"))
    assert len(runs) == 20 and all(r.started_at and r.finished_at for r in runs)
    per_host = defaultdict(list)
    for r in runs:
        for name in ("src.lab", r.request.target_host.name):
            per_host[name].append((r.started_at, r.finished_at))
    peaks = {name: max_overlap(iv) for name, iv in per_host.items()}
    assert all(peak <= limit for peak in peaks.values()), peaks
    assert peaks["src.lab"] == limit, peaks  # the moves did run side by side
    assert RunEvent.objects.filter(run__in=runs, message__startswith="waiting: host src.lab").exists()

    # The page watched every VM's run live: it subscribed to each and received its events.
    run_ids = {r.pk for r in runs}
    streamed = {f["id"] for f in frames if f.get("type") == "run.event"}
    assert run_ids <= streamed, run_ids - streamed
    assert any(f.get("type") == "plan.changed" and f.get("id") == plan.pk for f in frames)
