"""Live notifications: one group vocabulary and one emit helper.

The socket only notifies; the numbered ``RunEvent`` rows are the truth, and a page that reconnects
asks for the events after its last sequence number. Every payload carries type, id, seq and status.
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# Channel-layer message type; the consumer's method ``portal_event`` relays it to the browser.
RELAY_TYPE = "portal.event"


def run_group(run_id: int) -> str:
    return f"migration-run.{run_id}"


def request_group(request_id: int) -> str:
    return f"migration-request.{request_id}"


def user_requests_group(user_id: int) -> str:
    return f"requests.user.{user_id}"


def approvals_group(role: str = "approver") -> str:
    return f"approvals.{role}"


def plan_group(plan_id: int) -> str:
    return f"move-plan.{plan_id}"


def plan_changed_payload(plan, *, done: int, total: int) -> dict:
    """A plan or one of its items changed; the page re-reads the items (the socket only notifies)."""
    return {"type": "plan.changed", "id": plan.pk, "seq": 0, "status": plan.status, "done": done, "total": total,
            "percent": round(100.0 * done / total, 1) if total else 100.0}


def run_event_payload(event) -> dict:
    return {
        "type": "run.event",
        "id": event.run_id,
        "seq": event.seq,
        "status": event.status,
        "phase": event.phase,
        "percent": round(event.percent, 2),
        "bytes_done": event.bytes_done,
        "bytes_total": event.bytes_total,
        "rate_bytes_per_s": event.rate_bytes_per_s,
        "eta_s": event.eta_s,
        "iteration": event.iteration,
        "message": event.message,
        "at": event.created_at.isoformat(),
    }


def request_changed_payload(request, *, approvals: int | None = None) -> dict:
    """``approvals`` counts the stage signatures: a signature that leaves the request pending
    still changes what its pages show (counted here unless the caller, for a batch, did)."""
    if approvals is None:
        approvals = request.approvals.count() if request.pk else 0
    return {"type": "request.changed", "id": request.pk, "seq": 0, "status": request.status,
            "approvals": approvals}


def emit(group: str, payload: dict) -> None:
    """Send one notification to a group. Never raises: a lost push is caught up from stored events."""
    emit_many([(group, payload)])


def emit_many(messages: list[tuple[str, dict]]) -> None:
    """Send notifications to groups in one hop into the channel layer's event loop (each hop
    costs a loop, and with Redis a connection). Never raises, like ``emit``."""
    layer = get_channel_layer()
    if layer is None or not messages:
        return

    async def send_all() -> None:
        for group, payload in messages:
            await layer.group_send(group, {"type": RELAY_TYPE, "group": group, "payload": payload})

    try:
        async_to_sync(send_all)()
    except (OSError, RedisError) as exc:  # Redis down: the page catches up later
        log.warning("live push to %s failed: %s", ", ".join(g for g, _ in messages), exc)
