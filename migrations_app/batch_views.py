"""Pages that act on several things at once: migrate the VMs selected in the inventory (one
request each), and approve the requests selected in the approval queue."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from migrations_app import access, selectors
from migrations_app.choices import AuditAction, Role
from migrations_app.forms import CommentForm, MigrateManyForm
from migrations_app.models import Host
from migrations_app.services import requests as request_services
from migrations_app.services.errors import ActionRefused, BatchRefused
from migrations_app.views import _deny, client_ip


def _selected_vms(request, ids):
    return list(selectors.visible_vms(request.user).filter(pk__in=[i for i in ids if i is not None]))


def _context(form, vms, target_host=None) -> dict:
    blockers = selectors.live_move_blockers(vms)
    return {"form": form, "vms": vms, "blockers": blockers, "vm_rows": [(vm, blockers.get(vm.pk, "")) for vm in vms],
            "host_choices": selectors.host_choices_many(vms),
            "datastore_choices": selectors.datastore_choices_many(vms, target_host), "target_host": target_host}


@login_required
def vms_migrate(request):
    """GET ?vm=1&vm=2...: the Migrate form for the VMs selected in the inventory. POST: one
    request per VM, all or none (the refusal names each VM that cannot move and why)."""
    if not access.has_role(request.user, Role.REQUESTER, Role.ADMIN):
        _deny(request, access.deny("only requesters can ask for migrations"), action=AuditAction.REQUEST_SUBMITTED)
    candidates = selectors.visible_vms(request.user)
    if request.method != "POST":
        vms = _selected_vms(request, [selectors.as_id(v) for v in request.GET.getlist("vm")])
        if not vms:
            messages.error(request, "Select the VMs to migrate first.")
            return redirect("inventory")
        form = MigrateManyForm(vms=candidates, initial={"vms": vms})
        return render(request, "migrations_app/migrate_many.html", _context(form, vms))
    form = MigrateManyForm(request.POST, vms=candidates)
    if form.is_valid():
        d = form.cleaned_data
        vms = list(d["vms"])
        moves = [request_services.RequestedMove(vm, d["kind"], d["target_host"], d["target_datastore"]) for vm in vms]
        try:
            created = request_services.migration_requests_submit_many(
                requester=request.user, items=moves, reason=d["reason"], start_after=d["start_after"],
                window_end=d["window_end"], ip=client_ip(request))
        except BatchRefused as exc:
            form.add_error(None, "Nothing was submitted.")
            for refusal in exc.refusals:
                form.add_error(None, f"{refusal.label}: {refusal.error.message}.")
        except ActionRefused as exc:
            form.add_error(exc.field if exc.field in form.fields else None, exc.message)
        else:
            summary = ", ".join(f"#{mr.pk} {mr.vm.name} ({mr.get_status_display().lower()})" for mr in created)
            messages.success(request, f"{len(created)} requests submitted: {summary}.")
            return redirect("my_requests")
    vms = list(form.cleaned_data.get("vms") or []) if hasattr(form, "cleaned_data") else []
    if not vms:
        vms = _selected_vms(request, [selectors.as_id(v) for v in request.POST.getlist("vms")])
    host = form.cleaned_data.get("target_host") if hasattr(form, "cleaned_data") else None
    return render(request, "migrations_app/migrate_many.html", _context(form, vms, host if isinstance(host, Host)
                                                                        else None), status=400)


@login_required
@require_POST
def requests_approve_selected(request):
    """"Approve selected" on the approval queue: sign every selected request's current stage, or
    none of them (the refusal names each request that cannot be signed and why)."""
    verdict = access.can_watch_approvals(request.user)
    if not verdict:
        _deny(request, verdict)
    ids = [selectors.as_id(v) for v in request.POST.getlist("request")]
    form = CommentForm(request.POST)
    comment = form.cleaned_data["comment"] if form.is_valid() else ""
    found = {mr.pk: mr for mr in selectors.visible_requests(request.user).filter(pk__in=[i for i in ids if i])}
    if not ids or any(i not in found for i in ids):
        messages.error(request, "Approve selected: select the requests to approve first." if not ids
                       else "Approve selected: some selected requests no longer exist.")
        return _back_to_queue(request)
    try:
        approved = request_services.migration_requests_approve_many(
            requests=[found[i] for i in ids], actor=request.user, comment=comment, ip=client_ip(request))
    except BatchRefused as exc:
        messages.error(request, "Approve selected: nothing was approved. "
                       + "; ".join(f"{r.label}: {r.error.message}" for r in exc.refusals) + ".")
    except ActionRefused as exc:
        messages.error(request, f"Approve selected: {exc.message}.")
    else:
        messages.success(request, "Approved: " + ", ".join(
            f"#{mr.pk} ({mr.get_status_display().lower()})" for mr in approved) + ".")
    return _back_to_queue(request)


def _back_to_queue(request):
    """Back to the queue the form was on (same site only)."""
    nxt = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(nxt, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        return redirect(nxt)
    return redirect("approvals")
