"""The JSON API's batch endpoints: submit many moves, approve many requests; every bad item is
named by its index and nothing is done."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from migrations_app.choices import AuditOutcome, RequestStatus
from migrations_app.models import AuditEntry, MigrationRequest, MigrationRun, RequestApproval, VirtualMachine
from tests.conftest import client_for, other_cluster_host, other_host_same_cluster

S = RequestStatus
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("review_everything")]


def post(client, url, payload):
    return client.post(url, data=json.dumps(payload), content_type="application/json")


def vms(conn, n):
    found = [vm for vm in VirtualMachine.objects.filter(connection=conn, power_state="on",
                                                        owner_group__name="team-web").order_by("pk")
             if not any(t.startswith("sim:") for t in vm.tags)]
    return found[:n]


def move(vm):
    return {"vm_id": vm.pk, "target_host_id": other_host_same_cluster(vm).pk}


def test_bulk_submit_then_bulk_approve(users, datacenter):
    a, b, c = vms(datacenter, 3)
    created = post(client_for(users["alice"]), "/api/requests/bulk/",
                   {"moves": [move(a), move(b), move(c)], "reason": "rack 12 maintenance"})
    assert created.status_code == 201, created.content
    results = created.json()["results"]
    assert [r["vm"]["id"] for r in results] == [a.pk, b.pk, c.pk]
    assert {r["status"] for r in results} == {"pending_approval"}
    ids = [r["id"] for r in results]
    approved = post(client_for(users["erin"]), "/api/requests/approve/", {"ids": ids, "comment": "go"})
    assert approved.status_code == 200, approved.content
    assert [r["status"] for r in approved.json()["results"]] == ["queued"] * 3
    assert MigrationRun.objects.filter(request_id__in=ids).count() == 3


@pytest.mark.parametrize("bad, index_field, text", [
    ({"vm_id": "7"}, "vm_id", "integer id"),
    ({"target_host_id": 1}, "vm_id", "vm_id is required"),
    ({"vm_id": 999999}, "vm_id", "no such VM"),
    ("not an object", None, "JSON object"),
])
def test_a_bad_item_is_a_400_naming_its_index_and_nothing_is_created(users, datacenter, bad, index_field, text):
    a, b = vms(datacenter, 2)
    response = post(client_for(users["alice"]), "/api/requests/bulk/",
                    {"moves": [move(a), bad, move(b)], "reason": "x"})
    assert response.status_code == 400
    body = response.json()
    assert body["field"] == "moves" and "nothing was submitted" in body["error"]
    assert [(i["index"], i["field"]) for i in body["items"]] == [(1, index_field)]
    assert text in body["items"][0]["error"]
    assert not MigrationRequest.objects.exists()


def test_a_move_the_service_refuses_is_named_by_index(users, datacenter):
    a, b = vms(datacenter, 2)
    response = post(client_for(users["alice"]), "/api/requests/bulk/", {"reason": "x", "moves": [
        move(a), {"vm_id": b.pk, "target_host_id": other_cluster_host(b).pk}]})
    assert response.status_code == 400
    items = response.json()["items"]
    assert [(i["index"], i["vm"], i["field"]) for i in items] == [(1, b.name, "target_host")]
    assert "in cluster" in items[0]["error"]
    assert not MigrationRequest.objects.exists()


@pytest.mark.parametrize("payload, text", [
    ({"moves": [], "reason": "x"}, "non-empty list"),
    ({"moves": "all", "reason": "x"}, "non-empty list"),
    ({"moves": [{"vm_id": 1}], "reason": 3}, "reason must be a string"),
    ({"moves": [{"vm_id": 1}], "reason": "x", "start_after": "2030-01-01T00:00:00Z"}, "both"),
])
def test_bulk_submit_checks_the_batch_wide_fields(users, datacenter, payload, text):
    response = post(client_for(users["alice"]), "/api/requests/bulk/", payload)
    assert response.status_code == 400 and text in response.json()["error"]
    assert not MigrationRequest.objects.exists()


def test_bulk_submit_of_a_vm_you_do_not_own_is_refused(users, datacenter):
    (a,) = vms(datacenter, 1)
    # mallory cannot even see it: a bad item at the boundary.
    response = post(client_for(users["mallory"]), "/api/requests/bulk/", {"moves": [move(a)], "reason": "x"})
    assert response.status_code == 400 and "no such VM" in response.json()["items"][0]["error"]
    # dave (auditor) sees every VM but may not ask for moves: 403, audited as denied.
    response = post(client_for(users["dave"]), "/api/requests/bulk/", {"moves": [move(a)], "reason": "x"})
    assert response.status_code == 403 and "only requesters" in response.json()["items"][0]["error"]
    assert AuditEntry.objects.filter(actor=users["dave"], outcome=AuditOutcome.DENIED).count() == 1
    assert not MigrationRequest.objects.exists()


def test_bulk_approve_permissions_and_conflicts(users, datacenter):
    a, b = vms(datacenter, 2)
    ids = [r["id"] for r in post(client_for(users["bob"]), "/api/requests/bulk/",
                                 {"moves": [move(a), move(b)], "reason": "bob's"}).json()["results"]]
    # bob's own requests: 403 naming both, nothing signed.
    response = post(client_for(users["bob"]), "/api/requests/approve/", {"ids": ids})
    assert response.status_code == 403
    assert [(i["index"], i["id"]) for i in response.json()["items"]] == [(0, ids[0]), (1, ids[1])]
    assert "your own request" in response.json()["items"][0]["error"]
    # a requester who may not see them: 404.
    assert post(client_for(users["mallory"]), "/api/requests/approve/", {"ids": ids}).status_code == 404
    # erin approves one; approving both again is a 409 naming the decided one, and signs nothing.
    assert post(client_for(users["erin"]), "/api/requests/approve/", {"ids": ids[:1]}).status_code == 200
    response = post(client_for(users["erin"]), "/api/requests/approve/", {"ids": ids})
    assert response.status_code == 409 and [i["index"] for i in response.json()["items"]] == [0]
    assert MigrationRequest.objects.get(pk=ids[1]).status == S.PENDING_APPROVAL
    assert RequestApproval.objects.count() == 1


@pytest.mark.parametrize("payload, status, text", [
    ({"ids": []}, 400, "non-empty list"),
    ({"ids": ["1"]}, 400, "some ids are invalid"),
    ({"ids": [1, 1]}, 400, "some ids are invalid"),
    ({"ids": [999999]}, 404, "no such request"),
    ({"ids": [1], "comment": 5}, 400, "comment must be a string"),
])
def test_bulk_approve_checks_its_input(users, datacenter, payload, status, text):
    response = post(client_for(users["erin"]), "/api/requests/approve/", payload)
    assert response.status_code == status and text in response.json()["error"]


def test_bulk_endpoints_need_a_login(datacenter):
    assert post(Client(), "/api/requests/bulk/", {"moves": []}).status_code == 401
    assert post(Client(), "/api/requests/approve/", {"ids": [1]}).status_code == 401
