"""A request after submission: cancel (withdraw, dequeue, or abort a running move) and the
scheduler's expiry of what can no longer happen."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from migrations_app import access, notifications, windows
from migrations_app.choices import AuditAction, NotificationCategory, RequestStatus
from migrations_app.models import MigrationRequest, MigrationRun
from migrations_app.services.audit import audit_record, refusable
from migrations_app.services.errors import refuse_unless
from migrations_app.services.requests._common import EXPIRABLE, _lock, expire_locked, notify_request_changed, set_status

S = RequestStatus
N = NotificationCategory


@refusable(AuditAction.REQUEST_CANCELLED, subject="request")
def migration_request_cancel(*, request: MigrationRequest, actor, reason: str = "", ip: str | None = None) -> MigrationRequest:
    """Withdraw while pending or approved, dequeue while queued, abort on the hypervisor while running.

    A running migration becomes ``cancelling``; its worker aborts the hypervisor job at its next
    heartbeat and records the outcome (cancelled, or succeeded if the move had already finished).
    """
    from migrations_app.services.runs import append_run_event

    reason = (reason or "").strip()
    with transaction.atomic():
        request = _lock(request)
        refuse_unless(access.can_cancel(actor, request))
        now = timezone.now()
        run = getattr(request, "run", None)
        if request.status == S.RUNNING:
            set_status(request, S.CANCELLING)
            run.cancel_requested_at = now
            run.save(update_fields=["cancel_requested_at"])
            audit_record(actor=actor, action=AuditAction.RUN_CANCEL_REQUESTED, request=request, reason=reason,
                         ip=ip, task_id=run.task_id)
            append_run_event(run, status=request.status, message="cancel requested; aborting on the hypervisor")
        else:
            set_status(request, S.CANCELLED)
            if run is not None:
                run.finished_at = now
                run.explanation = "Cancelled before it started; the VM did not move."
                run.save(update_fields=["finished_at", "explanation"])
                append_run_event(run, status=request.status, message="cancelled before it started")
            audit_record(actor=actor, action=AuditAction.REQUEST_CANCELLED, request=request, reason=reason, ip=ip)
            notifications.notify(request, N.CANCELLED, actor=actor, detail=reason)
            _settle_plan_item_on_commit(request.pk)
        request.save(update_fields=["status", "updated_at"])
        notify_request_changed(request)
    return request


def _settle_plan_item_on_commit(request_id: int) -> None:
    """A move plan's item whose request ended: its plan records it (services.plans)."""
    from migrations_app.services.plans import plan_request_settled

    transaction.on_commit(lambda: plan_request_settled(request_id), robust=True)


def migration_request_expire_stale(*, now: datetime | None = None) -> int:
    """The scheduler expires what can no longer happen: requests nobody decided on within
    ``PORTAL["PENDING_EXPIRY_HOURS"]``, and pending, approved or queued requests whose change window
    closed before their run started. Returns how many expired."""
    now = now or timezone.now()
    hours = settings.PORTAL["PENDING_EXPIRY_HOURS"]
    cutoff = now - timedelta(hours=hours)
    candidates = MigrationRequest.objects.filter(
        Q(status=S.PENDING_APPROVAL, created_at__lt=cutoff) | Q(status__in=EXPIRABLE, window_end__lte=now)
    ).order_by("pk").values_list("pk", flat=True)
    count = 0
    for pk in candidates:
        with transaction.atomic():
            request = MigrationRequest.objects.select_for_update(of=("self",)).select_related("vm").get(pk=pk)
            if request.status not in EXPIRABLE:
                continue  # decided, started or withdrawn meanwhile
            reason = windows.window_closed(request, now)
            if not reason and request.status == S.PENDING_APPROVAL and request.created_at < cutoff:
                reason = f"no decision within {hours:g} hours"
            if not reason:
                continue
            run = MigrationRun.objects.select_for_update(of=("self",)).filter(request=request).first()
            expire_locked(request, reason=reason, now=now, run=run)
            count += 1
    return count
