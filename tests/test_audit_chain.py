"""The audit log is tamper-evident: a clean log verifies, and every kind of tampering (edit a field,
delete, reorder, insert, truncate the tail) is detected and names the first bad entry."""

from __future__ import annotations

import copy
import random
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction

from migrations_app import audit_chain
from migrations_app.choices import AuditAction
from migrations_app.models import AuditEntry
from migrations_app.services.audit import audit_checkpoint, audit_record, audit_verify_chain

KEY = b"test-checkpoint-key"


def make_log(n: int) -> list[dict]:
    entries, prev = [], audit_chain.GENESIS
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(1, n + 1):
        entry = {
            "id": i, "created_at": start + timedelta(seconds=i), "actor_id": i % 4 or None,
            "actor_name": f"user{i % 4}", "action": "request.approved", "outcome": "success",
            "object_type": "migration_request", "object_id": str(i), "request_id": i, "vm_name": f"vm-{i}",
            "reason": f"reason {i}", "before": {"host": "a"}, "after": {"host": "b"}, "task_id": f"task-{i}",
            "ip": "10.0.0.1", "data": {"n": i}, "prev_hash": prev,
        }
        entry["entry_hash"] = prev = audit_chain.entry_hash(entry)
        entries.append(entry)
    return entries


def mutate(log: list[dict], rnd: random.Random) -> tuple[list[dict], str]:
    log = copy.deepcopy(log)
    kind = rnd.choice(["edit", "delete", "reorder", "insert", "truncate", "rehash-edit"])
    i = rnd.randrange(len(log) - 1)
    if kind == "edit":
        field = rnd.choice(["actor_name", "reason", "vm_name", "action", "outcome", "task_id", "ip"])
        log[i][field] = str(log[i][field]) + "x"
    elif kind == "rehash-edit":  # a careful forger also fixes the edited entry's own hash
        log[i]["reason"] = "forged"
        log[i]["entry_hash"] = audit_chain.entry_hash(log[i])
    elif kind == "delete":
        del log[i]
    elif kind == "reorder":
        log[i], log[i + 1] = log[i + 1], log[i]
        log[i]["id"], log[i + 1]["id"] = log[i + 1]["id"], log[i]["id"]
    elif kind == "insert":
        forged = dict(log[i], id=log[i]["id"], reason="inserted")
        forged["entry_hash"] = audit_chain.entry_hash(forged)
        log.insert(i + 1, forged)
        for j, e in enumerate(log):
            e["id"] = j + 1
    elif kind == "truncate":
        del log[-rnd.randint(1, 5):]
    return log, kind


def test_a_clean_log_verifies():
    log = make_log(50)
    cps = [audit_chain.sign(KEY, 50, log[-1]["entry_hash"], "t")]
    assert audit_chain.verify(log, cps, KEY) == audit_chain.Verdict(True, 50)


def test_hundreds_of_random_mutations_are_all_detected():
    rnd = random.Random(20261128)
    clean = make_log(60)
    checkpoints = [audit_chain.sign(KEY, e["id"], e["entry_hash"], "t") for e in clean if e["id"] % 20 == 0]
    kinds: dict[str, int] = {}
    for _ in range(400):
        log, kind = mutate(clean, rnd)
        verdict = audit_chain.verify(log, checkpoints, KEY)
        assert not verdict.ok, kind
        assert verdict.problem and (verdict.first_bad_id is not None)
        kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) == {"edit", "delete", "reorder", "insert", "truncate", "rehash-edit"}


def test_a_forged_or_unreadable_checkpoint_is_reported():
    log = make_log(5)
    good = audit_chain.sign(KEY, 5, log[-1]["entry_hash"], "t")
    forged = audit_chain.Checkpoint(5, log[-1]["entry_hash"], "t", "0" * 64)
    assert "bad signature" in audit_chain.verify(log, [forged], KEY).problem
    assert "not readable" in audit_chain.verify(log, list(audit_chain.parse_checkpoints(["{oops"])), KEY).problem
    assert audit_chain.verify(log, [good], KEY).ok


# -- the database: entries chain as they are written, PostgreSQL refuses changes -------------------


def write(n: int) -> None:
    for i in range(n):
        with transaction.atomic():
            audit_record(actor=None, action=AuditAction.INVENTORY_SYNCED, object_type="connection",
                         object_id=str(i), data={"i": i, "ratio": 0.5}, before={"host": "h"})


@pytest.mark.django_db
def test_entries_written_by_the_portal_chain_and_verify(tmp_path, settings):
    settings.PORTAL = {**settings.PORTAL, "AUDIT_CHECKPOINT_FILE": str(tmp_path / "cp.log")}
    write(5)
    audit_checkpoint()
    assert audit_verify_chain().ok and audit_verify_chain().checked == 5
    call_command("audit_verify")  # exits 0


@pytest.mark.django_db(transaction=True)
def test_writing_an_entry_outside_a_transaction_is_refused():
    with pytest.raises(RuntimeError, match="inside the transaction"):
        audit_record(actor=None, action=AuditAction.INVENTORY_SYNCED, object_type="connection")
    assert not AuditEntry.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_postgresql_refuses_update_and_delete_of_audit_rows():
    write(2)
    for sql in ("UPDATE migrations_app_auditentry SET reason = 'x'", "DELETE FROM migrations_app_auditentry"):
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cur:
            cur.execute(sql)
    assert AuditEntry.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_tampering_behind_the_trigger_and_truncation_are_named(tmp_path, settings):
    settings.PORTAL = {**settings.PORTAL, "AUDIT_CHECKPOINT_FILE": str(tmp_path / "cp.log")}
    write(6)
    audit_checkpoint()
    ids = list(AuditEntry.objects.order_by("id").values_list("id", flat=True))
    with connection.cursor() as cur:  # the table owner can lift the guard; the chain still tells
        cur.execute("ALTER TABLE migrations_app_auditentry DISABLE TRIGGER migrations_app_audit_append_only")
        cur.execute("UPDATE migrations_app_auditentry SET reason = 'rewritten' WHERE id = %s", [ids[2]])
    verdict = audit_verify_chain()
    assert not verdict.ok and verdict.first_bad_id == ids[2] and "altered" in verdict.problem
    with pytest.raises(SystemExit):
        call_command("audit_verify")
    with connection.cursor() as cur:
        cur.execute("UPDATE migrations_app_auditentry SET reason = '' WHERE id = %s", [ids[2]])
        cur.execute("DELETE FROM migrations_app_auditentry WHERE id >= %s", [ids[4]])  # truncate the tail
        cur.execute("ALTER TABLE migrations_app_auditentry ENABLE TRIGGER migrations_app_audit_append_only")
    verdict = audit_verify_chain()
    assert not verdict.ok and "truncated" in verdict.problem and verdict.first_bad_id == ids[5]


@pytest.mark.django_db
def test_random_mutations_of_a_copy_of_the_real_audit_table_are_all_detected():
    write(40)
    rows = list(AuditEntry.objects.order_by("id").values("id", "prev_hash", "entry_hash",
                                                         *audit_chain.CONTENT_FIELDS))
    tail = rows[-1]
    checkpoints = [audit_chain.sign(KEY, tail["id"], tail["entry_hash"], "t")]
    assert audit_chain.verify(rows, checkpoints, KEY).ok
    rnd = random.Random(7)
    for _ in range(300):
        copy_of_table, kind = mutate(rows, rnd)
        assert not audit_chain.verify(copy_of_table, checkpoints, KEY).ok, kind
