"""What every JSON API module shares: the error body, who is calling, reading and checking the body.

Errors are JSON: {"error": "...", "field": "..."} with 400 (bad input), 401 (not logged in, or a
refused API token), 403 (not allowed), 404 (absent or not yours), 409 (the object's state does not
allow it), 429 (too many failed logins or token attempts from this address).
"""

from __future__ import annotations

import json

from django.conf import settings
from django.http import JsonResponse
from django.middleware.csrf import CsrfViewMiddleware

from migrations_app.services.api_tokens import api_token_authenticate
from migrations_app.services.errors import ActionRefused, NotAuthenticated
from migrations_app.views import client_ip


def _error(message: str, status: int, field: str | None = None) -> JsonResponse:
    return JsonResponse({"error": message, "field": field}, status=status)


def refusal_status(exc: ActionRefused) -> int:
    """The status a service's refusal stands for: 403 rights, 409 state, 400 input."""
    return 403 if exc.denied else 409 if exc.conflict else 400


def _unauthenticated(message: str, *, token_error: bool) -> JsonResponse:
    """A 401 that says how to authenticate (RFC 6750): a Bearer token, or the session."""
    response = _error(message, 401)
    challenge = 'Bearer realm="portal API"'
    if token_error:
        challenge += ', error="invalid_token", error_description="{}"'.format(message.replace('"', "'"))
    response["WWW-Authenticate"] = challenge
    return response


def _csrf_refusal(request):
    """The CSRF middleware's own check, for a call authenticated by its session cookie (the API's
    views are exempt from the middleware so that a token call, which carries no cookie and so
    cannot be forged by another site, needs no CSRF token): its 403, or None."""
    return CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})


def api_login_required(fn):
    """Who is calling: an ``Authorization: Bearer <token>`` header (a personal API token: the call
    acts as its user and creates no session; any problem with it is a 401, never a fall-back to
    the session), else the session, with its CSRF token for unsafe methods. Only the JSON API's
    views take tokens: the pages and the admin never look at the header."""

    def inner(request, *args, **kwargs):
        header = request.headers.get("Authorization")
        if header is not None:
            try:
                request.user = api_token_authenticate(header=header, ip=client_ip(request))
            except NotAuthenticated as exc:
                if exc.locked:
                    response = _error(exc.message, 429)
                    response["Retry-After"] = str(settings.PORTAL["LOGIN_LOCKOUT_S"])
                    return response
                return _unauthenticated(exc.message, token_error=True)
        else:
            refused = _csrf_refusal(request)
            if refused is not None:
                return refused
            if not request.user.is_authenticated:
                return _unauthenticated("log in first, or send an API token (Authorization: Bearer <token>)",
                                        token_error=False)
        return fn(request, *args, **kwargs)

    inner.__name__, inner.__doc__ = fn.__name__, fn.__doc__
    inner.csrf_exempt = True  # checked above, for session calls only
    return inner


def _body(request) -> dict:
    try:
        data = json.loads(request.body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ActionRefused("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ActionRefused("the body must be a JSON object")
    return data


def _int(data: dict, key: str, *, required: bool) -> int | None:
    value = data.get(key)
    if value is None:
        if required:
            raise ActionRefused(f"{key} is required", field=key)
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ActionRefused(f"{key} must be an integer id", field=key)
    return value


class _Missing(ActionRefused):
    """The named object does not exist, or this user may not see it: a 404."""
