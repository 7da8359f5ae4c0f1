"""A plan's approval follows the active approval policy, as a single request's does.

At submission the policy is evaluated for every VM the plan would move, with the facts of that
move (an unsaved ``MigrationRequest`` stands for it: ``policy.facts.facts_for``):

- a VM whose move the policy rejects stays where it is: its item is skipped, with the policy's reason;
- the plan then needs what every one of its moves' rules asks for: when they all match one rule,
  that rule's stages; under several rules, their stages merged (``policy.rules.merged_stages``:
  each distinct stage as often as the most demanding rule asks for it), frozen onto the plan with
  the policy, rule(s) and why (``MovePlan.approval_plan``, as on a request);
- when the policy approves every move automatically, so is the plan (``plan.auto_approved``).

Approvers sign the plan's stages under the rules of ``access.can_decide_plan`` (the same as for a
request); the plan is approved when its last stage is complete. Each move's request then carries
the plan's frozen approval and a copy of its signatures, so its own page tells the truth.
"""

from __future__ import annotations

from dataclasses import replace

from migrations_app import access
from migrations_app.choices import AuditAction, AuditOutcome, PlanFallback, RuleAction
from migrations_app.models import MigrationRequest, MovePlan, PlanApproval, PlanItem, RequestApproval
from migrations_app.models.plans import MOVES
from migrations_app.policy.facts import facts_for
from migrations_app.policy.rules import Decision, PolicySpec, evaluate, merged_stages
from migrations_app.services.errors import ActionRefused
from migrations_app.services.plans._common import Item, audit_plan
from migrations_app.services.policies import active_policy
from migrations_app.services.signatures import stage_label, stage_sign


def item_decision(policy: PolicySpec | None, item: PlanItem) -> Decision:
    """What the policy decides for this item's move, judged as a request for it would be."""
    move = MigrationRequest(vm=item.vm, kind=item.kind, target_host=item.target_host,
                            target_datastore=item.target_datastore, cold=not item.movable)
    return evaluate(policy, facts_for(move))


def _rule_order(policy: PolicySpec | None, decision: Decision) -> int:
    """Where the deciding rule stands in the policy (the built-in fallback comes after every rule)."""
    names = [r.name for r in policy.rules] if policy else []
    return names.index(decision.rule) if decision.rule in names and not decision.fallback else len(names)


def judge_items(plan: MovePlan) -> tuple[Decision, str]:
    """Evaluate the active policy for every planned move of the (locked) plan; skip the moves it
    rejects (audited one by one); return the decision the plan needs and the VM it is for.
    Raises ActionRefused (nothing changed by the caller's rollback) when no move is left."""
    policy = active_policy()
    items = list(plan.items.filter(MOVES, status=Item.PLANNED)
                 .select_related("vm__owner_group", "vm__host__cluster", "source_host", "target_host__cluster",
                                 "target_datastore").order_by("order"))
    if not items:
        raise ActionRefused("nothing in this plan can move; there is nothing to approve", conflict=True)
    kept: list[tuple[PlanItem, Decision]] = []
    refused: list[str] = []
    for item in items:
        decision = item_decision(policy, item)
        item.policy_note = decision.note
        if decision.action == RuleAction.AUTO_REJECT:
            item.status, item.movable, item.fallback = Item.SKIPPED, False, PlanFallback.SKIP
            item.blocker = f"the approval policy refuses this move: {decision.reject_reason}"[:500]
            item.explanation = (f"Refused by the approval policy ({decision.note}): {decision.reject_reason}. "
                                f"It stays on {item.source_host.name}.")
            item.save(update_fields=["status", "movable", "fallback", "blocker", "explanation", "policy_note"])
            audit_plan(plan, actor=None, action=AuditAction.PLAN_ITEM_SETTLED, outcome=AuditOutcome.FAILURE,
                       reason=item.explanation, vm_name=item.vm.name,
                       data={"item": item.pk, "item_status": item.status, "policy": decision.audit_data(),
                             "reject_reason": decision.reject_reason})
            refused.append(f"{item.vm.name}: {decision.reject_reason}")
        else:
            item.save(update_fields=["policy_note"])
            kept.append((item, decision))
    if not kept:
        raise ActionRefused("the approval policy refuses every move of this plan (" + "; ".join(refused) + ")",
                            conflict=True)
    staged = [(item, d) for item, d in kept if d.action == RuleAction.STAGES]
    if not staged:  # every move is approved automatically: so is the plan
        return kept[0][1], kept[0][0].vm.name
    item, decision = min(staged, key=lambda pair: (-len(pair[1].stages), _rule_order(policy, pair[1])))
    rules = sorted({(d.rule, d.fallback): d for _, d in staged}.values(), key=lambda d: _rule_order(policy, d))
    merged = merged_stages(rules)
    if len(merged) > len(decision.stages):  # the strictest move's stages do not cover the others' rules
        decision = replace(decision, stages=merged, rule=" + ".join(d.rule for d in rules),
                           why="its moves match several rules; the plan needs the approvals each of them asks for")
    return decision, item.vm.name


def sign_stage(plan: MovePlan, *, actor, verdict: access.Verdict, comment: str, ip: str | None) -> bool:
    """Record the approver's signature on the (locked) plan's current stage and move it on.
    Returns whether the plan is now approved (its last stage complete, or the admin bypass)."""
    index, stage, groups = stage_sign(plan, actor=actor, verdict=verdict, comment=comment)
    stages = plan.stages
    if plan.current_stage < len(stages):
        signed_what = stage_label(index, stages)
        audit_plan(plan, actor=actor, action=AuditAction.PLAN_STAGE_APPROVED, ip=ip,
                   reason=f"{signed_what}: {comment}" if comment else signed_what,
                   data={**stage_data(plan, index), "groups": groups})
        return False
    return True


def stage_data(plan: MovePlan, index: int) -> dict:
    stages = plan.stages
    frozen = plan.approval_plan or {}
    return {**{k: frozen.get(k) for k in ("policy", "policy_version", "rule", "why", "fallback", "strictest_vm")},
            "stage": index + 1, "stages": len(stages), "stage_name": stages[index].name if index < len(stages) else ""}


def signed_by(plan: MovePlan) -> str:
    """Who approved the plan, in words, e.g. "erin (stage 1), bob (stage 2)"; "" when nobody signed."""
    rows = PlanApproval.objects.filter(plan=plan).select_related("approver").order_by("stage", "at", "pk")
    return ", ".join(f"{a.approver.username} ({'admin bypass' if a.bypass else f'stage {a.stage + 1}'})"
                     for a in rows)


def copy_signatures(plan: MovePlan, request: MigrationRequest) -> None:
    """The plan's frozen approval and its signatures become the (new) request's: its page shows
    the stages that were really signed, by whom."""
    request.approval_plan = {**(plan.approval_plan or {}), "plan": plan.pk}
    request.current_stage = len(plan.stages)
    request.save(update_fields=["approval_plan", "current_stage"])
    RequestApproval.objects.bulk_create([
        RequestApproval(request=request, stage=a.stage, approver_id=a.approver_id, at=a.at,
                        comment=f"signed plan #{plan.pk}" + (f": {a.comment}" if a.comment else ""),
                        groups=a.groups, bypass=a.bypass)
        for a in PlanApproval.objects.filter(plan=plan)
    ])
