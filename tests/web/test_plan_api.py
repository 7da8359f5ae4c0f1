"""The JSON API for move plans, reading and building: the whole path through the API, the list's
filters and pages, one plan's items, stages, signatures and progress, who may read, and bad build
input (a 400 naming the field, 404 for an unknown subject; nothing built). The actions' refusals
are in test_plan_api_actions.py."""

from __future__ import annotations

import pytest
from django.test import Client

from migrations_app.choices import (
    AuditAction,
    AuditOutcome,
    PlanItemStatus,
    PlanKind,
    PlanStatus,
    RequestStatus,
    Role,
)
from migrations_app.models import (
    AuditEntry,
    Datastore,
    Host,
    MigrationRequest,
    MigrationRun,
    MovePlan,
    PlanItem,
)
from migrations_app.services import plans as svc
from migrations_app.services.runs import migration_run_execute
from tests.conftest import client_for, install_policy, make_user
from tests.simdc import evacuation_state, simulated_connection
from tests.web.plan_api_helpers import (
    AUTO,
    ROLES,
    SEE_PLANS,
    built,
    client,
    denied,
    post,
    src_host,
    status_of,
    submitted,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("review_everything")]
P, Item = PlanStatus, PlanItemStatus


# -- the whole path ----------------------------------------------------------------------------


def test_build_choose_a_fallback_submit_and_approve_through_the_api(users, evac_dc):
    carol, erin = client_for(users["carol"]), client_for(users["erin"])
    response = post(carol, "/api/plans/", {"kind": "evacuate_host", "host_id": src_host(evac_dc).pk,
                                           "reason": "BIOS update"})
    assert response.status_code == 201, response.content
    plan = response.json()
    assert response["Location"] == f"/api/plans/{plan['id']}/"
    assert (plan["status"], plan["kind"], plan["requester"], plan["reason"]) == (
        "draft", "evacuate_host", "carol", "BIOS update")
    assert plan["subject"] == {"type": "host", "id": src_host(evac_dc).pk, "name": "src.lab"}
    assert plan["allowed"] == {"edit": True, "decide": False, "cancel": True}
    assert plan["approval"] is None and plan["decision"] is None
    assert plan["progress"]["done"] == 0 and plan["progress"]["total"] == 5
    assert plan["fallback_options"] == ["skip", "cold_move"]  # the simulator cold-moves
    items = {i["vm"]["name"]: i for i in plan["items"]}
    stuck = items["pinned-local"]
    assert not stuck["movable"] and stuck["fallback"] == "skip" and stuck["blocker"]
    assert stuck["fallback_options"] == ["skip", "cold_move"] and not stuck["moves"]
    live = items["app-00"]
    assert live["movable"] and live["source_host"]["name"] == "src.lab" and live["target_host"]["name"] != "src.lab"
    assert live["status"] == "planned" and live["request"] is None and live["fallback_options"] == []
    assert [i["order"] for i in plan["items"]] == sorted(i["order"] for i in plan["items"])

    # erin sees it, but it is carol's draft: erin may do nothing with it yet.
    assert client_for(users["erin"]).get(f"/api/plans/{plan['id']}/").json()["allowed"] == {
        "edit": False, "decide": False, "cancel": False}

    response = post(carol, f"/api/plans/{plan['id']}/items/{stuck['id']}/fallback/", {"fallback": "cold_move"})
    assert response.status_code == 200, response.content
    assert next(i for i in response.json()["items"] if i["id"] == stuck["id"])["fallback"] == "cold_move"
    assert PlanItem.objects.get(pk=stuck["id"]).fallback == "cold_move"

    response = post(carol, f"/api/plans/{plan['id']}/submit/")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "pending_approval" and body["allowed"]["edit"] is False
    approval = body["approval"]
    assert approval["action"] == "stages" and approval["current_stage"] == 1 and approval["strictest_vm"]
    assert [(s["number"], s["state"], s["signed"]) for s in approval["stages"]] == [(1, "current", [])]
    assert approval["stages"][0]["needs"] == "one approver from approver"
    assert erin.get(f"/api/plans/{plan['id']}/").json()["allowed"]["decide"] is True

    response = post(erin, f"/api/plans/{plan['id']}/approve/", {"comment": "go ahead"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "running"
    assert body["decision"]["by"] == "erin" and body["decision"]["comment"] == "go ahead"
    signed = body["approval"]["stages"][0]["signed"]
    assert [(s["approver"], s["comment"], s["bypass"]) for s in signed] == [("erin", "go ahead", False)]
    assert body["approval"]["current_stage"] is None and body["approval"]["stages"][0]["state"] == "done"
    assert body["progress"]["moving_vms"] == 5 and body["progress"]["by_status"]["moving"] == 5
    for item in body["items"]:
        mr = MigrationRequest.objects.get(pk=item["request"]["id"])
        assert item["status"] == "moving" and item["request"]["status"] == mr.status == RequestStatus.QUEUED
        assert item["request"]["run"]["id"] == mr.run.pk and item["attempts"] == 1
    assert MigrationRequest.objects.get(plan_items__pk=stuck["id"]).cold
    assert AuditEntry.objects.filter(action=AuditAction.PLAN_APPROVED, actor=users["erin"]).exists()


def test_the_plan_shows_each_move_end_and_its_progress(users, evac_dc, django_capture_on_commit_callbacks):
    plan = submitted(evac_dc, users)
    svc.move_plan_approve(plan=plan, actor=users["erin"])
    run = MigrationRun.objects.filter(request__plan_items__plan=plan).order_by("pk").first()
    with django_capture_on_commit_callbacks(execute=True):
        migration_run_execute(run_id=run.pk, worker="w1")
    body = client_for(users["dave"]).get(f"/api/plans/{plan.pk}/").json()
    moved = next(i for i in body["items"] if i["request"] and i["request"]["id"] == run.request_id)
    assert moved["status"] == "succeeded" and moved["request"]["status"] == "succeeded"
    assert moved["request"]["run"]["percent"] == 100.0 and moved["explanation"]
    stayed = next(i for i in body["items"] if i["vm"]["name"] == "pinned-local")
    assert stayed["status"] == "skipped"  # fallback skip: it stays, and counts as ended
    assert body["progress"]["done"] == 2 and body["progress"]["total"] == 5 and body["progress"]["percent"] == 40.0
    listed = client_for(users["dave"]).get("/api/plans/").json()["results"][0]
    assert listed["id"] == plan.pk and listed["progress"] == {"done": 2, "total": 5, "percent": 40.0}


def test_each_kind_of_plan_is_built_from_its_own_subject(users, evac_dc):
    carol = client_for(users["carol"])
    store = Datastore.objects.get(connection=evac_dc, name="src-local")
    cluster = src_host(evac_dc).cluster
    for payload, subject in [
        ({"kind": "evacuate_datastore", "datastore_id": store.pk}, {"type": "datastore", "name": "src-local"}),
        ({"kind": "rebalance_cluster", "cluster_id": cluster.pk}, {"type": "cluster", "name": "Cluster-0"}),
    ]:
        response = post(carol, "/api/plans/", {**payload, "reason": "upgrade"})
        assert response.status_code == 201, response.content
        assert {k: response.json()["subject"][k] for k in ("type", "name")} == subject
    rebalance = MovePlan.objects.get(kind=PlanKind.REBALANCE_CLUSTER)
    body = carol.get(f"/api/plans/{rebalance.pk}/").json()
    assert body["imbalance"] == {"before": rebalance.imbalance_before, "after": rebalance.imbalance_after}
    assert body["imbalance"]["before"] > body["imbalance"]["after"]


def test_a_plan_the_policy_approves_by_itself_starts_on_submit(users, tmp_path):
    install_policy(AUTO)
    conn = simulated_connection(tmp_path / "auto.json", evacuation_state(2, local_vm=False))
    plan = built(conn, users)
    body = post(client_for(users["carol"]), f"/api/plans/{plan.pk}/submit/").json()
    assert body["status"] == "running" and body["approval"]["action"] == "auto_approve"
    assert body["approval"]["stages"] == [] and body["decision"]["by"] is None
    assert "approved by policy" in body["decision"]["comment"]


# -- the list ----------------------------------------------------------------------------------


def test_the_list_filters_by_status_kind_and_mine_and_pages(users, evac_dc):
    frank = make_user("frank", Role.ADMIN)
    drafts = [built(evac_dc, users) for _ in range(3)]
    pending = submitted(evac_dc, users)
    franks = built(evac_dc, {"frank": frank}, "frank")
    rebalance = svc.move_plan_build(requester=users["carol"], kind=PlanKind.REBALANCE_CLUSTER, reason="x",
                                    cluster=src_host(evac_dc).cluster)
    carol = client_for(users["carol"])

    def ids(query: str) -> list[int]:
        response = carol.get(f"/api/plans/{query}")
        assert response.status_code == 200, (query, response.content)
        return [p["id"] for p in response.json()["results"]]

    newest_first = [rebalance.pk, franks.pk, pending.pk] + [p.pk for p in reversed(drafts)]
    assert ids("") == newest_first
    assert ids("?status=pending_approval") == [pending.pk]
    assert ids("?status=pending_approval,draft&kind=evacuate_host") == [franks.pk, pending.pk] + [
        p.pk for p in reversed(drafts)]
    assert ids("?status=pending_approval&status=draft&kind=evacuate_host&mine=true") == [
        pending.pk] + [p.pk for p in reversed(drafts)]
    assert ids("?kind=rebalance_cluster") == [rebalance.pk]
    assert ids("?mine=false") == [franks.pk]
    assert ids("?mine=1&status=cancelled") == []

    page = carol.get("/api/plans/?kind=evacuate_host&limit=2").json()
    assert page["count"] == 5 and page["limit"] == 2 and page["offset"] == 0
    assert [p["id"] for p in page["results"]] == [franks.pk, pending.pk]
    seen = [p["id"] for p in page["results"]]
    while page["next"]:
        assert "kind=evacuate_host" in page["next"]
        page = carol.get(page["next"]).json()
        seen += [p["id"] for p in page["results"]]
    assert seen == [franks.pk, pending.pk] + [p.pk for p in reversed(drafts)]
    assert page["offset"] == 4 and page["next"] is None
    summary = carol.get("/api/plans/?status=pending_approval").json()["results"][0]
    assert "items" not in summary and summary["progress"] == {"done": 0, "total": 5, "percent": 0.0}


@pytest.mark.parametrize("query, field", [
    ("status=bogus", "status"),
    ("status=draft,", "status"),
    ("kind=teleport", "kind"),
    ("mine=perhaps", "mine"),
    ("limit=0", "limit"),
    ("limit=201", "limit"),
    ("limit=ten", "limit"),
    ("limit=²", "limit"),  # a digit to str.isdigit, not to int()
    ("offset=99999999999", "offset"),
    ("offset=-1", "offset"),
    ("state=draft", "state"),  # a misspelt filter is not silently ignored
])
def test_a_bad_filter_is_a_400_naming_it(users, evac_dc, query, field):
    built(evac_dc, users)
    response = client_for(users["carol"]).get(f"/api/plans/?{query}")
    assert response.status_code == 400, response.content
    assert response.json()["field"] == field and response.json()["error"]


# -- who may read ------------------------------------------------------------------------------


def test_reads_against_every_role(users, evac_dc):
    plan = built(evac_dc, users)
    for role in ROLES:
        listed = client(users, role).get("/api/plans/")
        one = client(users, role).get(f"/api/plans/{plan.pk}/")
        if role == "anonymous":
            assert (listed.status_code, one.status_code) == (401, 401)
        elif role in SEE_PLANS:
            assert listed.status_code == 200 and [p["id"] for p in listed.json()["results"]] == [plan.pk], role
            assert one.status_code == 200 and one.json()["id"] == plan.pk, role
        else:  # requesters see no plans: the list says why, a plan is answered as absent
            assert listed.status_code == 403 and "may not see" in listed.json()["error"], role
            assert one.status_code == 404 and one.json()["error"] == "no such plan", role
    assert client_for(users["carol"]).get("/api/plans/999999/").status_code == 404


def test_refused_reads_are_audited(users, evac_dc):
    plan = built(evac_dc, users)
    before = denied(AuditAction.ACCESS_DENIED)
    client_for(users["mallory"]).get("/api/plans/")
    client_for(users["mallory"]).get(f"/api/plans/{plan.pk}/")
    post(client_for(users["alice"]), f"/api/plans/{plan.pk}/cancel/")
    entries = AuditEntry.objects.filter(action=AuditAction.ACCESS_DENIED, outcome=AuditOutcome.DENIED)
    assert entries.count() == before + 3
    assert set(entries.values_list("object_id", flat=True)) >= {
        "/api/plans/", f"/api/plans/{plan.pk}/", f"/api/plans/{plan.pk}/cancel/"}
    assert status_of(plan) == P.DRAFT


def test_wrong_methods_are_refused(users, evac_dc):
    plan = built(evac_dc, users)
    carol = client_for(users["carol"])
    assert carol.get(f"/api/plans/{plan.pk}/submit/").status_code == 405
    assert carol.delete("/api/plans/").status_code == 405
    assert post(carol, f"/api/plans/{plan.pk}/", {}).status_code == 405
    assert status_of(plan) == P.DRAFT


# -- build -------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, status, field, text", [
    (None, 400, None, "not valid JSON"),
    ([1, 2], 400, None, "JSON object"),
    ({"host_id": "HOST", "reason": "x"}, 400, "kind", "kind must be one of"),
    ({"kind": 3, "host_id": "HOST", "reason": "x"}, 400, "kind", "kind must be one of"),
    ({"kind": "teleport", "host_id": "HOST", "reason": "x"}, 400, "kind", "evacuate_host"),
    ({"kind": "evacuate_host", "reason": "x"}, 400, "host_id", "host_id is required"),
    ({"kind": "evacuate_host", "host_id": "1", "reason": "x"}, 400, "host_id", "integer id"),
    ({"kind": "evacuate_host", "host_id": True, "reason": "x"}, 400, "host_id", "integer id"),
    ({"kind": "evacuate_host", "host_id": 999999, "reason": "x"}, 404, "host_id", "no such host"),
    ({"kind": "evacuate_host", "host_id": 10**30, "reason": "x"}, 404, "host_id", "no such host"),
    ({"kind": "rebalance_cluster", "host_id": "HOST", "reason": "x"}, 400, "host_id", "give cluster_id"),
    ({"kind": "evacuate_host", "host_id": "HOST", "datastore_id": 1, "reason": "x"}, 400, "datastore_id",
     "does not apply"),
    ({"kind": "evacuate_host", "host_id": "HOST", "reason": "x", "strategy": "spread"}, 400, "strategy",
     "unknown field"),
    ({"kind": "evacuate_host", "host_id": "HOST", "reason": 7}, 400, "reason", "must be a string"),
    ({"kind": "evacuate_host", "host_id": "HOST", "reason": "x" * 2001}, 400, "reason", "longer than"),
    ({"kind": "evacuate_host", "host_id": "HOST"}, 400, "reason", "say why"),
    ({"kind": "evacuate_host", "host_id": "HOST", "reason": "   "}, 400, "reason", "say why"),
])
def test_bad_build_input_is_refused_and_builds_nothing(users, evac_dc, payload, status, field, text):
    if isinstance(payload, dict) and payload.get("host_id") == "HOST":
        payload = {**payload, "host_id": src_host(evac_dc).pk}
    raw = "{not json" if payload is None else None
    response = post(client_for(users["carol"]), "/api/plans/", payload, raw=raw)
    assert response.status_code == status, response.content
    assert response.json()["field"] == field and text in response.json()["error"]
    assert not MovePlan.objects.exists()


def test_a_host_gone_from_the_inventory_is_not_found(users, evac_dc):
    Host.objects.filter(pk=src_host(evac_dc).pk).update(present=False)
    response = post(client_for(users["carol"]), "/api/plans/", {"kind": "evacuate_host",
                                                                "host_id": src_host(evac_dc).pk, "reason": "x"})
    assert response.status_code == 404 and response.json()["field"] == "host_id"
    assert not MovePlan.objects.exists()


def test_only_admins_build_and_the_refusals_are_audited(users, evac_dc):
    payload = {"kind": "evacuate_host", "host_id": src_host(evac_dc).pk, "reason": "x"}
    before = denied(AuditAction.PLAN_BUILT)
    for role in ("alice", "mallory", "erin", "dave"):
        response = post(client_for(users[role]), "/api/plans/", payload)
        assert response.status_code == 403 and "only admins" in response.json()["error"], role
    assert post(Client(), "/api/plans/", payload).status_code == 401
    assert denied(AuditAction.PLAN_BUILT) == before + 4
    assert not MovePlan.objects.exists()
    assert post(client_for(users["carol"]), "/api/plans/", payload).status_code == 201




def test_reading_many_plans_costs_the_same_queries_as_reading_one(users, evac_dc, tmp_path):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    dave = client_for(users["dave"])
    small = built(evac_dc, users)
    dave.get("/api/plans/")  # the session and the user's groups are read once either way

    def queries(path: str) -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert dave.get(path).status_code == 200
        return len(ctx.captured_queries)

    one_plan, small_plan = queries("/api/plans/"), queries(f"/api/plans/{small.pk}/")
    big_dc = simulated_connection(tmp_path / "big.json", evacuation_state(12), name="big")
    for _ in range(4):
        big = built(big_dc, users)
    svc.move_plan_approve(plan=svc.move_plan_submit(plan=big, actor=users["carol"]), actor=users["erin"])
    assert queries("/api/plans/") == one_plan
    assert queries(f"/api/plans/{big.pk}/") <= small_plan + 2  # + the signatures and their approvers


