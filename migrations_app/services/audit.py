"""Writing the audit log. Always called inside the transaction of the action it records.

Appends are serialized (an advisory lock on PostgreSQL; SQLite's immediate transactions already
serialize writers) so that each entry chains to the one committed just before it.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import UTC, datetime

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from migrations_app import audit_chain
from migrations_app.choices import AuditAction, AuditOutcome
from migrations_app.models import AuditEntry, MigrationRequest
from migrations_app.secrets import key_from
from migrations_app.services.errors import ActionRefused

# Any constant: the advisory lock that serializes appends to the chain (held until commit).
_CHAIN_LOCK = 7_402_113


def _chain_tail() -> str:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_CHAIN_LOCK])
    last = AuditEntry.objects.order_by("-id").values_list("entry_hash", flat=True).first()
    return last or audit_chain.GENESIS


def audit_record(**fields) -> AuditEntry:
    """Append one audit entry (``audit_entry``'s fields; ``actor`` None means the system: a
    worker, the scheduler)."""
    return audit_append([audit_entry(**fields)])[0]


def audit_entry(
    *,
    actor,
    action: AuditAction,
    request: MigrationRequest | None = None,
    object_type: str = "",
    object_id: str = "",
    outcome: AuditOutcome = AuditOutcome.SUCCESS,
    reason: str = "",
    before: dict | None = None,
    after: dict | None = None,
    task_id: str = "",
    ip: str | None = None,
    vm_name: str = "",
    data: dict | None = None,
    actor_name: str = "",
) -> AuditEntry:
    """An audit entry not yet chained nor saved: ``audit_append`` appends a list of them at once.

    An actor authenticated by a personal API token carries it (``api_token``, set by
    ``services.api_tokens.api_token_authenticate``): the entry names the token in its data, so
    auditors tell a script's actions from a person's."""
    token = getattr(actor, "api_token", None)
    if token is not None:
        data = {**(data or {}), "api_token": {"id": token.pk, "name": token.name}}
    if request is not None:
        object_type = object_type or "migration_request"
        object_id = object_id or str(request.pk)
        vm_name = vm_name or request.vm.name
    return AuditEntry(
        created_at=timezone.now(),
        actor=actor if getattr(actor, "pk", None) else None,
        actor_name=actor_name or getattr(actor, "username", "") or "system",
        action=action,
        outcome=outcome,
        object_type=object_type,
        object_id=object_id,
        request=request,
        vm_name=vm_name,
        reason=reason,
        before=before or {},
        after=after or {},
        task_id=task_id,
        ip=ip or None,
        data=data or {},
    )


def audit_append(entries: list[AuditEntry]) -> list[AuditEntry]:
    """Chain and save entries made by ``audit_entry``, in their order, with one lock, one read of
    the chain's tail and one INSERT (a batch of moves audits each move, at the cost of one)."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("audit entries are written inside the transaction of the action they record")
    if not entries:
        return []
    prev = _chain_tail()
    for entry in entries:
        entry.prev_hash = prev
        entry.entry_hash = prev = audit_chain.entry_hash(_content(entry))
    if len(entries) == 1:
        entries[0].save(force_insert=True)
        return entries
    AuditEntry.objects.bulk_create(entries)
    ids = [entry.pk for entry in entries]
    # The chain is verified in id order: the INSERT must have numbered the rows as listed.
    if None in ids or ids != sorted(ids):
        raise RuntimeError(f"audit entries were not numbered in the order they were chained: {ids}")
    return entries


def _content(entry: AuditEntry) -> dict:
    """An entry as the chain sees it: values as they come back from the database (JSON round trip)."""
    row = {name: getattr(entry, name) for name in audit_chain.CONTENT_FIELDS}
    for name in ("before", "after", "data"):
        row[name] = json.loads(json.dumps(row[name]))
    row["prev_hash"] = entry.prev_hash
    return row


def audit_denied(*, actor, action: AuditAction, reason: str, request: MigrationRequest | None = None,
                 ip: str | None = None, object_type: str = "", object_id: str = "") -> None:
    """Record a refused action in its own transaction (the refused one changed nothing)."""
    with transaction.atomic():
        audit_record(
            actor=actor, action=action, request=request, outcome=AuditOutcome.DENIED, reason=reason, ip=ip,
            object_type=object_type, object_id=object_id,
        )


def refusable(action: AuditAction, *, subject: str, where=lambda obj: {"request": obj}):
    """Decorator for a service whose keyword ``subject`` names the object acted on: an
    ActionRefused it raises is audited as denied (in its own transaction: the refused action
    changed nothing), then re-raised. ``where`` gives the audit entry's link to that object."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*, actor, ip: str | None = None, **kwargs):
            try:
                return fn(actor=actor, ip=ip, **kwargs)
            except ActionRefused as exc:
                audit_denied(actor=actor, action=action, reason=exc.message, ip=ip, **where(kwargs[subject]))
                raise

        return inner

    return wrap


def audit_session(*, action: AuditAction, user=None, username: str = "", ip: str | None = None,
                  reason: str = "") -> None:
    """Record a login, a failed login (``user`` None, ``username`` as typed) or a logout."""
    failed = action == AuditAction.USER_LOGIN_FAILED
    with transaction.atomic():
        audit_record(
            actor=user, action=action, object_type="session", ip=ip,
            outcome=AuditOutcome.FAILURE if failed else AuditOutcome.SUCCESS,
            data={"username": username[:150]} if failed else {},
            actor_name=f"unknown:{username[:140]}" if failed else "",
            reason=reason,
        )


# -- checkpoints: signed (id, hash) pairs kept outside the database -----------------------------


def _checkpoint_key() -> bytes:
    # Kept apart from SECRET_KEY and from the database it vouches for.
    return key_from("PORTAL_AUDIT_KEY", "audit.key", lambda: os.urandom(32).hex().encode())


def checkpoint_path():
    return settings.PORTAL.get("AUDIT_CHECKPOINT_FILE") or settings.DATA_DIR / "audit-checkpoints.log"


def audit_checkpoint() -> audit_chain.Checkpoint | None:
    """Sign the chain's current tail and append it to the checkpoint file (beat runs this)."""
    last = AuditEntry.objects.order_by("-id").values_list("id", "entry_hash").first()
    if last is None:
        return None
    cp = audit_chain.sign(_checkpoint_key(), last[0], last[1], datetime.now(UTC).isoformat())
    with open(checkpoint_path(), "a") as fh:
        fh.write(cp.line() + "\n")
    return cp


def audit_verify_chain() -> audit_chain.Verdict:
    """Check the whole chain, in id order, against the signed checkpoints."""
    rows = AuditEntry.objects.order_by("id").values("id", "prev_hash", "entry_hash", *audit_chain.CONTENT_FIELDS)
    try:
        with open(checkpoint_path()) as fh:
            checkpoints = list(audit_chain.parse_checkpoints(fh))
    except FileNotFoundError:
        checkpoints = []
    return audit_chain.verify(rows.iterator(chunk_size=2000), checkpoints, _checkpoint_key())


# -- configuration changes made by admins ----------------------------------------------------------

SECRET_FIELDS = frozenset({"password", "password_encrypted", "secret", "secret_encrypted"})


def snapshot(obj, fields) -> dict:
    """Field values of a configuration object for the audit entry; secrets only say whether set."""
    out = {}
    for name in fields:
        value = getattr(obj, name, None)
        if name in SECRET_FIELDS:
            out[name] = "(set)" if value else "(empty)"
        elif hasattr(value, "all"):  # many-to-many
            out[name] = sorted(str(v) for v in value.all())
        else:
            out[name] = value if isinstance(value, str | int | float | bool | dict | list | type(None)) else str(value)
    return out


def audit_config_change(*, actor, obj, before: dict, fields, ip: str | None = None) -> None:
    """Audit an admin's change to a configuration object (before/after of the changed fields,
    secrets redacted). Called inside the transaction that saved it."""
    after = snapshot(obj, fields)
    changed = sorted(k for k in after if before.get(k) != after.get(k))
    if before and not changed:
        return
    audit_record(actor=actor, action=AuditAction.CONFIG_CHANGED, object_type=obj._meta.model_name,
                 object_id=str(obj.pk), ip=ip, before={k: before.get(k) for k in changed},
                 after={k: after[k] for k in changed}, reason=f"{obj._meta.verbose_name} {obj}")


def config_delete(*, actor, obj, fields, ip: str | None = None) -> None:
    with transaction.atomic():
        before = snapshot(obj, fields)
        label, pk = str(obj), obj.pk
        obj.delete()
        audit_record(actor=actor, action=AuditAction.CONFIG_DELETED, object_type=obj._meta.model_name,
                     object_id=str(pk), ip=ip, before=before, reason=f"{obj._meta.verbose_name} {label}")


VERDICT_CACHE_KEY = "audit:last-verdict"


def audit_verify_and_record() -> dict:
    """Verify the chain, remember the result for the audit page, and sign the tail if it verified
    (a broken chain is never vouched for). Beat runs this; auditors can too, from the page."""
    from django.core.cache import cache

    verdict = audit_verify_chain()
    result = {"ok": verdict.ok, "checked": verdict.checked, "problem": verdict.problem,
              "first_bad_id": verdict.first_bad_id, "at": timezone.now().isoformat()}
    cache.set(VERDICT_CACHE_KEY, result, None)
    if verdict.ok:
        audit_checkpoint()
    return result


def audit_last_verdict() -> dict | None:
    from django.core.cache import cache

    return cache.get(VERDICT_CACHE_KEY)
