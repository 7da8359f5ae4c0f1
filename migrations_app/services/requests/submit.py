"""Submitting requests: one move or many at once, each judged by access, pre-flight checks and the
active approval policy (which may approve or reject at once)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.db.models import Prefetch
from django.utils import timezone

from migrations_app import access, notifications, windows
from migrations_app.choices import AuditAction, AuditOutcome, NotificationCategory, RequestStatus, RuleAction
from migrations_app.models import Datastore, Host, MigrationRequest, VirtualDisk, VirtualMachine
from migrations_app.policy.facts import facts_for
from migrations_app.policy.rules import evaluate
from migrations_app.selectors import open_requests_for_vms
from migrations_app.services.audit import audit_append, audit_entry
from migrations_app.services.errors import ActionRefused, BatchRefused, Refusal
from migrations_app.services.policies import active_policy
from migrations_app.services.preflight import check_move, host_mounts
from migrations_app.services.requests._common import MAX_BATCH, notify_requests_changed, set_status
from migrations_app.services.requests.decide import _Approval, _approve_many_locked, _enqueue, _stage_occasion

S = RequestStatus
N = NotificationCategory


@dataclass(frozen=True)
class RequestedMove:
    """One VM's move in a submission: what moves (``MigrationKind``) and where to."""

    vm: VirtualMachine
    kind: str
    target_host: Host | None = None
    target_datastore: Datastore | None = None


def migration_request_submit(
    *,
    requester,
    vm: VirtualMachine,
    kind: str,
    reason: str,
    target_host: Host | None = None,
    target_datastore: Datastore | None = None,
    start_after: datetime | None = None,
    window_end: datetime | None = None,
    ip: str | None = None,
) -> MigrationRequest:
    """A VM owner asks for a live migration, as soon as approved or within a change window
    (``start_after`` .. ``window_end``; see ``migrations_app.windows``). The active approval policy
    decides at once: approve, reject with its reason, or freeze the matched rule's stages onto the
    request. The one-move case of ``migration_requests_submit_many``."""
    try:
        return migration_requests_submit_many(
            requester=requester, items=[RequestedMove(vm, kind, target_host, target_datastore)], reason=reason,
            start_after=start_after, window_end=window_end, ip=ip)[0]
    except BatchRefused as exc:
        raise exc.refusals[0].error from None


def migration_requests_submit_many(
    *,
    requester,
    items: list[RequestedMove],
    reason: str,
    start_after: datetime | None = None,
    window_end: datetime | None = None,
    ip: str | None = None,
) -> list[MigrationRequest]:
    """A VM owner asks for many moves at once, with one reason and one window (the migrate wizard
    with several VMs selected): one request per move, each judged by the same rules and the same
    policy as a single submission, with the same audit entries and notifications.

    All or nothing: when any move is refused (access, an open request for its VM, the same VM
    twice, a pre-flight check) BatchRefused names every refused move and why, nothing is created,
    and access refusals are audited as denied. The VMs are read and locked (in id order: two
    batches never deadlock), and the targets, open requests, policy and notifications read, once
    for the whole batch."""
    items = list(items)
    if not items:
        raise ActionRefused("choose at least one VM to move", field="vm")
    if len(items) > MAX_BATCH:
        raise ActionRefused(f"at most {MAX_BATCH} moves at once", field="vm")
    verdicts = access.can_request_migrations(requester, [item.vm for item in items])
    refusals = {i: Refusal(i, item.vm.name, ActionRefused(verdict.reason, denied=True))
                for i, (item, verdict) in enumerate(zip(items, verdicts, strict=True)) if not verdict}
    first: dict[int, int] = {}
    for i, item in enumerate(items):
        if item.vm.pk in first and i not in refusals:
            refusals[i] = Refusal(i, item.vm.name, ActionRefused(
                f"{item.vm.name} is listed twice (moves {first[item.vm.pk] + 1} and {i + 1})", field="vm"))
        first.setdefault(item.vm.pk, i)
    reason = (reason or "").strip()
    if not refusals:  # a refused VM is named first: the batch-wide input is judged after
        if not reason:
            raise ActionRefused("say why this VM should move" if len(items) == 1 else "say why these VMs should move",
                                field="reason")
        problem = windows.window_problem(start_after, window_end, now=timezone.now())
        if problem:
            raise ActionRefused(problem[1], field=problem[0])
    try:
        with transaction.atomic():
            moves = _lock_and_check(items, refusals)
            if refusals:
                raise BatchRefused(list(refusals.values()))
            return _submit_locked(requester, moves, reason=reason, start_after=start_after, window_end=window_end,
                                  ip=ip)
    except BatchRefused as exc:
        denied = [r for r in exc.refusals if r.error.denied]
        if denied:  # in its own transaction: the refused submission changed nothing
            with transaction.atomic():
                audit_append([audit_entry(actor=requester, action=AuditAction.REQUEST_SUBMITTED,
                                          outcome=AuditOutcome.DENIED, reason=r.error.message, ip=ip,
                                          object_type="vm", object_id=str(items[r.index].vm.pk)) for r in denied])
        raise


def _lock_and_check(items: list[RequestedMove], refusals: dict[int, Refusal]) -> list[RequestedMove]:
    """Lock the VMs of the moves not refused yet and judge each move as it is now (targets re-read,
    not as the caller last read them); add each refusal to ``refusals``. Returns the moves with
    the locked VMs and fresh targets."""
    todo = [i for i in range(len(items)) if i not in refusals]
    if not todo:
        return []
    # Lock the VM rows: two submissions for one VM queue here, and the second sees the first.
    vms = {vm.pk: vm for vm in VirtualMachine.objects.select_for_update(of=("self",))
           .select_related("host__cluster", "connection", "owner_group")
           .prefetch_related(Prefetch("disks", queryset=VirtualDisk.objects.select_related("datastore")))
           .filter(pk__in={items[i].vm.pk for i in todo}).order_by("pk")}
    hosts = Host.objects.select_related("cluster").in_bulk({items[i].target_host.pk for i in todo
                                                            if items[i].target_host is not None})
    stores = Datastore.objects.in_bulk({items[i].target_datastore.pk for i in todo
                                        if items[i].target_datastore is not None})
    open_requests = open_requests_for_vms(vms)
    mounts = host_mounts({vm.host_id for vm in vms.values()} | set(hosts))
    moves = []
    for i in todo:
        item = items[i]
        vm = vms.get(item.vm.pk)
        host = hosts.get(item.target_host.pk) if item.target_host is not None else None
        store = stores.get(item.target_datastore.pk) if item.target_datastore is not None else None
        existing = open_requests.get(item.vm.pk)
        try:
            if vm is None:
                raise ActionRefused(f"{item.vm.name} is no longer in the inventory", field="vm")
            if existing is not None:
                raise ActionRefused(f"{vm.name} already has an open request (#{existing.pk}, "
                                    f"{existing.get_status_display().lower()})")
            check_move(vm, item.kind, host, store, mounts=mounts)
        except ActionRefused as exc:
            refusals[i] = Refusal(i, item.vm.name, exc)
            continue
        moves.append(RequestedMove(vm, item.kind, host, store))
    return moves


def _submit_locked(requester, moves: list[RequestedMove], *, reason: str, start_after: datetime | None,
                   window_end: datetime | None, ip: str | None) -> list[MigrationRequest]:
    """Create the requests of checked moves (VMs locked), let the policy decide on each, and
    write their audit entries, notifications and queued runs, each kind of row at once."""
    policy = active_policy()
    now = timezone.now()
    decided = []
    for move in moves:
        request = MigrationRequest(
            requester=requester, vm=move.vm, kind=move.kind, target_host=move.target_host,
            target_datastore=move.target_datastore, reason=reason, start_after=start_after, window_end=window_end,
            source_placement=move.vm.placement_snapshot(),
        )
        decision = evaluate(policy, facts_for(request))
        request.policy_note = decision.note
        request.approval_plan = decision.snapshot()
        if decision.action == RuleAction.AUTO_REJECT:
            set_status(request, S.REJECTED)
            request.decided_at = now
            request.decision_comment = decision.reject_reason
        decided.append((request, decision))
    requests = [request for request, _ in decided]
    if len(requests) == 1:
        requests[0].save(force_insert=True)
    else:
        MigrationRequest.objects.bulk_create(requests)
    window = {"start_after": start_after.isoformat() if start_after else None,
              "window_end": window_end.isoformat() if window_end else None}
    entries = [audit_entry(actor=requester, action=AuditAction.REQUEST_SUBMITTED, request=request, reason=reason,
                           ip=ip, before=request.source_placement, after=_target_snapshot(request),
                           data={"kind": request.kind, **window, "policy": decision.audit_data()})
               for request, decision in decided]
    notices: list[notifications.Notice] = []
    approving = []
    for request, decision in decided:
        if decision.action == RuleAction.AUTO_APPROVE:
            approving.append(_Approval(request, decision.note, AuditAction.REQUEST_AUTO_APPROVED,
                                       {"policy": decision.audit_data()}))
        elif decision.action == RuleAction.AUTO_REJECT:
            entries.append(audit_entry(actor=None, action=AuditAction.REQUEST_AUTO_REJECTED, request=request,
                                       reason=decision.reject_reason, data={"policy": decision.audit_data()}))
            notices.append(notifications.Notice(request, N.DECISION, "rejected", decision.reject_reason))
        else:
            notices.append(notifications.Notice(request, N.APPROVAL_WAITING, _stage_occasion(request)))
    due = _approve_many_locked(approving, approver=None, ip=None, entries=entries, notices=notices)
    audit_append(entries)
    notifications.notify_many(notices)
    _enqueue(due, actor=None)
    notify_requests_changed(requests, approvals={})
    return requests


def _target_snapshot(request: MigrationRequest) -> dict:
    out: dict = {}
    if request.target_host_id:
        out["host"] = request.target_host.name
    if request.target_datastore_id:
        out["datastore"] = request.target_datastore.name
    return out
