"""Services for migration requests: submit, approve, reject, cancel, expire."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from migrations_app import access, events, notifications, windows
from migrations_app.choices import AuditAction, MigrationKind, NotificationCategory, RequestStatus, RuleAction
from migrations_app.models import Datastore, Host, MigrationRequest, MigrationRun, RequestApproval, VirtualMachine
from migrations_app.policy.facts import facts_for
from migrations_app.policy.rules import evaluate
from migrations_app.selectors import open_request_for_vm
from migrations_app.services.audit import audit_denied, audit_record, refusable
from migrations_app.services.errors import ActionRefused, refuse_unless
from migrations_app.services.policies import active_policy
from migrations_app.services.preflight import check_move
from migrations_app.services.signatures import stage_label, stage_sign

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
    payload = events.request_changed_payload(request)
    groups = [events.request_group(request.pk), events.user_requests_group(request.requester_id),
              events.approvals_group()]
    transaction.on_commit(lambda: events.emit_many([(group, payload) for group in groups]))


def notify_requests_changed(requests: list[MigrationRequest]) -> None:
    """``notify_request_changed`` for many requests: their signatures counted in one query, and
    one hop into the channel layer after commit."""
    if not requests:
        return
    counts = dict(RequestApproval.objects.filter(request__in=requests).values_list("request")
                  .annotate(n=Count("pk")).values_list("request", "n"))
    messages = []
    for request in requests:
        payload = events.request_changed_payload(request, approvals=counts.get(request.pk, 0))
        messages += [(group, payload) for group in (events.request_group(request.pk),
                                                    events.user_requests_group(request.requester_id),
                                                    events.approvals_group())]
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


def migration_request_submit(
    *,
    requester,
    vm: VirtualMachine,
    kind: str,
    reason: str,
    target_host: Host | None = None,
    target_datastore: Datastore | None = None,
    start_after: datetime | None = None,
    window_end: datetime | None = None,
    ip: str | None = None,
) -> MigrationRequest:
    """A VM owner asks for a live migration, as soon as approved or within a change window
    (``start_after`` .. ``window_end``; see ``migrations_app.windows``). The active approval policy
    decides at once: approve, reject with its reason, or freeze the matched rule's stages onto the request."""
    verdict = access.can_request_migration(requester, vm)
    if not verdict:
        audit_denied(actor=requester, action=AuditAction.REQUEST_SUBMITTED, reason=verdict.reason, ip=ip,
                     object_type="vm", object_id=str(vm.pk))
        raise ActionRefused(verdict.reason, denied=True)
    reason = (reason or "").strip()
    if not reason:
        raise ActionRefused("say why this VM should move", field="reason")
    problem = windows.window_problem(start_after, window_end, now=timezone.now())
    if problem:
        raise ActionRefused(problem[1], field=problem[0])

    with transaction.atomic():
        # Lock the VM row: two submissions for one VM queue here, and the second sees the first.
        vm = VirtualMachine.objects.select_for_update(of=("self",)).select_related("host__cluster", "connection").get(pk=vm.pk)
        existing = open_request_for_vm(vm)
        if existing is not None:
            raise ActionRefused(f"{vm.name} already has an open request (#{existing.pk}, {existing.get_status_display().lower()})")
        # Judge the targets as they are now, not as the caller last read them.
        if target_host is not None:
            target_host = Host.objects.select_related("cluster").get(pk=target_host.pk)
        if target_datastore is not None:
            target_datastore = Datastore.objects.get(pk=target_datastore.pk)
        check_move(vm, kind, target_host, target_datastore)
        request = MigrationRequest.objects.create(
            requester=requester,
            vm=vm,
            kind=kind,
            target_host=target_host,
            target_datastore=target_datastore,
            reason=reason,
            start_after=start_after,
            window_end=window_end,
            source_placement=vm.placement_snapshot(),
        )
        decision = evaluate(active_policy(), facts_for(request))
        request.policy_note = decision.note
        request.approval_plan = decision.snapshot()
        request.save(update_fields=["policy_note", "approval_plan"])
        audit_record(
            actor=requester,
            action=AuditAction.REQUEST_SUBMITTED,
            request=request,
            reason=reason,
            ip=ip,
            before=request.source_placement,
            after=_target_snapshot(request),
            data={"kind": kind, "start_after": start_after.isoformat() if start_after else None,
                  "window_end": window_end.isoformat() if window_end else None, "policy": decision.audit_data()},
        )
        if decision.action == RuleAction.AUTO_APPROVE:
            _approve_locked(request, approver=None, comment=decision.note, ip=None,
                            action=AuditAction.REQUEST_AUTO_APPROVED, data={"policy": decision.audit_data()})
        elif decision.action == RuleAction.AUTO_REJECT:
            set_status(request, S.REJECTED)
            request.decided_at = timezone.now()
            request.decision_comment = decision.reject_reason
            request.save(update_fields=["status", "decided_at", "decision_comment", "updated_at"])
            audit_record(actor=None, action=AuditAction.REQUEST_AUTO_REJECTED, request=request,
                         reason=decision.reject_reason, data={"policy": decision.audit_data()})
            notifications.notify(request, N.DECISION, occasion="rejected", detail=decision.reject_reason)
        else:
            notifications.notify(request, N.APPROVAL_WAITING, occasion=_stage_occasion(request))
        notify_request_changed(request)
    return request


def _plan_data(request: MigrationRequest) -> dict:
    plan = request.approval_plan or {}
    return {key: plan.get(key) for key in ("policy", "policy_version", "rule", "why", "fallback")}


def _stage_occasion(request: MigrationRequest) -> str:
    """Approvers are told once per stage that opens (a delivery per recipient and occasion)."""
    return f"stage-{request.current_stage + 1}"


def _target_snapshot(request: MigrationRequest) -> dict:
    out: dict = {}
    if request.target_host_id:
        out["host"] = request.target_host.name
    if request.target_datastore_id:
        out["datastore"] = request.target_datastore.name
    return out


def _approve_locked(request: MigrationRequest, *, approver, comment: str, ip: str | None,
                    action: AuditAction = AuditAction.REQUEST_APPROVED, data: dict | None = None) -> None:
    from migrations_app.services.runs import migration_run_enqueue

    now = timezone.now()
    set_status(request, S.APPROVED)
    request.decided_by = approver
    request.decided_at = now
    request.decision_comment = comment
    request.save(update_fields=["status", "decided_by", "decided_at", "decision_comment", "updated_at"])
    audit_record(actor=approver, action=action, request=request, reason=comment, ip=ip, data=data)
    notifications.notify(request, N.DECISION, occasion="approved", actor=approver, detail=comment)
    if _start_is_due(request, now):
        migration_run_enqueue(request=request, actor=approver)


def _expire_if_window_closed(request: MigrationRequest, verdict: access.Verdict) -> str:
    """A decision refused because the request's window closed expires it in the same call (the
    expiry commits even though the decision is refused). Returns the reason, or ''."""
    now = timezone.now()
    closed = windows.window_closed(request, now)
    if verdict.conflict and closed and request.status in EXPIRABLE:
        expire_locked(request, reason=closed, now=now)
        return closed
    return ""


def _refuse_decision(request: MigrationRequest, verdict: access.Verdict, expired: str) -> None:
    if expired:
        raise ActionRefused(f"{expired}, so the request has expired; nothing can be decided any more", conflict=True)
    refuse_unless(verdict)


@refusable(AuditAction.REQUEST_APPROVED, subject="request")
def migration_request_approve(*, request: MigrationRequest, actor, comment: str = "", ip: str | None = None) -> MigrationRequest:
    """An approver signs the request's current stage. When that completes the last stage the
    request is approved and its run queued (unless it starts later); otherwise the next stage waits.
    Approval after the change window closed is refused and expires the request.
    Under the admin bypass an admin's approval completes every remaining stage, and says so.

    The request row is locked first: approvers clicking at once are serialized, and each sees the
    signatures committed before it (exactly one of them completes a stage; none signs twice).
    """
    comment = (comment or "").strip()
    with transaction.atomic():
        request = _lock(request)
        verdict = access.can_decide(actor, request)
        # A decision refused because the window closed expires the request; that commits.
        expired = "" if verdict else _expire_if_window_closed(request, verdict)
        if verdict:
            _sign_locked(request, actor=actor, verdict=verdict, comment=comment, ip=ip)
            notify_request_changed(request)
    if not verdict:
        _refuse_decision(request, verdict, expired)
    return request


def _sign_locked(request: MigrationRequest, *, actor, verdict: access.Verdict, comment: str, ip: str | None) -> None:
    """Record the approver's signature on the (locked) request's current stage and move it on."""
    index, stage, groups = stage_sign(request, actor=actor, verdict=verdict, comment=comment)
    stages = request.stages
    data = {**_plan_data(request), "stage": index + 1, "stages": len(stages), "stage_name": stage.name,
            "groups": groups, "bypass": verdict.bypass}
    if verdict.bypass:
        _approve_locked(request, approver=actor, ip=ip, action=AuditAction.REQUEST_BYPASS_APPROVED, data=data,
                        comment=comment or f"admin bypass: stages {index + 1}-{len(stages)} not signed")
    elif request.current_stage >= len(stages):
        _approve_locked(request, approver=actor, comment=comment, ip=ip, data=data)
    else:
        signed_what = stage_label(index, stages)
        audit_record(actor=actor, action=AuditAction.REQUEST_STAGE_APPROVED, request=request,
                     reason=f"{signed_what}: {comment}" if comment else signed_what, ip=ip, data=data)
        if request.current_stage > index:  # the next stage opens: tell its approvers
            notifications.notify(request, N.APPROVAL_WAITING, occasion=_stage_occasion(request))


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


def kind_for(target_host: Host | None, target_datastore: Datastore | None) -> str:
    if target_host and target_datastore:
        return MigrationKind.BOTH
    return MigrationKind.COMPUTE if target_host else MigrationKind.STORAGE
