"""Deciding on a request: an approver signs its current stage (one or many at once; the last
stage approves it and queues its run) or rejects it. A decision refused because the change
window closed expires the request."""

from __future__ import annotations

from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from migrations_app import access, notifications, windows
from migrations_app.choices import AuditAction, AuditOutcome, NotificationCategory, RequestStatus
from migrations_app.models import MigrationRequest
from migrations_app.services.audit import audit_append, audit_entry, audit_record, refusable
from migrations_app.services.errors import ActionRefused, BatchRefused, Refusal
from migrations_app.services.requests._common import (
    EXPIRABLE,
    MAX_BATCH,
    _lock,
    _save_requests,
    _start_is_due,
    expire_locked,
    notify_request_changed,
    notify_requests_changed,
    set_status,
)
from migrations_app.services.signatures import stage_label, stage_sign_many

S = RequestStatus
N = NotificationCategory


def _plan_data(request: MigrationRequest) -> dict:
    plan = request.approval_plan or {}
    return {key: plan.get(key) for key in ("policy", "policy_version", "rule", "why", "fallback")}


def _stage_occasion(request: MigrationRequest) -> str:
    """Approvers are told once per stage that opens (a delivery per recipient and occasion)."""
    return f"stage-{request.current_stage + 1}"


@dataclass(frozen=True)
class _Approval:
    """One request's approval within a batch: the decision's comment, audit action and data."""

    request: MigrationRequest
    comment: str
    action: AuditAction
    data: dict | None = None


def _approve_locked(request: MigrationRequest, *, approver, comment: str, ip: str | None,
                    action: AuditAction = AuditAction.REQUEST_APPROVED, data: dict | None = None) -> None:
    """Approve a (locked) request, audit and announce it, and queue its run when it is due."""
    entries: list = []
    notices: list[notifications.Notice] = []
    due = _approve_many_locked([_Approval(request, comment, action, data)], approver=approver, ip=ip,
                               entries=entries, notices=notices)
    audit_append(entries)
    notifications.notify_many(notices, actor=approver)
    _enqueue(due, actor=approver)


def _approve_many_locked(approvals: list[_Approval], *, approver, ip: str | None, entries: list,
                         notices: list[notifications.Notice]) -> list[MigrationRequest]:
    """Approve (locked) requests in one UPDATE; their audit entries and notices are added to the
    caller's lists (it writes them, at once, before queueing). Returns those due to start now."""
    now = timezone.now()
    for approval in approvals:
        request = approval.request
        set_status(request, S.APPROVED)
        request.decided_by = approver
        request.decided_at = now
        request.decision_comment = approval.comment
        entries.append(audit_entry(actor=approver, action=approval.action, request=request, reason=approval.comment,
                                   ip=ip, data=approval.data))
        notices.append(notifications.Notice(request, N.DECISION, "approved", approval.comment))
    _save_requests([a.request for a in approvals], ["status", "decided_by", "decided_at", "decision_comment"])
    return [a.request for a in approvals if _start_is_due(a.request, now)]


def _enqueue(requests: list[MigrationRequest], *, actor) -> None:
    from migrations_app.services.runs import migration_runs_enqueue

    if requests:
        migration_runs_enqueue(requests=requests, actor=actor)


def _expire_if_window_closed(request: MigrationRequest, verdict: access.Verdict) -> str:
    """A decision refused because the request's window closed expires it in the same call (the
    expiry commits even though the decision is refused). Returns the reason, or ''."""
    now = timezone.now()
    closed = windows.window_closed(request, now)
    if verdict.conflict and closed and request.status in EXPIRABLE:
        expire_locked(request, reason=closed, now=now)
        return closed
    return ""


def _decision_refusal(verdict: access.Verdict, expired: str) -> ActionRefused:
    if expired:
        return ActionRefused(f"{expired}, so the request has expired; nothing can be decided any more", conflict=True)
    return ActionRefused(verdict.reason, denied=not verdict.conflict, conflict=verdict.conflict)


def _refuse_decision(request: MigrationRequest, verdict: access.Verdict, expired: str) -> None:
    raise _decision_refusal(verdict, expired)


def migration_request_approve(*, request: MigrationRequest, actor, comment: str = "", ip: str | None = None) -> MigrationRequest:
    """An approver signs the request's current stage. When that completes the last stage the
    request is approved and its run queued (unless it starts later); otherwise the next stage waits.
    Approval after the change window closed is refused and expires the request.
    Under the admin bypass an admin's approval completes every remaining stage, and says so.
    The one-request case of ``migration_requests_approve_many`` (a refusal is audited as denied).

    The request row is locked first: approvers clicking at once are serialized, and each sees the
    signatures committed before it (exactly one of them completes a stage; none signs twice).
    """
    try:
        return migration_requests_approve_many(requests=[request], actor=actor, comment=comment, ip=ip)[0]
    except BatchRefused as exc:
        raise exc.refusals[0].error from None


def migration_requests_approve_many(*, requests, actor, comment: str = "",
                                    ip: str | None = None) -> list[MigrationRequest]:
    """An approver signs the current stage of each of these requests ("approve selected"), with
    one comment, exactly as ``migration_request_approve`` signs one; those whose last stage
    completes are approved and their runs queued together.

    All or nothing: the requests are locked (in id order: two approvers never deadlock) and each
    asked ``access.can_decide``; when any is refused, BatchRefused names each refused request and
    why, nothing is signed, and each refusal is audited as denied. A request refused because its
    window closed expires (that commits), as with one request."""
    comment = (comment or "").strip()
    ids = list(dict.fromkeys(r.pk for r in requests))
    if not ids:
        raise ActionRefused("choose at least one request to approve")
    if len(ids) > MAX_BATCH:
        raise ActionRefused(f"at most {MAX_BATCH} requests at once")
    refusals = []
    with transaction.atomic():
        locked = {r.pk: r for r in MigrationRequest.objects.select_for_update(of=("self",))
                  .select_related("vm", "requester", "target_host", "target_datastore")
                  .prefetch_related("approvals").filter(pk__in=ids).order_by("pk")}
        verdicts = {pk: access.can_decide(actor, request) for pk, request in locked.items()}
        for i, pk in enumerate(ids):
            request, verdict = locked.get(pk), verdicts.get(pk)
            if request is None:
                refusals.append(Refusal(i, f"#{pk}", ActionRefused("no such request", conflict=True)))
            elif not verdict:
                # A decision refused because the window closed expires the request; that commits.
                expired = _expire_if_window_closed(request, verdict)
                refusals.append(Refusal(i, f"#{pk} {request.vm.name}", _decision_refusal(verdict, expired)))
        if not refusals:
            _sign_many_locked([(locked[pk], verdicts[pk]) for pk in ids], actor=actor, comment=comment, ip=ip)
    if refusals:
        with transaction.atomic():  # in its own transaction: the refused decision changed nothing
            audit_append([audit_entry(actor=actor, action=AuditAction.REQUEST_APPROVED, request=locked[ids[r.index]],
                                      outcome=AuditOutcome.DENIED, reason=r.error.message, ip=ip)
                          for r in refusals if ids[r.index] in locked])
        raise BatchRefused(refusals)
    return [locked[pk] for pk in ids]


def _sign_many_locked(signing: list[tuple[MigrationRequest, access.Verdict]], *, actor, comment: str,
                      ip: str | None) -> None:
    """Record the approver's signature on each (locked) request's current stage and move it on."""
    signed = stage_sign_many(signing, actor=actor, comment=comment)
    entries: list = []
    notices: list[notifications.Notice] = []
    approving = []
    for (request, verdict), (index, stage, groups) in zip(signing, signed, strict=True):
        stages = request.stages
        data = {**_plan_data(request), "stage": index + 1, "stages": len(stages), "stage_name": stage.name,
                "groups": groups, "bypass": verdict.bypass}
        if verdict.bypass:
            approving.append(_Approval(request, comment or f"admin bypass: stages {index + 1}-{len(stages)} not signed",
                                       AuditAction.REQUEST_BYPASS_APPROVED, data))
        elif request.current_stage >= len(stages):
            approving.append(_Approval(request, comment, AuditAction.REQUEST_APPROVED, data))
        else:
            signed_what = stage_label(index, stages)
            entries.append(audit_entry(actor=actor, action=AuditAction.REQUEST_STAGE_APPROVED, request=request,
                                       reason=f"{signed_what}: {comment}" if comment else signed_what, ip=ip,
                                       data=data))
            if request.current_stage > index:  # the next stage opens: tell its approvers
                notices.append(notifications.Notice(request, N.APPROVAL_WAITING, _stage_occasion(request)))
    due = _approve_many_locked(approving, approver=actor, ip=ip, entries=entries, notices=notices)
    audit_append(entries)
    # The actor is never among a next stage's approvers (nobody signs a later stage after an
    # earlier one), so one call with the actor serves the decisions and the opened stages alike.
    notifications.notify_many(notices, actor=actor)
    _enqueue(due, actor=actor)
    notify_requests_changed([request for request, _ in signing])


@refusable(AuditAction.REQUEST_REJECTED, subject="request")
def migration_request_reject(*, request: MigrationRequest, actor, reason: str, ip: str | None = None) -> MigrationRequest:
    """An approver rejects, with a reason the requester will read. A request whose window closed
    cannot be rejected any more: it expires instead."""
    reason = (reason or "").strip()
    with transaction.atomic():
        request = _lock(request)
        verdict = access.can_decide(actor, request)
        expired = "" if verdict else _expire_if_window_closed(request, verdict)
        if verdict:
            if not reason:
                raise ActionRefused("a rejection needs a reason the requester can act on", field="reason")
            set_status(request, S.REJECTED)
            request.decided_by = actor
            request.decided_at = timezone.now()
            request.decision_comment = reason
            request.save(update_fields=["status", "decided_by", "decided_at", "decision_comment", "updated_at"])
            audit_record(actor=actor, action=AuditAction.REQUEST_REJECTED, request=request, reason=reason, ip=ip,
                         data={**_plan_data(request), "stage": request.current_stage + 1, "bypass": verdict.bypass})
            notifications.notify(request, N.DECISION, occasion="rejected", actor=actor, detail=reason)
            notify_request_changed(request)
    if not verdict:
        _refuse_decision(request, verdict, expired)
    return request
