"""Pages and the JSON API: each role sees what it should, and bad input is refused with a clear
message while nothing changes."""

from __future__ import annotations

import json
import re

import pytest
from django.test import Client

from migrations_app.choices import RequestStatus
from migrations_app.models import (
    AuditEntry,
    Datastore,
    Host,
    HypervisorConnection,
    MigrationRequest,
    MigrationRun,
    VirtualMachine,
)
from migrations_app.services import requests as svc
from tests.conftest import approved_run, client_for, other_cluster_host, other_host_same_cluster, running_vm

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("review_everything")]


def migrate_post(vm, **fields):
    data = {"kind": "compute", "reason": "patch window", "start_mode": "now"}
    data.update({k: ("" if v is None else v) for k, v in fields.items()})
    return data


@pytest.mark.parametrize("url_name, allowed", [
    ("/inventory/", {"alice", "bob", "erin", "dave", "carol", "mallory"}),
    ("/requests/", {"alice", "bob", "erin", "dave", "carol", "mallory"}),
    ("/approvals/", {"bob", "erin", "carol"}),
    ("/audit/", {"dave", "carol"}),
])
def test_pages_by_role(users, datacenter, url_name, allowed):
    for name, user in users.items():
        status = client_for(user).get(url_name).status_code
        assert status == (200 if name in allowed else 403), (name, url_name, status)


def test_anonymous_users_are_sent_to_login(datacenter):
    response = Client().get("/inventory/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_migrate_form_offers_only_valid_targets_and_says_why_not(users, datacenter):
    vm = running_vm(datacenter)
    page = client_for(users["alice"]).get(f"/vms/{vm.pk}/migrate/").content.decode()
    options = {int(pk): tag for tag, pk in re.findall(r'(<option value="(\d+)"[^>]*>)', page)}
    valid = other_host_same_cluster(vm)
    assert "disabled" not in options[valid.pk]
    foreign = other_cluster_host(vm)
    assert "disabled" in options[foreign.pk]
    assert f"{foreign.name} — in cluster {foreign.cluster.name}" in page
    maintenance = Host.objects.filter(maintenance=True).first()
    if maintenance.cluster_id == vm.host.cluster_id:
        assert "in maintenance mode" in page


def test_submitting_the_form_creates_a_request(users, datacenter):
    vm = running_vm(datacenter)
    target = other_host_same_cluster(vm)
    response = client_for(users["alice"]).post(f"/vms/{vm.pk}/migrate/", migrate_post(vm, target_host=target.pk))
    mr = MigrationRequest.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/requests/{mr.pk}/"
    assert mr.target_host == target and mr.requester == users["alice"]


@pytest.mark.parametrize("case", ["other_cluster", "foreign_connection_host", "missing_host", "no_reason",
                                  "bad_kind", "invisible_datastore"])
def test_tampered_or_invalid_form_posts_change_nothing(users, datacenter, case):
    vm = running_vm(datacenter)
    other_conn = HypervisorConnection.objects.create(name="other", kind="simulator")
    fields = {
        "other_cluster": migrate_post(vm, target_host=other_cluster_host(vm).pk),
        "foreign_connection_host": migrate_post(vm, target_host=999999),
        "missing_host": migrate_post(vm),
        "no_reason": migrate_post(vm, target_host=other_host_same_cluster(vm).pk, reason=""),
        "bad_kind": migrate_post(vm, kind="teleport", target_host=other_host_same_cluster(vm).pk),
        "invisible_datastore": migrate_post(
            vm, kind="storage",
            target_datastore=Datastore.objects.filter(connection=datacenter).exclude(hosts=vm.host).first().pk),
    }[case]
    assert other_conn  # a second connection exists whose objects must not be accepted
    response = client_for(users["alice"]).post(f"/vms/{vm.pk}/migrate/", fields)
    assert response.status_code == 400
    assert b'class="errorlist' in response.content or b'class="error"' in response.content
    assert not MigrationRequest.objects.exists()


def test_unknown_vm_is_a_404(users, datacenter):
    assert client_for(users["alice"]).get("/vms/999999/migrate/").status_code == 404


def test_approving_your_own_request_through_a_forged_post_is_refused(users, datacenter):
    bob = users["bob"]
    vm = running_vm(datacenter)
    mr = svc.migration_request_submit(requester=bob, vm=vm, kind="compute", target_host=other_host_same_cluster(vm),
                                      reason="mine")
    response = client_for(bob).post(f"/requests/{mr.pk}/approve/", follow=True)
    assert "cannot approve or reject your own request" in response.content.decode()
    mr.refresh_from_db()
    assert mr.status == RequestStatus.PENDING_APPROVAL


def test_approve_twice_through_the_page_reports_it(users, datacenter):
    vm = running_vm(datacenter)
    mr = svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute",
                                      target_host=other_host_same_cluster(vm), reason="x")
    client_for(users["erin"]).post(f"/requests/{mr.pk}/approve/")
    page = client_for(users["bob"]).post(f"/requests/{mr.pk}/approve/", follow=True).content.decode()
    assert "already queued" in page


def test_a_stranger_cannot_see_a_request(users, datacenter):
    vm = running_vm(datacenter)
    mr = svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute",
                                      target_host=other_host_same_cluster(vm), reason="x")
    assert client_for(users["mallory"]).get(f"/requests/{mr.pk}/").status_code == 403
    assert AuditEntry.objects.filter(actor=users["mallory"], outcome="denied").exists()


def test_audit_page_filters(users, datacenter):
    vm = running_vm(datacenter)
    svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute",
                                 target_host=other_host_same_cluster(vm), reason="audit me")
    page = client_for(users["dave"]).get("/audit/", {"actor": "alice", "action": "request.submitted"}).content.decode()
    assert "audit me" in page and vm.name in page


# -- JSON API ---------------------------------------------------------------------------------


def api_post(client, url, payload, raw=None):
    return client.post(url, data=raw if raw is not None else json.dumps(payload), content_type="application/json")


def test_api_submit_approve_and_read(users, datacenter):
    vm = running_vm(datacenter)
    target = other_host_same_cluster(vm)
    created = api_post(client_for(users["alice"]), "/api/requests/",
                       {"vm_id": vm.pk, "target_host_id": target.pk, "reason": "api"})
    assert created.status_code == 201, created.content
    rid = created.json()["id"]
    approved = api_post(client_for(users["erin"]), f"/api/requests/{rid}/approve/", {"comment": "fine"})
    assert approved.status_code == 200 and approved.json()["status"] == "queued"
    run_id = approved.json()["run"]["id"]
    events = client_for(users["alice"]).get(f"/api/runs/{run_id}/events/?after=0").json()["results"]
    assert [e["seq"] for e in events] == [1]


@pytest.mark.parametrize("payload, raw, status, text", [
    (None, "{not json", 400, "not valid JSON"),
    (None, "[]", 400, "JSON object"),
    ({"reason": "x"}, None, 400, "vm_id is required"),
    ({"vm_id": "7", "reason": "x"}, None, 400, "integer id"),
    ({"vm_id": 999999, "reason": "x"}, None, 404, "no such VM"),
])
def test_api_rejects_bad_input_clearly(users, datacenter, payload, raw, status, text):
    response = api_post(client_for(users["alice"]), "/api/requests/", payload, raw=raw)
    assert response.status_code == status and text in response.json()["error"]
    assert not MigrationRequest.objects.exists()


def test_api_requires_login(datacenter):
    assert Client().get("/api/requests/").status_code == 401


def test_api_self_approval_is_403(users, datacenter):
    vm = running_vm(datacenter)
    bob = client_for(users["bob"])
    rid = api_post(bob, "/api/requests/", {"vm_id": vm.pk, "target_host_id": other_host_same_cluster(vm).pk,
                                           "reason": "mine"}).json()["id"]
    response = api_post(bob, f"/api/requests/{rid}/approve/", {})
    assert response.status_code == 403 and "your own request" in response.json()["error"]


def test_logins_failed_logins_and_logouts_are_audited(users):
    client = Client()
    client.post("/login/", {"username": "alice", "password": "wrong"})
    client.post("/login/", {"username": "alice", "password": "pw-alice"})
    client.post("/logout/")
    rows = list(AuditEntry.objects.filter(object_type="session").order_by("id").values_list("action", "actor_name"))
    assert rows == [("user.login_failed", "unknown:alice"), ("user.login", "alice"), ("user.logout", "alice")]


def test_connection_passwords_are_encrypted_at_rest(db):
    conn = HypervisorConnection(name="vc", kind="vcenter", url="https://vc.example/sdk", username="svc")
    conn.set_password("canary-Secret-42")
    conn.save()
    stored = HypervisorConnection.objects.values_list("password_encrypted", flat=True).get(pk=conn.pk)
    assert "canary-Secret-42" not in stored and stored.startswith("fernet:")
    assert HypervisorConnection.objects.get(pk=conn.pk).get_password() == "canary-Secret-42"


def test_api_approving_twice_is_a_409_conflict(users, datacenter):
    vm = running_vm(datacenter)
    rid = api_post(client_for(users["alice"]), "/api/requests/",
                   {"vm_id": vm.pk, "target_host_id": other_host_same_cluster(vm).pk, "reason": "x"}).json()["id"]
    assert api_post(client_for(users["erin"]), f"/api/requests/{rid}/approve/", {}).status_code == 200
    again = api_post(client_for(users["bob"]), f"/api/requests/{rid}/approve/", {})
    assert again.status_code == 409 and "already queued" in again.json()["error"]


def test_audit_export_streams_the_filtered_entries_as_csv_and_json(users, datacenter):
    vm = running_vm(datacenter)
    svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute",
                                 target_host=other_host_same_cluster(vm), reason="export me")
    from asgiref.sync import async_to_sync

    async def body(response) -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])

    dave = client_for(users["dave"])
    response = dave.get("/audit/export.csv", {"action": "request.submitted"})
    assert response.streaming and response.is_async and response["Content-Type"].startswith("text/csv")
    lines = async_to_sync(body)(response).decode().splitlines()
    assert lines[0].startswith("id,created_at,actor_name,action") and len(lines) == 2 and "export me" in lines[1]
    rows = json.loads(async_to_sync(body)(dave.get("/audit/export.json", {"actor": "alice"})))
    assert [r["action"] for r in rows] == ["request.submitted"] and rows[0]["entry_hash"]
    assert client_for(users["alice"]).get("/audit/export.csv").status_code == 403


def test_export_rows_are_fetched_in_id_chunks_without_gaps(db):
    from asgiref.sync import async_to_sync
    from django.db import transaction

    from migrations_app.choices import AuditAction
    from migrations_app.services.audit import audit_record
    from migrations_app.views import _keyset_rows

    for i in range(5):
        with transaction.atomic():
            audit_record(actor=None, action=AuditAction.INVENTORY_SYNCED, object_type="connection", object_id=str(i))

    async def collect():
        return [row async for row in _keyset_rows(
            AuditEntry.objects.filter(object_type="connection").values_list("id", "object_id"), chunk=2)]

    rows = async_to_sync(collect)()
    assert [r[1] for r in rows] == ["0", "1", "2", "3", "4"]


def test_repeated_failed_logins_lock_the_user_name_out(users, settings):
    settings.PORTAL = {**settings.PORTAL, "LOGIN_MAX_FAILURES": 3}
    client = Client()
    for _ in range(3):
        assert client.post("/login/", {"username": "alice", "password": "guess"}).status_code == 200
    locked = client.post("/login/", {"username": "alice", "password": "pw-alice"})  # even the right one
    assert locked.status_code == 429 and b"Too many failed logins" in locked.content
    assert AuditEntry.objects.filter(reason__contains="locked out", actor_name="unknown:alice").exists()


def test_pages_carry_a_strict_content_security_policy(users):
    response = client_for(users["alice"]).get("/requests/")
    csp = response["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert b"<script>" not in response.content  # no inline script for the policy to block


def test_production_settings_pass_the_deployment_checklist(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "DEBUG": "0", "SECRET_KEY": "k" * 20 + "-prod-like-secret-" + "q" * 30,
           "ALLOWED_HOSTS": "portal.example.com", "PORTAL_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rotating_the_field_key_keeps_every_password_readable(db, tmp_path, settings, monkeypatch):
    from django.core.management import call_command

    from migrations_app import secrets

    monkeypatch.delenv("PORTAL_FIELD_KEY", raising=False)
    settings.DATA_DIR = tmp_path
    secrets._fernet.cache_clear()
    conn = HypervisorConnection(name="vc", kind="vcenter")
    conn.set_password("canary-before-rotation")
    conn.save()
    old_token, old_key = conn.password_encrypted, (tmp_path / "field.key").read_bytes()
    call_command("rotate_field_key")
    conn.refresh_from_db()
    assert conn.password_encrypted != old_token and (tmp_path / "field.key").read_bytes() != old_key
    assert conn.get_password() == "canary-before-rotation"
    assert AuditEntry.objects.filter(action="config.key_rotated").exists()
    secrets._fernet.cache_clear()


def test_admin_changes_to_connections_are_audited_without_the_secret(users):
    admin = client_for(users["carol"])
    users["carol"].is_staff = users["carol"].is_superuser = True
    users["carol"].save()
    response = admin.post("/admin/migrations_app/hypervisorconnection/add/", {
        "name": "vc-prod", "kind": "vcenter", "url": "https://vc.example/sdk", "username": "svc",
        "password": "canary-Admin-Secret", "verify_tls": "on", "options": "{}", "enabled": "on"})
    assert response.status_code == 302, response.content[:500]
    entry = AuditEntry.objects.get(action="config.changed", object_type="hypervisorconnection")
    assert entry.actor == users["carol"] and entry.after["url"] == "https://vc.example/sdk"
    assert entry.after["password_encrypted"] == "(set)"
    assert "canary-Admin-Secret" not in json.dumps([entry.before, entry.after, entry.reason])
    group = users["erin"].groups.get(name="approver")
    admin.post(f"/admin/auth/user/{users['dave'].pk}/change/", {
        "username": "dave", "is_active": "on", "groups": [group.pk, users["dave"].groups.get().pk],
        "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"})
    role_change = AuditEntry.objects.filter(action="config.changed", object_type="user").last()
    assert role_change is not None and "approver" in role_change.after["groups"]


def test_the_admin_run_list_shows_when_a_run_was_handed_over_and_how_often_it_went_back_in_line(users, datacenter):
    run = approved_run(users["alice"], users["erin"], running_vm(datacenter))
    MigrationRun.objects.filter(pk=run.pk).update(requeues=2)
    users["carol"].is_staff = users["carol"].is_superuser = True
    users["carol"].save()
    page = client_for(users["carol"]).get("/admin/migrations_app/migrationrun/").content.decode()
    assert "Handed at" in page and "Requeues" in page
    assert '<td class="field-requeues">2</td>' in page


def test_auditors_verify_the_chain_from_the_page_and_open_one_entry(users, datacenter, tmp_path, settings):
    settings.PORTAL = {**settings.PORTAL, "AUDIT_CHECKPOINT_FILE": str(tmp_path / "cp.log")}
    vm = running_vm(datacenter)
    mr = svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute",
                                      target_host=other_host_same_cluster(vm), reason="look at me")
    dave = client_for(users["dave"])
    assert b"Chain not verified yet" in dave.get("/audit/").content
    page = dave.post("/audit/verify/", follow=True).content.decode()
    assert "The audit log verifies" in page and "Chain verified:" in page
    assert (tmp_path / "cp.log").read_text().count("entry_hash") == 1  # the verified tail was signed
    entry = AuditEntry.objects.get(request=mr, action="request.submitted")
    detail = dave.get(f"/audit/{entry.pk}/").content.decode()
    assert "look at me" in detail and entry.entry_hash in detail and f"/requests/{mr.pk}/" in detail
    assert client_for(users["alice"]).get(f"/audit/{entry.pk}/").status_code == 403
    assert client_for(users["alice"]).post("/audit/verify/").status_code == 403


def test_the_approval_card_shows_conflicts_and_the_vms_recent_moves(users, datacenter):
    vm = running_vm(datacenter)
    target = other_host_same_cluster(vm)
    first = svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute", target_host=target,
                                         reason="first")
    svc.migration_request_reject(request=first, actor=users["erin"], reason="not this week")
    mine = svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute", target_host=target,
                                        reason="second try")
    neighbour = next(v for v in VirtualMachine.objects.filter(connection=datacenter, power_state="on",
                                                              host=vm.host).exclude(pk=vm.pk)
                     if not any(t.startswith("sim:") for t in v.tags))
    other = svc.migration_request_submit(requester=users["carol"], vm=neighbour, kind="compute",
                                         target_host=target, reason="same hosts")
    page = client_for(users["erin"]).get("/approvals/").content.decode()
    card = page[page.index(f"<strong>#{mine.pk}</strong>"):]
    card = card[:card.index("</article>")]
    assert f"#{other.pk}</a> {neighbour.name}" in card
    assert f"#{first.pk}</a> rejected" in card


def test_connection_add_saves_and_audits_the_connection_with_the_secret_redacted(db, monkeypatch):
    from django.core.management import call_command

    monkeypatch.setenv("CANARY_PW", "canary-cli-secret")
    call_command("connection_add", "--name", "demo-sim", "--kind", "simulator", "--password-env", "CANARY_PW",
                 "--options", '{"vms": 4, "clusters": 1, "hosts_per_cluster": 2, "datastores": 1}')
    conn = HypervisorConnection.objects.get(name="demo-sim")
    assert conn.get_password() == "canary-cli-secret" and conn.vms.count() == 4
    entry = AuditEntry.objects.get(action="config.changed", object_type="hypervisorconnection")
    assert entry.after["password_encrypted"] == "(set)" and "canary-cli-secret" not in json.dumps(entry.after)
