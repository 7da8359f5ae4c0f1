"""Services for personal API tokens: make one, revoke one, and tell which user a Bearer token
stands for.

A token is ``mvp_`` and 43 URL-safe characters (256 random bits); only its SHA-256 is stored, and
it is looked up by that digest. The secret is returned once, by ``api_token_create``, and appears
in no audit entry. A call authenticated by a token acts as the token's user (the user object
carries the token as ``api_token``, which ``services.audit`` writes into every entry that user's
actions make), so every rule of ``access`` applies to it unchanged.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from migrations_app import access, throttle
from migrations_app.choices import AuditAction, AuditOutcome
from migrations_app.models import ApiToken
from migrations_app.models.tokens import PREFIX
from migrations_app.services.audit import audit_denied, audit_record, refusable
from migrations_app.services.errors import ActionRefused, NotAuthenticated, refuse_unless

TOKEN_SHAPE = re.compile(re.escape(PREFIX) + r"[A-Za-z0-9_-]{43}")
MAX_ACTIVE = 50  # unrevoked, unexpired tokens per user: more is a script gone wrong
# A token's last use is written at most this often: a script calling every second costs one
# UPDATE a minute, not one a call.
LAST_USED_EVERY = timedelta(seconds=60)


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def expiry_limits() -> tuple[int, int]:
    """(the expiry offered, the longest allowed), in days: PORTAL["API_TOKEN_DEFAULT_DAYS"] and
    ["API_TOKEN_MAX_DAYS"]."""
    longest = max(1, int(settings.PORTAL.get("API_TOKEN_MAX_DAYS", 365)))
    return min(longest, max(1, int(settings.PORTAL.get("API_TOKEN_DEFAULT_DAYS", 90)))), longest


def active_tokens(user):
    return ApiToken.objects.filter(user=user, revoked_at__isnull=True, expires_at__gt=timezone.now())


def _clean_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ActionRefused("give the token a name (what it is for)", field="name")
    name = name.strip()
    if len(name) > 100:
        raise ActionRefused("the name is longer than 100 characters", field="name")
    if not name.isprintable():
        raise ActionRefused("the name must be printable text on one line", field="name")
    return name


def api_token_create(*, user, name: str, days: int, ip: str | None = None) -> tuple[ApiToken, str]:
    """Make a token for ``user`` that works for ``days`` days: the token and its secret, which
    exists nowhere else (only its digest is stored). The token and its audit entry commit together."""
    verdict = access.can_create_api_token(user)
    if not verdict:
        if getattr(user, "is_authenticated", False):
            audit_denied(actor=user, action=AuditAction.API_TOKEN_CREATED, reason=verdict.reason, ip=ip,
                         object_type="api_token")
        refuse_unless(verdict)
    name = _clean_name(name)
    longest = expiry_limits()[1]
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= longest:
        raise ActionRefused(f"the expiry must be from 1 to {longest} days", field="days")
    with transaction.atomic():
        # One creation at a time per user, so that the name and count checks hold.
        # NO KEY UPDATE: the audit entries and deliveries other transactions insert for this user
        # take a key-share lock on its row while they hold the audit chain's lock (a plain FOR
        # UPDATE here, then the chain's lock, deadlocked with them).
        get_user_model().objects.select_for_update(no_key=True).filter(pk=user.pk).first()
        mine = list(active_tokens(user))
        if any(t.name == name for t in mine):
            raise ActionRefused(f"you already have an active token named {name!r}", field="name")
        if len(mine) >= MAX_ACTIVE:
            raise ActionRefused(f"you have {MAX_ACTIVE} active tokens; revoke some first")
        secret = PREFIX + secrets.token_urlsafe(32)
        now = timezone.now()
        token = ApiToken.objects.create(user=user, name=name, digest=token_digest(secret), last4=secret[-4:],
                                        created_at=now, expires_at=now + timedelta(days=days))
        audit_record(actor=user, action=AuditAction.API_TOKEN_CREATED, object_type="api_token",
                     object_id=str(token.pk), ip=ip, reason=f"API token {name!r}",
                     after={"name": name, "hint": token.hint, "expires_at": token.expires_at.isoformat()})
    return token, secret


@refusable(AuditAction.API_TOKEN_REVOKED, subject="token",
           where=lambda token: {"object_type": "api_token", "object_id": str(token.pk)})
def api_token_revoke(*, token: ApiToken, actor, ip: str | None = None) -> ApiToken:
    """Revoke a token (its user, or an admin): it stops working at once, and stays listed."""
    with transaction.atomic():
        token = ApiToken.objects.select_for_update(of=("self",)).select_related("user").get(pk=token.pk)
        refuse_unless(access.can_revoke_api_token(actor, token))
        token.revoked_at, token.revoked_by = timezone.now(), actor
        token.save(update_fields=["revoked_at", "revoked_by"])
        audit_record(actor=actor, action=AuditAction.API_TOKEN_REVOKED, object_type="api_token",
                     object_id=str(token.pk), ip=ip, reason=f"API token {token.name!r} of {token.user.username}",
                     before={"revoked_at": None}, after={"revoked_at": token.revoked_at.isoformat()})
    return token


# -- authentication --------------------------------------------------------------------------------


def _find(header: str, now) -> tuple[ApiToken | None, str]:
    """The token an Authorization header names, and what is wrong with it ("" when nothing)."""
    scheme, _, secret = header.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        return None, 'the Authorization header must be "Bearer <token>"'
    if not TOKEN_SHAPE.fullmatch(secret):
        return None, f"this is not a portal API token (they are {PREFIX} and 43 more characters)"
    token = ApiToken.objects.select_related("user").filter(digest=token_digest(secret)).first()
    if token is None:
        return None, "unknown API token"
    if token.revoked_at is not None:
        return token, "this API token was revoked"
    if token.expires_at <= now:
        return token, f"this API token expired at {token.expires_at:%Y-%m-%d %H:%M} UTC"
    if not token.user.is_active:
        return token, "this API token's user is deactivated"
    return token, ""


def _audit_refused(*, ip: str | None, reason: str, token: ApiToken | None = None) -> None:
    # As a failed login: no actor (nobody is authenticated), the user the token names if known.
    with transaction.atomic():
        audit_record(actor=None, action=AuditAction.API_TOKEN_REFUSED, outcome=AuditOutcome.FAILURE,
                     object_type="api_token", object_id=str(token.pk) if token else "", ip=ip, reason=reason,
                     actor_name=f"unknown:{token.user.username}" if token else "unknown:api-token",
                     data={"api_token": {"id": token.pk, "name": token.name}} if token else {})


def _touch(token: ApiToken, now, ip: str | None) -> None:
    """Record the token's use, at most once every LAST_USED_EVERY (the condition in the UPDATE
    keeps two calls at once from both writing)."""
    if token.last_used_at is not None and now - token.last_used_at < LAST_USED_EVERY:
        return
    stale = Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_EVERY)
    if ApiToken.objects.filter(stale, pk=token.pk).update(last_used_at=now, last_used_ip=ip):
        token.last_used_at, token.last_used_ip = now, ip


def api_token_authenticate(*, header: str, ip: str | None):
    """The user an ``Authorization: Bearer <token>`` header stands for, carrying the token as
    ``api_token``. Raises NotAuthenticated when the token is malformed, unknown, revoked, expired
    or its user deactivated (each audited).

    Only what a guesser sends (a malformed or unknown token) counts against the address's login
    throttle; an address locked out gets 429 for those, unaudited (the refusal that locked it says
    so). A valid token works from a locked-out address: a 256-bit secret is not guessed, and one
    client's expired token behind a shared proxy address must not lock every script out."""
    now = timezone.now()
    token, problem = _find(header, now)
    if not problem:
        _touch(token, now, ip)
        user = token.user
        user.api_token = token
        return user
    guess = token is None
    if guess and throttle.address_locked_out(ip):
        raise NotAuthenticated("too many failed logins or API token attempts from this address; try again later",
                               locked=True)
    if guess:
        throttle.record_address_failure(ip)
        if throttle.address_locked_out(ip):
            problem += "; this address is now locked out of logins and token attempts for a while"
    _audit_refused(ip=ip, reason=problem, token=token)
    raise NotAuthenticated(problem)
