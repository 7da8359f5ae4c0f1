"""A small JSON API over the same services as the pages (callers authenticate with the session and
its CSRF token, or with a personal API token: ``_common.api_login_required``): migration requests
and their runs' events here, move plans in ``plans``.

Errors are JSON (``_common``): {"error": "...", "field": "..."} with 400 (bad input), 403 (not
allowed), 404 (absent or not yours), 409 (the request's state does not allow it).
"""

from __future__ import annotations

import re
from datetime import datetime

from django.http import JsonResponse
from django.utils.dateparse import parse_datetime
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from migrations_app import access, events, selectors
from migrations_app.api._common import _body, _error, _int, _Missing, api_login_required
from migrations_app.choices import AuditAction
from migrations_app.models import Datastore, Host, MigrationRequest, MigrationRun, VirtualMachine
from migrations_app.services import requests as request_services
from migrations_app.services.audit import audit_denied
from migrations_app.services.errors import ActionRefused, BatchRefused
from migrations_app.views import client_ip


def request_json(mr: MigrationRequest) -> dict:
    run = getattr(mr, "run", None)
    return {
        "id": mr.pk,
        "status": mr.status,
        "kind": mr.kind,
        "vm": {"id": mr.vm_id, "name": mr.vm.name},
        "requester": mr.requester.username,
        "target_host": mr.target_host.name if mr.target_host_id else None,
        "target_datastore": mr.target_datastore.name if mr.target_datastore_id else None,
        "reason": mr.reason,
        "start_after": mr.start_after.isoformat() if mr.start_after else None,
        "window_end": mr.window_end.isoformat() if mr.window_end else None,
        "decided_by": mr.decided_by.username if mr.decided_by_id else None,
        "decision_comment": mr.decision_comment,
        "policy_note": mr.policy_note,
        "stage": {"current": mr.current_stage + 1, "of": len(mr.stages)} if mr.status == "pending_approval" else None,
        "run": None if run is None else {
            "id": run.pk, "phase": run.phase, "percent": run.percent, "task_id": run.task_id,
            "last_seq": run.last_seq, "explanation": run.explanation,
        },
    }


def _move(request, data) -> request_services.RequestedMove:
    """One move from the body (a VM, its targets, maybe its kind), checked at the boundary."""
    if not isinstance(data, dict):
        raise ActionRefused("a move must be a JSON object")
    vm = VirtualMachine.objects.filter(pk=_int(data, "vm_id", required=True)).first()
    if vm is None or not access.can_view_vm(request.user, vm):
        raise _Missing("no such VM, or you may not see it", field="vm_id")
    host_id, ds_id = _int(data, "target_host_id", required=False), _int(data, "target_datastore_id", required=False)
    host = Host.objects.filter(pk=host_id, connection=vm.connection).first() if host_id is not None else None
    if host_id is not None and host is None:
        raise ActionRefused("no such host on this VM's connection", field="target_host_id")
    ds = Datastore.objects.filter(pk=ds_id, connection=vm.connection).first() if ds_id is not None else None
    if ds_id is not None and ds is None:
        raise ActionRefused("no such datastore on this VM's connection", field="target_datastore_id")
    kind = data.get("kind") or request_services.kind_for(host, ds)
    if not isinstance(kind, str):
        raise ActionRefused("kind must be a string", field="kind")
    return request_services.RequestedMove(vm, kind, host, ds)


def _when(data: dict) -> tuple[datetime | None, datetime | None, str]:
    """The reason and the window: "as soon as approved" (neither end) or a change window (both)."""
    start_after, window_end = _datetime(data, "start_after"), _datetime(data, "window_end")
    if (start_after is None) != (window_end is None):
        raise ActionRefused("give both start_after and window_end for a window, or neither",
                            field="window_end" if start_after else "start_after")
    if not isinstance(data.get("reason", ""), str):
        raise ActionRefused("reason must be a string", field="reason")
    return start_after, window_end, data.get("reason", "")


@api_login_required
@require_http_methods(["GET", "POST"])
def requests_collection(request):
    if request.method == "GET":
        rows = selectors.visible_requests(request.user)[:200]
        return JsonResponse({"results": [request_json(r) for r in rows]})
    try:
        data = _body(request)
        move = _move(request, data)
        start_after, window_end, reason = _when(data)
        mr = request_services.migration_request_submit(
            requester=request.user, vm=move.vm, kind=move.kind, reason=reason, target_host=move.target_host,
            target_datastore=move.target_datastore, start_after=start_after, window_end=window_end,
            ip=client_ip(request),
        )
    except _Missing as exc:
        return _error(exc.message, 404, exc.field)
    except ActionRefused as exc:
        return _error(exc.message, 403 if exc.denied else 400, exc.field)
    return JsonResponse(request_json(mr), status=201)


def _items_error(message: str, status: int, items: list[dict], field: str | None = None) -> JsonResponse:
    """A refused batch: the error, and each refused item with its index in the list sent."""
    return JsonResponse({"error": message, "field": field, "items": items}, status=status)


def _list(data: dict, key: str) -> list:
    value = data.get(key)
    if not isinstance(value, list) or not value:
        raise ActionRefused(f"{key} must be a non-empty list", field=key)
    if len(value) > request_services.MAX_BATCH:
        raise ActionRefused(f"at most {request_services.MAX_BATCH} {key} at once", field=key)
    return value


@api_login_required
@require_POST
def requests_bulk(request):
    """Submit many moves at once: {"moves": [{"vm_id", "target_host_id", "target_datastore_id",
    "kind"}, ...], "reason", "start_after", "window_end"}. Every move is checked; any bad one is a
    400 naming each by its index, and nothing is created. 201 with the requests, in order."""
    try:
        data = _body(request)
        raw = _list(data, "moves")
        start_after, window_end, reason = _when(data)
    except ActionRefused as exc:
        return _error(exc.message, 400, exc.field)
    moves, bad = [], []
    for index, item in enumerate(raw):
        try:
            moves.append(_move(request, item))
        except ActionRefused as exc:
            bad.append({"index": index, "error": exc.message, "field": exc.field})
    if bad:
        return _items_error(f"{len(bad)} of {len(raw)} moves are invalid; nothing was submitted", 400, bad, "moves")
    try:
        created = request_services.migration_requests_submit_many(
            requester=request.user, items=moves, reason=reason, start_after=start_after, window_end=window_end,
            ip=client_ip(request))
    except BatchRefused as exc:
        items = [{"index": r.index, "vm": r.label, "error": r.error.message, "field": r.error.field}
                 for r in exc.refusals]
        return _items_error(exc.message, 403 if exc.denied else 400, items, "moves")
    except ActionRefused as exc:
        return _error(exc.message, 403 if exc.denied else 400, exc.field)
    return JsonResponse({"results": [request_json(mr) for mr in created]}, status=201)


@api_login_required
@require_POST
def requests_bulk_approve(request):
    """Sign the current stage of many requests: {"ids": [...], "comment": ""}. All or nothing: any
    request this user may not see (404), may not sign (403) or that cannot be decided now (409)
    is named by its index, and nothing is signed. 200 with the requests, in order."""
    try:
        data = _body(request)
        ids = _list(data, "ids")
        comment = data.get("comment", "")
        if not isinstance(comment, str):
            raise ActionRefused("comment must be a string", field="comment")
    except ActionRefused as exc:
        return _error(exc.message, 400, exc.field)
    bad = [{"index": i, "id": pk, "error": "must be an integer id"} for i, pk in enumerate(ids)
           if isinstance(pk, bool) or not isinstance(pk, int)]
    bad += [{"index": i, "id": pk, "error": "listed twice"} for i, pk in enumerate(ids)
            if not bad and pk in ids[:i]]
    if bad:
        return _items_error("some ids are invalid; nothing was approved", 400, bad, "ids")
    visible = {pk: _visible(request, pk) for pk in ids}
    missing = [{"index": i, "id": pk, "error": "no such request"} for i, pk in enumerate(ids) if visible[pk] is None]
    if missing:
        return _items_error("no such request", 404, missing, "ids")
    try:
        approved = request_services.migration_requests_approve_many(
            requests=[visible[pk] for pk in ids], actor=request.user, comment=comment, ip=client_ip(request))
    except BatchRefused as exc:
        items = [{"index": r.index, "id": ids[r.index], "error": r.error.message} for r in exc.refusals]
        return _items_error(exc.message, 403 if exc.denied else 409 if exc.conflict else 400, items, "ids")
    except ActionRefused as exc:
        return _error(exc.message, 403 if exc.denied else 409 if exc.conflict else 400, exc.field)
    return JsonResponse({"results": [request_json(mr) for mr in approved]})


def _datetime(data: dict, key: str) -> datetime | None:
    value = data.get(key)
    if value in (None, ""):
        return None
    try:
        parsed = parse_datetime(value) if isinstance(value, str) else None
    except ValueError:  # well-formed but impossible (month 13)
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise ActionRefused(f"{key} must be an ISO 8601 time with a time zone", field=key)
    return parsed


def _visible(request, pk: int) -> MigrationRequest | None:
    """The request if this user may see it; None (a 404, absent or not) otherwise, audited."""
    mr = MigrationRequest.objects.select_related("vm", "requester", "target_host", "target_datastore").filter(pk=pk).first()
    if mr is None:
        return None
    verdict = access.can_view_request(request.user, mr)
    if not verdict:
        audit_denied(actor=request.user, action=AuditAction.ACCESS_DENIED, reason=f"API: {verdict.reason}",
                     request=mr, ip=client_ip(request), object_type="api", object_id=request.path[:50])
        return None
    return mr


@api_login_required
@require_GET
def request_item(request, pk: int):
    mr = _visible(request, pk)
    return JsonResponse(request_json(mr)) if mr else _error("no such request", 404)


def _action(service, text_param: str):
    """A decision endpoint: the body's "comment" or "reason" goes to the service as ``text_param``."""

    @api_login_required
    @require_POST
    def view(request, pk: int):
        mr = _visible(request, pk)
        if mr is None:
            return _error("no such request", 404)
        try:
            data = _body(request)
            text = data.get("comment", data.get("reason", ""))
            if not isinstance(text, str):
                raise ActionRefused("comment/reason must be a string")
            mr = service(request=mr, actor=request.user, ip=client_ip(request), **{text_param: text})
        except ActionRefused as exc:
            return _error(exc.message, 403 if exc.denied else 409 if exc.conflict else 400, exc.field)
        return JsonResponse(request_json(mr))

    return view


request_approve = _action(request_services.migration_request_approve, "comment")
request_reject = _action(request_services.migration_request_reject, "reason")
request_cancel = _action(request_services.migration_request_cancel, "reason")


@api_login_required
@require_GET
def run_events(request, pk: int):
    run = MigrationRun.objects.filter(pk=pk).first()
    if run is None or _visible(request, run.request_id) is None:
        return _error("no such run", 404)
    after = request.GET.get("after", "0")
    if not re.fullmatch(r"[0-9]{1,12}", after):
        return _error("after must be a non-negative integer", 400, "after")
    return JsonResponse({"results": [events.run_event_payload(e) for e in selectors.run_events_after(run, int(after))]})
