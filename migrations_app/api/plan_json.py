"""How the JSON API shows a move plan: a summary per plan in the list, and one plan with what its
page shows (items, approval stages and who signed, decision, progress, fallbacks) plus what the
user asking may do with it now, so a script need not guess which action will be refused."""

from __future__ import annotations

from migrations_app import access, selectors
from migrations_app.choices import ITEM_TERMINAL, PlanItemStatus, PlanStatus
from migrations_app.models import MovePlan, PlanItem
from migrations_app.services import plans as plan_services


def _ref(obj) -> dict | None:
    return None if obj is None else {"id": obj.pk, "name": obj.name}


def _time(value) -> str | None:
    return value.isoformat() if value else None


def _subject(plan: MovePlan) -> dict:
    for kind, obj in (("host", plan.subject_host), ("datastore", plan.subject_datastore),
                      ("cluster", plan.subject_cluster)):
        if obj is not None:
            return {"type": kind, "id": obj.pk, "name": obj.name}
    return {"type": None, "id": None, "name": ""}


def progress_json(done: int, total: int) -> dict:
    """Items ended of items in all, as the plan's page and its live push count them."""
    return {"done": done, "total": total, "percent": round(100.0 * done / total, 1) if total else 100.0}


def plan_summary(plan: MovePlan, *, done: int, total: int) -> dict:
    """One plan as the list shows it (no items)."""
    decided = plan.decided_at is not None
    return {
        "id": plan.pk,
        "kind": plan.kind,
        "status": plan.status,
        "subject": _subject(plan),
        "connection": plan.connection.name,
        "requester": plan.requester.username,
        "reason": plan.reason,
        "estimated_duration_s": plan.estimated_duration_s,
        "imbalance": None if plan.imbalance_before is None else {
            "before": plan.imbalance_before, "after": plan.imbalance_after},
        "progress": progress_json(done, total),
        "decision": None if not decided else {
            # decided_by is None when the approval policy approved every move by itself
            "by": plan.decided_by.username if plan.decided_by_id else None,
            "at": _time(plan.decided_at),
            "comment": plan.decision_comment,
        },
        "summary": plan.summary,
        "created_at": _time(plan.created_at),
        "updated_at": _time(plan.updated_at),
        "finished_at": _time(plan.finished_at),
        "cancel_requested_at": _time(plan.cancel_requested_at),
    }


def _approval(plan: MovePlan) -> dict | None:
    """The policy's decision frozen at submission and each stage with who signed it; None before."""
    frozen = plan.approval_plan or {}
    if not frozen:
        return None
    signatures = list(plan.approvals.all())
    stages = []
    for view in selectors.approval_stages(plan):
        stages.append({
            "number": view.number,
            "name": view.spec.name,
            "needs": view.spec.describe(),
            "groups": list(view.spec.groups),
            "needed": view.spec.needed,
            "state": view.state,
            "progress": view.progress,
            "signed": [{"approver": a.approver.username, "at": _time(a.at), "comment": a.comment,
                        "groups": list(a.groups), "bypass": a.bypass}
                       for a in signatures if a.stage == view.number - 1],
        })
    waiting = plan.status == PlanStatus.PENDING_APPROVAL and plan.current_stage < len(stages)
    return {
        "action": frozen.get("action"),
        "policy": frozen.get("policy"),
        "policy_version": frozen.get("policy_version"),
        "rule": frozen.get("rule"),
        "why": frozen.get("why"),
        # No rule of the policy matched: the built-in rule (one approver) decided.
        "no_rule_matched": bool(frozen.get("fallback")),
        "strictest_vm": frozen.get("strictest_vm"),
        "current_stage": plan.current_stage + 1 if waiting else None,
        "stages": stages,
    }


def item_json(plan: MovePlan, item: PlanItem) -> dict:
    request = item.request
    run = getattr(request, "run", None) if request is not None else None
    return {
        "id": item.pk,
        "order": item.order,
        "vm": _ref(item.vm),
        "kind": item.kind,
        "source_host": _ref(item.source_host),
        "target_host": _ref(item.target_host),
        "target_datastore": _ref(item.target_datastore),
        "why": item.why,
        "movable": item.movable,
        "blocker": item.blocker,
        "fallback": item.fallback or None,
        # What may be chosen for a VM that cannot move live (nothing for one that can).
        "fallback_options": [] if item.movable else [v for v, _ in plan_services.fallback_choices(plan, item)],
        "moves": item.moves,
        "status": item.status,
        "explanation": item.explanation,
        "policy_note": item.policy_note,
        "attempts": item.attempts,
        "max_attempts": item.max_attempts,
        "request": None if request is None else {
            "id": request.pk,
            "status": request.status,
            "run": None if run is None else {"id": run.pk, "phase": run.phase, "percent": run.percent},
        },
    }


def plan_json(plan: MovePlan, user) -> dict:
    """One plan as its page shows it, for ``user`` (the ``allowed`` actions are theirs)."""
    items = list(selectors.plan_items(plan).order_by("order"))
    done = sum(i.status in ITEM_TERMINAL for i in items)
    out = plan_summary(plan, done=done, total=len(items))
    out["progress"]["by_status"] = {s: sum(i.status == s for i in items) for s in PlanItemStatus.values}
    out["progress"]["moving_vms"] = sum(i.moves for i in items)
    out["approval"] = _approval(plan)
    out["fallback_options"] = [v for v, _ in plan_services.fallback_choices(plan)]
    out["allowed"] = {
        "edit": bool(access.can_edit_plan(user, plan)),  # choose fallbacks, submit
        "decide": bool(access.can_decide_plan(user, plan)),  # approve or reject the current stage
        "cancel": bool(access.can_cancel_plan(user, plan)),
    }
    out["items"] = [item_json(plan, i) for i in items]
    return out
