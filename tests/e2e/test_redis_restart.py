"""Redis (the broker) stops while migrations run and others wait in its queue, and comes back
empty. The database, not the broker, is the source of truth: the running moves finish, the
queued runs whose messages died with Redis are sent again from the database, and nothing starts
twice. The broker is a private redis-server on a free port (the shared one is never touched)."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import redis
from django.utils import timezone

from migrations_app.choices import RequestStatus
from migrations_app.models import HypervisorConnection, MigrationRun, VirtualMachine
from migrations_app.services.inventory import inventory_sync
from tests.conftest import other_host_same_cluster
from tests.e2e.chaos import PortalProcesses, assert_true_story, submit_batch, wait_for

S = RequestStatus
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("review_everything")]
MIGRATIONS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of this test alone, without persistence: a restart loses every message."""

    def __init__(self, tmp_path: Path):
        self.port = _free_port()
        self.dir = tmp_path / "redis"
        self.dir.mkdir()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=(self.dir / "redis.log").open("a"), stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)

        def answers():
            assert self.proc.poll() is None, (self.dir / "redis.log").read_text()
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_for(answers, timeout=10, what="the private redis-server")
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_restarted_mid_run_loses_nothing_and_starts_nothing_twice(transactional_db, tmp_path, private_redis):
    state_file = tmp_path / "sim.json"
    conn = HypervisorConnection.objects.create(name="redis-restart", kind="simulator", options={
        "speed": 4, "tick_s": 0.05, "vms": 30, "state_file": str(state_file),
        "admission": {"host_max": 4, "datastore_max": 8}})
    inventory_sync(connection=conn)
    vms = [vm for vm in VirtualMachine.objects.filter(connection=conn, power_state="on").order_by("pk")
           if not any(t.startswith("sim:") for t in vm.tags)][:MIGRATIONS]
    assert len(vms) == MIGRATIONS
    targets = {vm.pk: other_host_same_cluster(vm) for vm in vms}
    sources = {vm.ref: vm.host.ref for vm in vms}

    portal = PortalProcesses(tmp_path, private_redis.url)
    try:
        portal.start_worker()
        portal.start_beat()
        batch = submit_batch(vms, targets)
        # Some moves running, others queued behind them (their messages wait in Redis).
        wait_for(lambda: batch.count(S.RUNNING) >= 2 and batch.count(S.QUEUED) >= 4, timeout=60,
                 what="runs both running and queued")
        waiting = set(MigrationRun.objects.filter(request_id__in=batch.ids, request__status=S.QUEUED)
                      .values_list("pk", flat=True))
        private_redis.stop()
        # The running moves go on without the broker (progress and heartbeats live in the database).
        progress = batch.events()
        wait_for(lambda: batch.events() > progress + 5, timeout=30, what="progress while Redis is down")
        restarted_at = timezone.now()
        private_redis.start()
        wait_for(batch.all_terminal, timeout=120, what=f"every request to be final: {batch.statuses()}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{portal.logs()}") from None
    finally:
        portal.stop()

    state = json.loads(state_file.read_text())
    starts: dict[str, int] = {}
    for task in state["tasks"].values():
        starts[task["vm"]] = starts.get(task["vm"], 0) + 1
    hosts = {v["ref"]: v["host"] for v in state["vms"]}
    counts = assert_true_story(batch, starts=starts,
                               at_target={vm.ref: hosts[vm.ref] == targets[vm.pk].ref for vm in vms},
                               at_source={vm.ref: hosts[vm.ref] == sources[vm.ref] for vm in vms})
    # Nothing lost: every move done, each started once on the hypervisor.
    assert counts == {S.SUCCEEDED: MIGRATIONS}, counts
    assert sum(starts.values()) == MIGRATIONS
    # The runs that waited in the dead broker's queue were handed out again from the database.
    resent = MigrationRun.objects.filter(pk__in=waiting, dispatched_at__gt=restarted_at).count()
    assert resent >= 1, (len(waiting), resent)
