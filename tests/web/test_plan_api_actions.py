"""The JSON API for move plans, acting: fallbacks, submit, approve, reject and cancel call the plan
services, which refuse with 403 (rights, the four-eyes rules: never one's own plan, one person one
stage), 409 (the plan's state) or 400 (input, naming the field); unknown ids are 404; a refused
call changes nothing and is audited; every action against every role."""

from __future__ import annotations

import pytest
from django.test import Client

from migrations_app.choices import (
    TERMINAL,
    AuditAction,
    AuditOutcome,
    PlanItemStatus,
    PlanStatus,
    RequestStatus,
    Role,
)
from migrations_app.models import (
    AuditEntry,
    MigrationRequest,
    PlanApproval,
    PlanItem,
)
from migrations_app.services import plans as svc
from tests.conftest import client_for, install_policy, make_user
from tests.simdc import evacuation_state, simulated_connection
from tests.web.plan_api_helpers import (
    ROLES,
    TWO_DISTINCT,
    TWO_STAGES,
    built,
    client,
    denied,
    post,
    status_of,
    submitted,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("review_everything")]
P, Item = PlanStatus, PlanItemStatus


# -- fallbacks ---------------------------------------------------------------------------------


def test_fallback_refusals_change_nothing(users, evac_dc):
    plan = built(evac_dc, users)
    other = built(evac_dc, users)
    stuck = plan.items.get(movable=False)
    live = plan.items.filter(movable=True).first()
    carol, url = client_for(users["carol"]), f"/api/plans/{plan.pk}/items/{stuck.pk}/fallback/"
    cases = [
        (carol, f"/api/plans/{plan.pk}/items/999999/fallback/", {"fallback": "cold_move"}, 404, None),
        (carol, f"/api/plans/{plan.pk}/items/{other.items.get(movable=False).pk}/fallback/",
         {"fallback": "cold_move"}, 404, None),  # an item of another plan
        (carol, "/api/plans/999999/items/1/fallback/", {"fallback": "cold_move"}, 404, None),
        (carol, f"/api/plans/{plan.pk}/items/{live.pk}/fallback/", {"fallback": "cold_move"}, 400, "fallback"),
        (carol, url, {"fallback": "teleport"}, 400, "fallback"),
        (carol, url, {"fallback": 1}, 400, "fallback"),
        (carol, url, {}, 400, "fallback"),
        (carol, url, {"fallback": "cold_move", "vm": 1}, 400, "vm"),
        (client_for(users["erin"]), url, {"fallback": "cold_move"}, 403, None),  # not her plan
        (client_for(users["dave"]), url, {"fallback": "cold_move"}, 403, None),
        (client_for(users["alice"]), url, {"fallback": "cold_move"}, 404, None),  # may not see plans
    ]
    for c, path, payload, status, field in cases:
        response = post(c, path, payload)
        assert (response.status_code, response.json()["field"]) == (status, field), (path, payload, response.content)
    assert set(PlanItem.objects.values_list("fallback", flat=True)) == {"", "skip"}
    svc.move_plan_submit(plan=plan, actor=users["carol"])
    response = post(carol, url, {"fallback": "cold_move"})
    assert response.status_code == 409 and "pending approval" in response.json()["error"]
    assert PlanItem.objects.get(pk=stuck.pk).fallback == "skip"


def test_cold_move_is_not_offered_where_the_driver_cannot(users, evac_dc, monkeypatch):
    from drivers.base import Capability
    from drivers.simulator import SimulatorDriver

    monkeypatch.setattr(SimulatorDriver, "capabilities", SimulatorDriver.capabilities & ~Capability.COLD_MOVE)
    plan = built(evac_dc, users)
    stuck = plan.items.get(movable=False)
    body = client_for(users["carol"]).get(f"/api/plans/{plan.pk}/").json()
    assert body["fallback_options"] == ["skip"]
    assert next(i for i in body["items"] if i["id"] == stuck.pk)["fallback_options"] == ["skip"]
    response = post(client_for(users["carol"]), f"/api/plans/{plan.pk}/items/{stuck.pk}/fallback/",
                    {"fallback": "cold_move"})
    assert response.status_code == 400 and "not a fallback this hypervisor offers" in response.json()["error"]


# -- submit, approve, reject, cancel: who and when -----------------------------------------------


@pytest.mark.parametrize("role, status", [("erin", 403), ("dave", 403), ("alice", 404), ("mallory", 404),
                                          ("anonymous", 401)])
def test_only_the_admin_who_built_it_submits(users, evac_dc, role, status):
    plan = built(evac_dc, users)
    response = post(client(users, role), f"/api/plans/{plan.pk}/submit/")
    assert response.status_code == status
    assert status_of(plan) == P.DRAFT
    frank = make_user("frank", Role.ADMIN)  # another admin: not the plan's requester
    assert post(client_for(frank), f"/api/plans/{plan.pk}/submit/").status_code == 403
    assert status_of(plan) == P.DRAFT


def test_the_requester_never_approves_or_rejects_their_own_plan(users, evac_dc, settings):
    settings.PORTAL = {**settings.PORTAL, "ADMIN_BYPASS_APPROVAL": True}  # not even with the bypass
    plan = submitted(evac_dc, users)
    carol = client_for(users["carol"])
    before = denied(AuditAction.PLAN_APPROVED)
    response = post(carol, f"/api/plans/{plan.pk}/approve/", {"comment": "mine"})
    assert response.status_code == 403 and "your own plan" in response.json()["error"]
    response = post(carol, f"/api/plans/{plan.pk}/reject/", {"reason": "mine"})
    assert response.status_code == 403 and "your own plan" in response.json()["error"]
    assert denied(AuditAction.PLAN_APPROVED) == before + 1
    assert status_of(plan) == P.PENDING_APPROVAL and not PlanApproval.objects.exists()


@pytest.mark.parametrize("action", ["approve", "reject"])
@pytest.mark.parametrize("role, status", [("dave", 403), ("alice", 404), ("mallory", 404), ("anonymous", 401)])
def test_only_approvers_decide(users, evac_dc, action, role, status):
    plan = submitted(evac_dc, users)
    response = post(client(users, role), f"/api/plans/{plan.pk}/{action}/", {
        "comment": "ok"} if action == "approve" else {"reason": "no"})
    assert response.status_code == status
    if status == 403:
        assert "only approvers" in response.json()["error"]
    assert status_of(plan) == P.PENDING_APPROVAL and not PlanApproval.objects.exists()


def test_one_person_signs_one_stage(users, evac_dc):
    install_policy(TWO_STAGES)
    plan = submitted(evac_dc, users)
    erin, bob = client_for(users["erin"]), client_for(users["bob"])
    body = post(erin, f"/api/plans/{plan.pk}/approve/", {"comment": "ops ok"}).json()
    assert body["status"] == "pending_approval" and body["approval"]["current_stage"] == 2
    assert [(s["state"], [x["approver"] for x in s["signed"]]) for s in body["approval"]["stages"]] == [
        ("done", ["erin"]), ("current", [])]
    assert body["allowed"]["decide"] is False
    for action, payload in (("approve", {}), ("reject", {"reason": "changed my mind"})):
        response = post(erin, f"/api/plans/{plan.pk}/{action}/", payload)
        assert response.status_code == 403 and "you signed stage 1" in response.json()["error"], action
    assert status_of(plan) == P.PENDING_APPROVAL and PlanApproval.objects.count() == 1
    body = post(bob, f"/api/plans/{plan.pk}/approve/", {"comment": "board ok"}).json()
    assert body["status"] == "running" and body["decision"]["by"] == "bob"
    assert [[x["approver"] for x in s["signed"]] for s in body["approval"]["stages"]] == [["erin"], ["bob"]]


def test_signing_a_stage_twice_is_a_conflict(users, evac_dc):
    install_policy(TWO_DISTINCT)
    plan = submitted(evac_dc, users)
    erin = client_for(users["erin"])
    assert post(erin, f"/api/plans/{plan.pk}/approve/").status_code == 200
    response = post(erin, f"/api/plans/{plan.pk}/approve/")
    assert response.status_code == 409 and "already approved stage 1" in response.json()["error"]
    assert PlanApproval.objects.count() == 1 and status_of(plan) == P.PENDING_APPROVAL


def test_the_admin_bypass_lets_another_admin_approve(users, evac_dc, settings):
    plan = submitted(evac_dc, users)
    frank = client_for(make_user("frank", Role.ADMIN))
    assert post(frank, f"/api/plans/{plan.pk}/approve/").status_code == 403  # bypass off: admins do not sign
    settings.PORTAL = {**settings.PORTAL, "ADMIN_BYPASS_APPROVAL": True}
    body = post(frank, f"/api/plans/{plan.pk}/approve/", {"comment": "emergency"}).json()
    assert body["status"] == "running" and body["approval"]["stages"][0]["signed"][0]["bypass"] is True


def test_reject_needs_a_reason(users, evac_dc):
    plan = submitted(evac_dc, users)
    erin = client_for(users["erin"])
    for payload, field in (({}, "reason"), ({"reason": "  "}, "reason"), ({"reason": 3}, "reason"),
                           ({"comment": "no"}, "comment")):
        response = post(erin, f"/api/plans/{plan.pk}/reject/", payload)
        assert (response.status_code, response.json()["field"]) == (400, field), payload
    assert status_of(plan) == P.PENDING_APPROVAL
    body = post(erin, f"/api/plans/{plan.pk}/reject/", {"reason": "not during the freeze"}).json()
    assert body["status"] == "rejected" and body["decision"]["comment"] == "not during the freeze"
    assert {i["status"] for i in body["items"]} == {"cancelled"}
    assert set(PlanItem.objects.filter(plan=plan).values_list("status", flat=True)) == {Item.CANCELLED}


def test_cancel_a_draft_and_stop_a_running_plan(users, evac_dc, django_capture_on_commit_callbacks):
    draft = built(evac_dc, users)
    assert post(client_for(users["erin"]), f"/api/plans/{draft.pk}/cancel/").status_code == 403
    assert post(client_for(users["dave"]), f"/api/plans/{draft.pk}/cancel/").status_code == 403
    body = post(client_for(users["carol"]), f"/api/plans/{draft.pk}/cancel/", {"reason": "wrong host"}).json()
    assert body["status"] == "cancelled" and body["finished_at"]

    plan = submitted(evac_dc, users)
    svc.move_plan_approve(plan=plan, actor=users["erin"])
    with django_capture_on_commit_callbacks(execute=True):  # the moves' bookkeeping runs on commit
        response = post(make_admin_client(), f"/api/plans/{plan.pk}/cancel/", {"reason": "abort"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["cancel_requested_at"] and body["allowed"]["cancel"] is False
    assert {i["request"]["status"] for i in body["items"] if i["request"]} == {RequestStatus.CANCELLED}
    assert status_of(plan) == P.CANCELLED  # every move was still queued: the plan ends at once


def make_admin_client() -> Client:
    """Another admin than the plan's requester: admins may stop any plan."""
    return client_for(make_user("grace", Role.ADMIN))


@pytest.mark.parametrize("action, payload", [
    ("submit", {}), ("approve", {}), ("reject", {"reason": "x"}), ("cancel", {}),
])
def test_an_action_the_state_does_not_allow_is_a_409(users, evac_dc, action, payload):
    plan = built(evac_dc, users)
    svc.move_plan_cancel(plan=plan, actor=users["carol"])
    actor = "erin" if action in ("approve", "reject") else "carol"
    response = post(client_for(users[actor]), f"/api/plans/{plan.pk}/{action}/", payload)
    assert response.status_code == 409, response.content
    assert "cancelled" in response.json()["error"]
    assert status_of(plan) == P.CANCELLED


def test_deciding_a_draft_and_submitting_twice_are_conflicts(users, evac_dc):
    plan = built(evac_dc, users)
    response = post(client_for(users["erin"]), f"/api/plans/{plan.pk}/approve/")
    assert response.status_code == 409 and "draft" in response.json()["error"]
    assert post(client_for(users["carol"]), f"/api/plans/{plan.pk}/submit/").status_code == 200
    response = post(client_for(users["carol"]), f"/api/plans/{plan.pk}/submit/")
    assert response.status_code == 409 and "pending approval" in response.json()["error"]


def test_a_plan_with_nothing_to_move_cannot_be_submitted(users, tmp_path):
    conn = simulated_connection(tmp_path / "stuck.json", evacuation_state(0))  # only the pinned VM
    plan = built(conn, users)
    response = post(client_for(users["carol"]), f"/api/plans/{plan.pk}/submit/")
    assert response.status_code == 409 and "nothing in this plan can move" in response.json()["error"]
    assert status_of(plan) == P.DRAFT and AuditEntry.objects.filter(
        action=AuditAction.PLAN_SUBMITTED, outcome=AuditOutcome.DENIED).count() == 1


@pytest.mark.parametrize("action", ["submit", "approve", "reject", "cancel"])
@pytest.mark.parametrize("raw, field", [
    ("{oops", None),
    ('"a string"', None),
    ('{"comment": 5}', "comment"),
    ('{"reason": ["x"]}', "reason"),
    ('{"why": "x"}', "why"),
])
def test_bad_action_bodies_are_400s_that_change_nothing(users, evac_dc, action, raw, field):
    plan = submitted(evac_dc, users) if action in ("approve", "reject") else built(evac_dc, users)
    before = status_of(plan)
    actor = "erin" if action in ("approve", "reject") else "carol"
    response = post(client_for(users[actor]), f"/api/plans/{plan.pk}/{action}/", raw=raw)
    assert response.status_code == 400, response.content
    assert response.json()["field"] == field
    if field is not None:  # a field this action takes has the wrong type; any other is unknown to it
        takes = {"approve": "comment", "reject": "reason", "cancel": "reason"}.get(action)
        expected = f"{field} must be a string" if field == takes else f"unknown field '{field}'"
        assert expected in response.json()["error"], response.json()
    assert status_of(plan) == before and not PlanApproval.objects.exists()


@pytest.mark.parametrize("action", ["submit", "approve", "reject", "cancel"])
def test_actions_on_an_unknown_plan_are_404s(users, evac_dc, action):
    response = post(client_for(users["carol"]), f"/api/plans/999999/{action}/", {"reason": "x"})
    assert response.status_code == 404 and response.json()["error"] == "no such plan"


def test_the_api_is_csrf_protected_like_the_pages(users, evac_dc):
    """A session's POST needs its CSRF token in X-CSRFToken (what the README's curl example sends)."""
    plan = built(evac_dc, users)
    c = Client(enforce_csrf_checks=True)
    c.force_login(users["carol"])
    assert post(c, f"/api/plans/{plan.pk}/submit/").status_code == 403
    assert status_of(plan) == P.DRAFT
    c.get("/login/")  # sets the csrftoken cookie
    token = c.cookies["csrftoken"].value
    response = c.post(f"/api/plans/{plan.pk}/submit/", data="{}", content_type="application/json",
                      HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 200 and status_of(plan) == P.PENDING_APPROVAL



# -- every endpoint against every role -----------------------------------------------------------

# (endpoint, the plan's state, the body, the answer for each role): only the plan's admin edits,
# submits and withdraws it; only an approver other than its requester decides; requesters are told
# it does not exist (they may see no plan); nobody logged out gets further than 401.
WRITES = [
    ("fallback", "draft", {"fallback": "cold_move"}, {"erin": 403, "dave": 403, "carol": 200}),
    ("submit", "draft", {}, {"erin": 403, "dave": 403, "carol": 200}),
    ("cancel", "draft", {"reason": "x"}, {"erin": 403, "dave": 403, "carol": 200}),
    ("approve", "pending", {"comment": "x"}, {"erin": 200, "dave": 403, "carol": 403}),
    ("reject", "pending", {"reason": "x"}, {"erin": 200, "dave": 403, "carol": 403}),
]


@pytest.mark.parametrize("action, state, payload, answers", WRITES, ids=[w[0] for w in WRITES])
def test_every_action_against_every_role(users, evac_dc, action, state, payload, answers):
    answers = {"anonymous": 401, "alice": 404, "mallory": 404, **answers}
    for role in ROLES:
        plan = submitted(evac_dc, users) if state == "pending" else built(evac_dc, users)
        before = (status_of(plan), sorted(PlanItem.objects.filter(plan=plan).values_list("fallback", flat=True)))
        path = (f"/api/plans/{plan.pk}/items/{plan.items.get(movable=False).pk}/fallback/" if action == "fallback"
                else f"/api/plans/{plan.pk}/{action}/")
        response = post(client(users, role), path, payload)
        assert response.status_code == answers[role], (role, action, response.content)
        after = (status_of(plan), sorted(PlanItem.objects.filter(plan=plan).values_list("fallback", flat=True)))
        assert (after != before) == (response.status_code == 200), (role, action)
        # Setup only: retire this round's moves so the next round's plan has its VMs to move.
        MigrationRequest.objects.exclude(status__in=TERMINAL).update(status=RequestStatus.CANCELLED)


