"""One UPDATE for many rows, each with its own values: ``UPDATE t SET ... FROM (VALUES ...)``.

Django's ``bulk_update`` writes a CASE WHEN per field and row, which costs more Python time to
build than the rows cost the database to write; a worker's batch of runs updates a few dozen rows
at a time, many times a second. PostgreSQL and SQLite (3.35+, for RETURNING) both take ``WITH ... UPDATE ... FROM``; on
PostgreSQL each value is CAST to its column's type, so a NULL or a timestamp in the first row
types the column.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from django.db import connections, router, transaction
from django.db.models import Model


def update_rows(model: type[Model], rows: Iterable[tuple[int, Sequence]], fields: Sequence[str], *,
                add: Sequence[str] = (), returning: Sequence[str] = ()) -> list[tuple]:
    """For each (pk, values) row, set ``fields`` to ``values`` in order; the fields named in
    ``add`` are incremented by their value instead. The rows are locked in id order before they
    are written (in the caller's transaction, or one of its own). Returns the ``returning`` columns of the
    updated rows (pk first), as the database gives them back (empty when ``returning`` is empty)."""
    rows = list(rows)
    if not rows:
        return []
    db = connections[router.db_for_write(model)]
    meta = model._meta
    quote = db.ops.quote_name
    columns = [meta.get_field(name) for name in fields]
    if db.vendor == "postgresql":
        # Each value CAST to its column's type: PostgreSQL types a VALUES column from its first row.
        casts = [f"CAST(%s AS {meta.pk.db_type(db)})"] + [f"CAST(%s AS {f.db_type(db)})" for f in columns]
    else:
        # SQLite stores what it is given; a CAST there would change values (to "datetime", a
        # NUMERIC affinity, '2026-11-28 12:00' becomes 2026).
        casts = ["%s"] * (1 + len(columns))
    row_sql = "(" + ", ".join(casts) + ")"
    params: list = []
    for pk, values in rows:
        if len(values) != len(columns):
            raise ValueError(f"{len(columns)} fields but {len(values)} values for row {pk}")
        for f, v in zip(columns, values, strict=True):
            # A CAST to varchar(n) would cut a longer value without a word: refuse it, as save() would fail.
            if isinstance(v, str) and f.max_length is not None and len(v) > f.max_length:
                raise ValueError(f"{meta.model_name}.{f.name} of row {pk} is {len(v)} characters, "
                                 f"longer than its {f.max_length}")
        params.append(pk)
        params += [f.get_db_prep_save(v, connection=db) for f, v in zip(columns, values, strict=True)]
    names = ["pk_"] + [f"v{i}" for i in range(len(columns))]
    table = quote(meta.db_table)
    sets = ", ".join(
        f"{quote(f.column)} = {table}.{quote(f.column)} + v.{names[i + 1]}" if f.name in add
        else f"{quote(f.column)} = v.{names[i + 1]}"
        for i, f in enumerate(columns)
    )
    # The values as a named CTE: SQLite names a bare VALUES list's columns column1, column2...
    sql = (f"WITH v({', '.join(names)}) AS (VALUES {', '.join([row_sql] * len(rows))}) "
           f"UPDATE {table} SET {sets} FROM v WHERE {table}.{quote(meta.pk.column)} = v.pk_")
    if returning:
        sql += " RETURNING " + ", ".join(f"{table}.{quote(meta.get_field(name).column)}" for name in returning)
    with transaction.atomic(using=db.alias, savepoint=False), db.cursor() as cursor:
        if len(rows) > 1 and db.features.has_select_for_update:
            # Lock the rows in id order first: an UPDATE takes its rows' locks in the order it
            # meets them, and two writers of the same rows in different orders would deadlock.
            ids = sorted({pk for pk, _ in rows})
            cursor.execute(f"SELECT 1 FROM {table} WHERE {quote(meta.pk.column)} IN ({', '.join(['%s'] * len(ids))}) "
                           f"ORDER BY {quote(meta.pk.column)} FOR UPDATE", ids)
        cursor.execute(sql, params)
        return cursor.fetchall() if returning else []


def update_objects(objs: Sequence[Model], fields: Sequence[str]) -> None:
    """``Model.objects.bulk_update(objs, fields)`` in one ``update_rows`` UPDATE (no auto_now:
    set such fields on the objects first)."""
    if not objs:
        return
    model = type(objs[0])
    attnames = [model._meta.get_field(name).attname for name in fields]
    update_rows(model, ((obj.pk, [getattr(obj, a) for a in attnames]) for obj in objs), fields)
