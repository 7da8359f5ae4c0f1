"""A run's numbered progress events: the stored story a page catches up from (the socket only notifies)."""

from __future__ import annotations

from django.db import connections, router, transaction
from django.db.models import F, Q, sql

from migrations_app import events
from migrations_app.models import MigrationRun, RunEvent


def append_run_event(run: MigrationRun, *, status: str, message: str = "", run_fields: dict | None = None,
                     **fields) -> RunEvent:
    """Store the next numbered event of a run (call inside a transaction) and push it on commit.

    The sequence number comes from an UPDATE on the run row, so two writers (worker and a cancel
    from the web) never take the same number; ``run_fields`` are written by that same UPDATE.
    """
    seq = _next_seq(run.pk, run_fields or {})
    run.last_seq = seq
    event = RunEvent.objects.create(
        run=run,
        seq=seq,
        status=status,
        phase=fields.get("phase", run.phase),
        percent=fields.get("percent", run.percent),
        bytes_done=fields.get("bytes_done", run.bytes_done),
        bytes_total=fields.get("bytes_total", run.bytes_total),
        rate_bytes_per_s=fields.get("rate_bytes_per_s", run.rate_bytes_per_s),
        eta_s=fields.get("eta_s", run.eta_s),
        iteration=fields.get("iteration", run.iteration),
        message=message[:500],
    )
    payload = events.run_event_payload(event)
    transaction.on_commit(lambda: events.emit(events.run_group(run.pk), payload))
    return event


def _next_seq(run_id: int, run_fields: dict) -> int:
    """Take the run's next event number (and write ``run_fields``) in one UPDATE ... RETURNING
    where the database has it (PostgreSQL; SQLite from 3.35), else an UPDATE and a read back."""
    updates = {"last_seq": F("last_seq") + 1, **run_fields}
    db = connections[router.db_for_write(MigrationRun)]
    if not db.features.can_return_columns_from_insert:
        MigrationRun.objects.filter(pk=run_id).update(**updates)
        return MigrationRun.objects.filter(pk=run_id).values_list("last_seq", flat=True).get()
    query = sql.UpdateQuery(MigrationRun)
    query.add_update_values(updates)
    query.add_q(Q(pk=run_id))
    text, params = query.get_compiler(connection=db).as_sql()
    with db.cursor() as cursor:
        cursor.execute(f"{text} RETURNING {db.ops.quote_name('last_seq')}", params)
        row = cursor.fetchone()
    if row is None:
        raise MigrationRun.DoesNotExist(f"run {run_id} does not exist")
    return row[0]
