"""What every move-plan service shares: the status change, the audit entry, the live push, the lock."""

from __future__ import annotations

from django.db import transaction

from migrations_app import events
from migrations_app.choices import ITEM_TERMINAL, AuditAction, AuditOutcome, PlanItemStatus, PlanStatus
from migrations_app.models import MovePlan
from migrations_app.services.audit import audit_record
from migrations_app.services.audit import refusable as audit_refusable

P, Item = PlanStatus, PlanItemStatus


def set_plan_status(plan: MovePlan, target: str) -> str:
    old = plan.status
    PlanStatus.check_transition(old, target)
    plan.status = target
    return old


def audit_plan(plan: MovePlan, *, actor, action: AuditAction, reason: str = "", ip: str | None = None,
           outcome: AuditOutcome = AuditOutcome.SUCCESS, vm_name: str = "", data: dict | None = None) -> None:
    audit_record(actor=actor, action=action, object_type="move_plan", object_id=str(plan.pk), reason=reason, ip=ip,
                 outcome=outcome, vm_name=vm_name, data={"kind": plan.kind, "status": plan.status, **(data or {})})


def plan_progress(plan: MovePlan) -> tuple[int, int]:
    """(items ended, items in all): the plan's overall progress."""
    statuses = list(plan.items.values_list("status", flat=True))
    return sum(s in ITEM_TERMINAL for s in statuses), len(statuses)


def notify_plan_changed(plan: MovePlan) -> None:
    """After commit: the plan's page and the approvers' queue re-read the plan."""
    done, total = plan_progress(plan)
    payload = events.plan_changed_payload(plan, done=done, total=total)
    transaction.on_commit(lambda: events.emit(events.plan_group(plan.pk), payload))
    transaction.on_commit(lambda: events.emit(events.approvals_group(), payload))


def plan_stage_occasion(plan: MovePlan) -> str:
    """A plan's approvers are told once per stage that opens (a delivery per recipient and occasion)."""
    return f"plan-stage-{plan.current_stage + 1}"


def lock_plan(plan: MovePlan) -> MovePlan:
    return MovePlan.objects.select_for_update(of=("self",)).select_related("connection").get(pk=plan.pk)


def refusable(action: AuditAction):
    """``services.audit.refusable`` for a plan's services: a refusal is audited against the plan."""
    return audit_refusable(action, subject="plan",
                           where=lambda plan: {"object_type": "move_plan", "object_id": str(plan.pk)})

