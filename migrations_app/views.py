"""Pages. Each view checks access, calls one selector or one service, and renders."""

from __future__ import annotations

import csv
import json

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from migrations_app import access, notifications, selectors, windows
from migrations_app.choices import AuditAction, AuditOutcome, NotificationCategory, RequestStatus, Role
from migrations_app.forms import AuditFilterForm, CommentForm, MigrateForm, NotificationPreferencesForm, RejectForm
from migrations_app.models import AuditEntry, Cluster, Host, MigrationRequest, VirtualMachine
from migrations_app.services import requests as request_services
from migrations_app.services.audit import audit_denied, audit_last_verdict, audit_verify_and_record
from migrations_app.services.errors import ActionRefused
from migrations_app.services.notifications import notification_preferences_set
from migrations_app.services.preflight import check_move


def client_ip(request) -> str | None:
    return request.META.get("REMOTE_ADDR") or None


def _deny(request, verdict, *, action=AuditAction.ACCESS_DENIED, obj=None):
    audit_denied(actor=request.user, action=action, reason=verdict.reason, ip=client_ip(request),
                 request=obj if isinstance(obj, MigrationRequest) else None, object_type="page",
                 object_id=request.path[:50])
    raise PermissionDenied(verdict.reason)


@login_required
def home(request):
    if access.has_role(request.user, Role.APPROVER):
        return redirect("approvals")
    if access.has_role(request.user, Role.AUDITOR) and not access.has_role(request.user, Role.REQUESTER):
        return redirect("audit")
    return redirect("my_requests")


# -- inventory ---------------------------------------------------------------------------------


@login_required
@require_GET
def inventory(request):
    f = request.GET
    vms = selectors.vm_search(request.user, text=f.get("q", "").strip(), cluster_id=f.get("cluster", ""),
                              host_id=f.get("host", ""), power=f.get("power", ""), tag=f.get("tag", "").strip())
    page = Paginator(vms, 50).get_page(f.get("page"))
    query = f.copy()
    query.pop("page", None)
    context = {
        "query": query.urlencode(),
        "page": page,
        "clusters": Cluster.objects.select_related("datacenter").order_by("name"),
        "hosts": Host.objects.filter(present=True).order_by("name"),
        "filters": f,
    }
    template = "migrations_app/_vm_rows.html" if request.htmx and request.htmx.target == "vm-rows" else "migrations_app/inventory.html"
    return render(request, template, context)


@login_required
@require_GET
def vm_detail(request, pk: int):
    vm = get_object_or_404(VirtualMachine.objects.select_related("host__cluster", "owner_group", "connection"), pk=pk)
    verdict = access.can_view_vm(request.user, vm)
    if not verdict:
        _deny(request, verdict)
    return render(request, "migrations_app/vm_detail.html", {
        "vm": vm,
        "disks": vm.disks.select_related("datastore"),
        "recent": selectors.visible_requests(request.user).filter(vm=vm)[:10],
        "can_migrate": access.can_request_migration(request.user, vm),
        "open_request": selectors.open_request_for_vm(vm),
    })


def _migrate_context(vm, form, target_host=None):
    return {
        "vm": vm,
        "form": form,
        "host_choices": selectors.host_choices(vm),
        "datastore_choices": selectors.datastore_choices(vm, target_host),
        "target_host": target_host,
    }


@login_required
def vm_migrate(request, pk: int):
    vm = get_object_or_404(VirtualMachine.objects.select_related("host__cluster", "connection"), pk=pk)
    verdict = access.can_request_migration(request.user, vm)
    if not verdict:
        _deny(request, verdict, action=AuditAction.REQUEST_SUBMITTED)
    if request.method == "POST":
        form = MigrateForm(request.POST, vm=vm)
        if form.is_valid():
            d = form.cleaned_data
            try:
                mr = request_services.migration_request_submit(
                    requester=request.user, vm=vm, kind=d["kind"], reason=d["reason"],
                    target_host=d["target_host"], target_datastore=d["target_datastore"],
                    start_after=d["start_after"], window_end=d["window_end"], ip=client_ip(request),
                )
            except ActionRefused as exc:
                form.add_error(exc.field if exc.field in form.fields else None, exc.message)
            else:
                messages.success(request, f"Request #{mr.pk} submitted: {mr.get_status_display().lower()}.")
                return redirect("request_detail", pk=mr.pk)
        target_host = form.cleaned_data.get("target_host") if hasattr(form, "cleaned_data") else None
        return render(request, "migrations_app/migrate.html", _migrate_context(vm, form, target_host), status=400)
    return render(request, "migrations_app/migrate.html", _migrate_context(vm, MigrateForm(vm=vm)))


@login_required
@require_GET
def vm_migrate_datastores(request, pk: int):
    """htmx: the datastore choices for the host picked in the Migrate form."""
    vm = get_object_or_404(VirtualMachine, pk=pk)
    if not access.can_view_vm(request.user, vm):
        raise PermissionDenied
    host_id = request.GET.get("target_host", "")
    host = Host.objects.filter(connection=vm.connection, pk=selectors.as_id(host_id)).first() if selectors.as_id(host_id) else None
    return render(request, "migrations_app/_datastore_select.html", {
        "datastore_choices": selectors.datastore_choices(vm, host), "target_host": host,
    })


# -- requests ----------------------------------------------------------------------------------


@login_required
@require_GET
def my_requests(request):
    page = Paginator(selectors.my_requests(request.user), 25).get_page(request.GET.get("page"))
    template = "migrations_app/_request_rows.html" if request.htmx else "migrations_app/my_requests.html"
    return render(request, template, {"page": page, "show_requester": False})


@login_required
@require_GET
def approvals(request):
    """The approval queue. "Pending for me" (the default for approvers) shows only what this user
    may sign now; "All pending" shows every open request with the stage it waits at."""
    from migrations_app.plan_views import plan_cards  # it imports this module

    verdict = access.can_watch_approvals(request.user)
    if not verdict:
        _deny(request, verdict)
    default = "mine" if access.has_role(request.user, Role.APPROVER) else "all"
    scope = request.GET.get("scope", default)
    scope = scope if scope in ("mine", "all") else default
    queue = selectors.approval_queue(request.user, mine_only=scope == "mine")
    for item in queue:  # what an approver weighs, beside the request itself
        item.conflicts = selectors.conflicting_requests(item)
        item.recent = selectors.recent_migrations(item.vm)
        item.estimate = selectors.request_estimate(item)
        item.stage_views = selectors.approval_stages(item)
        item.can_decide = access.can_decide(request.user, item)
        item.preflight = _preflight_now(item)
    template = "migrations_app/_approval_cards.html" if request.htmx else "migrations_app/approvals.html"
    return render(request, template, {"queue": queue, "reject_form": RejectForm(), "scope": scope,
                                      "plan_queue": plan_cards(request.user)})


def _preflight_now(mr: MigrationRequest) -> str:
    """The pre-flight checks run again as the approver looks: "" when the move is still valid."""
    try:
        check_move(mr.vm, mr.kind, mr.target_host, mr.target_datastore)
    except ActionRefused as exc:
        return exc.message
    return ""


def _visible_request(request, pk: int) -> MigrationRequest:
    mr = get_object_or_404(MigrationRequest.objects.select_related(
        "vm__host__cluster", "requester", "target_host", "target_datastore", "decided_by"), pk=pk)
    verdict = access.can_view_request(request.user, mr)
    if not verdict:
        _deny(request, verdict, obj=mr)
    return mr


def _detail_context(request, mr: MigrationRequest) -> dict:
    run = getattr(mr, "run", None)
    return {
        "mr": mr,
        "run": run,
        "recent_events": selectors.recent_run_events(run) if run else [],
        "can_decide": access.can_decide(request.user, mr),
        "stage_views": selectors.approval_stages(mr),
        "estimate": selectors.request_estimate(mr),
        "approvals_count": mr.approvals.count(),
        "can_cancel": access.can_cancel(request.user, mr),
        "window_closed": windows.window_closed(mr) if mr.status in request_services.EXPIRABLE else "",
        "expired_because": mr.audit.filter(action=AuditAction.REQUEST_EXPIRED).values_list("reason", flat=True).last()
        if mr.status == RequestStatus.EXPIRED else "",
        "history": mr.audit.order_by("id"),
        "reject_form": RejectForm(),
        "comment_form": CommentForm(),
    }


@login_required
@require_GET
def request_detail(request, pk: int):
    mr = _visible_request(request, pk)
    template = "migrations_app/_request_panel.html" if request.htmx else "migrations_app/request_detail.html"
    return render(request, template, _detail_context(request, mr))


def run_action(request, label: str, call):
    """Run a service call for a page's POST: its refusal becomes a message (and, for htmx, the
    status the API uses: 403 not allowed, 409 state conflict, 400 bad input). None when the page
    should go back to where it was."""
    try:
        call()
    except ActionRefused as exc:
        messages.error(request, f"{label}: {exc.message}.")
        if request.htmx:
            return HttpResponse(exc.message, status=403 if exc.denied else 409 if exc.conflict else 400)
    else:
        messages.success(request, f"{label}: done.")
    return None


def _act(request, pk: int, service, **kwargs):
    mr = _visible_request(request, pk)
    refused = run_action(request, f"Request #{pk}",
                         lambda: service(request=mr, actor=request.user, ip=client_ip(request), **kwargs))
    return refused or _back(request, pk)


def _back(request, pk: int):
    """Return to the page the action came from (same site only), else to the request."""
    nxt = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(nxt, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        return redirect(nxt)
    return redirect("request_detail", pk=pk)


@login_required
@require_POST
def request_approve(request, pk: int):
    form = CommentForm(request.POST)
    comment = form.cleaned_data["comment"] if form.is_valid() else ""
    return _act(request, pk, request_services.migration_request_approve, comment=comment)


@login_required
@require_POST
def request_reject(request, pk: int):
    form = RejectForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Request #{pk}: a rejection needs a reason the requester can act on.")
        return _back(request, pk)
    return _act(request, pk, request_services.migration_request_reject, reason=form.cleaned_data["reason"])


@login_required
@require_POST
def request_cancel(request, pk: int):
    return _act(request, pk, request_services.migration_request_cancel, reason=request.POST.get("reason", "")[:2000])


# -- notifications -----------------------------------------------------------------------------


@login_required
def notification_settings(request):
    """Each user picks which notification categories reach them by e-mail."""
    if request.method == "POST":
        form = NotificationPreferencesForm(request.POST)
        if form.is_valid():
            wanted = set(form.cleaned_data["wanted"])
            notification_preferences_set(user=request.user, muted=set(NotificationCategory.values) - wanted,
                                         ip=client_ip(request))
            messages.success(request, "Notification preferences saved.")
            return redirect("notification_settings")
        return render(request, "migrations_app/notifications.html", {"form": form}, status=400)
    muted = notifications.muted_categories(request.user)
    form = NotificationPreferencesForm(initial={"wanted": [c for c in NotificationCategory.values if c not in muted]})
    return render(request, "migrations_app/notifications.html", {"form": form})


# -- audit -------------------------------------------------------------------------------------


def _audit_filtered(request):
    verdict = access.can_view_audit(request.user)
    if not verdict:
        _deny(request, verdict)
    form = AuditFilterForm(request.GET)
    filters = form.cleaned_data if form.is_valid() else {}
    entries = selectors.audit_entries(
        actor=filters.get("actor") or "", vm=filters.get("vm") or "", action=filters.get("action") or "",
        outcome=filters.get("outcome") or "", request_id=filters.get("request") or "",
        since=filters.get("since"), until=filters.get("until"), text=filters.get("q") or "",
    )
    return form, entries


@login_required
@require_GET
def audit_log(request):
    form, entries = _audit_filtered(request)
    entries = entries.select_related("request")
    page = Paginator(entries, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "migrations_app/audit.html", {
        "form": form, "page": page, "actions": AuditAction.choices, "outcomes": AuditOutcome.choices,
        "query": query.urlencode(), "verdict": audit_last_verdict(),
    })


@login_required
@require_POST
def audit_verify(request):
    """Verify the whole chain now (auditors); the result shows on the audit page."""
    verdict = access.can_view_audit(request.user)
    if not verdict:
        _deny(request, verdict)
    result = audit_verify_and_record()
    if result["ok"]:
        messages.success(request, f"The audit log verifies: {result['checked']} entries.")
    else:
        messages.error(request, f"The audit log does NOT verify: {result['problem']}.")
    return redirect("audit")


@login_required
@require_GET
def audit_entry(request, pk: int):
    """One entry with everything it recorded, its place in the chain and its request's story."""
    verdict = access.can_view_audit(request.user)
    if not verdict:
        _deny(request, verdict)
    entry = get_object_or_404(AuditEntry.objects.select_related("request__vm", "actor"), pk=pk)
    related = AuditEntry.objects.filter(request=entry.request_id).order_by("id") if entry.request_id else []
    return render(request, "migrations_app/audit_entry.html", {"entry": entry, "related": related})


EXPORT_FIELDS = ("id", "created_at", "actor_name", "action", "outcome", "object_type", "object_id", "request_id",
                 "vm_name", "reason", "before", "after", "task_id", "ip", "data", "prev_hash", "entry_hash")


@login_required
@require_GET
async def audit_export(request, fmt: str):
    """The filtered audit entries as CSV or JSON, streamed row by row (never built in memory).

    An async view with an async row source: under ASGI, Django would read a synchronous streaming
    iterator to its end before sending anything."""
    _, entries = await sync_to_async(_audit_filtered)(request)
    rows = _keyset_rows(entries.values_list(*EXPORT_FIELDS))
    if fmt == "csv":
        writer = csv.writer(_Echo())

        async def content():
            yield writer.writerow(EXPORT_FIELDS)
            async for row in rows:
                yield writer.writerow([_csv_cell(v) for v in row])

        content_type = "text/csv; charset=utf-8"
    else:
        async def content():
            yield "["
            first = True
            async for row in rows:
                yield ("" if first else ",") + json.dumps(dict(zip(EXPORT_FIELDS, row, strict=True)), default=str)
                first = False
            yield "]"

        content_type = "application/json"
    response = StreamingHttpResponse(content(), content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="audit-log.{fmt}"'
    return response


async def _keyset_rows(rows, chunk: int = 2000):
    """Rows in id order, fetched a chunk at a time by id (each chunk one short query, no cursor
    held open while the client reads)."""
    last_id = 0
    while True:
        batch = await sync_to_async(list)(rows.filter(id__gt=last_id).order_by("id")[:chunk])
        for row in batch:
            yield row
        if len(batch) < chunk:
            return
        last_id = batch[-1][0]


def _csv_cell(value):
    """JSON for structures; text that a spreadsheet would run as a formula is quoted."""
    if isinstance(value, dict | list):
        value = json.dumps(value)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value


class _Echo:
    """A file-like object whose write returns the line: csv.writer then yields lines to stream."""

    def write(self, value: str) -> str:
        return value
