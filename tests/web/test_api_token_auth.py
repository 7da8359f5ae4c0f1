"""Calling the JSON API with a personal API token (``Authorization: Bearer``): it acts as its user
with exactly that user's rights, needs no CSRF token and makes no session; the pages and the admin
ignore it; a refused token is a 401 that says why, audited and counted against the address's login
throttle; every action done with it is audited naming the token; its last use is written at most
once a minute."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from migrations_app.choices import AuditAction, AuditOutcome, PlanStatus, RequestStatus
from migrations_app.models import ApiToken, AuditEntry, MigrationRequest, MovePlan
from migrations_app.services import requests as svc
from migrations_app.services.api_tokens import api_token_create, api_token_revoke
from migrations_app.services.audit import audit_verify_chain
from tests.conftest import client_for, other_host_same_cluster, running_vm
from tests.web.plan_api_helpers import src_host

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("review_everything")]


def token_client(secret: str, **kw) -> Client:
    """A client that sends the token on every call and, like a script, no CSRF token."""
    return Client(enforce_csrf_checks=True, headers={"Authorization": f"Bearer {secret}"}, **kw)


def secret_of(users, who: str, name: str = "ci", days: int = 30) -> str:
    return api_token_create(user=users[who], name=name, days=days)[1]


def post(c: Client, url: str, payload=None):
    return c.post(url, data=json.dumps(payload or {}), content_type="application/json")


def move(vm) -> dict:
    return {"vm_id": vm.pk, "target_host_id": other_host_same_cluster(vm).pk, "reason": "automation"}


# -- it works, as its user, on the API only -----------------------------------------------------


def test_a_token_submits_and_approves_requests_without_csrf_or_a_session(users, datacenter):
    vm = running_vm(datacenter)
    alice = token_client(secret_of(users, "alice"))
    created = post(alice, "/api/requests/", move(vm))
    assert created.status_code == 201, created.content
    mr = MigrationRequest.objects.get(pk=created.json()["id"])
    assert mr.requester == users["alice"] and created.json()["requester"] == "alice"
    assert [r["id"] for r in alice.get("/api/requests/").json()["results"]] == [mr.pk]
    approved = post(token_client(secret_of(users, "erin")), f"/api/requests/{mr.pk}/approve/", {"comment": "ok"})
    assert approved.status_code == 200 and approved.json()["status"] == RequestStatus.QUEUED
    assert approved.json()["decided_by"] == "erin"
    # No session was made, and no cookie handed out.
    assert not Session.objects.exists()
    assert "sessionid" not in created.cookies and "sessionid" not in approved.cookies


def test_a_token_builds_submits_and_approves_plans(users, evac_dc):
    carol = token_client(secret_of(users, "carol"))
    built = post(carol, "/api/plans/", {"kind": "evacuate_host", "host_id": src_host(evac_dc).pk, "reason": "bios"})
    assert built.status_code == 201, built.content
    plan = MovePlan.objects.get(pk=built.json()["id"])
    assert plan.requester == users["carol"]
    assert post(carol, f"/api/plans/{plan.pk}/submit/").json()["status"] == PlanStatus.PENDING_APPROVAL
    assert carol.get("/api/plans/?status=pending_approval").json()["count"] == 1
    approved = post(token_client(secret_of(users, "erin")), f"/api/plans/{plan.pk}/approve/", {"comment": "go"})
    assert approved.status_code == 200 and approved.json()["status"] in (PlanStatus.APPROVED, PlanStatus.RUNNING)
    assert not Session.objects.exists()


def test_the_pages_and_the_admin_ignore_a_token(users, datacenter):
    users["carol"].is_staff = users["carol"].is_superuser = True
    users["carol"].save()
    carol = token_client(secret_of(users, "carol"))
    assert carol.get("/api/requests/").status_code == 200  # the same token, on the API
    for url in ("/requests/", "/inventory/", "/tokens/", "/audit/", "/plans/"):
        response = carol.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/"), url
    admin = carol.get("/admin/migrations_app/apitoken/")
    assert admin.status_code == 302 and admin["Location"].startswith("/admin/login/")
    # A form post with a token is still a page's post: refused (no CSRF token), nothing made.
    assert carol.post("/tokens/", {"name": "more", "days": "5"}).status_code == 403
    assert ApiToken.objects.count() == 1


def test_a_session_still_needs_its_csrf_token_and_a_bad_token_never_falls_back_to_the_session(users, datacenter):
    vm = running_vm(datacenter)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(users["alice"])
    assert post(browser, "/api/requests/", move(vm)).status_code == 403  # CSRF, as before tokens
    assert browser.get("/api/requests/").status_code == 200
    refused = browser.get("/api/requests/", headers={"Authorization": "Bearer mvp_" + "x" * 43})
    assert refused.status_code == 401 and refused.json()["error"] == "unknown API token"
    assert not MigrationRequest.objects.exists()


# -- refused tokens ------------------------------------------------------------------------------


def _expired(users):
    token, secret = api_token_create(user=users["alice"], name="old", days=1)
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    return secret


def _revoked(users):
    token, secret = api_token_create(user=users["alice"], name="gone", days=5)
    api_token_revoke(token=token, actor=users["alice"])
    return secret


def _deactivated(users):
    secret = secret_of(users, "alice")
    users["alice"].is_active = False
    users["alice"].save()
    return secret


REFUSED = [
    ("expired", lambda u: f"Bearer {_expired(u)}", "this API token expired at"),
    ("revoked", lambda u: f"Bearer {_revoked(u)}", "this API token was revoked"),
    ("deactivated user", lambda u: f"Bearer {_deactivated(u)}", "this API token's user is deactivated"),
    ("unknown", lambda u: "Bearer mvp_" + "A" * 43, "unknown API token"),
    ("a known token's secret altered", lambda u: f"Bearer {secret_of(u, 'alice')[:-1]}!", "not a portal API token"),
    ("no token", lambda u: "Bearer", 'must be "Bearer <token>"'),
    ("blank token", lambda u: "Bearer    ", 'must be "Bearer <token>"'),
    ("no scheme", lambda u: secret_of(u, "alice"), 'must be "Bearer <token>"'),
    ("another scheme", lambda u: f"Token {secret_of(u, 'alice')}", 'must be "Bearer <token>"'),
    ("basic", lambda u: "Basic YWxpY2U6cHctYWxpY2U=", 'must be "Bearer <token>"'),
    ("not ours", lambda u: "Bearer ghp_16C7e42F292c6912E7710c838347Ae178B4a", "not a portal API token"),
    ("too short", lambda u: "Bearer mvp_abc", "not a portal API token"),
    ("two tokens", lambda u: f"Bearer {secret_of(u, 'alice')} {secret_of(u, 'alice', 'b')}", "not a portal API token"),
]


@pytest.mark.parametrize("header, problem", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_a_refused_token_is_a_401_that_says_why(users, datacenter, header, problem):
    vm = running_vm(datacenter)
    value = header(users)
    c = Client(enforce_csrf_checks=True, headers={"Authorization": value})
    for response in (c.get("/api/requests/"), post(c, "/api/requests/", move(vm)), c.get("/api/plans/")):
        assert response.status_code == 401
        assert problem in response.json()["error"], response.json()
        challenge = response["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="portal API"') and 'error="invalid_token"' in challenge
    assert not MigrationRequest.objects.exists() and not Session.objects.exists()
    entries = AuditEntry.objects.filter(action=AuditAction.API_TOKEN_REFUSED, outcome=AuditOutcome.FAILURE)
    assert entries.count() == 3 and all(problem in e.reason for e in entries)
    assert all(e.actor is None for e in entries)
    token_part = value.split()[-1]
    assert not any(len(token_part) > 8 and token_part[4:] in json.dumps([e.reason, e.data]) for e in entries)


def test_no_credentials_at_all_is_a_401_that_offers_bearer(db):
    response = Client().get("/api/requests/")
    assert response.status_code == 401 and "Authorization: Bearer" in response.json()["error"]
    assert response["WWW-Authenticate"] == 'Bearer realm="portal API"'


def test_a_token_stops_working_the_moment_it_expires(users, datacenter):
    token, secret = api_token_create(user=users["alice"], name="ci", days=1)
    c = token_client(secret)
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() + timedelta(seconds=30))
    assert c.get("/api/requests/").status_code == 200
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now())
    assert c.get("/api/requests/").status_code == 401


# -- exactly the user's rights ---------------------------------------------------------------------


def test_a_token_has_exactly_its_users_rights(users, datacenter, evac_dc):
    vm = running_vm(datacenter)
    mr = svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute",
                                      target_host=other_host_same_cluster(vm), reason="x")
    alice, mallory = token_client(secret_of(users, "alice")), token_client(secret_of(users, "mallory"))
    dave = token_client(secret_of(users, "dave"))
    refused = post(alice, f"/api/requests/{mr.pk}/approve/", {})
    assert refused.status_code == 403 and "only approvers" in refused.json()["error"]
    assert post(dave, f"/api/requests/{mr.pk}/approve/", {}).status_code == 403  # an auditor reads, never decides
    assert mallory.get(f"/api/requests/{mr.pk}/").status_code == 404  # not her team's VM
    assert post(mallory, "/api/requests/", move(vm)).status_code in (403, 404)
    built = post(alice, "/api/plans/", {"kind": "evacuate_host", "host_id": src_host(evac_dc).pk, "reason": "x"})
    assert built.status_code == 403 and not MovePlan.objects.exists()  # only admins build plans
    assert MigrationRequest.objects.get(pk=mr.pk).status == RequestStatus.PENDING_APPROVAL
    assert MigrationRequest.objects.count() == 1


def test_a_token_never_approves_its_users_own_request_or_plan(users, datacenter, evac_dc):
    bob = token_client(secret_of(users, "bob"))  # an approver who also asks for moves
    rid = post(bob, "/api/requests/", move(running_vm(datacenter))).json()["id"]
    own = post(bob, f"/api/requests/{rid}/approve/", {})
    assert own.status_code == 403 and "your own request" in own.json()["error"]
    users["carol"].groups.add(users["erin"].groups.get(name="approver"))  # an admin who may also approve
    carol = token_client(secret_of(users, "carol"))
    pid = post(carol, "/api/plans/", {"kind": "evacuate_host", "host_id": src_host(evac_dc).pk,
                                      "reason": "x"}).json()["id"]
    post(carol, f"/api/plans/{pid}/submit/")
    own_plan = post(carol, f"/api/plans/{pid}/approve/", {})
    assert own_plan.status_code == 403 and "your own plan" in own_plan.json()["error"]
    assert MigrationRequest.objects.get(pk=rid).status == RequestStatus.PENDING_APPROVAL
    assert MovePlan.objects.get(pk=pid).status == PlanStatus.PENDING_APPROVAL


# -- audit ---------------------------------------------------------------------------------------


def test_what_a_token_does_is_audited_as_its_user_naming_the_token(users, datacenter):
    alice_token, alice_secret = api_token_create(user=users["alice"], name="awx-prod", days=30)
    erin_token, erin_secret = api_token_create(user=users["erin"], name="approval-bot", days=30)
    vm = running_vm(datacenter)
    rid = post(token_client(alice_secret), "/api/requests/", move(vm)).json()["id"]
    post(token_client(erin_secret), f"/api/requests/{rid}/approve/", {"comment": "ok"})
    refused = post(token_client(alice_secret), f"/api/requests/{rid}/approve/", {})  # not an approver: 403
    assert refused.status_code == 403
    submitted = AuditEntry.objects.get(action=AuditAction.REQUEST_SUBMITTED, request_id=rid)
    assert submitted.actor == users["alice"] and submitted.actor_name == "alice"
    assert submitted.data["api_token"] == {"id": alice_token.pk, "name": "awx-prod"}
    decided = AuditEntry.objects.filter(request_id=rid, actor=users["erin"])
    assert decided.exists() and all(e.data["api_token"] == {"id": erin_token.pk, "name": "approval-bot"}
                                    for e in decided)
    denied = AuditEntry.objects.get(request_id=rid, outcome=AuditOutcome.DENIED)
    assert denied.actor == users["alice"] and denied.data["api_token"]["id"] == alice_token.pk
    # The same refusal through a session names no token; the chain holds.
    assert post(client_for(users["alice"]), f"/api/requests/{rid}/approve/", {}).status_code == 403
    by_hand = AuditEntry.objects.filter(request_id=rid, outcome=AuditOutcome.DENIED).order_by("-id").first()
    assert by_hand.pk != denied.pk and by_hand.actor == users["alice"] and "api_token" not in by_hand.data
    # Auditors see it on the audit pages.
    dave = client_for(users["dave"])
    assert "via token “awx-prod”" in dave.get("/audit/", {"actor": "alice"}).content.decode()
    assert "with API token “awx-prod”" in dave.get(f"/audit/{submitted.pk}/").content.decode()
    assert audit_verify_chain().ok


# -- throttling and last use ---------------------------------------------------------------------


def test_repeated_bad_tokens_lock_the_address_out_of_guesses_and_logins_but_not_valid_tokens(users, settings):
    settings.PORTAL = {**settings.PORTAL, "LOGIN_MAX_FAILURES": 3}
    good = secret_of(users, "alice")
    guesser = Client(headers={"Authorization": "Bearer mvp_" + "G" * 43})
    for _ in range(3):
        assert guesser.get("/api/requests/").status_code == 401
    assert AuditEntry.objects.filter(action=AuditAction.API_TOKEN_REFUSED, reason__contains="now locked out").count() == 1
    refused = AuditEntry.objects.filter(action=AuditAction.API_TOKEN_REFUSED).count()
    locked = guesser.get("/api/requests/")
    assert locked.status_code == 429 and "too many failed" in locked.json()["error"]
    assert int(locked["Retry-After"]) == settings.PORTAL["LOGIN_LOCKOUT_S"]
    # Locked-out guesses are not audited one by one (the refusal that locked the address said so).
    assert AuditEntry.objects.filter(action=AuditAction.API_TOKEN_REFUSED).count() == refused
    login = Client().post("/login/", {"username": "bob", "password": "pw-bob"})
    assert login.status_code == 429  # the login form shares the address's count
    # A valid token is not a guess: it still works from that address.
    assert token_client(good).get("/api/requests/").status_code == 200


def test_refused_known_tokens_do_not_lock_the_address_out(users, settings):
    # A forgotten cron job's expired token must not lock out everything behind its address.
    settings.PORTAL = {**settings.PORTAL, "LOGIN_MAX_FAILURES": 2}
    token, secret = api_token_create(user=users["bob"], name="old-cron", days=1)
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(days=1))
    for _ in range(4):
        assert token_client(secret).get("/api/requests/").status_code == 401
    assert Client().post("/login/", {"username": "bob", "password": "pw-bob"}).status_code == 302
    assert token_client(secret_of(users, "alice")).get("/api/requests/").status_code == 200


def test_failed_logins_count_against_token_guesses_from_the_same_address(users, settings):
    settings.PORTAL = {**settings.PORTAL, "LOGIN_MAX_FAILURES": 2}
    for name in ("nobody", "someone"):
        Client().post("/login/", {"username": name, "password": "guess"})
    assert Client(headers={"Authorization": "Bearer mvp_" + "H" * 43}).get("/api/requests/").status_code == 429
    assert token_client(secret_of(users, "alice")).get("/api/requests/").status_code == 200


def _token_updates(queries) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].startswith('UPDATE "migrations_app_apitoken"')]


def test_last_use_is_written_at_most_once_a_minute(users, datacenter):
    token, secret = api_token_create(user=users["alice"], name="ci", days=5)
    c = token_client(secret, REMOTE_ADDR="10.9.8.7")
    with CaptureQueriesContext(connection) as first:
        assert c.get("/api/requests/").status_code == 200
    token.refresh_from_db()
    used = token.last_used_at
    assert used is not None and token.last_used_ip == "10.9.8.7" and len(_token_updates(first)) == 1
    with CaptureQueriesContext(connection) as more:
        for _ in range(5):
            assert c.get("/api/requests/").status_code == 200
    token.refresh_from_db()
    assert token.last_used_at == used and _token_updates(more) == []
    # A minute later, the next call writes it again.
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=used - timedelta(seconds=61))
    with CaptureQueriesContext(connection) as later:
        assert c.get("/api/requests/").status_code == 200
    token.refresh_from_db()
    assert token.last_used_at > used and len(_token_updates(later)) == 1
    assert "10.9.8.7" in client_for(users["alice"]).get("/tokens/").content.decode()
