"""Who may do what: the one place views, the API, services and websocket subscriptions ask.

Roles are Django groups named after ``choices.Role``; a superuser holds every role. Ownership of a
VM comes from its owner group: a requester may ask to move the VMs of the groups they belong to.
The rule that a requester never approves their own request lives here and is enforced by the
services, not only hidden in the page.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from migrations_app.choices import (
    AWAITING_DECISION,
    CANCELABLE,
    PLAN_CANCELABLE,
    PLAN_EDITABLE,
    PlanStatus,
    Role,
)
from migrations_app.windows import window_closed


@dataclass(frozen=True)
class Verdict:
    """The answer to "may this user do this?": truthy when allowed, with the reason when not."""

    allowed: bool
    reason: str = ""
    conflict: bool = False  # refused because of the object's state, not the user's rights
    bypass: bool = False  # allowed only through the admin bypass of approval stages

    def __bool__(self) -> bool:
        return self.allowed


ALLOW = Verdict(True)


def deny(reason: str, *, conflict: bool = False) -> Verdict:
    return Verdict(False, reason, conflict)


def group_names(user) -> frozenset[str]:
    """The names of the user's groups, read once per user object (a page asks for every row)."""
    cached = getattr(user, "_portal_groups", None)
    if cached is None:
        cached = user._portal_groups = frozenset(user.groups.values_list("name", flat=True))
    return cached


def load_group_names(users) -> None:
    """Read the group names of many users in one query (``group_names`` then asks nothing)."""
    from django.contrib.auth.models import Group

    missing = {u.pk: u for u in users if getattr(u, "_portal_groups", None) is None}
    if not missing:
        return
    names: dict[int, set[str]] = {pk: set() for pk in missing}
    for user_id, name in Group.objects.filter(user__in=list(missing)).values_list("user", "name"):
        names[user_id].add(name)
    for pk, user in missing.items():
        user._portal_groups = frozenset(names[pk])


def roles(user) -> frozenset[str]:
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return frozenset()
    cached = getattr(user, "_portal_roles", None)
    if cached is None:
        names = group_names(user)
        cached = frozenset(Role) if user.is_superuser else frozenset(r for r in Role if r.value in names)
        user._portal_roles = cached
    return cached


def has_role(user, *wanted: Role) -> bool:
    return bool(roles(user) & set(wanted))


def sees_everything(user) -> bool:
    """Approvers, auditors and admins see every VM and request; requesters see their own."""
    return has_role(user, Role.APPROVER, Role.AUDITOR, Role.ADMIN)


def owns_vm(user, vm) -> bool:
    return vm.owner_group_id is not None and user.groups.filter(pk=vm.owner_group_id).exists()


def can_view_vm(user, vm) -> Verdict:
    if sees_everything(user) or (has_role(user, Role.REQUESTER) and owns_vm(user, vm)):
        return ALLOW
    return deny("you do not own this VM")


def can_request_migration(user, vm) -> Verdict:
    return can_request_migrations(user, [vm])[0]


def can_request_migrations(user, vms) -> list[Verdict]:
    """``can_request_migration`` for each VM of a batch, in order: the user's groups are read once."""
    if not has_role(user, Role.REQUESTER, Role.ADMIN):
        return [deny("only requesters can ask for migrations")] * len(vms)
    admin = has_role(user, Role.ADMIN)
    owned = set() if admin else set(user.groups.filter(pk__in={vm.owner_group_id for vm in vms} - {None})
                                    .values_list("pk", flat=True))
    out = []
    for vm in vms:
        if not admin and vm.owner_group_id not in owned:
            out.append(deny(f"you are not in the group that owns {vm.name}"))
        elif not vm.present:
            out.append(deny(f"{vm.name} is no longer in the hypervisor's inventory"))
        else:
            out.append(ALLOW)
    return out


def can_view_request(user, request) -> Verdict:
    if request.requester_id == getattr(user, "pk", None) or sees_everything(user):
        return ALLOW
    if has_role(user, Role.REQUESTER) and owns_vm(user, request.vm):
        return ALLOW
    return deny("you may not see this request")


def admin_bypass_enabled() -> bool:
    """PORTAL["ADMIN_BYPASS_APPROVAL"] (default off): an admin's approval completes every stage."""
    return bool(settings.PORTAL.get("ADMIN_BYPASS_APPROVAL", False))


def stage_groups_of(user, stage) -> tuple[str, ...]:
    """The stage's groups this user is a member of, if they hold the approver role. Membership is
    the real one: a superuser signs only for groups they belong to (else, like any admin, only
    through the admin bypass), so the bypass being off means something for them too."""
    if not has_role(user, Role.APPROVER):
        return ()
    names = group_names(user)
    return tuple(g for g in stage.groups if g in names)


def _stage_verdict(user, subject) -> Verdict:
    """May this approver sign the current stage of ``subject`` now? A request and a move plan both
    carry ``stages``, ``current_stage`` and their signatures as ``approvals`` (own request or plan
    and state are checked before)."""
    from migrations_app.policy.rules import Approval, approval_helps

    stages = subject.stages
    number, total = subject.current_stage + 1, len(stages)
    if subject.current_stage >= total:
        return deny("every approval stage is already signed", conflict=True)
    stage = stages[subject.current_stage]
    mine = stage_groups_of(user, stage)
    if not mine:
        return deny(f"stage {number} of {total} waits for {stage.describe()}; you are not in "
                    f"{' or '.join(stage.groups)}")
    signed = list(subject.approvals.all())
    earlier = sorted(a.stage for a in signed if a.approver_id == user.pk and a.stage < subject.current_stage)
    if earlier:
        return deny(f"you signed stage {earlier[0] + 1}; stage {number} needs someone else")
    current = [Approval(a.approver_id, tuple(a.groups)) for a in signed if a.stage == subject.current_stage]
    if any(a.approver_id == user.pk for a in current):
        return deny(f"you already approved stage {number}", conflict=True)
    if not approval_helps(stage, current, Approval(user.pk, mine)):
        return deny(f"stage {number} already has an approver from {', '.join(mine)}; it waits for "
                    f"{stage.describe()}", conflict=True)
    return ALLOW


def _stage_or_bypass(user, subject) -> Verdict:
    """The stage verdict, or, when it says no, the admin bypass if it is on."""
    verdict = _stage_verdict(user, subject)
    if not verdict and has_role(user, Role.ADMIN) and admin_bypass_enabled():
        return Verdict(True, "admin bypass of the approval stages", bypass=True)
    return verdict


def can_decide(user, request) -> Verdict:
    """Approve or reject the request's current stage. Whoever may approve the stage now may also
    reject the request. The requester never decides on their own request, whatever their roles
    (superuser and admin bypass included). A member of the stage's groups who holds the approver
    role may sign, once per stage, and never a later stage after signing an earlier one. An admin
    may act on any stage only when PORTAL["ADMIN_BYPASS_APPROVAL"] is on (``Verdict.bypass``)."""
    if not has_role(user, Role.APPROVER, Role.ADMIN):
        return deny("only approvers can approve or reject requests")
    if request.requester_id == user.pk:
        return deny("you cannot approve or reject your own request")
    if request.status not in AWAITING_DECISION:
        return deny(f"this request is already {request.get_status_display().lower()}", conflict=True)
    if closed := window_closed(request):  # too late to decide: the services expire it
        return deny(closed, conflict=True)
    return _stage_or_bypass(user, request)


def can_cancel(user, request) -> Verdict:
    if request.requester_id != user.pk and not has_role(user, Role.ADMIN):
        return deny("only the requester or an admin can cancel a request")
    if request.status not in CANCELABLE:
        return deny(f"this request is already {request.get_status_display().lower()}", conflict=True)
    return ALLOW


def can_view_audit(user) -> Verdict:
    return ALLOW if has_role(user, Role.AUDITOR, Role.ADMIN) else deny("only auditors can read the audit log")


def can_watch_approvals(user) -> Verdict:
    return ALLOW if has_role(user, Role.APPROVER, Role.ADMIN) else deny("only approvers see the approval queue")


# -- move plans ---------------------------------------------------------------------------------
# Evacuating a host or a datastore, or rebalancing a cluster, moves VMs of many owner groups: it is
# an operator's action. Admins build plans; approvers sign the stages the approval policy froze on
# the plan, as for a request (admins only through the admin bypass), never the plan's own
# requester; approvers, auditors and admins see them.


def can_build_plan(user) -> Verdict:
    return ALLOW if has_role(user, Role.ADMIN) else deny("only admins build evacuation and rebalance plans")


def can_view_plan(user, plan) -> Verdict:
    return ALLOW if sees_everything(user) else deny("you may not see this plan")


def can_edit_plan(user, plan) -> Verdict:
    """Choose fallbacks and submit: the plan's requester, while it is a draft."""
    if plan.requester_id != getattr(user, "pk", None) or not has_role(user, Role.ADMIN):
        return deny("only the admin who built this plan can change or submit it")
    if plan.status not in PLAN_EDITABLE:
        return deny(f"this plan is already {plan.get_status_display().lower()}", conflict=True)
    return ALLOW


def can_decide_plan(user, plan) -> Verdict:
    """Approve or reject the plan's current stage: exactly the rules of ``can_decide`` (the stages
    frozen on the plan at submission, fresh eyes per stage, never the plan's requester, admins
    only through the admin bypass)."""
    if not has_role(user, Role.APPROVER, Role.ADMIN):
        return deny("only approvers can approve or reject plans")
    if plan.requester_id == user.pk:
        return deny("you cannot approve or reject your own plan")
    if plan.status != PlanStatus.PENDING_APPROVAL:
        return deny(f"this plan is {plan.get_status_display().lower()}", conflict=True)
    return _stage_or_bypass(user, plan)


def can_cancel_plan(user, plan) -> Verdict:
    if plan.requester_id != user.pk and not has_role(user, Role.ADMIN):
        return deny("only the plan's requester or an admin can cancel it")
    if plan.status not in PLAN_CANCELABLE or plan.cancel_requested_at is not None:
        return deny(f"this plan is already {plan.get_status_display().lower()}"
                    + (" and being cancelled" if plan.cancel_requested_at else ""), conflict=True)
    return ALLOW


# -- personal API tokens -------------------------------------------------------------------------
# Every user may make tokens for themselves (a token carries its user's rights, nothing more); a
# token never makes another one. Its user or an admin revokes it.


def can_create_api_token(user) -> Verdict:
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return deny("log in to make an API token")
    if getattr(user, "api_token", None) is not None:
        return deny("an API token cannot make API tokens; log in to the portal")
    return ALLOW


def can_view_api_token(user, token) -> Verdict:
    if token.user_id == getattr(user, "pk", None) or has_role(user, Role.ADMIN):
        return ALLOW
    return deny("this API token is not yours")


def can_revoke_api_token(user, token) -> Verdict:
    if not can_view_api_token(user, token):
        return deny("only the token's user or an admin can revoke it")
    if token.revoked_at is not None:
        return deny("this API token is already revoked", conflict=True)
    return ALLOW


def roles_context(request) -> dict:
    """Template context: the current user's roles, for showing the right navigation."""
    user_roles = roles(request.user)
    return {"portal_roles": {r.value for r in user_roles}}
