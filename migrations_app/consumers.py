"""The live-progress websocket: one socket per page, subscriptions checked like the pages they serve.

Client -> server (JSON):
    {"action": "subscribe", "stream": "run", "id": <run id>, "after": <last seq seen>}
    {"action": "subscribe", "stream": "request", "id": <request id>}
    {"action": "subscribe", "stream": "my-requests"}
    {"action": "subscribe", "stream": "approvals"}
    {"action": "subscribe", "stream": "plan", "id": <move plan id>}
Server -> client: the payloads of ``events`` (type, id, seq, status, ...), plus
    {"type": "subscribed", "stream": ..., "id": ...} and {"type": "error", "message": ...}.

On subscribing to a run the consumer joins the run's group first, then sends the stored events
after ``after``: an event stored in between arrives twice at worst, and the page drops any seq it
has already applied. Nothing is lost to a reconnect.
"""

from __future__ import annotations

import json
import logging
import time

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.contrib.auth.models import User

from migrations_app import access, events
from migrations_app.choices import AuditAction
from migrations_app.models import MigrationRequest, MigrationRun, MovePlan
from migrations_app.selectors import run_events_after
from migrations_app.services.audit import audit_denied

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4096
RECHECK_S = 5.0  # how stale a subscription's permission check may get
MAX_SUBSCRIPTIONS = 50


class LiveConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.groups_joined: set[str] = set()
        self.watching: dict[str, tuple[str, int | None, float]] = {}  # group -> (stream, id, last check)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups_joined", set()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None or len(text_data) > MAX_MESSAGE_BYTES:
            await self._error("send one JSON object of at most 4 KiB as text")
            return
        try:
            msg = json.loads(text_data)
        except json.JSONDecodeError:
            await self._error("message is not valid JSON")
            return
        if not isinstance(msg, dict) or msg.get("action") != "subscribe":
            await self._error('unknown message; expected {"action": "subscribe", ...}')
            return
        stream = msg.get("stream")
        if len(self.groups_joined) >= MAX_SUBSCRIPTIONS:
            await self._error("too many subscriptions on one socket")
            return
        if stream == "run":
            await self._subscribe_run(msg)
        elif stream == "request":
            request_id = msg.get("id")
            if not isinstance(request_id, int) or isinstance(request_id, bool):
                await self._error("a request subscription needs an integer id")
                return
            state = await self._request_state(request_id)
            if state is None:
                await self._refuse("no such request, or you may not watch it", stream=stream, id=request_id)
                return
            await self._join(events.request_group(request_id), "request", request_id)
            # The state as of now, read after joining: a page rendered earlier compares and catches up.
            state = await self._request_state(request_id) or state
            await self._send({"type": "subscribed", "stream": stream, "id": request_id, "status": state["status"],
                              "approvals": state["approvals"]})
        elif stream == "plan":
            await self._subscribe_plan(msg)
        elif stream == "my-requests":
            await self._join(events.user_requests_group(self.scope["user"].pk))
            await self._send({"type": "subscribed", "stream": stream, "id": None})
        elif stream == "approvals":
            verdict = await database_sync_to_async(access.can_watch_approvals)(self.scope["user"])
            if not verdict:
                await self._refuse(verdict.reason, stream=stream)
                return
            await self._join(events.approvals_group(), "approvals")
            await self._send({"type": "subscribed", "stream": stream, "id": None})
        else:
            await self._error(f"unknown stream {stream!r}")

    async def _subscribe_run(self, msg: dict) -> None:
        run_id, after = msg.get("id"), msg.get("after", 0)
        if not isinstance(run_id, int) or isinstance(run_id, bool) or not isinstance(after, int) or after < 0:
            await self._error("a run subscription needs an integer id and a non-negative integer after")
            return
        allowed, backlog = await self._run_backlog(run_id, after)
        if not allowed:
            # Same answer for "absent" and "not yours": ids are not probed through the socket.
            await self._refuse("no such run, or you may not watch it", stream="run", id=run_id)
            return
        await self._join(events.run_group(run_id), "run", run_id)
        await self._send({"type": "subscribed", "stream": "run", "id": run_id})
        # Re-read after joining: anything stored meanwhile is in this read or in a push.
        _, backlog = await self._run_backlog(run_id, after)
        for payload in backlog:
            await self._send(payload)

    async def _subscribe_plan(self, msg: dict) -> None:
        plan_id = msg.get("id")
        if not isinstance(plan_id, int) or isinstance(plan_id, bool):
            await self._error("a plan subscription needs an integer id")
            return
        if await self._plan_status(plan_id) is None:
            await self._refuse("no such plan, or you may not watch it", stream="plan", id=plan_id)
            return
        await self._join(events.plan_group(plan_id), "plan", plan_id)
        # The status as of now, read after joining: a page rendered earlier compares and catches up.
        status = await self._plan_status(plan_id)
        await self._send({"type": "subscribed", "stream": "plan", "id": plan_id, "status": status})

    @database_sync_to_async
    def _plan_status(self, plan_id: int) -> str | None:
        """The plan's status, or None when it is absent or not this user's to watch."""
        plan = MovePlan.objects.filter(pk=plan_id).first()
        if plan is None or not access.can_view_plan(self.scope["user"], plan):
            return None
        return plan.status

    @database_sync_to_async
    def _run_backlog(self, run_id: int, after: int) -> tuple[bool, list[dict]]:
        run = MigrationRun.objects.select_related("request__vm").filter(pk=run_id).first()
        if run is None or not access.can_view_request(self.scope["user"], run.request):
            return False, []
        return True, [events.run_event_payload(e) for e in run_events_after(run, after)]

    @database_sync_to_async
    def _request_state(self, request_id: int) -> dict | None:
        """The request's status and stage signatures (as ``request.changed`` carries them), or None
        when it is absent or not this user's to watch."""
        request = MigrationRequest.objects.select_related("vm").filter(pk=request_id).first()
        if request is None or not access.can_view_request(self.scope["user"], request):
            return None
        return events.request_changed_payload(request)

    async def _join(self, group: str, stream: str = "", obj_id: int | None = None) -> None:
        if group not in self.groups_joined:
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups_joined.add(group)
            self.watching[group] = (stream, obj_id, time.monotonic())

    async def portal_event(self, message: dict) -> None:
        """Relay a notification from the channel layer (events.emit) to the browser, re-checking the
        subscription with the user's current rights at most every RECHECK_S seconds: a user whose
        role or team changed stops receiving what they may no longer see."""
        group = message.get("group", "")
        if group not in self.groups_joined:
            return  # left (or was removed from) the group; messages already on their way are dropped
        stream, obj_id, checked = self.watching.get(group, ("", None, time.monotonic()))
        if stream and time.monotonic() - checked > RECHECK_S:
            if not await self._still_allowed(stream, obj_id):
                await self.channel_layer.group_discard(group, self.channel_name)
                self.groups_joined.discard(group)
                self.watching.pop(group, None)
                await self._refuse("you may no longer watch this", stream=stream, id=obj_id)
                return
            self.watching[group] = (stream, obj_id, time.monotonic())
        await self._send(message["payload"])

    @database_sync_to_async
    def _still_allowed(self, stream: str, obj_id: int | None) -> bool:
        user = User.objects.filter(pk=self.scope["user"].pk, is_active=True).first()  # fresh roles
        if user is None:
            return False
        if stream == "approvals":
            return bool(access.can_watch_approvals(user))
        if stream == "plan":
            plan = MovePlan.objects.filter(pk=obj_id).first()
            return plan is not None and bool(access.can_view_plan(user, plan))
        if stream == "run":
            request = MigrationRequest.objects.select_related("vm").filter(run__pk=obj_id).first()
        else:
            request = MigrationRequest.objects.select_related("vm").filter(pk=obj_id).first()
        return request is not None and bool(access.can_view_request(user, request))

    async def _send(self, payload: dict) -> None:
        await self.send(text_data=json.dumps(payload))

    async def _refuse(self, message: str, *, stream: str, id: int | None = None) -> None:
        """An authorization refusal: audited like the pages' refusals, then told to the browser."""
        await database_sync_to_async(audit_denied)(
            actor=self.scope["user"], action=AuditAction.ACCESS_DENIED, reason=f"websocket {stream}: {message}",
            ip=(self.scope.get("client") or [None])[0], object_type=f"stream:{stream}", object_id=str(id or ""))
        await self._error(message, stream=stream, id=id)

    async def _error(self, message: str, **extra) -> None:
        await self._send({"type": "error", "message": message, **extra})
