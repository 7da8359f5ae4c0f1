"""A plan at work: each movable VM's attempt is an ordinary migration request; when one ends,
record the item, retry a failure while attempts remain, and finish the plan once every item ended."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from migrations_app import notifications
from migrations_app.choices import ITEM_TERMINAL, TERMINAL, AuditAction, AuditOutcome, PlanFallback, RequestStatus
from migrations_app.models import MigrationRequest, MovePlan, PlanApproval, PlanItem, VirtualMachine
from migrations_app.selectors import open_request_for_vm
from migrations_app.services.audit import audit_record
from migrations_app.services.errors import ActionRefused
from migrations_app.services.plans._common import Item, P, audit_plan, lock_plan, notify_plan_changed, set_plan_status
from migrations_app.services.plans.approval import copy_signatures, signed_by
from migrations_app.services.preflight import check_move


def start_attempt(plan: MovePlan, item: PlanItem, *, approver, ip: str | None) -> None:
    """Create the item's next migration request, approved as part of the plan, and queue it.
    When the move is refused now (the world changed, another request holds the VM), the item fails."""
    from migrations_app.services.requests import _approve_locked, notify_request_changed

    attempt = item.attempts + 1
    cold = not item.movable and item.fallback == PlanFallback.COLD_MOVE  # the requester chose it
    try:
        with transaction.atomic():  # a savepoint: the request and its audit, or nothing
            vm = (VirtualMachine.objects.select_for_update(of=("self",))
                  .select_related("host__cluster", "connection").get(pk=item.vm_id))
            existing = open_request_for_vm(vm)
            if existing is not None:
                raise ActionRefused(f"{vm.name} already has an open request (#{existing.pk})")
            check_move(vm, item.kind, item.target_host, item.target_datastore, cold=cold)
            request = MigrationRequest.objects.create(
                requester=plan.requester, vm=vm, kind=item.kind, target_host=item.target_host,
                target_datastore=item.target_datastore, reason=f"plan #{plan.pk}: {plan.reason}", cold=cold,
                source_placement=vm.placement_snapshot(),
                policy_note=(f"part of plan #{plan.pk}, attempt {attempt} of {item.max_attempts}"
                             + (" (cold move: powered off while it moves)" if cold else "")
                             + (f"; for this VM alone: {item.policy_note}" if item.policy_note else ""))[:300],
            )
            copy_signatures(plan, request)
            after = {}
            if item.target_host_id:
                after["host"] = item.target_host.name
            if item.target_datastore_id:
                after["datastore"] = item.target_datastore.name
            audit_record(actor=plan.requester, action=AuditAction.REQUEST_SUBMITTED, request=request,
                         reason=request.reason, before=request.source_placement, after=after,
                         data={"kind": item.kind, "plan": plan.pk, "attempt": attempt, "cold": cold})
            who = signed_by(plan)
            comment = f"approved as part of plan #{plan.pk}, " + (
                f"signed by {who}" if who else f"by the approval policy ({(plan.approval_plan or {}).get('rule')})")
            if attempt > 1:
                comment += f" (attempt {attempt} of {item.max_attempts})"
            bypass = PlanApproval.objects.filter(plan=plan, bypass=True).exists()
            action = (AuditAction.REQUEST_BYPASS_APPROVED if bypass else AuditAction.REQUEST_APPROVED if who
                      else AuditAction.REQUEST_AUTO_APPROVED)
            _approve_locked(request, approver=approver, comment=comment, ip=ip, action=action,
                            data={"plan": plan.pk, "attempt": attempt, "bypass": bypass})
            notify_request_changed(request)
    except ActionRefused as exc:
        item.status = Item.FAILED
        item.explanation = f"Not started: {exc.message}. The VM stays where it is."
        item.save(update_fields=["status", "explanation"])
        audit_plan(plan, actor=None, action=AuditAction.PLAN_ITEM_SETTLED, outcome=AuditOutcome.FAILURE,
               reason=item.explanation, vm_name=item.vm.name, data={"item": item.pk, "attempt": attempt})
        return
    item.attempts = attempt
    item.request = request
    item.status = Item.MOVING
    item.save(update_fields=["attempts", "request", "status"])


def plan_request_settled(request_id: int) -> None:
    """A migration request ended (called on commit): if it is a plan's current attempt, record the
    item's outcome, retry a failure while attempts remain, and finish the plan when all items ended."""
    found = PlanItem.objects.filter(request_id=request_id, status=Item.MOVING).values_list("pk", "plan_id").first()
    if found is None:
        return  # not a plan's, or already recorded
    item_id, plan_id = found
    with transaction.atomic():
        # Lock order everywhere: the plan, then its items (approve and cancel take them so too).
        plan = lock_plan(MovePlan(pk=plan_id))
        item = (PlanItem.objects.select_for_update(of=("self",))
                .select_related("vm", "request__run", "source_host", "target_host__cluster", "target_datastore")
                .get(pk=item_id))
        request = item.request
        if item.status != Item.MOVING or item.request_id != request_id or request.status not in TERMINAL:
            return
        run = getattr(request, "run", None)
        said = (run.explanation if run is not None else "") or request.get_status_display()
        if request.status == RequestStatus.SUCCEEDED:
            item.status, item.explanation = Item.SUCCEEDED, said
        elif request.status in (RequestStatus.FAILED, RequestStatus.ERRORED) and plan.cancel_requested_at is None \
                and item.attempts < item.max_attempts and not request.cold:
            # A cold move is never retried by itself: its first attempt may have left the VM
            # powered off, and a second would take it for a VM that was off and leave it so.
            audit_plan(plan, actor=None, action=AuditAction.PLAN_ITEM_RETRIED, outcome=AuditOutcome.FAILURE,
                   reason=f"attempt {item.attempts} of {item.max_attempts} {request.status}: {said}",
                   vm_name=item.vm.name, data={"item": item.pk, "request": request.pk})
            start_attempt(plan, item, approver=None, ip=None)
            finish_if_done(plan)
            notify_plan_changed(plan)
            return
        elif request.status in (RequestStatus.FAILED, RequestStatus.ERRORED) and request.cold:
            item.status = Item.FAILED
            item.explanation = f"The cold move failed and is not retried by itself (check the VM's power state): {said}"
        elif request.status in (RequestStatus.FAILED, RequestStatus.ERRORED):
            item.status = Item.FAILED
            item.explanation = f"Gave up after {item.attempts} attempt{'s' if item.attempts > 1 else ''}: {said}"
        else:
            item.status, item.explanation = Item.CANCELLED, said
        item.save(update_fields=["status", "explanation"])
        audit_plan(plan, actor=None, action=AuditAction.PLAN_ITEM_SETTLED,
               outcome=AuditOutcome.SUCCESS if item.status == Item.SUCCEEDED else AuditOutcome.FAILURE,
               reason=item.explanation, vm_name=item.vm.name,
               data={"item": item.pk, "request": request.pk, "item_status": item.status})
        finish_if_done(plan)
        notify_plan_changed(plan)


def finish_if_done(plan: MovePlan) -> None:
    """Once every item ended: done (every movable VM moved; skipped ones stayed as agreed),
    partially done, failed (nothing moved) or cancelled (cancel was asked)."""
    if plan.status != P.RUNNING:
        return
    statuses = list(plan.items.values_list("status", flat=True))
    if any(s not in ITEM_TERMINAL for s in statuses):
        return
    moved = statuses.count(Item.SUCCEEDED)
    failed = statuses.count(Item.FAILED) + statuses.count(Item.CANCELLED)
    skipped = statuses.count(Item.SKIPPED)
    if plan.cancel_requested_at is not None:
        target = P.CANCELLED
    elif failed == 0:
        target = P.DONE
    else:
        target = P.PARTIALLY_DONE if moved else P.FAILED
    set_plan_status(plan, target)
    plan.finished_at = timezone.now()
    plan.summary = f"{moved} moved, {skipped} skipped, {failed} not moved."
    plan.save(update_fields=["status", "finished_at", "summary", "updated_at"])
    audit_plan(plan, actor=None, action=AuditAction.PLAN_FINISHED, reason=plan.summary,
           outcome=AuditOutcome.SUCCESS if target == P.DONE else AuditOutcome.FAILURE)
    if target in notifications.PLAN_FINISHED_CATEGORY:  # a cancelled plan was told at its cancel
        notifications.notify_plan(plan, notifications.PLAN_FINISHED_CATEGORY[target], occasion="finished")


def move_plan_settle_stale() -> int:
    """The scheduler's safety net: items whose request ended but whose bookkeeping was lost (the
    process died between the run's commit and ``plan_request_settled``). Returns how many."""
    ids = list(PlanItem.objects.filter(status=Item.MOVING, request__status__in=TERMINAL)
               .values_list("request_id", flat=True))
    for request_id in ids:
        plan_request_settled(request_id)
    return len(ids)
