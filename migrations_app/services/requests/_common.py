"""What every step of a request shares: the state-machine move, the after-commit push, locking
a request, expiry of one that has not started, and the batch limit."""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from migrations_app import events, notifications, windows
from migrations_app.bulk import update_objects
from migrations_app.choices import AuditAction, MigrationKind, NotificationCategory, RequestStatus
from migrations_app.models import Datastore, Host, MigrationRequest, RequestApproval
from migrations_app.services.audit import audit_record

S = RequestStatus
N = NotificationCategory


def set_status(request: MigrationRequest, target: str) -> str:
    """Move a (locked) request along the state machine; raises IllegalTransition. Returns the old status."""
    old = request.status
    RequestStatus.check_transition(old, target)
    request.status = target
    return old


def notify_request_changed(request: MigrationRequest) -> None:
    """After commit: tell the requester's pages and the approvers' queue that this request changed."""
    notify_requests_changed([request])


def notify_requests_changed(requests: list[MigrationRequest], *, approvals: dict[int, int] | None = None) -> None:
    """``notify_request_changed`` for many requests: one hop into the channel layer after commit.
    ``approvals`` (request id -> signatures) when the caller knows them; else counted in one query."""
    if not requests:
        return
    if approvals is None:
        approvals = dict(RequestApproval.objects.filter(request_id__in=[r.pk for r in requests])
                         .values("request_id").annotate(n=Count("id")).values_list("request_id", "n"))
    messages = []
    for request in requests:
        payload = events.request_changed_payload(request, approvals=approvals.get(request.pk, 0))
        groups = [events.request_group(request.pk), events.user_requests_group(request.requester_id),
                  events.approvals_group()]
        messages += [(group, payload) for group in groups]
    transaction.on_commit(lambda: events.emit_many(messages))


def _lock(request: MigrationRequest) -> MigrationRequest:
    return (
        MigrationRequest.objects.select_for_update(of=("self",))
        .select_related("vm", "requester", "target_host", "target_datastore")
        .get(pk=request.pk)
    )


def _start_is_due(request: MigrationRequest, now: datetime) -> bool:
    return not windows.window_not_open_yet(request, now)


# Statuses a closed window or an expiry pass can end: nothing has started on the hypervisor yet.
EXPIRABLE = frozenset({S.PENDING_APPROVAL, S.APPROVED, S.QUEUED})


def expire_locked(request: MigrationRequest, *, reason: str, now: datetime, run=None) -> None:
    """Expire a (locked) request that has not started, with its reason, audited in the caller's
    transaction. A queued run is closed with an explanation the VM owner reads on the page."""
    from migrations_app.services.runs import append_run_event

    set_status(request, S.EXPIRED)
    request.save(update_fields=["status", "updated_at"])
    run = run if run is not None else getattr(request, "run", None)
    if run is not None:
        run.finished_at = now
        run.wait_reason = ""
        run.explanation = f"Not started: {reason}. The VM did not move."
        run.save(update_fields=["finished_at", "wait_reason", "explanation"])
        append_run_event(run, status=request.status, message=f"expired: {reason}")
    audit_record(actor=None, action=AuditAction.REQUEST_EXPIRED, request=request, reason=reason,
                 data={"window_end": request.window_end.isoformat() if request.window_end else None})
    notify_request_changed(request)
    notifications.notify(request, N.EXPIRED, detail=reason)


# The most moves (or decisions) one batch call takes: a batch holds its rows' locks until it commits.
MAX_BATCH = 200


def _save_requests(requests: list[MigrationRequest], fields: list[str]) -> None:
    """Write these fields (and ``updated_at``) of many requests in one UPDATE."""
    now = timezone.now()
    for request in requests:
        request.updated_at = now
    update_objects(requests, [*fields, "updated_at"])


def kind_for(target_host: Host | None, target_datastore: Datastore | None) -> str:
    if target_host and target_datastore:
        return MigrationKind.BOTH
    return MigrationKind.COMPUTE if target_host else MigrationKind.STORAGE
