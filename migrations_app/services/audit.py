"""Writing the audit log. Always called inside the transaction of the action it records."""

from __future__ import annotations

from django.db import transaction

from migrations_app.choices import AuditAction, AuditOutcome
from migrations_app.models import AuditEntry, MigrationRequest


def audit_record(
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
) -> AuditEntry:
    """Append one audit entry. ``actor`` None means the system (a worker, the scheduler)."""
    if request is not None:
        object_type = object_type or "migration_request"
        object_id = object_id or str(request.pk)
        vm_name = vm_name or request.vm.name
    return AuditEntry.objects.create(
        actor=actor if getattr(actor, "pk", None) else None,
        actor_name=getattr(actor, "username", "") or "system",
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


def audit_denied(*, actor, action: AuditAction, reason: str, request: MigrationRequest | None = None,
                 ip: str | None = None, object_type: str = "", object_id: str = "") -> None:
    """Record a refused action in its own transaction (the refused one changed nothing)."""
    with transaction.atomic():
        audit_record(
            actor=actor, action=action, request=request, outcome=AuditOutcome.DENIED, reason=reason, ip=ip,
            object_type=object_type, object_id=object_id,
        )


def audit_session(*, action: AuditAction, user=None, username: str = "", ip: str | None = None) -> None:
    """Record a login, a failed login (``user`` None, ``username`` as typed) or a logout."""
    failed = action == AuditAction.USER_LOGIN_FAILED
    with transaction.atomic():
        entry = audit_record(
            actor=user, action=action, object_type="session", ip=ip,
            outcome=AuditOutcome.FAILURE if failed else AuditOutcome.SUCCESS,
            data={"username": username[:150]} if failed else {},
        )
        if failed:
            entry.actor_name = f"unknown:{username[:140]}"
            entry.save(update_fields=["actor_name"])
