"""Services for migration requests: submit, approve, reject, cancel, expire."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from migrations_app import access, events, policy
from migrations_app.choices import AuditAction, MigrationKind, RequestStatus
from migrations_app.models import Datastore, Host, MigrationRequest, VirtualMachine
from migrations_app.selectors import open_request_for_vm
from migrations_app.services.audit import audit_denied, audit_record
from migrations_app.services.errors import ActionRefused
from migrations_app.services.preflight import check_move

S = RequestStatus


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


def _lock(request: MigrationRequest) -> MigrationRequest:
    return (
        MigrationRequest.objects.select_for_update(of=("self",))
        .select_related("vm", "requester", "target_host", "target_datastore")
        .get(pk=request.pk)
    )


def _start_is_due(request: MigrationRequest, now: datetime) -> bool:
    return request.start_after is None or request.start_after <= now


def migration_request_submit(
    *,
    requester,
    vm: VirtualMachine,
    kind: str,
    reason: str,
    target_host: Host | None = None,
    target_datastore: Datastore | None = None,
    start_after: datetime | None = None,
    ip: str | None = None,
) -> MigrationRequest:
    """A VM owner asks for a live migration. The policy may approve it at once."""
    verdict = access.can_request_migration(requester, vm)
    if not verdict:
        audit_denied(actor=requester, action=AuditAction.REQUEST_SUBMITTED, reason=verdict.reason, ip=ip,
                     object_type="vm", object_id=str(vm.pk))
        raise ActionRefused(verdict.reason, denied=True)
    reason = (reason or "").strip()
    if not reason:
        raise ActionRefused("say why this VM should move", field="reason")
    if start_after is not None and start_after < timezone.now() - timedelta(minutes=1):
        raise ActionRefused("the start time is in the past", field="start_after")

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
            source_placement=vm.placement_snapshot(),
        )
        decision = policy.evaluate(request)
        request.policy_note = decision.note
        request.save(update_fields=["policy_note"])
        audit_record(
            actor=requester,
            action=AuditAction.REQUEST_SUBMITTED,
            request=request,
            reason=reason,
            ip=ip,
            before=request.source_placement,
            after=_target_snapshot(request),
            data={"kind": kind, "start_after": start_after.isoformat() if start_after else None,
                  "policy": decision.note},
        )
        if decision.auto_approve:
            _approve_locked(request, approver=None, comment=decision.note, ip=None,
                            action=AuditAction.REQUEST_AUTO_APPROVED)
        notify_request_changed(request)
    return request


def _target_snapshot(request: MigrationRequest) -> dict:
    out: dict = {}
    if request.target_host_id:
        out["host"] = request.target_host.name
    if request.target_datastore_id:
        out["datastore"] = request.target_datastore.name
    return out


def _approve_locked(request: MigrationRequest, *, approver, comment: str, ip: str | None,
                    action: AuditAction = AuditAction.REQUEST_APPROVED) -> None:
    from migrations_app.services.runs import migration_run_enqueue

    now = timezone.now()
    set_status(request, S.APPROVED)
    request.decided_by = approver
    request.decided_at = now
    request.decision_comment = comment
    request.save(update_fields=["status", "decided_by", "decided_at", "decision_comment", "updated_at"])
    audit_record(actor=approver, action=action, request=request, reason=comment, ip=ip)
    if _start_is_due(request, now):
        migration_run_enqueue(request=request, actor=approver)


def _refusable(action: AuditAction):
    """Decorator: an ActionRefused raised inside the service is audited (in its own transaction)."""

    def wrap(fn):
        def inner(*, request: MigrationRequest, actor, ip: str | None = None, **kwargs):
            try:
                return fn(request=request, actor=actor, ip=ip, **kwargs)
            except ActionRefused as exc:
                audit_denied(actor=actor, action=action, reason=exc.message, request=request, ip=ip)
                raise

        inner.__name__ = fn.__name__
        inner.__doc__ = fn.__doc__
        return inner

    return wrap


@_refusable(AuditAction.REQUEST_APPROVED)
def migration_request_approve(*, request: MigrationRequest, actor, comment: str = "", ip: str | None = None) -> MigrationRequest:
    """An approver approves; the run is queued at once unless the request starts later."""
    with transaction.atomic():
        request = _lock(request)
        verdict = access.can_decide(actor, request)
        if not verdict:
            raise ActionRefused(verdict.reason, denied=not verdict.conflict, conflict=verdict.conflict)
        _approve_locked(request, approver=actor, comment=(comment or "").strip(), ip=ip)
        notify_request_changed(request)
    return request


@_refusable(AuditAction.REQUEST_REJECTED)
def migration_request_reject(*, request: MigrationRequest, actor, reason: str, ip: str | None = None) -> MigrationRequest:
    """An approver rejects, with a reason the requester will read."""
    reason = (reason or "").strip()
    with transaction.atomic():
        request = _lock(request)
        verdict = access.can_decide(actor, request)
        if not verdict:
            raise ActionRefused(verdict.reason, denied=not verdict.conflict, conflict=verdict.conflict)
        if not reason:
            raise ActionRefused("a rejection needs a reason the requester can act on", field="reason")
        set_status(request, S.REJECTED)
        request.decided_by = actor
        request.decided_at = timezone.now()
        request.decision_comment = reason
        request.save(update_fields=["status", "decided_by", "decided_at", "decision_comment", "updated_at"])
        audit_record(actor=actor, action=AuditAction.REQUEST_REJECTED, request=request, reason=reason, ip=ip)
        notify_request_changed(request)
    return request


@_refusable(AuditAction.REQUEST_CANCELLED)
def migration_request_cancel(*, request: MigrationRequest, actor, reason: str = "", ip: str | None = None) -> MigrationRequest:
    """Withdraw while pending or approved, dequeue while queued, abort on the hypervisor while running.

    A running migration becomes ``cancelling``; its worker aborts the hypervisor job at its next
    heartbeat and records the outcome (cancelled, or succeeded if the move had already finished).
    """
    from migrations_app.services.runs import append_run_event

    reason = (reason or "").strip()
    with transaction.atomic():
        request = _lock(request)
        verdict = access.can_cancel(actor, request)
        if not verdict:
            raise ActionRefused(verdict.reason, denied=not verdict.conflict, conflict=verdict.conflict)
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
        request.save(update_fields=["status", "updated_at"])
        notify_request_changed(request)
    return request


def migration_request_expire_stale(*, now: datetime | None = None) -> int:
    """The scheduler expires requests nobody decided on in time. Returns how many expired."""
    now = now or timezone.now()
    cutoff = now - timedelta(hours=settings.PORTAL["PENDING_EXPIRY_HOURS"])
    count = 0
    for pk in MigrationRequest.objects.filter(status=S.PENDING_APPROVAL, created_at__lt=cutoff).values_list("pk", flat=True):
        with transaction.atomic():
            request = MigrationRequest.objects.select_for_update(of=("self",)).select_related("vm").get(pk=pk)
            if request.status != S.PENDING_APPROVAL:
                continue  # decided meanwhile
            set_status(request, S.EXPIRED)
            request.save(update_fields=["status", "updated_at"])
            audit_record(actor=None, action=AuditAction.REQUEST_EXPIRED, request=request,
                         reason=f"no decision within {settings.PORTAL['PENDING_EXPIRY_HOURS']:g} hours")
            notify_request_changed(request)
            count += 1
    return count


def kind_for(target_host: Host | None, target_datastore: Datastore | None) -> str:
    if target_host and target_datastore:
        return MigrationKind.BOTH
    return MigrationKind.COMPUTE if target_host else MigrationKind.STORAGE
