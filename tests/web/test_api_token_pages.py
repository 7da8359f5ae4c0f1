"""The API tokens page and the admin's token list: a token is shown in full once, when it is made,
and stored only as its hash; it needs a name and an expiry within the configured maximum; its user
or an admin revokes it; making and revoking are audited, never with the secret."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from migrations_app.choices import AuditAction, AuditOutcome
from migrations_app.models import ApiToken, AuditEntry
from migrations_app.services.api_tokens import api_token_create, api_token_revoke
from migrations_app.services.errors import ActionRefused
from tests.conftest import client_for

pytestmark = pytest.mark.django_db

SECRET = re.compile(r"mvp_[A-Za-z0-9_-]{43}")


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def make(users, who="alice", name="ci", days=30):
    return api_token_create(user=users[who], name=name, days=days)


def test_making_a_token_shows_its_secret_once_and_stores_only_its_hash(users):
    alice = client_for(users["alice"])
    assert "API tokens" in alice.get("/requests/").content.decode()  # the user menu links the page
    page = alice.get("/tokens/")
    assert page.status_code == 200 and 'value="90"' in page.content.decode()  # the default expiry
    made = alice.post("/tokens/", {"name": "awx-prod", "days": "30"})
    assert made.status_code == 200 and "no-store" in made["Cache-Control"]
    secrets = SECRET.findall(made.content.decode())
    assert len(set(secrets)) == 1, made.content.decode()
    secret = secrets[0]
    token = ApiToken.objects.get()
    assert token.user == users["alice"] and token.name == "awx-prod"
    assert token.digest == hashlib.sha256(secret.encode()).hexdigest() and token.last4 == secret[-4:]
    assert abs(token.expires_at - (timezone.now() + timedelta(days=30))) < timedelta(minutes=1)
    stored = json.dumps(list(ApiToken.objects.values()), default=str)
    assert secret not in stored and secret[4:] not in stored
    # Shown once: the list afterwards has its name and last four characters, never the secret.
    again = alice.get("/tokens/").content.decode()
    assert secret not in again and "awx-prod" in again and f"mvp_…{secret[-4:]}" in again and "never" in again
    entry = AuditEntry.objects.get(action=AuditAction.API_TOKEN_CREATED)
    assert entry.actor == users["alice"] and entry.object_id == str(token.pk) and entry.after["name"] == "awx-prod"
    assert secret[4:] not in json.dumps([entry.before, entry.after, entry.data, entry.reason])
    # The secret works: it is the one whose hash was stored.
    assert Client().get("/api/requests/", headers=bearer(secret)).status_code == 200


def test_two_tokens_never_share_a_secret(users):
    (a, one), (b, two) = make(users, name="one"), make(users, name="two")
    assert one != two and a.digest != b.digest and SECRET.fullmatch(one) and SECRET.fullmatch(two)


@pytest.mark.parametrize("form, problem", [
    ({"name": "ci"}, "This field is required"),
    ({"name": "ci", "days": "0"}, "greater than or equal to 1"),
    ({"name": "ci", "days": "366"}, "less than or equal to 365"),
    ({"name": "ci", "days": "soon"}, "Enter a whole number"),
    ({"name": "  ", "days": "30"}, "This field is required"),
])
def test_a_token_needs_a_name_and_an_expiry_within_the_maximum(users, form, problem):
    response = client_for(users["alice"]).post("/tokens/", form)
    assert response.status_code == 400 and problem in response.content.decode()
    assert not SECRET.search(response.content.decode()) and not ApiToken.objects.exists()


def test_the_expiry_limits_come_from_the_settings(users, settings):
    settings.PORTAL = {**settings.PORTAL, "API_TOKEN_DEFAULT_DAYS": 7, "API_TOKEN_MAX_DAYS": 30}
    alice = client_for(users["alice"])
    assert 'value="7"' in alice.get("/tokens/").content.decode()
    assert alice.post("/tokens/", {"name": "ci", "days": "31"}).status_code == 400
    assert alice.post("/tokens/", {"name": "ci", "days": "30"}).status_code == 200
    with pytest.raises(ActionRefused, match="from 1 to 30 days"):
        make(users, name="other", days=31)
    for bad in (0, True, "5", 2.5):
        with pytest.raises(ActionRefused) as refused:
            make(users, name="other", days=bad)
        assert refused.value.field == "days"
    assert ApiToken.objects.count() == 1


def test_an_active_token_name_is_unique_per_user(users):
    make(users, name="ci")
    response = client_for(users["alice"]).post("/tokens/", {"name": "ci", "days": "5"})
    assert response.status_code == 400 and "already have an active token named" in response.content.decode()
    make(users, who="bob", name="ci")  # another user's name is theirs
    api_token_revoke(token=ApiToken.objects.get(user=users["alice"]), actor=users["alice"])
    make(users, name="ci")  # a revoked token's name is free again
    assert ApiToken.objects.filter(name="ci").count() == 3


def test_a_token_cannot_make_tokens(users):
    token, _ = make(users)
    user = users["alice"]
    user.api_token = token  # how a token-authenticated call's user arrives
    with pytest.raises(ActionRefused, match="cannot make API tokens") as refused:
        api_token_create(user=user, name="more", days=5)
    assert refused.value.denied and ApiToken.objects.count() == 1
    assert AuditEntry.objects.filter(action=AuditAction.API_TOKEN_CREATED, outcome=AuditOutcome.DENIED).exists()


def test_its_user_revokes_a_token_from_the_page_and_it_stops_working(users):
    token, secret = make(users)
    assert Client().get("/api/requests/", headers=bearer(secret)).status_code == 200
    alice = client_for(users["alice"])
    response = alice.post(f"/tokens/{token.pk}/revoke/", follow=True)
    assert "revoked: it no longer works" in response.content.decode()
    token.refresh_from_db()
    assert token.revoked_at is not None and token.revoked_by == users["alice"]
    assert Client().get("/api/requests/", headers=bearer(secret)).status_code == 401
    entry = AuditEntry.objects.get(action=AuditAction.API_TOKEN_REVOKED, outcome=AuditOutcome.SUCCESS)
    assert entry.actor == users["alice"] and entry.object_id == str(token.pk)
    # Revoked stays listed, without a Revoke button; revoking again is refused and says why.
    page = alice.get("/tokens/").content.decode()
    assert 'class="token-revoked"' in page and f"/tokens/{token.pk}/revoke/" not in page
    again = alice.post(f"/tokens/{token.pk}/revoke/", follow=True)
    assert "already revoked" in again.content.decode()


def test_nobody_else_revokes_a_users_token_from_the_page(users):
    token, secret = make(users, name="alice-nightly")
    assert client_for(users["mallory"]).post(f"/tokens/{token.pk}/revoke/").status_code == 403
    assert client_for(users["erin"]).post(f"/tokens/{token.pk}/revoke/").status_code == 403
    assert "alice-nightly" not in client_for(users["mallory"]).get("/tokens/").content.decode()
    token.refresh_from_db()
    assert token.revoked_at is None and Client().get("/api/requests/", headers=bearer(secret)).status_code == 200
    assert AuditEntry.objects.filter(outcome=AuditOutcome.DENIED, actor_name="mallory").exists()
    with pytest.raises(ActionRefused, match="only the token's user or an admin"):
        api_token_revoke(token=token, actor=users["erin"])


def test_admins_see_every_users_tokens_and_revoke_them_in_the_admin(users):
    token, secret = make(users, name="alice-ci")
    make(users, who="bob", name="bob-ci")
    users["carol"].is_staff = users["carol"].is_superuser = True
    users["carol"].save()
    admin = client_for(users["carol"])
    listing = admin.get("/admin/migrations_app/apitoken/").content.decode()
    assert "alice-ci" in listing and "bob-ci" in listing and f"mvp_…{secret[-4:]}" in listing
    assert token.digest not in listing and secret not in listing
    one = admin.get(f"/admin/migrations_app/apitoken/{token.pk}/change/").content.decode()
    assert "alice-ci" in one and f"mvp_…{secret[-4:]}" in one and token.digest not in one
    response = admin.post("/admin/migrations_app/apitoken/", {"action": "revoke", "_selected_action": [token.pk]})
    assert response.status_code == 302
    token.refresh_from_db()
    assert token.revoked_by == users["carol"] and ApiToken.objects.get(name="bob-ci").revoked_at is None
    entry = AuditEntry.objects.get(action=AuditAction.API_TOKEN_REVOKED, outcome=AuditOutcome.SUCCESS)
    assert entry.actor == users["carol"] and "alice" in entry.reason
    assert Client().get("/api/requests/", headers=bearer(secret)).status_code == 401
    # Tokens are made by their users and revoked, never added or deleted in the admin.
    assert admin.get("/admin/migrations_app/apitoken/add/").status_code == 403
    assert admin.post(f"/admin/migrations_app/apitoken/{token.pk}/delete/", {"post": "yes"}).status_code == 403
