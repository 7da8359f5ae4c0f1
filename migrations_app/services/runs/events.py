"""A run's numbered progress events: the stored story a page catches up from (the socket only notifies)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from django.db import transaction

from migrations_app import events
from migrations_app.bulk import update_rows
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
    UPDATE ... RETURNING per set of fields written (PostgreSQL; SQLite from 3.35). Returns each
    run's new ``last_seq``."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for run_id in counts:
        groups.setdefault(tuple(sorted(run_fields.get(run_id, {}))), []).append(run_id)
    found: dict[int, int] = {}
    for names, run_ids in groups.items():
        rows = [(pk, [counts[pk], *(run_fields[pk][name] for name in names)]) for pk in run_ids]
        found.update(update_rows(MigrationRun, rows, ["last_seq", *names], add=["last_seq"],
                                 returning=["id", "last_seq"]))
    missing = set(counts) - set(found)
    if missing:
        raise MigrationRun.DoesNotExist(f"runs {sorted(missing)} do not exist")
    return found
