"""Login throttling: failures counted per user name and per address in the shared cache."""

from __future__ import annotations

from django.conf import settings
from django.core.cache import cache


def _keys(username: str, ip: str | None) -> list[str]:
    return [f"login-fail:user:{username.strip().lower()[:150]}", f"login-fail:ip:{ip or '-'}"]


def locked_out(username: str, ip: str | None) -> bool:
    limit = settings.PORTAL["LOGIN_MAX_FAILURES"]
    return any((cache.get(key) or 0) >= limit for key in _keys(username, ip))


def record_failure(username: str, ip: str | None) -> None:
    ttl = settings.PORTAL["LOGIN_LOCKOUT_S"]
    for key in _keys(username, ip):
        if not cache.add(key, 1, ttl):
            try:
                cache.incr(key)
            except ValueError:  # expired between add and incr
                cache.add(key, 1, ttl)


def clear(username: str) -> None:
    cache.delete(_keys(username, None)[0])
