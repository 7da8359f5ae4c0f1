"""A move plan's approval follows the active approval policy: each move is judged at submission,
moves the policy rejects are skipped with its reason, the plan waits for the stages of its strictest
move (signed as a request's are), and a plan whose moves are all approved by the policy starts at once."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User

from migrations_app.choices import AuditAction, AuditOutcome, PlanItemStatus, PlanKind, PlanStatus, RequestStatus, Role
from migrations_app.models import AuditEntry, Host, MigrationRequest, MovePlan, PlanApproval, RequestApproval
from migrations_app.selectors import approval_stages
from migrations_app.services import plans as svc
from migrations_app.services.errors import ActionRefused
from tests.conftest import install_policy, make_user
from tests.simdc import evacuation_state, simulated_connection

pytestmark = pytest.mark.django_db
P, Item, S = PlanStatus, PlanItemStatus, RequestStatus
PROD = "env:production"

NEVER_PROD = {"name": "No prod moves", "description": "", "rules": [
    {"name": "Production never moves", "when": {"tags_any": [PROD]}, "action": "auto_reject",
     "reject_reason": "production is frozen"},
    {"name": "rest", "when": {}, "action": "stages",
     "stages": [{"name": "Review", "groups": ["approver"], "mode": "any"}]}]}


def submitted(tmp_path, users, tags, *, name="evac", n=3):
    conn = simulated_connection(tmp_path / f"{name}.json", evacuation_state(n, local_vm=False, tags=tags), name=name)
    src = Host.objects.get(connection=conn, name="src.lab")
    plan = svc.move_plan_build(requester=users["carol"], kind=PlanKind.EVACUATE_HOST, host=src, reason="fw")
    return svc.move_plan_submit(plan=plan, actor=users["carol"])


def fresh(plan):
    return MovePlan.objects.get(pk=plan.pk)


def test_a_production_vm_makes_the_plan_wait_for_two_distinct_approvers(tmp_path, users):
    plan = submitted(tmp_path, users, {0: [PROD]})  # the shipped policy: production needs two stages
    assert plan.status == P.PENDING_APPROVAL
    assert plan.approval_plan["rule"] == "Production VMs need two distinct approvers"
    assert plan.approval_plan["strictest_vm"] == "app-00" and len(plan.stages) == 2
    svc.move_plan_approve(plan=plan, actor=users["erin"], comment="first look")
    assert fresh(plan).status == P.PENDING_APPROVAL and not MigrationRequest.objects.exists()
    with pytest.raises(ActionRefused, match="you signed stage 1"):
        svc.move_plan_approve(plan=plan, actor=users["erin"])
    assert fresh(plan).status == P.PENDING_APPROVAL
    svc.move_plan_approve(plan=plan, actor=users["bob"], comment="second look")
    plan = fresh(plan)
    assert plan.status == P.RUNNING and plan.decided_by == users["bob"]
    actions = list(AuditEntry.objects.filter(object_type="move_plan", object_id=str(plan.pk))
                   .exclude(outcome=AuditOutcome.DENIED).order_by("id").values_list("action", flat=True))
    assert actions == [AuditAction.PLAN_BUILT, AuditAction.PLAN_SUBMITTED, AuditAction.PLAN_STAGE_APPROVED,
                       AuditAction.PLAN_APPROVED, AuditAction.PLAN_STARTED]
    # Every move's request carries the plan's true stages and who signed them.
    for mr in MigrationRequest.objects.all():
        assert mr.status == S.QUEUED and len(mr.stages) == 2 and mr.current_stage == 2
        assert [(v.state, v.signed) for v in approval_stages(mr)] == [("done", ("erin",)), ("done", ("bob",))]
        assert mr.decision_comment == f"approved as part of plan #{plan.pk}, signed by erin (stage 1), bob (stage 2)"
    assert RequestApproval.objects.count() == 2 * 3


def test_a_plan_whose_moves_the_policy_all_approves_starts_on_submit(tmp_path, users):
    plan = submitted(tmp_path, users, {})  # small same-cluster compute moves: approved by the shipped policy
    assert plan.status == P.RUNNING and plan.decided_by is None and plan.stages == []
    assert "approved by policy" in plan.decision_comment
    assert AuditEntry.objects.filter(action=AuditAction.PLAN_AUTO_APPROVED, actor=None).count() == 1
    assert MigrationRequest.objects.filter(status=S.QUEUED).count() == 3
    assert AuditEntry.objects.filter(action=AuditAction.REQUEST_AUTO_APPROVED).count() == 3
    with pytest.raises(ActionRefused, match="running"):
        svc.move_plan_approve(plan=plan, actor=users["erin"])


def test_a_move_the_policy_rejects_is_skipped_with_its_reason(tmp_path, users, client):
    install_policy(NEVER_PROD)
    plan = submitted(tmp_path, users, {0: [PROD]})
    skipped = plan.items.get(vm__name="app-00")
    assert skipped.status == Item.SKIPPED and not skipped.movable and "production is frozen" in skipped.explanation
    entry = AuditEntry.objects.get(action=AuditAction.PLAN_ITEM_SETTLED, vm_name="app-00")
    assert entry.data["reject_reason"] == "production is frozen" and entry.data["policy"]["rule"] == "Production never moves"
    assert plan.status == P.PENDING_APPROVAL and plan.approval_plan["rule"] == "rest"
    client.force_login(users["erin"])
    page = client.get(f"/plans/{plan.pk}/").content.decode()
    assert "production is frozen" in page and "2 of 3 VMs move" in page
    svc.move_plan_approve(plan=plan, actor=users["erin"])
    assert sorted(MigrationRequest.objects.values_list("vm__name", flat=True)) == ["app-01", "app-02"]
    assert fresh(plan).items.get(vm__name="app-00").request is None


def test_a_plan_the_policy_refuses_entirely_cannot_be_submitted(tmp_path, users):
    install_policy(NEVER_PROD)
    with pytest.raises(ActionRefused, match="refuses every move"):
        submitted(tmp_path, users, {0: [PROD], 1: [PROD]}, n=2)
    plan = MovePlan.objects.get()
    assert plan.status == P.DRAFT and set(plan.items.values_list("status", flat=True)) == {Item.PLANNED}


def test_the_plan_needs_the_stages_of_its_strictest_move_ties_to_the_first_rule(tmp_path, users):
    install_policy({"name": "Tiers", "description": "", "rules": [
        {"name": "one-a", "when": {"tags_any": ["a"]}, "action": "stages",
         "stages": [{"name": "A", "groups": ["approver"], "mode": "any"}]},
        {"name": "two", "when": {"tags_any": ["t"]}, "action": "stages",
         "stages": [{"name": "T1", "groups": ["approver"], "mode": "any"},
                    {"name": "T2", "groups": ["approver"], "mode": "any"}]},
        {"name": "one-b", "when": {"tags_any": ["b"]}, "action": "stages",
         "stages": [{"name": "B", "groups": ["approver"], "mode": "any"}]},
        {"name": "rest", "when": {}, "action": "auto_approve"}]})
    tie = submitted(tmp_path, users, {0: ["b"], 1: ["a"]}, name="tie")
    assert tie.approval_plan["rule"] == "one-a" and [s.name for s in tie.stages] == ["A"]
    most = submitted(tmp_path, users, {0: ["a"], 1: ["t"]}, name="most")
    assert most.approval_plan["rule"] == "two" and most.approval_plan["strictest_vm"] == "app-01"


@pytest.mark.parametrize("bypass", [False, True])
def test_an_admin_decides_a_plan_only_through_the_bypass(tmp_path, users, settings, bypass):
    settings.PORTAL = {**settings.PORTAL, "ADMIN_BYPASS_APPROVAL": bypass}
    admin2 = make_user("admin2", Role.ADMIN)
    plan = submitted(tmp_path, users, {0: [PROD]})
    if not bypass:
        with pytest.raises(ActionRefused, match="you are not in approver"):
            svc.move_plan_approve(plan=plan, actor=admin2, comment="go")
        assert fresh(plan).status == P.PENDING_APPROVAL and not MigrationRequest.objects.exists()
        return
    svc.move_plan_approve(plan=plan, actor=admin2, comment="")
    plan = fresh(plan)
    assert plan.status == P.RUNNING and plan.current_stage == 2
    entry = AuditEntry.objects.get(action=AuditAction.PLAN_BYPASS_APPROVED)
    assert entry.actor == admin2 and entry.data["bypass"] is True and "stages 1-2 not signed" in entry.reason
    assert PlanApproval.objects.get().bypass
    mr = MigrationRequest.objects.get(vm__name="app-00")
    assert [v.signed for v in approval_stages(mr)] == [("admin2 (admin bypass)",), ()]


def test_the_plan_page_and_the_approvals_page_show_the_stages_and_offer_a_decision_only_to_who_may_act(
        tmp_path, users, client):
    plan = submitted(tmp_path, users, {0: [PROD]})
    svc.move_plan_approve(plan=plan, actor=users["erin"])
    client.force_login(users["erin"])
    page = client.get(f"/plans/{plan.pk}/").content.decode()
    assert "Stage 1 of 2 (First review)" in page and "(1 of 1: erin)" in page and 'id="plan-approve"' not in page
    cards = client.get("/approvals/").content.decode()
    assert f'data-plan-id="{plan.pk}"' in cards and "you signed stage 1" in cards
    client.force_login(users["bob"])
    page = client.get(f"/plans/{plan.pk}/").content.decode()
    assert 'id="plan-approve"' in page and "stage 2 of 2" in page
    assert "and decide" in client.get("/plans/queue/").content.decode()


def test_moves_under_different_rules_make_the_plan_need_what_each_rule_asks_for(tmp_path, users):
    make_user("sam", Role.APPROVER, teams=("security",))
    install_policy({"name": "Tiers", "description": "", "rules": [
        {"name": "prod", "when": {"tags_any": [PROD]}, "action": "stages",
         "stages": [{"name": "P1", "groups": ["approver"], "mode": "any"},
                    {"name": "P2", "groups": ["approver"], "mode": "any"}]},
        {"name": "pci", "when": {"tags_any": ["pci"]}, "action": "stages",
         "stages": [{"name": "Security", "groups": ["security"], "mode": "any"}]},
        {"name": "rest", "when": {}, "action": "auto_approve"}]})
    plan = submitted(tmp_path, users, {0: [PROD], 1: ["pci"]})
    assert plan.approval_plan["rule"] == "prod + pci"
    assert [s.groups for s in plan.stages] == [("approver",), ("approver",), ("security",)]
    svc.move_plan_approve(plan=plan, actor=users["erin"])
    svc.move_plan_approve(plan=plan, actor=users["bob"])
    plan = fresh(plan)
    assert plan.status == P.PENDING_APPROVAL and not MigrationRequest.objects.exists()  # security has not signed
    with pytest.raises(ActionRefused):
        svc.move_plan_approve(plan=plan, actor=users["erin"])  # not in security, and signed already
    svc.move_plan_approve(plan=plan, actor=User.objects.get(username="sam"))
    assert fresh(plan).status == P.RUNNING
    pci = MigrationRequest.objects.get(vm__name="app-01")
    assert pci.approvals.filter(approver__username="sam", groups=["security"]).exists()


def test_a_cold_move_of_a_running_vm_is_judged_with_the_whole_move_as_downtime(tmp_path, users):
    install_policy({"name": "Short downtime goes", "description": "", "rules": [
        {"name": "short switchover", "when": {"downtime_ms_at_most": 5000}, "action": "auto_approve"},
        {"name": "rest", "when": {}, "action": "stages",
         "stages": [{"name": "Review", "groups": ["approver"], "mode": "any"}]}]})
    conn = simulated_connection(tmp_path / "c.json", evacuation_state(0, local_vm=True))
    src = Host.objects.get(connection=conn, name="src.lab")
    plan = svc.move_plan_build(requester=users["carol"], kind=PlanKind.EVACUATE_HOST, host=src, reason="fw")
    stuck = plan.items.select_related("vm").get(movable=False)
    assert stuck.vm.power_state == "on"
    svc.move_plan_set_fallback(plan=plan, actor=users["carol"], item=stuck, fallback="cold_move")
    plan = svc.move_plan_submit(plan=plan, actor=users["carol"])
    assert fresh(plan).status == P.PENDING_APPROVAL and plan.approval_plan["rule"] == "rest"
    assert not MigrationRequest.objects.exists()  # powering a running VM off is never approved by itself


def test_a_plan_approved_through_the_bypass_audits_each_move_as_a_bypass(tmp_path, users, settings):
    settings.PORTAL = {**settings.PORTAL, "ADMIN_BYPASS_APPROVAL": True}
    plan = submitted(tmp_path, users, {0: [PROD]}, n=1)
    svc.move_plan_approve(plan=plan, actor=make_user("admin2", Role.ADMIN))
    mr = MigrationRequest.objects.get()
    actions = list(AuditEntry.objects.filter(request=mr).order_by("pk").values_list("action", flat=True))
    assert AuditAction.REQUEST_BYPASS_APPROVED in actions and AuditAction.REQUEST_APPROVED not in actions
