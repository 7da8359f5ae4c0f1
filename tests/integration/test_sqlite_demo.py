"""The embedded default: the demo's SQLite database and the simulator, in a process of its own (the
test suite itself runs on PostgreSQL). Its seed, a batch approval and a batch of runs executed by
the worker's service must work there too, timestamps and all, and the audit chain must verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json
from django.utils import timezone
from django.contrib.auth.models import User
from migrations_app.models import MigrationRequest, MigrationRun, RunEvent
from migrations_app.services import requests as svc
from migrations_app.services.audit import audit_verify_chain
from migrations_app.services.runs import migration_runs_execute

pending = list(MigrationRequest.objects.filter(status="pending_approval", approval_plan__rule="Everything else needs one approver"))
svc.migration_requests_approve_many(requests=pending, actor=User.objects.get(username="erin"))
queued = list(MigrationRun.objects.filter(request__status="queued").values_list("pk", flat=True))
migration_runs_execute(run_ids=queued, worker="sqlite-test")
runs = list(MigrationRun.objects.filter(pk__in=queued).select_related("request"))
print(json.dumps({
    "runs": len(runs),
    "statuses": sorted(r.request.status for r in runs),
    "times_ok": all(r.started_at <= r.heartbeat_at <= r.finished_at <= timezone.now() for r in runs),
    "seqs_ok": all(list(RunEvent.objects.filter(run=r).order_by("seq").values_list("seq", flat=True))
                   == list(range(1, r.last_seq + 1)) for r in runs),
    "chain_ok": audit_verify_chain().ok,
}))
"""


def test_the_demo_database_seeds_approves_and_runs_a_batch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(DEBUG="1", PORTAL_DATA_DIR=str(tmp_path), CHANNEL_LAYER="memory", CELERY_BROKER_URL="memory://")
    manage = [sys.executable, str(REPO / "manage.py")]

    def run(*args: str) -> str:
        done = subprocess.run([*manage, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    run("migrate", "--noinput", "-v0")
    run("seed_demo", "--password", "pw-demo-123", "--speed", "200")  # simulated moves in a fraction of a second
    assert (tmp_path / "db.sqlite3").exists() or list(tmp_path.glob("*.sqlite3")), list(tmp_path.iterdir())
    out = json.loads(run("shell", "-c", SCRIPT).strip().splitlines()[-1])
    # The seed's auto-approved move and the one-approver move, executed together as one batch.
    assert out["runs"] == 2 and out["statuses"] == ["succeeded", "succeeded"], out
    assert out["times_ok"] and out["seqs_ok"] and out["chain_ok"], out
