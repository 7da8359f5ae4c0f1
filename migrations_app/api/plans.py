"""The JSON API for move plans: the plan pages' reads and actions for scripts and playbooks.

Each view checks its input at the boundary (a 400 naming the field: unknown fields, wrong types,
unknown choices), finds the plan (404 when absent or not visible to this user, the refusal
audited), and calls the one service the page calls; the service decides who may do what and in
which state, audits its refusals, and changes everything or nothing. Its refusal becomes 403
(rights, including the four-eyes rules), 409 (the plan's state) or 400 (input), as in ``views``.
"""

from __future__ import annotations

import re

from django.db.models import Count, Q
from django.http import JsonResponse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from migrations_app import access, selectors
from migrations_app.api._common import _body, _error, _int, _Missing, api_login_required, refusal_status
from migrations_app.api.plan_json import plan_json, plan_summary
from migrations_app.choices import ITEM_TERMINAL, AuditAction, PlanKind, PlanStatus
from migrations_app.models import Cluster, Datastore, Host, MovePlan, PlanItem
from migrations_app.services import plans as plan_services
from migrations_app.services.audit import audit_denied
from migrations_app.services.errors import ActionRefused
from migrations_app.views import client_ip

DEFAULT_LIMIT, MAX_LIMIT = 50, 200
MAX_TEXT = 2000  # as the pages' reason and comment fields

# The one subject each kind of plan takes: the body's field, and where its id is looked up (the
# page's form offers only hosts and datastores still in the inventory).
SUBJECTS = {
    PlanKind.EVACUATE_HOST: ("host_id", "host", lambda: Host.objects.filter(present=True)),
    PlanKind.EVACUATE_DATASTORE: ("datastore_id", "datastore", lambda: Datastore.objects.filter(present=True)),
    PlanKind.REBALANCE_CLUSTER: ("cluster_id", "cluster", lambda: Cluster.objects.all()),
}


def _only(data: dict, allowed: set[str]) -> None:
    """A field this endpoint does not know is a mistake (a typo would otherwise be ignored)."""
    for key in data:
        if key not in allowed:
            expected = ", ".join(sorted(allowed)) or "no fields"
            raise ActionRefused(f"unknown field {key!r} (this endpoint takes {expected})", field=key)


def _text(data: dict, key: str) -> str:
    value = data.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ActionRefused(f"{key} must be a string", field=key)
    if len(value) > MAX_TEXT:
        raise ActionRefused(f"{key} is longer than {MAX_TEXT} characters", field=key)
    return value


def _audit_refused_read(request, reason: str) -> None:
    audit_denied(actor=request.user, action=AuditAction.ACCESS_DENIED, reason=f"API: {reason}",
                 ip=client_ip(request), object_type="api", object_id=request.path[:50])


def _load(pk: int) -> MovePlan | None:
    return (MovePlan.objects.select_related("requester", "decided_by", "subject_host", "subject_datastore",
                                            "subject_cluster", "connection")
            .prefetch_related("approvals__approver").filter(pk=pk).first())


def _visible_plan(request, pk: int) -> MovePlan | None:
    """The plan if this user may see it; None (a 404, absent or not) otherwise, audited."""
    plan = _load(pk)
    if plan is None:
        return None
    verdict = access.can_view_plan(request.user, plan)
    if not verdict:
        _audit_refused_read(request, verdict.reason)
        return None
    return plan


def _answer(request, plan: MovePlan, status: int = 200) -> JsonResponse:
    """The plan as it is now (re-read: the service changed it), for this user."""
    return JsonResponse(plan_json(_load(plan.pk), request.user), status=status)


# -- the list ---------------------------------------------------------------------------------


def _choices(params, key: str, allowed: list[str]) -> list[str] | None:
    """?key=a,b or ?key=a&key=b; every value one of ``allowed``."""
    if key not in params:
        return None
    values = [v.strip() for raw in params.getlist(key) for v in raw.split(",")]
    for value in values:
        if value not in allowed:
            raise ActionRefused(f"{key} must be one of {', '.join(allowed)}; got {value!r}", field=key)
    return values


def _bool(params, key: str) -> bool | None:
    if key not in params:
        return None
    value = params[key].strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ActionRefused(f"{key} must be true or false", field=key)


def _count(params, key: str, default: int, low: int, high: int) -> int:
    raw = params.get(key)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,10}", raw) or not low <= int(raw) <= high:
        raise ActionRefused(f"{key} must be an integer from {low} to {high}", field=key)
    return int(raw)


def _list(request) -> JsonResponse:
    verdict = access.can_view_plan(request.user, None)
    if not verdict:
        _audit_refused_read(request, verdict.reason)
        return _error(verdict.reason, 403)
    params = request.GET
    try:
        for key in params:
            if key not in ("status", "kind", "mine", "limit", "offset"):
                raise ActionRefused(f"unknown filter {key!r} (filters: status, kind, mine, limit, offset)", field=key)
        statuses = _choices(params, "status", PlanStatus.values)
        kinds = _choices(params, "kind", PlanKind.values)
        mine = _bool(params, "mine")
        limit = _count(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = _count(params, "offset", 0, 0, 10**9)
    except ActionRefused as exc:
        return _error(exc.message, 400, exc.field)
    plans = selectors.visible_plans(request.user)
    if statuses is not None:
        plans = plans.filter(status__in=statuses)
    if kinds is not None:
        plans = plans.filter(kind__in=kinds)
    if mine is not None:
        plans = plans.filter(requester=request.user) if mine else plans.exclude(requester=request.user)
    count = plans.count()
    # Newest first, spelt out: Django leaves Meta.ordering out of a query that aggregates.
    rows = (plans.annotate(items_total=Count("items"),
                           items_done=Count("items", filter=Q(items__status__in=ITEM_TERMINAL)))
            .order_by("-created_at", "-id")[offset:offset + limit])
    following = None
    if offset + limit < count:
        query = params.copy()
        query["offset"] = str(offset + limit)
        following = f"{request.path}?{query.urlencode()}"
    return JsonResponse({"count": count, "limit": limit, "offset": offset, "next": following,
                         "results": [plan_summary(p, done=p.items_done, total=p.items_total) for p in rows]})


# -- build --------------------------------------------------------------------------------------


def _build_args(data: dict) -> dict:
    """The service's arguments from the body: a kind, the one subject it takes, a reason."""
    _only(data, {"kind", "reason"} | {field for field, _, _ in SUBJECTS.values()})
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in PlanKind.values:
        raise ActionRefused(f"kind must be one of {', '.join(PlanKind.values)}", field="kind")
    field, noun, candidates = SUBJECTS[kind]
    for other, _, _ in SUBJECTS.values():
        if other != field and data.get(other) is not None:
            raise ActionRefused(f"{other} does not apply to {kind}; give {field}", field=other)
    subject = candidates().filter(pk=_int(data, field, required=True)).first()
    if subject is None:
        raise _Missing(f"no such {noun}" + (" in the inventory" if noun != "cluster" else ""), field=field)
    return {"kind": kind, noun: subject, "reason": _text(data, "reason")}


@api_login_required
@require_http_methods(["GET", "POST"])
def plans_collection(request):
    """GET: the plans this user may see, newest first, filtered and paged. POST: build a draft plan
    {"kind", "host_id" | "datastore_id" | "cluster_id", "reason"}; 201 with the plan."""
    if request.method == "GET":
        return _list(request)
    try:
        args = _build_args(_body(request))
        plan = plan_services.move_plan_build(requester=request.user, ip=client_ip(request), **args)
    except _Missing as exc:
        return _error(exc.message, 404, exc.field)
    except ActionRefused as exc:
        return _error(exc.message, refusal_status(exc), exc.field)
    response = _answer(request, plan, status=201)
    response["Location"] = f"/api/plans/{plan.pk}/"
    return response


# -- one plan and its actions -------------------------------------------------------------------


@api_login_required
@require_GET
def plan_detail(request, pk: int):
    plan = _visible_plan(request, pk)
    return JsonResponse(plan_json(plan, request.user)) if plan else _error("no such plan", 404)


def _action(service, text: str | None = None):
    """An action endpoint: the body takes only ``text`` (a string, optional for the view: the
    service says when it is required), which goes to the service under the same name."""

    @api_login_required
    @require_POST
    def view(request, pk: int):
        plan = _visible_plan(request, pk)
        if plan is None:
            return _error("no such plan", 404)
        try:
            data = _body(request)
            _only(data, {text} if text else set())
            kwargs = {text: _text(data, text)} if text else {}
            plan = service(plan=plan, actor=request.user, ip=client_ip(request), **kwargs)
        except ActionRefused as exc:
            return _error(exc.message, refusal_status(exc), exc.field)
        return _answer(request, plan)

    view.__name__ = f"plan_{service.__name__.rsplit('_', 1)[-1]}"
    return view


plan_submit = _action(plan_services.move_plan_submit)
plan_approve = _action(plan_services.move_plan_approve, "comment")
plan_reject = _action(plan_services.move_plan_reject, "reason")
plan_cancel = _action(plan_services.move_plan_cancel, "reason")


@api_login_required
@require_POST
def plan_item_fallback(request, pk: int, item_pk: int):
    """Choose what happens to a VM that cannot move live: {"fallback": "skip" | "cold_move"}."""
    plan = _visible_plan(request, pk)
    if plan is None:
        return _error("no such plan", 404)
    item = PlanItem.objects.filter(pk=item_pk, plan=plan).first()
    if item is None:
        return _error(f"plan #{plan.pk} has no item {item_pk}", 404)
    try:
        data = _body(request)
        _only(data, {"fallback"})
        fallback = data.get("fallback")
        if not isinstance(fallback, str) or not fallback:
            raise ActionRefused("fallback must be a non-empty string (skip, cold_move)", field="fallback")
        plan_services.move_plan_set_fallback(plan=plan, actor=request.user, item=item, fallback=fallback,
                                             ip=client_ip(request))
    except ActionRefused as exc:
        return _error(exc.message, refusal_status(exc), exc.field)
    return _answer(request, plan)
