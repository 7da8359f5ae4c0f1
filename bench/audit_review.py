"""How fast the auditor's page answers over a large log, on PostgreSQL.

    .venv/bin/python bench/audit_review.py [ROWS]        # default 300000 entries

Fills database portal_bench (recreated) with ROWS chained entries, then times what the audit page
does: the count and first page, a deep page, filtered pages (actor, action, text), and a full chain
verification for scale.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000


def main() -> None:
    from bench.django_env import django_on_fresh_database

    django_on_fresh_database()
    from django.core.paginator import Paginator
    from django.utils import timezone

    from migrations_app import audit_chain, selectors
    from migrations_app.models import AuditEntry
    from migrations_app.services.audit import audit_verify_chain

    started = time.perf_counter()
    prev, batch, base = audit_chain.GENESIS, [], timezone.now() - timedelta(days=30)
    actions = ("request.submitted", "request.approved", "run.started", "run.phase", "run.succeeded")
    for i in range(1, ROWS + 1):
        row = {"id": i, "created_at": base + timedelta(seconds=i), "actor_id": None,
               "actor_name": f"user{i % 50}", "action": actions[i % 5], "outcome": "success",
               "object_type": "migration_request", "object_id": str(i % 5000), "request_id": None,
               "vm_name": f"vm-{i % 3000:04d}", "reason": f"reason {i}", "before": {}, "after": {},
               "task_id": "", "ip": None, "data": {}, "prev_hash": prev}
        row["entry_hash"] = prev = audit_chain.entry_hash(row)
        batch.append(AuditEntry(**row))
        if len(batch) == 5000:
            AuditEntry.objects.bulk_create(batch)
            batch = []
    AuditEntry.objects.bulk_create(batch)
    print(f"{ROWS} chained entries written in {time.perf_counter() - started:.1f} s")

    def timed(label: str, fn) -> None:
        t = time.perf_counter()
        n = fn()
        print(f"{label:<44} {1000 * (time.perf_counter() - t):8.1f} ms  ({n})")

    def page(number: int, **filters):
        p = Paginator(selectors.audit_entries(**filters), 50).get_page(number)
        return f"{len(list(p))} rows of {p.paginator.count}"

    timed("first page, no filter (count + 50 rows)", lambda: page(1))
    timed("page 2000, no filter", lambda: page(2000))
    timed("first page, actor=user7", lambda: page(1, actor="user7"))
    timed("first page, action=run.succeeded", lambda: page(1, action="run.succeeded"))
    timed("first page, text 'vm-0042'", lambda: page(1, text="vm-0042"))
    timed("full chain verification", lambda: audit_verify_chain().checked)


if __name__ == "__main__":
    main()
