"""Cost of appending one audit entry with the hash chain on and off, in one run, on PostgreSQL.

    .venv/bin/python bench/audit_append.py [N]        # default 2000 entries each way

Each entry is its own transaction, as actions are. "Chain on" is the portal's audit_record: the
advisory lock that serializes appends, reading the tail's hash, SHA-256 over the canonical entry.
"Chain off" inserts the same row with no chain work. Uses database portal_bench (recreated).
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000


def main() -> None:
    from bench.django_env import django_on_fresh_database

    django_on_fresh_database()
    from django.db import transaction
    from django.utils import timezone

    from migrations_app.choices import AuditAction
    from migrations_app.models import AuditEntry
    from migrations_app.services.audit import audit_record

    fields = {"action": AuditAction.RUN_PHASE, "object_type": "migration_run", "object_id": "42",
              "reason": "phase change", "data": {"phase": "memory_precopy", "percent": 42.5},
              "before": {"host": "esx-01"}, "after": {"host": "esx-02"}, "task_id": "task-123"}

    def chain_off() -> None:
        with transaction.atomic():
            AuditEntry.objects.create(created_at=timezone.now(), actor_name="system", prev_hash="",
                                      entry_hash=uuid.uuid4().hex, **fields)

    def chain_on() -> None:
        with transaction.atomic():
            audit_record(actor=None, **fields)

    for _ in range(50):  # warm up connections and caches
        chain_off()
    results = {}
    for name, append in (("chain off", chain_off), ("chain on", chain_on)):
        started = time.perf_counter()
        for _ in range(N):
            append()
        results[name] = (time.perf_counter() - started) / N
    off, on = results["chain off"], results["chain on"]
    print(f"entries: {N} each way, one transaction per entry (PostgreSQL)")
    print(f"chain off: {off * 1e6:8.0f} us per entry")
    print(f"chain on:  {on * 1e6:8.0f} us per entry")
    print(f"chain cost: {(on - off) * 1e6:+.0f} us per entry (x{on / off:.2f})")


if __name__ == "__main__":
    main()
