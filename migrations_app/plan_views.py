"""Pages of move plans (evacuate a host or a datastore, rebalance a cluster): build, review with
fallbacks, submit, decide, cancel, and watch overall and per-VM progress live.

Each view checks access, calls one selector or one service, and renders (as ``views`` does).
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from migrations_app import access, selectors
from migrations_app.choices import PlanStatus
from migrations_app.forms import CommentForm, PlanBuildForm, RejectForm
from migrations_app.models import Cluster, Datastore, Host, MovePlan, PlanItem
from migrations_app.services import plans as plan_services
from migrations_app.services.errors import ActionRefused
from migrations_app.views import _deny, client_ip, run_action


@login_required
@require_GET
def plan_list(request):
    verdict = access.can_view_plan(request.user, None)
    if not verdict:
        _deny(request, verdict)
    return render(request, "migrations_app/plans.html", {
        "plans": selectors.visible_plans(request.user)[:50],
        "can_build": access.can_build_plan(request.user),
        "preselect": request.GET,  # ?host= / ?datastore= / ?cluster= from the inventory's links
        "hosts": Host.objects.filter(present=True).select_related("cluster").order_by("name"),
        "datastores": Datastore.objects.filter(present=True).order_by("name"),
        "clusters": Cluster.objects.order_by("name"),
    })


@login_required
@require_POST
def plan_build(request):
    form = PlanBuildForm(request.POST)
    if not form.is_valid():
        for field, errors in form.errors.items():
            messages.error(request, f"{field}: {' '.join(errors)}")
        return redirect("plans")
    data = form.cleaned_data
    try:
        plan = plan_services.move_plan_build(requester=request.user, kind=data["kind"], reason=data["reason"],
                                             host=data["host"], datastore=data["datastore"],
                                             cluster=data["cluster"], ip=client_ip(request))
    except ActionRefused as exc:
        messages.error(request, f"No plan built: {exc.message}.")
        return redirect("plans")
    return redirect("plan_detail", pk=plan.pk)


def _visible_plan(request, pk: int) -> MovePlan:
    plan = get_object_or_404(MovePlan.objects.select_related(
        "requester", "decided_by", "subject_host", "subject_datastore", "subject_cluster", "connection"), pk=pk)
    verdict = access.can_view_plan(request.user, plan)
    if not verdict:
        _deny(request, verdict)
    return plan


def _plan_context(request, plan: MovePlan) -> dict:
    items = list(selectors.plan_items(plan))
    for item in items:
        item.fallback_options = plan_services.fallback_choices(plan, item)
    done, total = plan_services.plan_progress(plan)
    return {
        "plan": plan,
        "items": items,
        "done": done,
        "total": total,
        "percent": round(100.0 * done / total, 1) if total else 100.0,
        "movable": sum(i.moves for i in items),
        "cold_capable": len(plan_services.fallback_choices(plan)) > 1,
        "can_edit": access.can_edit_plan(request.user, plan),
        "can_decide": access.can_decide_plan(request.user, plan),
        "stage_views": selectors.approval_stages(plan),
        "can_cancel": access.can_cancel_plan(request.user, plan),
        "history": plan_history(plan),
    }


def plan_history(plan: MovePlan):
    from migrations_app.models import AuditEntry

    return AuditEntry.objects.filter(object_type="move_plan", object_id=str(plan.pk)).order_by("id")


@login_required
@require_GET
def plan_detail(request, pk: int):
    plan = _visible_plan(request, pk)
    template = "migrations_app/_plan_panel.html" if request.htmx else "migrations_app/plan_detail.html"
    return render(request, template, _plan_context(request, plan))


def _act(request, pk: int, service, **kwargs):
    plan = _visible_plan(request, pk)
    refused = run_action(request, f"Plan #{pk}",
                         lambda: service(plan=plan, actor=request.user, ip=client_ip(request), **kwargs))
    return refused or redirect("plan_detail", pk=pk)


@login_required
@require_POST
def plan_fallback(request, pk: int, item_pk: int):
    plan = _visible_plan(request, pk)
    item = get_object_or_404(PlanItem, pk=item_pk, plan=plan)
    return _act(request, pk, plan_services.move_plan_set_fallback, item=item,
                fallback=request.POST.get("fallback", "")[:20])


@login_required
@require_POST
def plan_submit(request, pk: int):
    return _act(request, pk, plan_services.move_plan_submit)


@login_required
@require_POST
def plan_approve(request, pk: int):
    form = CommentForm(request.POST)
    return _act(request, pk, plan_services.move_plan_approve,
                comment=form.cleaned_data["comment"] if form.is_valid() else "")


@login_required
@require_POST
def plan_reject(request, pk: int):
    form = RejectForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Plan #{pk}: a rejection needs a reason the requester can act on.")
        return redirect("plan_detail", pk=pk)
    return _act(request, pk, plan_services.move_plan_reject, reason=form.cleaned_data["reason"])


@login_required
@require_POST
def plan_cancel(request, pk: int):
    return _act(request, pk, plan_services.move_plan_cancel, reason=request.POST.get("reason", "")[:2000])


@login_required
@require_GET
def plan_queue(request):
    """The approvals page's "Plans" section (re-read live when a plan changes)."""
    verdict = access.can_watch_approvals(request.user)
    if not verdict:
        _deny(request, verdict)
    return render(request, "migrations_app/_plan_cards.html",
                  {"plan_queue": plan_cards(request.user), "statuses": PlanStatus})


def plan_cards(user) -> list[MovePlan]:
    """The plans of the approvals page, each with its stages and whether this user may act now."""
    cards = list(selectors.plan_approval_queue(user))
    for plan in cards:
        plan.stage_views = selectors.approval_stages(plan)
        plan.can_decide = access.can_decide_plan(user, plan)
    return cards
