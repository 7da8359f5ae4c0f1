"""Read-side queries: what a user may see, and the choices a Migrate form may offer."""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.contrib.auth.models import User
from django.db.models import Prefetch, Q, QuerySet, prefetch_related_objects
from django.utils import timezone

from drivers.base import Capability
from migrations_app import access
from migrations_app.choices import AWAITING_DECISION, OPEN, TERMINAL, PlanStatus, RequestStatus, Role
from migrations_app.estimates import Estimate, estimate
from migrations_app.models import (
    AuditEntry,
    Datastore,
    Host,
    MigrationRequest,
    RunEvent,
    VirtualDisk,
    VirtualMachine,
)
from migrations_app.policy.rules import Approval, StageSpec, stage_progress


def as_id(value: str) -> int | None:
    """A database id from a query parameter, or None (str.isdigit accepts other scripts' digits)."""
    return int(value) if re.fullmatch(r"[0-9]{1,18}", value or "") else None


def visible_vms(user) -> QuerySet[VirtualMachine]:
    qs = VirtualMachine.objects.filter(present=True).select_related(
        "host__cluster__datacenter", "owner_group", "connection"
    ).prefetch_related(Prefetch("disks", queryset=VirtualDisk.objects.select_related("datastore")))
    if access.sees_everything(user):
        return qs
    if access.has_role(user, Role.REQUESTER):
        return qs.filter(owner_group__in=user.groups.all())
    return qs.none()


def vm_search(user, *, text: str = "", cluster_id: str = "", host_id: str = "", power: str = "", tag: str = ""):
    qs = visible_vms(user)
    if text:
        qs = qs.filter(Q(name__icontains=text) | Q(host__name__icontains=text) | Q(folder__icontains=text))
    if as_id(cluster_id) is not None:
        qs = qs.filter(host__cluster_id=as_id(cluster_id))
    if as_id(host_id) is not None:
        qs = qs.filter(host_id=as_id(host_id))
    if power:
        qs = qs.filter(power_state=power)
    if tag:
        # JSON containment is not on SQLite; tags are short lists, so a text match is exact enough.
        qs = qs.filter(tags__icontains=f'"{tag}"')
    return qs


def visible_requests(user) -> QuerySet[MigrationRequest]:
    qs = MigrationRequest.objects.select_related(
        "vm", "requester", "target_host", "target_datastore", "decided_by", "run"
    )
    if access.sees_everything(user):
        return qs
    return qs.filter(Q(requester=user) | Q(vm__owner_group__in=user.groups.all())).distinct()


def my_requests(user) -> QuerySet[MigrationRequest]:
    return visible_requests(user).filter(requester=user)


def approval_queue(user, *, mine_only: bool = False) -> list[MigrationRequest]:
    """Requests waiting for a decision (never the user's own, never one whose
    window has closed: the expiry pass ends those). ``mine_only``: only those whose
    current stage this user may sign now ("Pending for me")."""
    if not access.can_watch_approvals(user):
        return []
    queue = (
        visible_requests(user)
        .filter(status=RequestStatus.PENDING_APPROVAL)
        .exclude(requester=user)
        .exclude(window_end__lte=timezone.now())
        .select_related("vm__owner_group", "vm__host__cluster")
        .prefetch_related("approvals__approver")
        .order_by("created_at", "id")
    )
    return [r for r in queue if access.can_decide(user, r)] if mine_only else list(queue)


def current_approvers(request: MigrationRequest) -> list[User]:
    """The users who may act on the request's current stage now (``access.can_decide`` says yes
    for each): members of the stage's groups holding the approver role, minus the requester and
    anyone who already signed this request; admins too while the admin bypass is on."""
    return current_approvers_many([request])[request.pk]


def current_approvers_many(requests: list[MigrationRequest]) -> dict[int, list[User]]:
    """``current_approvers`` of many requests (request id -> users), with a constant number of
    queries: the candidates of every current stage, their groups, and the requests' signatures."""
    waiting = [r for r in requests if r.status in AWAITING_DECISION]
    out: dict[int, list[User]] = {r.pk: [] for r in requests}
    if not waiting:
        return out
    names = {g for r in waiting for g in r.stages[r.current_stage].groups}
    reach = Q(groups__name__in=names)
    if access.admin_bypass_enabled():
        reach |= Q(groups__name=Role.ADMIN) | Q(is_superuser=True)
    candidates = list(User.objects.filter(is_active=True).filter(reach).distinct().order_by("username"))
    access.load_group_names(candidates)
    prefetch_related_objects([r for r in waiting if "approvals" not in getattr(r, "_prefetched_objects_cache", {})],
                             "approvals")
    for request in waiting:
        out[request.pk] = [u for u in candidates if u.pk != request.requester_id and access.can_decide(u, request)]
    return out


def current_plan_approvers(plan) -> list[User]:
    """The users who may sign the plan's current stage now (``access.can_decide_plan`` says yes for
    each), found as ``current_approvers`` finds a request's."""
    if plan.status != PlanStatus.PENDING_APPROVAL or plan.current_stage >= len(plan.stages):
        return []
    stage = plan.stages[plan.current_stage]
    reach = Q(groups__name__in=stage.groups)
    if access.admin_bypass_enabled():
        reach |= Q(groups__name=Role.ADMIN) | Q(is_superuser=True)
    candidates = User.objects.filter(is_active=True).filter(reach).exclude(pk=plan.requester_id).distinct()
    return [u for u in candidates.order_by("username") if access.can_decide_plan(u, plan)]


@dataclass(frozen=True)
class StageView:
    """One stage of a request as the approval card and the request page show it."""

    number: int
    total: int
    spec: StageSpec
    state: str  # "done", "current", "waiting" (a later stage), "skipped" (bypassed or decided before it)
    signed: tuple[str, ...]  # who approved this stage
    progress: int

    @property
    def summary(self) -> str:
        """E.g. "Stage 2 of 2: two distinct approvers from change-board (1 of 2: bob)"."""
        who = f": {', '.join(self.signed)}" if self.signed else ""
        return (f"Stage {self.number} of {self.total}{' (' + self.spec.name + ')' if self.spec.name else ''}: "
                f"{self.spec.describe()} ({self.progress} of {self.spec.needed}{who})")


def approval_stages(request) -> list[StageView]:
    """The frozen stages of a request (or of a move plan: both carry ``stages``, ``current_stage``
    and ``approvals``) with who signed each; empty when the policy decided alone."""
    stages = request.stages
    rows = list(request.approvals.all())
    awaiting = request.status in AWAITING_DECISION  # a plan's "pending_approval" reads the same
    out = []
    for i, stage in enumerate(stages):
        signed = [a for a in rows if a.stage == i]
        progress = stage_progress(stage, [Approval(a.approver_id, tuple(a.groups)) for a in signed])
        if i < request.current_stage:
            state = "done" if progress >= stage.needed else "skipped"
        elif i == request.current_stage and awaiting:
            state = "current"
        else:
            state = "waiting" if awaiting else "skipped"
        names = tuple(a.approver.username + (" (admin bypass)" if a.bypass else "") for a in signed)
        out.append(StageView(i + 1, len(stages), stage, state, names, progress))
    return out


def request_estimate(request: MigrationRequest) -> Estimate:
    """The same estimate the policy's conditions saw (``migrations_app.estimates``)."""
    return estimate(memory_bytes=request.vm.memory_bytes, disk_bytes=request.vm.disk_bytes, kind=request.kind)


def conflicting_requests(request: MigrationRequest) -> list[MigrationRequest]:
    """Other open requests that touch the same hosts or datastores (an approver weighs them)."""
    hosts = {request.vm.host_id, request.target_host_id} - {None}
    stores = set(request.vm.datastore_ids()) | ({request.target_datastore_id} if request.target_datastore_id else set())
    return list(
        MigrationRequest.objects.filter(status__in=OPEN)
        .exclude(pk=request.pk)
        .filter(Q(vm__host__in=hosts) | Q(target_host__in=hosts) | Q(vm__disks__datastore__in=stores)
                | Q(target_datastore__in=stores))
        .select_related("vm", "target_host", "target_datastore")
        .distinct()
        .order_by("created_at")[:10]
    )


def recent_migrations(vm, *, limit: int = 5) -> list[MigrationRequest]:
    return list(MigrationRequest.objects.filter(vm=vm, status__in=TERMINAL).order_by("-updated_at")[:limit])


def visible_plans(user):
    """Move plans this user may see (approvers, auditors and admins see them all)."""
    from migrations_app.models import MovePlan

    qs = MovePlan.objects.select_related("requester", "decided_by", "subject_host", "subject_datastore",
                                         "subject_cluster", "connection")
    return qs if access.sees_everything(user) else qs.none()


def plan_approval_queue(user):
    """Plans waiting for a decision this user may take (never their own)."""
    from migrations_app.choices import PlanStatus

    if not access.can_watch_approvals(user):
        return visible_plans(user).none()
    return (visible_plans(user).filter(status=PlanStatus.PENDING_APPROVAL).exclude(requester=user)
            .prefetch_related("approvals__approver").order_by("created_at"))


def plan_items(plan):
    return plan.items.select_related("vm", "source_host", "target_host", "target_datastore", "request__run")


def open_request_for_vm(vm) -> MigrationRequest | None:
    return MigrationRequest.objects.filter(vm=vm, status__in=OPEN).first()


def open_requests_for_vms(vm_ids) -> dict[int, MigrationRequest]:
    """VM id -> its open request, for many VMs in one query (``open_request_for_vm`` for a batch)."""
    rows = MigrationRequest.objects.filter(vm_id__in=list(vm_ids), status__in=OPEN).only("pk", "vm_id", "status")
    return {r.vm_id: r for r in rows.order_by("pk")}


def live_move_blockers(vms) -> dict[int, str]:
    """VM id -> why it cannot move live whatever the target (gone from the inventory, not
    running, an open request already), for the many-VM Migrate page: shown before a target is
    chosen. The submission checks all of it again, with the targets."""
    vms = list(vms)
    open_requests = open_requests_for_vms([vm.pk for vm in vms])
    out = {}
    for vm in vms:
        existing = open_requests.get(vm.pk)
        if not vm.present:
            out[vm.pk] = "no longer in the hypervisor's inventory"
        elif existing is not None:
            out[vm.pk] = f"already has an open request (#{existing.pk}, {existing.get_status_display().lower()})"
        elif vm.power_state != "on":
            out[vm.pk] = f"{vm.get_power_state_display().lower()}; a live migration needs it running"
    return out


def run_events_after(run, seq: int, limit: int = 1000) -> list[RunEvent]:
    return list(RunEvent.objects.filter(run=run, seq__gt=seq).order_by("seq")[:limit])


def recent_run_events(run, limit: int = 50) -> list[RunEvent]:
    """The newest events of a run, oldest first (the page shows a window, the API has them all)."""
    return list(reversed(RunEvent.objects.filter(run=run).order_by("-seq")[:limit]))


def audit_entries(*, actor: str = "", vm: str = "", action: str = "", outcome: str = "", request_id: str = "",
                  since=None, until=None, text: str = "") -> QuerySet[AuditEntry]:
    qs = AuditEntry.objects.all()
    if actor:
        qs = qs.filter(actor_name__iexact=actor)
    if vm:
        qs = qs.filter(vm_name__icontains=vm)
    if action:
        qs = qs.filter(action=action)
    if outcome:
        qs = qs.filter(outcome=outcome)
    if as_id(request_id) is not None:
        qs = qs.filter(request_id=as_id(request_id))
    if since:
        qs = qs.filter(created_at__gte=since)
    if until:
        qs = qs.filter(created_at__lte=until)
    if text:
        qs = qs.filter(Q(reason__icontains=text) | Q(vm_name__icontains=text) | Q(actor_name__icontains=text))
    return qs


# -- Migrate form choices: every candidate, each with the reason it cannot be chosen ----------


@dataclass(frozen=True)
class Choice:
    obj: object
    reason: str = ""  # empty: a valid choice

    @property
    def valid(self) -> bool:
        return not self.reason


def host_choices(vm: VirtualMachine) -> list[Choice]:
    """Hosts of the VM's connection; only other usable hosts of its cluster that see its disks are valid."""
    # Where the driver copies host-local disks along with a compute move, any host may be chosen.
    vm_ds = set() if vm.connection.supports(Capability.COMPUTE_COPIES_LOCAL_DISKS) else vm.datastore_ids()
    hosts = Host.objects.filter(connection=vm.connection, present=True).select_related("cluster").prefetch_related(
        "datastores"
    )
    out = []
    for host in hosts:
        if host.pk == vm.host_id:
            continue
        if host.cluster_id != vm.host.cluster_id:
            reason = f"in cluster {host.cluster.name}; live moves stay within {vm.host.cluster.name}"
        elif not host.usable:
            reason = host.unusable_reason()
        else:
            seen = {d.pk for d in host.datastores.all()}
            missing = vm_ds - seen
            reason = "does not see the VM's datastore; choose a storage move too" if missing else ""
        out.append(Choice(host, reason))
    out.sort(key=lambda c: (not c.valid, c.obj.name))
    return out


def datastore_choices(vm: VirtualMachine, target_host: Host | None) -> list[Choice]:
    """Datastores the (target) host sees with room for the VM's disks; others with the reason why not."""
    host = target_host or vm.host
    needed = vm.disk_bytes
    current = vm.datastore_ids()
    seen = set(host.datastores.values_list("pk", flat=True))
    out = []
    for ds in Datastore.objects.filter(connection=vm.connection, present=True):
        if ds.pk in current and len(current) == 1:
            reason = "the VM's disks are already here"
        elif ds.pk not in seen:
            reason = f"not mounted on {host.name}"
        elif not ds.accessible:
            reason = "not accessible"
        elif ds.free_bytes < needed:
            reason = f"{_gib(ds.free_bytes)} free, needs {_gib(needed)}"
        else:
            reason = ""
        out.append(Choice(ds, reason))
    out.sort(key=lambda c: (not c.valid, -c.obj.free_bytes))
    return out


def _gib(n: int) -> str:
    return f"{n / 1024**3:,.0f} GiB"


def _merged(per_vm: list[tuple[VirtualMachine, list[Choice]]], *, absent: str) -> list[Choice]:
    """One list of choices for several VMs: a choice is valid only if it is for every VM; else
    the reason names the first VM it is not valid for. ``absent`` says why a VM's list lacks one."""
    objs: dict[int, object] = {}
    reasons: dict[int, str] = {}
    for _vm, choices in per_vm:
        for c in choices:
            objs.setdefault(c.obj.pk, c.obj)
    for vm, choices in per_vm:
        mine = {c.obj.pk: c for c in choices}
        for pk in objs:
            if pk in reasons:
                continue
            choice = mine.get(pk)
            reason = absent if choice is None else choice.reason
            if reason:
                reasons[pk] = f"{vm.name}: {reason}"
    out = [Choice(obj, reasons.get(pk, "")) for pk, obj in objs.items()]
    out.sort(key=lambda c: (not c.valid, c.obj.name))
    return out


def host_choices_many(vms: list[VirtualMachine]) -> list[Choice]:
    """``host_choices`` for several VMs moving to one host: valid when valid for each of them."""
    return _merged([(vm, host_choices(vm)) for vm in vms], absent="runs there already (or it is on another manager)")


def datastore_choices_many(vms: list[VirtualMachine], target_host: Host | None) -> list[Choice]:
    """``datastore_choices`` for several VMs moving to one datastore: valid when valid for each."""
    return _merged([(vm, datastore_choices(vm, target_host)) for vm in vms], absent="on another manager")
