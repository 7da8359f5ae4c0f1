"""Services for move plans: build, choose fallbacks, submit, approve, reject, cancel, and the
bookkeeping as their moves finish (retry a failed VM, finish the plan).

A plan runs as ordinary migration requests, one per movable VM, created already approved ("approved
as part of plan #N") and queued through ``migration_run_enqueue``, so admission control, cancel,
reconciliation, audit and live progress treat them like any other. When a request of a plan ends,
``plan_request_settled`` (called on commit by the run's finish and by cancel) records the item's
outcome, retries a failed move up to ``max_attempts``, and finishes the plan once every item ended.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from drivers.base import Capability
from migrations_app import access, admission, events, placement
from migrations_app.choices import (
    ITEM_TERMINAL,
    TERMINAL,
    AuditAction,
    AuditOutcome,
    MigrationKind,
    PlanFallback,
    PlanItemStatus,
    PlanKind,
    PlanStatus,
    PowerState,
    RequestStatus,
)
from migrations_app.models import (
    Cluster,
    Datastore,
    Host,
    MigrationRequest,
    MovePlan,
    PlanItem,
    VirtualMachine,
)
from migrations_app.selectors import open_request_for_vm
from migrations_app.services.audit import audit_denied, audit_record
from migrations_app.services.errors import ActionRefused
from migrations_app.services.preflight import check_move

log = logging.getLogger(__name__)
P, Item = PlanStatus, PlanItemStatus


def _set_status(plan: MovePlan, target: str) -> str:
    old = plan.status
    PlanStatus.check_transition(old, target)
    plan.status = target
    return old


def _audit(plan: MovePlan, *, actor, action: AuditAction, reason: str = "", ip: str | None = None,
           outcome: AuditOutcome = AuditOutcome.SUCCESS, vm_name: str = "", data: dict | None = None) -> None:
    audit_record(actor=actor, action=action, object_type="move_plan", object_id=str(plan.pk), reason=reason, ip=ip,
                 outcome=outcome, vm_name=vm_name, data={"kind": plan.kind, "status": plan.status, **(data or {})})


def plan_progress(plan: MovePlan) -> tuple[int, int]:
    """(items ended, items in all): the plan's overall progress."""
    statuses = list(plan.items.values_list("status", flat=True))
    return sum(s in ITEM_TERMINAL for s in statuses), len(statuses)


def notify_plan_changed(plan: MovePlan) -> None:
    """After commit: the plan's page and the approvers' queue re-read the plan."""
    done, total = plan_progress(plan)
    payload = events.plan_changed_payload(plan, done=done, total=total)
    transaction.on_commit(lambda: events.emit(events.plan_group(plan.pk), payload))
    transaction.on_commit(lambda: events.emit(events.approvals_group(), payload))


def _lock(plan: MovePlan) -> MovePlan:
    return MovePlan.objects.select_for_update(of=("self",)).select_related("connection").get(pk=plan.pk)


def _refusable(action: AuditAction):
    """An ActionRefused raised by the service is audited (in its own transaction), then re-raised."""

    def wrap(fn):
        def inner(*, plan: MovePlan, actor, ip: str | None = None, **kwargs):
            try:
                return fn(plan=plan, actor=actor, ip=ip, **kwargs)
            except ActionRefused as exc:
                audit_denied(actor=actor, action=action, reason=exc.message, ip=ip, object_type="move_plan",
                             object_id=str(plan.pk))
                raise

        inner.__name__, inner.__doc__ = fn.__name__, fn.__doc__
        return inner

    return wrap


def _check(verdict) -> None:
    if not verdict:
        raise ActionRefused(verdict.reason, denied=not verdict.conflict, conflict=verdict.conflict)


# -- building -----------------------------------------------------------------------------------


def _vm_blocker(vm: VirtualMachine, open_vm_ids: set[int]) -> str:
    if vm.power_state != PowerState.ON:
        return f"{vm.get_power_state_display().lower()}; a live migration needs it running"
    if vm.pk in open_vm_ids:
        return "it already has an open migration request"
    return ""


def _capacities(connection, cluster: Cluster, *, compute: bool) -> tuple[list[placement.HostCap], list[placement.StoreCap],
                                                         list[placement.VMInfo]]:
    """The cluster as the planner sees it, read from the portal's inventory."""
    hosts = list(Host.objects.filter(connection=connection, cluster=cluster, present=True)
                 .prefetch_related("datastores").order_by("pk"))
    copies_local = connection.supports(Capability.COMPUTE_COPIES_LOCAL_DISKS)
    host_caps = [placement.HostCap(id=h.pk, name=h.name, cluster_id=h.cluster_id, memory_bytes=h.memory_bytes,
                                   usable=h.usable, unusable_reason=h.unusable_reason(),
                                   datastore_ids=frozenset(d.pk for d in h.datastores.all()))
                 for h in hosts]
    stores = list(Datastore.objects.filter(connection=connection, present=True).prefetch_related("hosts")
                  .order_by("pk"))
    store_caps = [placement.StoreCap(id=d.pk, name=d.name, free_bytes=d.free_bytes,
                                     host_ids=frozenset(h.pk for h in d.hosts.all()), usable=d.accessible)
                  for d in stores]
    vms = list(VirtualMachine.objects.filter(connection=connection, host__in=hosts, present=True)
               .prefetch_related("disks").order_by("pk"))
    open_ids = set(MigrationRequest.objects.filter(vm__in=vms).exclude(status__in=TERMINAL)
                   .values_list("vm_id", flat=True))
    vm_infos = []
    for vm in vms:
        by_store: dict[int, int] = {}
        for disk in vm.disks.all():
            by_store[disk.datastore_id] = by_store.get(disk.datastore_id, 0) + disk.capacity_bytes
        vm_infos.append(placement.VMInfo(
            id=vm.pk, name=vm.name, host_id=vm.host_id, memory_bytes=vm.memory_bytes,
            disk_bytes=sum(by_store.values()),
            # A driver that copies local disks along (libvirt) needs no shared datastore for a compute move.
            datastore_ids=frozenset() if compute and copies_local else frozenset(by_store),
            tags=tuple(vm.tags or ()), blocker=_vm_blocker(vm, open_ids),
            disk_bytes_by_store=tuple(sorted(by_store.items()))))
    return host_caps, store_caps, vm_infos


def _estimator(connection, kind: str) -> placement.Estimator:
    """Link speed from the connection's options (the simulator's speed compresses time); as many
    moves at once as admission control lets leave one host (or datastore)."""
    options = connection.options or {}
    bandwidth = float(options.get("bandwidth_bytes_per_s") or placement.GiB) * float(options.get("speed") or 1.0)
    limits = admission.Limits.for_connection(connection.kind, options)
    if kind == PlanKind.EVACUATE_DATASTORE:
        parallel = min(limits.datastore_max // max(1, limits.datastore_storage),
                       limits.host_max // max(1, limits.host_storage))
    else:
        parallel = min(limits.host_max // max(1, limits.host_compute), limits.network_max)
    return placement.Estimator(bandwidth_bytes_per_s=bandwidth, parallel=max(1, parallel))


def move_plan_build(*, requester, kind: str, reason: str, host: Host | None = None, datastore: Datastore | None = None,
                    cluster: Cluster | None = None, ip: str | None = None) -> MovePlan:
    """Plan an evacuation (of ``host`` or ``datastore``) or a rebalance (of ``cluster``): a draft
    with a target per VM, the VMs that cannot move (fallback: skip), the order and the duration."""
    verdict = access.can_build_plan(requester)
    if not verdict:
        audit_denied(actor=requester, action=AuditAction.PLAN_BUILT, reason=verdict.reason, ip=ip,
                     object_type="move_plan")
        raise ActionRefused(verdict.reason, denied=True)
    reason = (reason or "").strip()
    if not reason:
        raise ActionRefused("say why (maintenance, storage upgrade...)", field="reason")
    subject = {PlanKind.EVACUATE_HOST: host, PlanKind.EVACUATE_DATASTORE: datastore,
               PlanKind.REBALANCE_CLUSTER: cluster}.get(kind, "unknown")
    if subject == "unknown":
        raise ActionRefused(f"unknown plan kind {kind!r}", field="kind")
    if subject is None:
        raise ActionRefused("choose what to evacuate or rebalance", field="subject")
    headroom = settings.PORTAL["PLAN_HOST_HEADROOM"]

    with transaction.atomic():
        if kind == PlanKind.EVACUATE_HOST:
            host = Host.objects.select_related("connection", "cluster").get(pk=host.pk)
            connection, clusters = host.connection, [host.cluster]
        elif kind == PlanKind.EVACUATE_DATASTORE:
            datastore = Datastore.objects.select_related("connection").get(pk=datastore.pk)
            connection = datastore.connection
            clusters = list(Cluster.objects.filter(hosts__datastores=datastore).distinct())
        else:
            cluster = Cluster.objects.select_related("datacenter__connection").get(pk=cluster.pk)
            connection, clusters = cluster.datacenter.connection, [cluster]
        estimator = _estimator(connection, kind)
        host_caps, store_caps, vms = [], [], []
        for c in clusters:
            h, s, v = _capacities(connection, c, compute=kind != PlanKind.EVACUATE_DATASTORE)
            host_caps += h
            store_caps, vms = s, vms + v
        if kind == PlanKind.EVACUATE_HOST:
            result = placement.plan_host_evacuation(source_host_id=host.pk, hosts=host_caps, vms=vms,
                                                    headroom=headroom, estimator=estimator)
        elif kind == PlanKind.EVACUATE_DATASTORE:
            capacity = dict(Datastore.objects.filter(connection=connection).values_list("pk", "capacity_bytes"))
            result = placement.plan_datastore_evacuation(source_datastore_id=datastore.pk, stores=store_caps,
                                                         vms=vms, capacities=capacity, estimator=estimator)
        else:
            result = placement.recommend_rebalance(hosts=host_caps, vms=vms, headroom=headroom,
                                                   estimator=estimator)
        plan = MovePlan.objects.create(
            kind=kind, connection=connection, requester=requester, reason=reason,
            subject_host=host if kind == PlanKind.EVACUATE_HOST else None,
            subject_datastore=datastore if kind == PlanKind.EVACUATE_DATASTORE else None,
            subject_cluster=cluster if kind == PlanKind.REBALANCE_CLUSTER else None,
            estimated_duration_s=round(result.estimated_duration_s, 1),
            imbalance_before=result.imbalance_before, imbalance_after=result.imbalance_after,
        )
        source_of = {v.id: v.host_id for v in vms}
        max_attempts = max(1, settings.PORTAL["PLAN_MAX_ATTEMPTS"])
        items = [
            PlanItem(plan=plan, vm_id=m.vm_id, order=m.order, source_host_id=source_of[m.vm_id],
                     kind=MigrationKind.STORAGE if m.target_datastore_id else MigrationKind.COMPUTE,
                     target_host_id=m.target_host_id, target_datastore_id=m.target_datastore_id, why=m.why,
                     max_attempts=max_attempts)
            for m in result.moves
        ]
        stuck = sorted(result.unmovable.items(), key=lambda kv: next(v.name for v in vms if v.id == kv[0]))
        items += [
            PlanItem(plan=plan, vm_id=vm_id, order=len(result.moves) + n, source_host_id=source_of[vm_id],
                     kind=MigrationKind.STORAGE if kind == PlanKind.EVACUATE_DATASTORE else MigrationKind.COMPUTE,
                     movable=False, blocker=why[:500], fallback=PlanFallback.SKIP, max_attempts=max_attempts)
            for n, (vm_id, why) in enumerate(stuck, start=1)
        ]
        PlanItem.objects.bulk_create(items)
        _audit(plan, actor=requester, action=AuditAction.PLAN_BUILT, reason=reason, ip=ip,
               data={"subject": plan.subject_name, "moves": len(result.moves), "unmovable": len(stuck),
                     "estimated_duration_s": plan.estimated_duration_s,
                     "imbalance": [result.imbalance_before, result.imbalance_after]})
    return plan


def fallback_choices(plan: MovePlan) -> list[tuple[str, str]]:
    """The fallbacks this plan's driver allows for a VM that cannot move live."""
    out = [(PlanFallback.SKIP.value, PlanFallback.SKIP.label)]
    if plan.connection.supports(Capability.COLD_MOVE):
        out.append((PlanFallback.COLD_MOVE.value, PlanFallback.COLD_MOVE.label))
    return out


@_refusable(AuditAction.PLAN_FALLBACK_SET)
def move_plan_set_fallback(*, plan: MovePlan, actor, item: PlanItem, fallback: str, ip: str | None = None) -> PlanItem:
    """The requester chooses what happens to a VM that cannot move live."""
    with transaction.atomic():
        plan = _lock(plan)
        _check(access.can_edit_plan(actor, plan))
        item = PlanItem.objects.select_related("vm").get(pk=item.pk, plan=plan)
        if item.movable:
            raise ActionRefused(f"{item.vm.name} moves live; a fallback is only for VMs that cannot", field="fallback")
        if fallback not in dict(fallback_choices(plan)):
            raise ActionRefused(f"{fallback!r} is not a fallback this hypervisor offers", field="fallback")
        old, item.fallback = item.fallback, fallback
        item.save(update_fields=["fallback"])
        _audit(plan, actor=actor, action=AuditAction.PLAN_FALLBACK_SET, ip=ip, vm_name=item.vm.name,
               data={"item": item.pk, "from": old, "to": fallback})
    return item


@_refusable(AuditAction.PLAN_SUBMITTED)
def move_plan_submit(*, plan: MovePlan, actor, ip: str | None = None) -> MovePlan:
    """The requester sends the reviewed plan to the approvers."""
    with transaction.atomic():
        plan = _lock(plan)
        _check(access.can_edit_plan(actor, plan))
        if not plan.items.filter(movable=True).exists():
            raise ActionRefused("nothing in this plan can move; there is nothing to approve", conflict=True)
        _set_status(plan, P.PENDING_APPROVAL)
        plan.save(update_fields=["status", "updated_at"])
        _audit(plan, actor=actor, action=AuditAction.PLAN_SUBMITTED, reason=plan.reason, ip=ip)
        notify_plan_changed(plan)
    return plan


# -- decision and execution -------------------------------------------------------------------


def _start_attempt(plan: MovePlan, item: PlanItem, *, approver, ip: str | None) -> None:
    """Create the item's next migration request, approved as part of the plan, and queue it.
    When the move is refused now (the world changed, another request holds the VM), the item fails."""
    from migrations_app.services.requests import _approve_locked, notify_request_changed

    attempt = item.attempts + 1
    try:
        with transaction.atomic():  # a savepoint: the request and its audit, or nothing
            vm = (VirtualMachine.objects.select_for_update(of=("self",))
                  .select_related("host__cluster", "connection").get(pk=item.vm_id))
            existing = open_request_for_vm(vm)
            if existing is not None:
                raise ActionRefused(f"{vm.name} already has an open request (#{existing.pk})")
            check_move(vm, item.kind, item.target_host, item.target_datastore)
            request = MigrationRequest.objects.create(
                requester=plan.requester, vm=vm, kind=item.kind, target_host=item.target_host,
                target_datastore=item.target_datastore, reason=f"plan #{plan.pk}: {plan.reason}",
                source_placement=vm.placement_snapshot(),
                policy_note=f"part of plan #{plan.pk}, attempt {attempt} of {item.max_attempts}",
            )
            audit_record(actor=plan.requester, action=AuditAction.REQUEST_SUBMITTED, request=request,
                         reason=request.reason, before=request.source_placement,
                         after={"host": item.target_host.name} if item.target_host_id
                         else {"datastore": item.target_datastore.name},
                         data={"kind": item.kind, "plan": plan.pk, "attempt": attempt})
            comment = f"approved as part of plan #{plan.pk}"
            if attempt > 1:
                comment += f" (attempt {attempt} of {item.max_attempts})"
            _approve_locked(request, approver=approver, comment=comment, ip=ip)
            notify_request_changed(request)
    except ActionRefused as exc:
        item.status = Item.FAILED
        item.explanation = f"Not started: {exc.message}. The VM stays where it is."
        item.save(update_fields=["status", "explanation"])
        _audit(plan, actor=None, action=AuditAction.PLAN_ITEM_SETTLED, outcome=AuditOutcome.FAILURE,
               reason=item.explanation, vm_name=item.vm.name, data={"item": item.pk, "attempt": attempt})
        return
    item.attempts = attempt
    item.request = request
    item.status = Item.MOVING
    item.save(update_fields=["attempts", "request", "status"])


@_refusable(AuditAction.PLAN_APPROVED)
def move_plan_approve(*, plan: MovePlan, actor, comment: str = "", ip: str | None = None) -> MovePlan:
    """An approver approves the whole plan: every movable VM gets an approved, queued request (in
    plan order); admission control decides how many run at once. VMs whose fallback is skip stay."""
    with transaction.atomic():
        plan = _lock(plan)
        _check(access.can_decide_plan(actor, plan))
        _set_status(plan, P.APPROVED)
        plan.decided_by, plan.decided_at, plan.decision_comment = actor, timezone.now(), (comment or "").strip()
        plan.save(update_fields=["status", "decided_by", "decided_at", "decision_comment", "updated_at"])
        _audit(plan, actor=actor, action=AuditAction.PLAN_APPROVED, reason=plan.decision_comment, ip=ip)
        _set_status(plan, P.RUNNING)
        plan.save(update_fields=["status", "updated_at"])
        _audit(plan, actor=None, action=AuditAction.PLAN_STARTED)
        items = plan.items.select_related("vm", "source_host", "target_host__cluster", "target_datastore").order_by("order")
        for item in items:
            if item.movable:
                _start_attempt(plan, item, approver=actor, ip=ip)
            else:  # skip is the only fallback until a driver declares COLD_MOVE
                item.status = Item.SKIPPED
                item.explanation = f"Stays on {item.source_host.name}: {item.blocker}."
                item.save(update_fields=["status", "explanation"])
        _finish_if_done(plan)
        notify_plan_changed(plan)
    return plan


@_refusable(AuditAction.PLAN_REJECTED)
def move_plan_reject(*, plan: MovePlan, actor, reason: str, ip: str | None = None) -> MovePlan:
    reason = (reason or "").strip()
    with transaction.atomic():
        plan = _lock(plan)
        _check(access.can_decide_plan(actor, plan))
        if not reason:
            raise ActionRefused("a rejection needs a reason the requester can act on", field="reason")
        _set_status(plan, P.REJECTED)
        plan.decided_by, plan.decided_at, plan.decision_comment = actor, timezone.now(), reason
        plan.finished_at = plan.decided_at
        plan.save(update_fields=["status", "decided_by", "decided_at", "decision_comment", "finished_at",
                                 "updated_at"])
        plan.items.filter(status=Item.PLANNED).update(status=Item.CANCELLED)
        _audit(plan, actor=actor, action=AuditAction.PLAN_REJECTED, reason=reason, ip=ip)
        notify_plan_changed(plan)
    return plan


@_refusable(AuditAction.PLAN_CANCELLED)
def move_plan_cancel(*, plan: MovePlan, actor, reason: str = "", ip: str | None = None) -> MovePlan:
    """Withdraw a plan before it runs; while it runs, cancel its open moves (a running one aborts on
    the hypervisor) and finish the plan as cancelled once they ended. Moves already done stay done."""
    from migrations_app.services.requests import migration_request_cancel

    reason = (reason or "").strip()
    with transaction.atomic():
        plan = _lock(plan)
        _check(access.can_cancel_plan(actor, plan))
        plan.items.filter(status=Item.PLANNED).update(status=Item.CANCELLED, explanation="Cancelled with the plan.")
        _audit(plan, actor=actor, action=AuditAction.PLAN_CANCELLED, reason=reason, ip=ip)
        if plan.status == P.RUNNING:
            plan.cancel_requested_at = timezone.now()
            plan.save(update_fields=["cancel_requested_at", "updated_at"])
            for item in plan.items.filter(status=Item.MOVING).select_related("request"):
                if item.request.status in TERMINAL:
                    continue  # settled meanwhile; its own bookkeeping runs on commit
                migration_request_cancel(request=item.request, actor=plan.requester,
                                         reason=f"plan #{plan.pk} cancelled: {reason}".strip(": "), ip=ip)
            _finish_if_done(plan)
        else:
            _set_status(plan, P.CANCELLED)
            plan.finished_at = timezone.now()
            plan.save(update_fields=["status", "finished_at", "updated_at"])
        notify_plan_changed(plan)
    return plan


def plan_request_settled(request_id: int) -> None:
    """A migration request ended (called on commit): if it is a plan's current attempt, record the
    item's outcome, retry a failure while attempts remain, and finish the plan when all items ended."""
    found = PlanItem.objects.filter(request_id=request_id, status=Item.MOVING).values_list("pk", "plan_id").first()
    if found is None:
        return  # not a plan's, or already recorded
    item_id, plan_id = found
    with transaction.atomic():
        # Lock order everywhere: the plan, then its items (approve and cancel take them so too).
        plan = _lock(MovePlan(pk=plan_id))
        item = (PlanItem.objects.select_for_update(of=("self",))
                .select_related("vm", "request__run", "source_host", "target_host__cluster", "target_datastore")
                .get(pk=item_id))
        request = item.request
        if item.status != Item.MOVING or item.request_id != request_id or request.status not in TERMINAL:
            return
        run = getattr(request, "run", None)
        said = (run.explanation if run is not None else "") or request.get_status_display()
        if request.status == RequestStatus.SUCCEEDED:
            item.status, item.explanation = Item.SUCCEEDED, said
        elif request.status in (RequestStatus.FAILED, RequestStatus.ERRORED) and plan.cancel_requested_at is None \
                and item.attempts < item.max_attempts:
            _audit(plan, actor=None, action=AuditAction.PLAN_ITEM_RETRIED, outcome=AuditOutcome.FAILURE,
                   reason=f"attempt {item.attempts} of {item.max_attempts} {request.status}: {said}",
                   vm_name=item.vm.name, data={"item": item.pk, "request": request.pk})
            _start_attempt(plan, item, approver=None, ip=None)
            _finish_if_done(plan)
            notify_plan_changed(plan)
            return
        elif request.status in (RequestStatus.FAILED, RequestStatus.ERRORED):
            item.status = Item.FAILED
            item.explanation = f"Gave up after {item.attempts} attempt{'s' if item.attempts > 1 else ''}: {said}"
        else:
            item.status, item.explanation = Item.CANCELLED, said
        item.save(update_fields=["status", "explanation"])
        _audit(plan, actor=None, action=AuditAction.PLAN_ITEM_SETTLED,
               outcome=AuditOutcome.SUCCESS if item.status == Item.SUCCEEDED else AuditOutcome.FAILURE,
               reason=item.explanation, vm_name=item.vm.name,
               data={"item": item.pk, "request": request.pk, "item_status": item.status})
        _finish_if_done(plan)
        notify_plan_changed(plan)


def _finish_if_done(plan: MovePlan) -> None:
    """Once every item ended: done (every movable VM moved; skipped ones stayed as agreed),
    partially done, failed (nothing moved) or cancelled (cancel was asked)."""
    if plan.status != P.RUNNING:
        return
    statuses = list(plan.items.values_list("status", flat=True))
    if any(s not in ITEM_TERMINAL for s in statuses):
        return
    moved = statuses.count(Item.SUCCEEDED)
    failed = statuses.count(Item.FAILED) + statuses.count(Item.CANCELLED)
    skipped = statuses.count(Item.SKIPPED)
    if plan.cancel_requested_at is not None:
        target = P.CANCELLED
    elif failed == 0:
        target = P.DONE
    else:
        target = P.PARTIALLY_DONE if moved else P.FAILED
    _set_status(plan, target)
    plan.finished_at = timezone.now()
    plan.summary = f"{moved} moved, {skipped} skipped, {failed} not moved."
    plan.save(update_fields=["status", "finished_at", "summary", "updated_at"])
    _audit(plan, actor=None, action=AuditAction.PLAN_FINISHED, reason=plan.summary,
           outcome=AuditOutcome.SUCCESS if target == P.DONE else AuditOutcome.FAILURE)


def move_plan_settle_stale() -> int:
    """The scheduler's safety net: items whose request ended but whose bookkeeping was lost (the
    process died between the run's commit and ``plan_request_settled``). Returns how many."""
    ids = list(PlanItem.objects.filter(status=Item.MOVING, request__status__in=TERMINAL)
               .values_list("request_id", flat=True))
    for request_id in ids:
        plan_request_settled(request_id)
    return len(ids)


def move_plan_expire_stale(*, now: datetime | None = None) -> int:
    """Plans nobody decided on in time expire, as requests do. Returns how many."""
    now = now or timezone.now()
    cutoff = now - timedelta(hours=settings.PORTAL["PENDING_EXPIRY_HOURS"])
    count = 0
    for pk in MovePlan.objects.filter(status=P.PENDING_APPROVAL, updated_at__lt=cutoff).values_list("pk", flat=True):
        with transaction.atomic():
            plan = MovePlan.objects.select_for_update().get(pk=pk)
            if plan.status != P.PENDING_APPROVAL:
                continue
            _set_status(plan, P.EXPIRED)
            plan.finished_at = now
            plan.save(update_fields=["status", "finished_at", "updated_at"])
            plan.items.filter(status=Item.PLANNED).update(status=Item.CANCELLED)
            _audit(plan, actor=None, action=AuditAction.PLAN_EXPIRED,
                   reason=f"no decision within {settings.PORTAL['PENDING_EXPIRY_HOURS']:g} hours")
            notify_plan_changed(plan)
            count += 1
    return count
