"""A run's numbered progress events: the stored story a page catches up from (the socket only notifies)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from django.db import connections, router, transaction
from django.db.models import Case, F, Q, Value, When, sql

from migrations_app import events
from migrations_app.models import MigrationRun, RunEvent


@dataclass
class NewEvent:
    """One event to append to a run: ``run_fields`` are written to the run's row by the same UPDATE
    that numbers the event; ``fields`` override what the event copies from the run."""

    run: MigrationRun
    status: str
    message: str = ""
    run_fields: dict = field(default_factory=dict)
    fields: dict = field(default_factory=dict)


def append_run_event(run: MigrationRun, *, status: str, message: str = "", run_fields: dict | None = None,
                     **fields) -> RunEvent:
    """Store the next numbered event of a run (call inside a transaction) and push it on commit.

    The sequence number comes from an UPDATE on the run row, so two writers (worker and a cancel
    from the web) never take the same number; ``run_fields`` are written by that same UPDATE.
    """
    return append_run_events([NewEvent(run, status, message, run_fields or {}, fields)])[0]


def append_run_events(new: list[NewEvent]) -> list[RunEvent]:
    """``append_run_event`` for many events of many runs, in their order: one UPDATE numbers them
    all (and writes their ``run_fields``; a run's later event wins), one INSERT stores them and
    one hop into the channel layer pushes them on commit."""
    if not new:
        return []
    counts = Counter(item.run.pk for item in new)
    last = _take_seqs(counts, _merged_run_fields(new))
    first = {run_id: last[run_id] - count + 1 for run_id, count in counts.items()}
    stored = []
    for item in new:
        run, fields = item.run, item.fields
        seq = first[run.pk]
        first[run.pk] += 1
        run.last_seq = seq
        stored.append(RunEvent(
            run=run,
            seq=seq,
            status=item.status,
            phase=fields.get("phase", run.phase),
            percent=fields.get("percent", run.percent),
            bytes_done=fields.get("bytes_done", run.bytes_done),
            bytes_total=fields.get("bytes_total", run.bytes_total),
            rate_bytes_per_s=fields.get("rate_bytes_per_s", run.rate_bytes_per_s),
            eta_s=fields.get("eta_s", run.eta_s),
            iteration=fields.get("iteration", run.iteration),
            message=item.message[:500],
        ))
    if len(stored) == 1:
        stored[0].save(force_insert=True)
    else:
        RunEvent.objects.bulk_create(stored)
    messages = [(events.run_group(event.run_id), events.run_event_payload(event)) for event in stored]
    transaction.on_commit(lambda: events.emit_many(messages))
    return stored


def _merged_run_fields(new: list[NewEvent]) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for item in new:
        merged.setdefault(item.run.pk, {}).update(item.run_fields)
    return merged


def _take_seqs(counts: Counter, run_fields: dict[int, dict]) -> dict[int, int]:
    """Add each run's count of new events to its ``last_seq`` (and write ``run_fields``) in one
    UPDATE ... RETURNING where the database has it (PostgreSQL; SQLite from 3.35), else UPDATEs
    and a read back. Returns each run's new ``last_seq``."""
    db = connections[router.db_for_write(MigrationRun)]
    if len(counts) == 1:
        (run_id, count), = counts.items()
        updates = {"last_seq": F("last_seq") + count, **run_fields.get(run_id, {})}
    else:
        updates = {"last_seq": Case(*(When(pk=pk, then=F("last_seq") + n) for pk, n in counts.items()))}
        for name in {name for fields in run_fields.values() for name in fields}:
            model_field = MigrationRun._meta.get_field(name)
            whens = [When(pk=pk, then=Value(fields[name], output_field=model_field))
                     for pk, fields in run_fields.items() if name in fields]
            updates[name] = Case(*whens, default=F(name), output_field=model_field)
    if not db.features.can_return_columns_from_insert:
        MigrationRun.objects.filter(pk__in=counts).update(**updates)
        found = dict(MigrationRun.objects.filter(pk__in=counts).values_list("pk", "last_seq"))
    else:
        query = sql.UpdateQuery(MigrationRun)
        query.add_update_values(updates)
        query.add_q(Q(pk__in=list(counts)))
        text, params = query.get_compiler(connection=db).as_sql()
        pk, seq = (db.ops.quote_name(name) for name in ("id", "last_seq"))
        with db.cursor() as cursor:
            cursor.execute(f"{text} RETURNING {pk}, {seq}", params)
            found = dict(cursor.fetchall())
    missing = set(counts) - set(found)
    if missing:
        raise MigrationRun.DoesNotExist(f"runs {sorted(missing)} do not exist")
    return found
