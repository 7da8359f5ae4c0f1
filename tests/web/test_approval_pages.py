"""The approval card, the "Pending for me" filter, the request page's stages, the API through the
stages, and the admin's policy import/export."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Group
from django.core.files.uploadedfile import SimpleUploadedFile

from migrations_app.choices import Role
from migrations_app.models import ApprovalPolicy, AuditEntry, VirtualMachine
from migrations_app.services import requests as svc
from tests.conftest import client_for, install_policy, make_user, other_host_same_cluster, running_vm

pytestmark = pytest.mark.django_db

TWO_STAGES = {
    "name": "Two stages",
    "rules": [{"name": "all", "when": {}, "action": "stages", "stages": [
        {"name": "Team lead", "groups": ["approver"], "mode": "any"},
        {"name": "Change board", "groups": ["change-board"], "mode": "n_distinct", "count": 2},
    ]}],
}


@pytest.fixture
def world(users, datacenter):
    Group.objects.create(name="change-board")
    users["frank"] = make_user("frank", Role.APPROVER, teams=("change-board",))
    users["grace"] = make_user("grace", Role.APPROVER, teams=("change-board",))
    install_policy(TWO_STAGES)
    vm = running_vm(datacenter)
    mr = svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute",
                                      target_host=other_host_same_cluster(vm), reason="kernel update")
    return {"users": users, "mr": mr, "vm": vm}


def cards(html: str) -> str:
    return html.split('id="approval-cards"', 1)[1]


def test_the_card_shows_what_an_approver_weighs(world):
    users, mr = world["users"], world["mr"]
    svc.migration_request_approve(request=mr, actor=users["erin"])
    svc.migration_request_approve(request=mr, actor=users["frank"])
    html = cards(client_for(users["grace"]).get("/approvals/").content.decode())
    assert f"#{mr.pk}</strong> Compute move of {mr.vm.name}" in html
    assert "Stage 2 of 2 (Change board): two distinct approvers from change-board (1 of 2: frank)" in html
    assert "Stage 1 of 2 (Team lead): one approver from approver (1 of 1: erin)" in html
    assert "downtime about" in html and "passes now" in html
    assert "team-web" in html  # owner
    assert f"Approve #{mr.pk}" in html


def test_pending_for_me_shows_only_what_i_may_sign_now(world):
    users, mr = world["users"], world["mr"]
    svc.migration_request_approve(request=mr, actor=users["erin"])  # stage 2 waits for change-board
    mine = cards(client_for(users["bob"]).get("/approvals/").content.decode())
    assert "Nothing waits for you" in mine
    everything = cards(client_for(users["bob"]).get("/approvals/?scope=all").content.decode())
    assert f"#{mr.pk}</strong>" in everything
    assert "You cannot act on this one now: stage 2 of 2 waits for two distinct approvers from change-board" \
        in everything
    assert f"Approve #{mr.pk}" not in everything
    # frank may sign: it is his by default
    assert f"Approve #{mr.pk}" in cards(client_for(users["frank"]).get("/approvals/").content.decode())
    # an htmx refresh keeps the scope it was rendered with
    page = client_for(users["bob"]).get("/approvals/?scope=all").content.decode()
    assert 'hx-get="/approvals/?scope=all"' in page


def test_the_request_page_shows_the_stages_and_the_requester_reads_a_rejection(world):
    users, mr = world["users"], world["mr"]
    svc.migration_request_approve(request=mr, actor=users["erin"])
    page = client_for(users["alice"]).get(f"/requests/{mr.pk}/").content.decode()
    assert 'data-approvals="1"' in page
    assert "Stage 2 of 2 (Change board)" in page and "· waiting" in page
    client_for(users["frank"]).post(f"/requests/{mr.pk}/reject/", {"reason": "collides with the backup window"})
    page = client_for(users["alice"]).get(f"/requests/{mr.pk}/").content.decode()
    assert "Rejected by frank" in page and "collides with the backup window" in page


def test_the_api_walks_the_stages_and_keeps_its_status_codes(world):
    users, mr = world["users"], world["mr"]

    def post(user, action, body):
        return client_for(user).post(f"/api/requests/{mr.pk}/{action}/", data=json.dumps(body),
                                     content_type="application/json")

    assert post(users["frank"], "approve", {}).status_code == 200  # stage 1 is for any approver
    again = post(users["frank"], "approve", {})
    assert again.status_code == 403 and "you signed stage 1" in again.json()["error"]
    assert post(users["bob"], "approve", {}).status_code == 403  # not in change-board
    assert post(users["alice"], "approve", {}).status_code == 403  # her own
    first = post(users["grace"], "approve", {"comment": "ok"})
    assert first.status_code == 200 and first.json()["status"] == "pending_approval"
    assert first.json()["stage"] == {"current": 2, "of": 2}
    assert post(users["grace"], "approve", {}).status_code == 409  # signed this stage already
    erin = Group.objects.get(name="change-board")
    users["erin"].groups.add(erin)
    done = post(users["erin"], "approve", {})
    assert done.status_code == 200 and done.json()["status"] == "queued"
    assert post(users["erin"], "reject", {"reason": "late"}).status_code == 409


def test_auto_approved_and_auto_rejected_requests_say_which_rule_decided(users, datacenter):
    install_policy({"name": "Strict", "rules": [
        {"name": "no production", "when": {"environment": ["production"]}, "action": "auto_reject",
         "reject_reason": "production moves need a change ticket"},
        {"name": "rest", "when": {}, "action": "auto_approve"}]})
    prod = VirtualMachine.objects.filter(owner_group__name="team-web", tags__icontains="env:production",
                                         power_state="on").exclude(tags__icontains="sim:").first()
    assert prod is not None
    mr = svc.migration_request_submit(requester=users["alice"], vm=prod, kind="compute",
                                      target_host=other_host_same_cluster(prod), reason="x")
    page = client_for(users["alice"]).get(f"/requests/{mr.pk}/").content.decode()
    assert "Rejected by the approval policy" in page and "production moves need a change ticket" in page
    assert "rule “no production”" in page


# -- admin ---------------------------------------------------------------------------------------


@pytest.fixture
def admin_client(users):
    carol = users["carol"]
    carol.is_staff = carol.is_superuser = True
    carol.save()
    return client_for(carol)


def test_admin_import_refuses_a_bad_file_with_every_error_and_changes_nothing(admin_client, users):
    before = ApprovalPolicy.objects.count()
    bad = SimpleUploadedFile("p.yaml", b"name: X\nrules:\n  - {name: a, when: {size: 3}, action: stages, "
                                       b"stages: [{groups: [approver], mode: most}]}\n")
    response = admin_client.post("/admin/migrations_app/approvalpolicy/import/", {"file": bad})
    html = response.content.decode()
    assert response.status_code == 200
    assert "rules[0].when.size: unknown condition" in html
    assert "rules[0].stages[0].mode: &#x27;most&#x27; is not a mode" in html
    assert ApprovalPolicy.objects.count() == before


def test_admin_import_then_export_round_trips(admin_client, users):
    import yaml

    text = yaml.safe_dump(TWO_STAGES | {"rules": [{"name": "all", "when": {}, "action": "stages", "stages": [
        {"name": "Review", "groups": ["approver"], "mode": "any"}]}], "name": "Admin made"})
    response = admin_client.post("/admin/migrations_app/approvalpolicy/import/",
                                 {"file": SimpleUploadedFile("p.yml", text.encode()), "activate": "on"})
    assert response.status_code == 302
    policy = ApprovalPolicy.objects.get(name="Admin made")
    assert policy.active
    exported = admin_client.post("/admin/migrations_app/approvalpolicy/",
                                 {"action": "export_yaml", "_selected_action": [policy.pk]})
    assert exported["Content-Disposition"] == 'attachment; filename="admin-made.yaml"'
    assert yaml.safe_load(exported.content)["rules"][0]["stages"][0]["groups"] == ["approver"]
    assert AuditEntry.objects.filter(action="policy.imported", actor=users["carol"]).exists()


def test_the_admin_pages_for_policies_and_rules_render(admin_client):
    policy = ApprovalPolicy.objects.get(active=True)
    assert admin_client.get("/admin/migrations_app/approvalpolicy/").status_code == 200
    assert admin_client.get(f"/admin/migrations_app/approvalpolicy/{policy.pk}/change/").status_code == 200
    rule = policy.rules.first()
    assert admin_client.get(f"/admin/migrations_app/policyrule/{rule.pk}/change/").status_code == 200


def _rule_form(rule, stage, **changes):
    data = {"policy": rule.policy_id, "order": rule.order, "name": rule.name, "conditions": "{}",
            "action": "stages", "reject_reason": "",
            "stages-TOTAL_FORMS": 1, "stages-INITIAL_FORMS": 1, "stages-MIN_NUM_FORMS": 0,
            "stages-MAX_NUM_FORMS": 1000, "stages-0-id": stage.pk, "stages-0-rule": rule.pk, "stages-0-order": 1,
            "stages-0-name": "Review", "stages-0-groups": [Group.objects.get(name="approver").pk],
            "stages-0-mode": "any", "stages-0-count": 1}
    data.update(changes)
    return data


def test_an_admin_edit_of_a_rule_is_audited_with_its_stages_and_raises_the_policy_version(admin_client):
    policy = ApprovalPolicy.objects.get(active=True)
    version = policy.version
    rule = policy.rules.order_by("order").last()
    stage = rule.stages.get()
    url = f"/admin/migrations_app/policyrule/{rule.pk}/change/"
    response = admin_client.post(url, _rule_form(rule, stage, **{"stages-0-mode": "n_distinct",
                                                                 "stages-0-count": 2}))
    assert response.status_code == 302
    entry = AuditEntry.objects.filter(action="config.changed", object_type="policyrule").latest("id")
    assert entry.before["summary"]["stages"][0]["mode"] == "any"
    assert entry.after["summary"]["stages"][0] == {"order": 1, "name": "Review", "groups": ["approver"],
                                                   "mode": "n_distinct", "count": 2}
    policy.refresh_from_db()
    assert policy.version == version + 1
    refused = admin_client.post(url, _rule_form(rule, stage, conditions='{"size": 3}'))
    assert refused.status_code == 200 and "conditions.size: unknown condition" in refused.content.decode()


def test_the_policy_form_cannot_switch_a_policy_off_activation_goes_through_the_action(admin_client):
    policy = ApprovalPolicy.objects.get(active=True)
    url = f"/admin/migrations_app/approvalpolicy/{policy.pk}/change/"
    assert 'name="active"' not in admin_client.get(url).content.decode()
    form = {"name": policy.name, "description": "edited", "rules-TOTAL_FORMS": 0, "rules-INITIAL_FORMS": 0,
            "rules-MIN_NUM_FORMS": 0, "rules-MAX_NUM_FORMS": 1000}  # "active" left out: an unticked box
    assert admin_client.post(url, form).status_code == 302
    policy.refresh_from_db()
    assert policy.active and policy.description == "edited"
