"""What the chaos tests share: the portal's background processes (Celery workers on a real Redis
broker and Celery beat, on the test database) that a test can kill and start again, the batch of
requests they run, and the end conditions every chaos test asserts against the hypervisor's own
record (never the portal's word alone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from migrations_app.choices import TERMINAL, AuditAction, MigrationKind, RequestStatus, Role
from migrations_app.models import AuditEntry, MigrationRequest, MigrationRun, VirtualMachine
from migrations_app.services import requests as svc
from migrations_app.services.audit import audit_verify_chain
from tests.conftest import make_user

ROOT = Path(__file__).resolve().parents[2]
S = RequestStatus
TERMINAL_ACTIONS = (AuditAction.RUN_SUCCEEDED, AuditAction.RUN_FAILED, AuditAction.RUN_ERRORED,
                    AuditAction.RUN_CANCELLED)

# Short clocks for the processes: heartbeats every 0.25 s, a worker silent for 2 s is lost, beat
# dispatches and reconciles twice a second, a queued run's message is sent again after 3 s.
FAST_CLOCKS = {
    "PORTAL_HEARTBEAT_S": "0.25",
    "PORTAL_PROGRESS_INTERVAL_S": "0.2",
    "PORTAL_STALE_AFTER_S": "2",
    "PORTAL_REDISPATCH_AFTER_S": "3",
    "PORTAL_DISPATCH_EVERY_S": "0.5",
    "PORTAL_RECONCILE_EVERY_S": "0.5",
}


def wait_for(predicate, *, timeout: float, what: str, interval: float = 0.1):
    """Poll the database (or a process) for a state, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class PortalProcesses:
    """Celery workers and beat on the test database and the given broker, as a deployment runs
    them (threads pool, early ack). Workers can be SIGKILLed and replaced; each has its own log."""

    def __init__(self, tmp_path: Path, broker_url: str, *, concurrency: int = 4):
        db = settings.DATABASES["default"]
        assert db["ENGINE"].endswith("postgresql"), "chaos tests run on PostgreSQL"
        tag = uuid.uuid4().hex[:8]
        from cryptography.fernet import Fernet

        from migrations_app.secrets import key_from

        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "REDIS_URL": broker_url,
            "CELERY_BROKER_URL": broker_url,
            "CELERY_QUEUE": f"chaos-{tag}",
            "CHANNEL_PREFIX": f"chaos-{tag}",
            "PORTAL_DATA_DIR": str(tmp_path / "data"),
            # The processes decrypt the connection passwords this process stored.
            "PORTAL_FIELD_KEY": key_from("PORTAL_FIELD_KEY", "field.key", Fernet.generate_key).decode(),
            "DEBUG": "1",
            **FAST_CLOCKS,
        }
        for key in ("CHANNEL_LAYER", "DJANGO_ALLOW_ASYNC_UNSAFE"):
            self.env.pop(key, None)
        self.tmp_path = tmp_path
        self.concurrency = concurrency
        self.worker: subprocess.Popen | None = None
        self.beat: subprocess.Popen | None = None
        self.worker_pids: list[int] = []
        self._count = 0

    def _spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.tmp_path / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "portal", *args], cwd=ROOT, env=self.env,
                                stdout=log.open("w"), stderr=subprocess.STDOUT)
        return proc, log

    def start_worker(self) -> None:
        self._count += 1
        proc, log = self._spawn(f"worker-{self._count}", [
            "worker", "-Q", self.env["CELERY_QUEUE"], "--pool", "threads", "--concurrency", str(self.concurrency),
            "--without-mingle", "--without-gossip", "--loglevel", "INFO", "-n", f"chaos{self._count}@%h"])
        self.worker = proc
        self.worker_pids.append(proc.pid)

        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"the worker exited:\n{log.read_text()[-3000:]}")
            return "ready." in log.read_text()

        wait_for(ready, timeout=60, what="the worker to be ready")

    def kill_worker(self) -> None:
        """SIGKILL: no shutdown hook runs, whatever the worker was doing stops mid-way."""
        assert self.worker is not None
        os.kill(self.worker.pid, signal.SIGKILL)
        self.worker.wait(10)
        self.worker = None

    def start_beat(self) -> None:
        self.beat, _ = self._spawn("beat", ["beat", "--schedule", str(self.tmp_path / "beat-schedule"),
                                            "--loglevel", "INFO"])

    def stop(self) -> None:
        for proc in (self.worker, self.beat):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in (self.worker, self.beat):
            if proc is None:
                continue
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.tmp_path.glob("*.log")))


@dataclass
class Batch:
    """The requests of one chaos run: one per VM, so the hypervisor's record per VM is per run."""

    requests: list[MigrationRequest] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return [r.pk for r in self.requests]

    def statuses(self) -> dict[int, str]:
        return dict(MigrationRequest.objects.filter(pk__in=self.ids).values_list("pk", "status"))

    def all_terminal(self) -> bool:
        return all(s in TERMINAL for s in self.statuses().values())

    def count(self, *statuses: str) -> int:
        return sum(1 for s in self.statuses().values() if s in statuses)

    def events(self) -> int:
        return sum(MigrationRun.objects.filter(request_id__in=self.ids).values_list("last_seq", flat=True))


def submit_batch(vms: list[VirtualMachine], targets: dict[int, object]) -> Batch:
    """Submit and approve a compute move of each VM, due together once all are approved."""
    requester = make_user("chaos-requester", Role.REQUESTER, teams=("team-web", "team-data", "team-ops"))
    approver = make_user("chaos-approver", Role.APPROVER)
    later = timezone.now() + timedelta(hours=1)
    batch = Batch()
    for vm in vms:
        request = svc.migration_request_submit(requester=requester, vm=vm, kind=MigrationKind.COMPUTE,
                                               target_host=targets[vm.pk], reason="chaos", start_after=later)
        if request.status == S.PENDING_APPROVAL:
            svc.migration_request_approve(request=request, actor=approver)
        batch.requests.append(request)
    assert batch.count(S.APPROVED) == len(vms), batch.statuses()
    # Their start time comes for all at once: the scheduler (beat's dispatch_due, in the worker)
    # queues them and hands them to the broker, as it does for any scheduled migration.
    MigrationRequest.objects.filter(pk__in=batch.ids).update(start_after=timezone.now())
    return batch


def assert_true_story(batch: Batch, *, starts: dict[str, int], at_target: dict[str, bool],
                      at_source: dict[str, bool]) -> dict[str, int]:
    """The end conditions, per request, against the hypervisor's own record read independently:
    ``starts`` (migration tasks it started per VM ref), ``at_target`` / ``at_source`` (where it
    says each VM is). Returns the count of requests per final status."""
    statuses = batch.statuses()
    assert all(s in TERMINAL for s in statuses.values()), f"not terminal: {statuses}"
    counts: dict[str, int] = {}
    for request in MigrationRequest.objects.filter(pk__in=batch.ids).select_related("vm__host", "target_host", "run"):
        ref, status = request.vm.ref, request.status
        counts[status] = counts.get(status, 0) + 1
        story = f"request {request.pk} ({request.vm.name}): {status}: {request.run.explanation}"
        assert status != S.ERRORED, story  # no run ends with the portal not knowing what happened
        # Never started twice, and settled with the truth the hypervisor confirms.
        assert starts.get(ref, 0) <= 1, f"{story}; the hypervisor started {starts[ref]} migrations"
        assert (status == S.SUCCEEDED) == at_target[ref], f"{story}; hypervisor says at target: {at_target[ref]}"
        if status != S.SUCCEEDED:
            assert at_source[ref], f"{story}; but the VM left its source"
            assert request.vm.host_id != request.target_host_id, story
        else:
            assert starts.get(ref, 0) == 1, story
            assert request.vm.host_id == request.target_host_id, f"{story}; the portal's placement disagrees"
        # The audit trail: queued once; each claim started, and put back in line when its worker
        # was lost before handing the move over (nothing moved), so the last claim alone may have
        # reached the hypervisor; one terminal entry, after all of that.
        actions = list(AuditEntry.objects.filter(request=request).order_by("pk").values_list("action", flat=True))
        assert actions.count(AuditAction.RUN_QUEUED) == 1, (story, actions)
        claims = [a for a in actions if a in (AuditAction.RUN_STARTED, AuditAction.RUN_REQUEUED)]
        requeued = claims.count(AuditAction.RUN_REQUEUED)
        assert claims[:2 * requeued] == [AuditAction.RUN_STARTED, AuditAction.RUN_REQUEUED] * requeued, (story, actions)
        assert claims[2 * requeued:] in ([], [AuditAction.RUN_STARTED]), (story, actions)
        assert requeued <= settings.PORTAL["MAX_REQUEUES"], (story, actions)
        if starts.get(ref, 0):
            assert claims[-1] == AuditAction.RUN_STARTED, (story, actions)
        terminal = [a for a in actions if a in TERMINAL_ACTIONS]
        assert len(terminal) == 1, (story, actions)
        end = actions.index(terminal[0])
        assert actions.index(AuditAction.RUN_QUEUED) < end, (story, actions)
        assert all(i < end for i, a in enumerate(actions)
                   if a in (AuditAction.RUN_STARTED, AuditAction.RUN_REQUEUED)), (story, actions)
        if AuditAction.RUN_RECONCILED in actions:
            last_start = len(actions) - 1 - actions[::-1].index(AuditAction.RUN_STARTED)
            assert actions.index(AuditAction.RUN_RECONCILED) > last_start, (story, actions)
    verdict = audit_verify_chain()
    assert verdict.ok, verdict
    return counts
