"""The plan's decisions: fallbacks, submit (the approval policy judges each move), approve (stage
by stage; then one approved request per moving VM), reject, cancel, and expiry of plans nobody
decided on."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from migrations_app import access, notifications
from migrations_app.choices import CANCELABLE, AuditAction, NotificationCategory, RuleAction
from migrations_app.models import MigrationRequest, MigrationRun, MovePlan, PlanItem
from migrations_app.services.errors import ActionRefused, refuse_unless
from migrations_app.services.plans._common import (
    Item,
    P,
    audit_plan,
    lock_plan,
    notify_plan_changed,
    plan_stage_occasion,
    refusable,
    set_plan_status,
)
from migrations_app.services.plans.approval import judge_items, sign_stage, stage_data
from migrations_app.services.plans.build import fallback_choices
from migrations_app.services.plans.execution import finish_if_done, start_attempt

N = NotificationCategory


@refusable(AuditAction.PLAN_FALLBACK_SET)
def move_plan_set_fallback(*, plan: MovePlan, actor, item: PlanItem, fallback: str, ip: str | None = None) -> PlanItem:
    """The requester chooses what happens to a VM that cannot move live."""
    with transaction.atomic():
        plan = lock_plan(plan)
        refuse_unless(access.can_edit_plan(actor, plan))
        item = PlanItem.objects.select_related("vm").get(pk=item.pk, plan=plan)
        if item.movable:
            raise ActionRefused(f"{item.vm.name} moves live; a fallback is only for VMs that cannot", field="fallback")
        if fallback not in dict(fallback_choices(plan, item)):
            raise ActionRefused(f"{fallback!r} is not a fallback this hypervisor offers", field="fallback")
        old, item.fallback = item.fallback, fallback
        item.save(update_fields=["fallback"])
        audit_plan(plan, actor=actor, action=AuditAction.PLAN_FALLBACK_SET, ip=ip, vm_name=item.vm.name,
               data={"item": item.pk, "from": old, "to": fallback})
    return item


@refusable(AuditAction.PLAN_SUBMITTED)
def move_plan_submit(*, plan: MovePlan, actor, ip: str | None = None) -> MovePlan:
    """The requester sends the reviewed plan to the approvers. The approval policy judges each
    move now (``approval``): moves it rejects are skipped, the plan waits for the stages of its
    strictest move, or, when the policy approves every move by itself, it starts at once."""
    with transaction.atomic():
        plan = lock_plan(plan)
        refuse_unless(access.can_edit_plan(actor, plan))
        decision, strictest_vm = judge_items(plan)
        plan.approval_plan = {**decision.snapshot(), "strictest_vm": strictest_vm}
        plan.current_stage = 0
        set_plan_status(plan, P.PENDING_APPROVAL)
        plan.save(update_fields=["status", "approval_plan", "current_stage", "updated_at"])
        audit_plan(plan, actor=actor, action=AuditAction.PLAN_SUBMITTED, reason=plan.reason, ip=ip,
                   data={"policy": {**decision.audit_data(), "strictest_vm": strictest_vm},
                         "stages": len(decision.stages)})
        if decision.action == RuleAction.AUTO_APPROVE:
            _start(plan, approver=None, ip=None, action=AuditAction.PLAN_AUTO_APPROVED,
                   comment=f"approved by policy: {decision.note}", data={"policy": decision.audit_data()})
        else:
            notifications.notify_plan(plan, N.APPROVAL_WAITING, occasion=plan_stage_occasion(plan))
        notify_plan_changed(plan)
    return plan


@refusable(AuditAction.PLAN_APPROVED)
def move_plan_approve(*, plan: MovePlan, actor, comment: str = "", ip: str | None = None) -> MovePlan:
    """An approver signs the plan's current stage (``access.can_decide_plan``: the same rules as
    for a request). When that completes the last stage (or an admin approves under the admin
    bypass), every moving VM gets an approved, queued request in plan order; admission control
    decides how many run at once. VMs whose fallback is skip stay."""
    comment = (comment or "").strip()
    with transaction.atomic():
        plan = lock_plan(plan)
        verdict = access.can_decide_plan(actor, plan)
        refuse_unless(verdict)
        index = plan.current_stage
        if sign_stage(plan, actor=actor, verdict=verdict, comment=comment, ip=ip):
            data = {**stage_data(plan, index), "bypass": verdict.bypass}
            if verdict.bypass:
                _start(plan, approver=actor, ip=ip, action=AuditAction.PLAN_BYPASS_APPROVED, data=data,
                       comment=comment or f"admin bypass: stages {index + 1}-{len(plan.stages)} not signed")
            else:
                _start(plan, approver=actor, ip=ip, action=AuditAction.PLAN_APPROVED, comment=comment, data=data)
        elif plan.current_stage > index:  # the next stage opens: tell its approvers
            notifications.notify_plan(plan, N.APPROVAL_WAITING, occasion=plan_stage_occasion(plan))
        notify_plan_changed(plan)
    return plan


def _start(plan: MovePlan, *, approver, comment: str, ip: str | None, action: AuditAction, data: dict) -> None:
    """The (locked) plan is approved: record the decision, start a request per moving item."""
    set_plan_status(plan, P.APPROVED)
    plan.decided_by, plan.decided_at, plan.decision_comment = approver, timezone.now(), comment
    plan.save(update_fields=["status", "decided_by", "decided_at", "decision_comment", "updated_at"])
    audit_plan(plan, actor=approver, action=action, reason=comment, ip=ip, data=data)
    notifications.notify_plan(plan, N.DECISION, occasion="approved", actor=approver, detail=comment)
    set_plan_status(plan, P.RUNNING)
    plan.save(update_fields=["status", "updated_at"])
    audit_plan(plan, actor=None, action=AuditAction.PLAN_STARTED)
    items = (plan.items.filter(status=Item.PLANNED)
             .select_related("vm", "source_host", "target_host__cluster", "target_datastore").order_by("order"))
    for item in items:
        if item.moves:
            start_attempt(plan, item, approver=approver, ip=ip)
        else:  # fallback skip: it stays where it is, as the plan says
            item.status = Item.SKIPPED
            item.explanation = f"Stays on {item.source_host.name}: {item.blocker}."
            item.save(update_fields=["status", "explanation"])
    finish_if_done(plan)


@refusable(AuditAction.PLAN_REJECTED)
def move_plan_reject(*, plan: MovePlan, actor, reason: str, ip: str | None = None) -> MovePlan:
    reason = (reason or "").strip()
    with transaction.atomic():
        plan = lock_plan(plan)
        refuse_unless(access.can_decide_plan(actor, plan))
        if not reason:
            raise ActionRefused("a rejection needs a reason the requester can act on", field="reason")
        set_plan_status(plan, P.REJECTED)
        plan.decided_by, plan.decided_at, plan.decision_comment = actor, timezone.now(), reason
        plan.finished_at = plan.decided_at
        plan.save(update_fields=["status", "decided_by", "decided_at", "decision_comment", "finished_at",
                                 "updated_at"])
        plan.items.filter(status=Item.PLANNED).update(status=Item.CANCELLED)
        audit_plan(plan, actor=actor, action=AuditAction.PLAN_REJECTED, reason=reason, ip=ip)
        notifications.notify_plan(plan, N.DECISION, occasion="rejected", actor=actor, detail=reason)
        notify_plan_changed(plan)
    return plan


@refusable(AuditAction.PLAN_CANCELLED)
def move_plan_cancel(*, plan: MovePlan, actor, reason: str = "", ip: str | None = None) -> MovePlan:
    """Withdraw a plan before it runs; while it runs, cancel its open moves (a running one aborts on
    the hypervisor) and finish the plan as cancelled once they ended. Moves already done stay done."""
    from migrations_app.services.requests import migration_request_cancel

    reason = (reason or "").strip()
    with transaction.atomic():
        plan = lock_plan(plan)
        refuse_unless(access.can_cancel_plan(actor, plan))
        # The open moves' requests and runs are locked now, in id order, before the first audit
        # entry takes the chain's lock: a worker finishing several of them holds those rows and
        # then waits for the chain, so taking them the other way round would deadlock.
        moving = list(plan.items.filter(status=Item.MOVING).values_list("request_id", flat=True))
        list(MigrationRequest.objects.select_for_update(of=("self",)).filter(pk__in=moving).order_by("pk"))
        list(MigrationRun.objects.select_for_update(of=("self",)).filter(request_id__in=moving).order_by("pk"))
        plan.items.filter(status=Item.PLANNED).update(status=Item.CANCELLED, explanation="Cancelled with the plan.")
        audit_plan(plan, actor=actor, action=AuditAction.PLAN_CANCELLED, reason=reason, ip=ip)
        # Told now, by whoever cancelled (a running plan then finishes as cancelled, without a
        # second mail): moves already done stay done, the open ones are aborted.
        detail = "; ".join(filter(None, [reason, "the open moves are being stopped, the moves already done stay done"
                                         if plan.status == P.RUNNING else ""]))
        notifications.notify_plan(plan, N.CANCELLED, actor=actor, detail=detail)
        if plan.status == P.RUNNING:
            plan.cancel_requested_at = timezone.now()
            plan.save(update_fields=["cancel_requested_at", "updated_at"])
            for item in plan.items.filter(status=Item.MOVING).select_related("request"):
                if item.request.status not in CANCELABLE:
                    # Settled meanwhile (its own bookkeeping runs on commit), or already being
                    # cancelled on its own: it keeps aborting and settles the item when it ends.
                    continue
                migration_request_cancel(request=item.request, actor=actor,
                                         reason=f"plan #{plan.pk} cancelled: {reason}".strip(": "), ip=ip)
            finish_if_done(plan)
        else:
            set_plan_status(plan, P.CANCELLED)
            plan.finished_at = timezone.now()
            plan.save(update_fields=["status", "finished_at", "updated_at"])
        notify_plan_changed(plan)
    return plan


def move_plan_expire_stale(*, now: datetime | None = None) -> int:
    """Plans nobody decided on in time expire, as requests do. Returns how many."""
    now = now or timezone.now()
    cutoff = now - timedelta(hours=settings.PORTAL["PENDING_EXPIRY_HOURS"])
    count = 0
    for pk in MovePlan.objects.filter(status=P.PENDING_APPROVAL, updated_at__lt=cutoff).values_list("pk", flat=True):
        with transaction.atomic():
            plan = MovePlan.objects.select_for_update().get(pk=pk)
            if plan.status != P.PENDING_APPROVAL:
                continue
            set_plan_status(plan, P.EXPIRED)
            plan.finished_at = now
            plan.save(update_fields=["status", "finished_at", "updated_at"])
            plan.items.filter(status=Item.PLANNED).update(status=Item.CANCELLED)
            reason = f"no decision within {settings.PORTAL['PENDING_EXPIRY_HOURS']:g} hours"
            audit_plan(plan, actor=None, action=AuditAction.PLAN_EXPIRED, reason=reason)
            notifications.notify_plan(plan, N.EXPIRED, detail=reason)
            notify_plan_changed(plan)
            count += 1
    return count
