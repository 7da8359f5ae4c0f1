"""What every JSON API module shares: the error body, the login check, reading and checking the body.

Errors are JSON: {"error": "...", "field": "..."} with 400 (bad input), 401 (not logged in), 403
(not allowed), 404 (absent or not yours), 409 (the object's state does not allow it).
"""

from __future__ import annotations

import json

from django.http import JsonResponse

from migrations_app.services.errors import ActionRefused


def _error(message: str, status: int, field: str | None = None) -> JsonResponse:
    return JsonResponse({"error": message, "field": field}, status=status)


def refusal_status(exc: ActionRefused) -> int:
    """The status a service's refusal stands for: 403 rights, 409 state, 400 input."""
    return 403 if exc.denied else 409 if exc.conflict else 400


def api_login_required(fn):
    def inner(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return _error("log in first", 401)
        return fn(request, *args, **kwargs)

    inner.__name__, inner.__doc__ = fn.__name__, fn.__doc__
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
