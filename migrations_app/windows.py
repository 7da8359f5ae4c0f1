"""Change windows: when a request's run may start.

A request asks for "as soon as approved" (no window) or a window (``start_after``, ``window_end``).
Approval is valid until the window closes (approving before it opens is fine: the run waits for
the start); a run never starts outside its window (``services.runs`` checks at the claim); a
request whose window closes before its run started expires (``services.requests``).
These are pure functions of the request's fields and a time, so they read and test alone.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.utils import timezone


def utc_text(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def window_closed(request, now: datetime | None = None) -> str:
    """'' while the request's window is open or it has none; else why it is closed, in words."""
    now = now or timezone.now()
    if request.window_end is not None and now >= request.window_end:
        return f"its window closed at {utc_text(request.window_end)}"
    return ""


def window_not_open_yet(request, now: datetime | None = None) -> str:
    """'' when the run may start now as far as the window's start goes; else when it opens."""
    now = now or timezone.now()
    if request.start_after is not None and now < request.start_after:
        return f"its window opens at {utc_text(request.start_after)}"
    return ""


def window_problem(start: datetime | None, end: datetime | None, *, now: datetime) -> tuple[str, str] | None:
    """Why a requested window is not acceptable, as (field, message); None when it is.

    Rules: no end means "not before ``start``" (or "as soon as approved" without a start); an end
    must lie in the future and after the start, the window must last at least
    ``PORTAL["WINDOW_MIN_MINUTES"]`` and close within ``PORTAL["WINDOW_MAX_DAYS"]`` days.
    """
    if start is not None and start < now - timedelta(minutes=1):
        return "start_after", "the start time is in the past"
    if end is None:
        return None
    if end <= now:
        return "window_end", "the window's end is in the past"
    if start is not None and end <= start:
        return "window_end", "the window must end after it starts"
    min_minutes = settings.PORTAL["WINDOW_MIN_MINUTES"]
    if end - max(start or now, now) < timedelta(minutes=min_minutes):
        return "window_end", f"the window must stay open at least {min_minutes:g} minutes"
    max_days = settings.PORTAL["WINDOW_MAX_DAYS"]
    if end - now > timedelta(days=max_days):
        return "window_end", f"the window must close within {max_days:g} days"
    return None
