"""A small JSON API over the same services as the pages (session authentication, CSRF-protected).

Errors are JSON: {"error": "...", "field": "..."} with 400 (bad input), 403 (not allowed),
404 (absent or not yours), 409 (the request's state does not allow it).
"""

from __future__ import annotations

import json
import re
from datetime import datetime

from django.http import JsonResponse
from django.utils.dateparse import parse_datetime
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from migrations_app import access, events, selectors
from migrations_app.choices import AuditAction
from migrations_app.models import Datastore, Host, MigrationRequest, MigrationRun, VirtualMachine
from migrations_app.services import requests as request_services
from migrations_app.services.audit import audit_denied
from migrations_app.services.errors import ActionRefused
from migrations_app.views import client_ip


def _error(message: str, status: int, field: str | None = None) -> JsonResponse:
    return JsonResponse({"error": message, "field": field}, status=status)


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


@api_login_required
@require_http_methods(["GET", "POST"])
def requests_collection(request):
    if request.method == "GET":
        rows = selectors.visible_requests(request.user)[:200]
        return JsonResponse({"results": [request_json(r) for r in rows]})
    try:
        data = _body(request)
        vm = VirtualMachine.objects.filter(pk=_int(data, "vm_id", required=True)).first()
        if vm is None or not access.can_view_vm(request.user, vm):
            return _error("no such VM, or you may not see it", 404, "vm_id")
        host_id, ds_id = _int(data, "target_host_id", required=False), _int(data, "target_datastore_id", required=False)
        host = Host.objects.filter(pk=host_id, connection=vm.connection).first() if host_id is not None else None
        if host_id is not None and host is None:
            raise ActionRefused("no such host on this VM's connection", field="target_host_id")
        ds = Datastore.objects.filter(pk=ds_id, connection=vm.connection).first() if ds_id is not None else None
        if ds_id is not None and ds is None:
            raise ActionRefused("no such datastore on this VM's connection", field="target_datastore_id")
        # "As soon as approved" (neither) or a change window (both ends).
        start_after, window_end = _datetime(data, "start_after"), _datetime(data, "window_end")
        if (start_after is None) != (window_end is None):
            raise ActionRefused("give both start_after and window_end for a window, or neither",
                                field="window_end" if start_after else "start_after")
        kind = data.get("kind") or request_services.kind_for(host, ds)
        if not isinstance(kind, str) or not isinstance(data.get("reason", ""), str):
            raise ActionRefused("kind and reason must be strings")
        mr = request_services.migration_request_submit(
            requester=request.user, vm=vm, kind=kind, reason=data.get("reason", ""), target_host=host,
            target_datastore=ds, start_after=start_after, window_end=window_end, ip=client_ip(request),
        )
    except ActionRefused as exc:
        return _error(exc.message, 403 if exc.denied else 400, exc.field)
    return JsonResponse(request_json(mr), status=201)


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
