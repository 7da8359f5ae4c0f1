"""Login throttling: failures counted per user name and per address in the shared cache.

Failed API token attempts (``services.api_tokens``) count against the same per-address counter:
an address that guesses tokens is locked out of the login form too, and the other way round.
"""

from __future__ import annotations

from django.conf import settings
from django.core.cache import cache


def _user_key(username: str) -> str:
    return f"login-fail:user:{username.strip().lower()[:150]}"


def _address_key(ip: str | None) -> str:
    return f"login-fail:ip:{ip or '-'}"


def _over(key: str) -> bool:
    return (cache.get(key) or 0) >= settings.PORTAL["LOGIN_MAX_FAILURES"]


def _count(key: str) -> None:
    ttl = settings.PORTAL["LOGIN_LOCKOUT_S"]
    if not cache.add(key, 1, ttl):
        try:
            cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.add(key, 1, ttl)


def locked_out(username: str, ip: str | None) -> bool:
    return _over(_user_key(username)) or _over(_address_key(ip))


def record_failure(username: str, ip: str | None) -> None:
    _count(_user_key(username))
    _count(_address_key(ip))


def address_locked_out(ip: str | None) -> bool:
    """Too many failures (logins or tokens) from this address."""
    return _over(_address_key(ip))


def record_address_failure(ip: str | None) -> None:
    """A failure with no user name to count against (a refused API token)."""
    _count(_address_key(ip))


def clear(username: str) -> None:
    cache.delete(_user_key(username))
