"""Services for migration requests: submit, approve, reject, cancel, expire."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Prefetch, Q
from django.utils import timezone

from migrations_app import access, events, notifications, windows
from migrations_app.bulk import update_objects
from migrations_app.choices import (
    AuditAction,
    AuditOutcome,
    MigrationKind,
    NotificationCategory,
    RequestStatus,
    RuleAction,
)
from migrations_app.models import (
    Datastore,
    Host,
    MigrationRequest,
    MigrationRun,
    RequestApproval,
    VirtualDisk,
    VirtualMachine,
)
from migrations_app.policy.facts import facts_for
from migrations_app.policy.rules import evaluate
from migrations_app.selectors import open_requests_for_vms
from migrations_app.services.audit import audit_append, audit_entry, audit_record, refusable
from migrations_app.services.errors import ActionRefused, BatchRefused, Refusal, refuse_unless
from migrations_app.services.policies import active_policy
from migrations_app.services.preflight import check_move, host_mounts
from migrations_app.services.signatures import stage_label, stage_sign_many

S = RequestStatus
N = NotificationCategory


def set_status(request: MigrationRequest, target: str) -> str:
    """Move a (locked) request along the state machine; raises IllegalTransition. Returns the old status."""
    old = request.status
    RequestStatus.check_transition(old, target)
    request.status = target
    return old


def notify_request_changed(request: MigrationRequest) -> None:
    """After commit: tell the requester's pages and the approvers' queue that this request changed."""
    notify_requests_changed([request])


def notify_requests_changed(requests: list[MigrationRequest], *, approvals: dict[int, int] | None = None) -> None:
    """``notify_request_changed`` for many requests: one hop into the channel layer after commit.
    ``approvals`` (request id -> signatures) when the caller knows them; else counted in one query."""
    if not requests:
        return
    if approvals is None:
        approvals = dict(RequestApproval.objects.filter(request_id__in=[r.pk for r in requests])
                         .values("request_id").annotate(n=Count("id")).values_list("request_id", "n"))
    messages = []
    for request in requests:
        payload = events.request_changed_payload(request, approvals=approvals.get(request.pk, 0))
        groups = [events.request_group(request.pk), events.user_requests_group(request.requester_id),
                  events.approvals_group()]
        messages += [(group, payload) for group in groups]
    transaction.on_commit(lambda: events.emit_many(messages))


def _lock(request: MigrationRequest) -> MigrationRequest:
    return (
        MigrationRequest.objects.select_for_update(of=("self",))
        .select_related("vm", "requester", "target_host", "target_datastore")
        .get(pk=request.pk)
    )


def _start_is_due(request: MigrationRequest, now: datetime) -> bool:
    return not windows.window_not_open_yet(request, now)


# Statuses a closed window or an expiry pass can end: nothing has started on the hypervisor yet.
EXPIRABLE = frozenset({S.PENDING_APPROVAL, S.APPROVED, S.QUEUED})


def expire_locked(request: MigrationRequest, *, reason: str, now: datetime, run=None) -> None:
    """Expire a (locked) request that has not started, with its reason, audited in the caller's
    transaction. A queued run is closed with an explanation the VM owner reads on the page."""
    from migrations_app.services.runs import append_run_event

    set_status(request, S.EXPIRED)
    request.save(update_fields=["status", "updated_at"])
    run = run if run is not None else getattr(request, "run", None)
    if run is not None:
        run.finished_at = now
        run.wait_reason = ""
        run.explanation = f"Not started: {reason}. The VM did not move."
        run.save(update_fields=["finished_at", "wait_reason", "explanation"])
        append_run_event(run, status=request.status, message=f"expired: {reason}")
    audit_record(actor=None, action=AuditAction.REQUEST_EXPIRED, request=request, reason=reason,
                 data={"window_end": request.window_end.isoformat() if request.window_end else None})
    notify_request_changed(request)
    notifications.notify(request, N.EXPIRED, detail=reason)


@dataclass(frozen=True)
class RequestedMove:
    """One VM's move in a submission: what moves (``MigrationKind``) and where to."""

    vm: VirtualMachine
    kind: str
    target_host: Host | None = None
    target_datastore: Datastore | None = None


# The most moves (or decisions) one batch call takes: a batch holds its rows' locks until it commits.
MAX_BATCH = 200


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


def _plan_data(request: MigrationRequest) -> dict:
    plan = request.approval_plan or {}
    return {key: plan.get(key) for key in ("policy", "policy_version", "rule", "why", "fallback")}


def _stage_occasion(request: MigrationRequest) -> str:
    """Approvers are told once per stage that opens (a delivery per recipient and occasion)."""
    return f"stage-{request.current_stage + 1}"


def _target_snapshot(request: MigrationRequest) -> dict:
    out: dict = {}
    if request.target_host_id:
        out["host"] = request.target_host.name
    if request.target_datastore_id:
        out["datastore"] = request.target_datastore.name
    return out


@dataclass(frozen=True)
class _Approval:
    """One request's approval within a batch: the decision's comment, audit action and data."""

    request: MigrationRequest
    comment: str
    action: AuditAction
    data: dict | None = None


def _approve_locked(request: MigrationRequest, *, approver, comment: str, ip: str | None,
                    action: AuditAction = AuditAction.REQUEST_APPROVED, data: dict | None = None) -> None:
    """Approve a (locked) request, audit and announce it, and queue its run when it is due."""
    entries: list = []
    notices: list[notifications.Notice] = []
    due = _approve_many_locked([_Approval(request, comment, action, data)], approver=approver, ip=ip,
                               entries=entries, notices=notices)
    audit_append(entries)
    notifications.notify_many(notices, actor=approver)
    _enqueue(due, actor=approver)


def _approve_many_locked(approvals: list[_Approval], *, approver, ip: str | None, entries: list,
                         notices: list[notifications.Notice]) -> list[MigrationRequest]:
    """Approve (locked) requests in one UPDATE; their audit entries and notices are added to the
    caller's lists (it writes them, at once, before queueing). Returns those due to start now."""
    now = timezone.now()
    for approval in approvals:
        request = approval.request
        set_status(request, S.APPROVED)
        request.decided_by = approver
        request.decided_at = now
        request.decision_comment = approval.comment
        entries.append(audit_entry(actor=approver, action=approval.action, request=request, reason=approval.comment,
                                   ip=ip, data=approval.data))
        notices.append(notifications.Notice(request, N.DECISION, "approved", approval.comment))
    _save_requests([a.request for a in approvals], ["status", "decided_by", "decided_at", "decision_comment"])
    return [a.request for a in approvals if _start_is_due(a.request, now)]


def _save_requests(requests: list[MigrationRequest], fields: list[str]) -> None:
    """Write these fields (and ``updated_at``) of many requests in one UPDATE."""
    if len(requests) == 1:
        requests[0].save(update_fields=[*fields, "updated_at"])
    elif requests:
        now = timezone.now()
        for request in requests:
            request.updated_at = now
        update_objects(requests, [*fields, "updated_at"])


def _enqueue(requests: list[MigrationRequest], *, actor) -> None:
    from migrations_app.services.runs import migration_runs_enqueue

    if requests:
        migration_runs_enqueue(requests=requests, actor=actor)


def _expire_if_window_closed(request: MigrationRequest, verdict: access.Verdict) -> str:
    """A decision refused because the request's window closed expires it in the same call (the
    expiry commits even though the decision is refused). Returns the reason, or ''."""
    now = timezone.now()
    closed = windows.window_closed(request, now)
    if verdict.conflict and closed and request.status in EXPIRABLE:
        expire_locked(request, reason=closed, now=now)
        return closed
    return ""


def _decision_refusal(verdict: access.Verdict, expired: str) -> ActionRefused:
    if expired:
        return ActionRefused(f"{expired}, so the request has expired; nothing can be decided any more", conflict=True)
    return ActionRefused(verdict.reason, denied=not verdict.conflict, conflict=verdict.conflict)


def _refuse_decision(request: MigrationRequest, verdict: access.Verdict, expired: str) -> None:
    raise _decision_refusal(verdict, expired)


def migration_request_approve(*, request: MigrationRequest, actor, comment: str = "", ip: str | None = None) -> MigrationRequest:
    """An approver signs the request's current stage. When that completes the last stage the
    request is approved and its run queued (unless it starts later); otherwise the next stage waits.
    Approval after the change window closed is refused and expires the request.
    Under the admin bypass an admin's approval completes every remaining stage, and says so.
    The one-request case of ``migration_requests_approve_many`` (a refusal is audited as denied).

    The request row is locked first: approvers clicking at once are serialized, and each sees the
    signatures committed before it (exactly one of them completes a stage; none signs twice).
    """
    try:
        return migration_requests_approve_many(requests=[request], actor=actor, comment=comment, ip=ip)[0]
    except BatchRefused as exc:
        raise exc.refusals[0].error from None


def migration_requests_approve_many(*, requests, actor, comment: str = "",
                                    ip: str | None = None) -> list[MigrationRequest]:
    """An approver signs the current stage of each of these requests ("approve selected"), with
    one comment, exactly as ``migration_request_approve`` signs one; those whose last stage
    completes are approved and their runs queued together.

    All or nothing: the requests are locked (in id order: two approvers never deadlock) and each
    asked ``access.can_decide``; when any is refused, BatchRefused names each refused request and
    why, nothing is signed, and each refusal is audited as denied. A request refused because its
    window closed expires (that commits), as with one request."""
    comment = (comment or "").strip()
    ids = list(dict.fromkeys(r.pk for r in requests))
    if not ids:
        raise ActionRefused("choose at least one request to approve")
    if len(ids) > MAX_BATCH:
        raise ActionRefused(f"at most {MAX_BATCH} requests at once")
    refusals = []
    with transaction.atomic():
        locked = {r.pk: r for r in MigrationRequest.objects.select_for_update(of=("self",))
                  .select_related("vm", "requester", "target_host", "target_datastore")
                  .prefetch_related("approvals").filter(pk__in=ids).order_by("pk")}
        verdicts = {pk: access.can_decide(actor, request) for pk, request in locked.items()}
        for i, pk in enumerate(ids):
            request, verdict = locked.get(pk), verdicts.get(pk)
            if request is None:
                refusals.append(Refusal(i, f"#{pk}", ActionRefused("no such request", conflict=True)))
            elif not verdict:
                # A decision refused because the window closed expires the request; that commits.
                expired = _expire_if_window_closed(request, verdict)
                refusals.append(Refusal(i, f"#{pk} {request.vm.name}", _decision_refusal(verdict, expired)))
        if not refusals:
            _sign_many_locked([(locked[pk], verdicts[pk]) for pk in ids], actor=actor, comment=comment, ip=ip)
    if refusals:
        with transaction.atomic():  # in its own transaction: the refused decision changed nothing
            audit_append([audit_entry(actor=actor, action=AuditAction.REQUEST_APPROVED, request=locked[ids[r.index]],
                                      outcome=AuditOutcome.DENIED, reason=r.error.message, ip=ip)
                          for r in refusals if ids[r.index] in locked])
        raise BatchRefused(refusals)
    return [locked[pk] for pk in ids]


def _sign_many_locked(signing: list[tuple[MigrationRequest, access.Verdict]], *, actor, comment: str,
                      ip: str | None) -> None:
    """Record the approver's signature on each (locked) request's current stage and move it on."""
    signed = stage_sign_many(signing, actor=actor, comment=comment)
    entries: list = []
    notices: list[notifications.Notice] = []
    approving = []
    for (request, verdict), (index, stage, groups) in zip(signing, signed, strict=True):
        stages = request.stages
        data = {**_plan_data(request), "stage": index + 1, "stages": len(stages), "stage_name": stage.name,
                "groups": groups, "bypass": verdict.bypass}
        if verdict.bypass:
            approving.append(_Approval(request, comment or f"admin bypass: stages {index + 1}-{len(stages)} not signed",
                                       AuditAction.REQUEST_BYPASS_APPROVED, data))
        elif request.current_stage >= len(stages):
            approving.append(_Approval(request, comment, AuditAction.REQUEST_APPROVED, data))
        else:
            signed_what = stage_label(index, stages)
            entries.append(audit_entry(actor=actor, action=AuditAction.REQUEST_STAGE_APPROVED, request=request,
                                       reason=f"{signed_what}: {comment}" if comment else signed_what, ip=ip,
                                       data=data))
            if request.current_stage > index:  # the next stage opens: tell its approvers
                notices.append(notifications.Notice(request, N.APPROVAL_WAITING, _stage_occasion(request)))
    due = _approve_many_locked(approving, approver=actor, ip=ip, entries=entries, notices=notices)
    audit_append(entries)
    # The actor is never among a next stage's approvers (nobody signs a later stage after an
    # earlier one), so one call with the actor serves the decisions and the opened stages alike.
    notifications.notify_many(notices, actor=actor)
    _enqueue(due, actor=actor)
    notify_requests_changed([request for request, _ in signing])


@refusable(AuditAction.REQUEST_REJECTED, subject="request")
def migration_request_reject(*, request: MigrationRequest, actor, reason: str, ip: str | None = None) -> MigrationRequest:
    """An approver rejects, with a reason the requester will read. A request whose window closed
    cannot be rejected any more: it expires instead."""
    reason = (reason or "").strip()
    with transaction.atomic():
        request = _lock(request)
        verdict = access.can_decide(actor, request)
        expired = "" if verdict else _expire_if_window_closed(request, verdict)
        if verdict:
            if not reason:
                raise ActionRefused("a rejection needs a reason the requester can act on", field="reason")
            set_status(request, S.REJECTED)
            request.decided_by = actor
            request.decided_at = timezone.now()
            request.decision_comment = reason
            request.save(update_fields=["status", "decided_by", "decided_at", "decision_comment", "updated_at"])
            audit_record(actor=actor, action=AuditAction.REQUEST_REJECTED, request=request, reason=reason, ip=ip,
                         data={**_plan_data(request), "stage": request.current_stage + 1, "bypass": verdict.bypass})
            notifications.notify(request, N.DECISION, occasion="rejected", actor=actor, detail=reason)
            notify_request_changed(request)
    if not verdict:
        _refuse_decision(request, verdict, expired)
    return request


@refusable(AuditAction.REQUEST_CANCELLED, subject="request")
def migration_request_cancel(*, request: MigrationRequest, actor, reason: str = "", ip: str | None = None) -> MigrationRequest:
    """Withdraw while pending or approved, dequeue while queued, abort on the hypervisor while running.

    A running migration becomes ``cancelling``; its worker aborts the hypervisor job at its next
    heartbeat and records the outcome (cancelled, or succeeded if the move had already finished).
    """
    from migrations_app.services.runs import append_run_event

    reason = (reason or "").strip()
    with transaction.atomic():
        request = _lock(request)
        refuse_unless(access.can_cancel(actor, request))
        now = timezone.now()
        run = getattr(request, "run", None)
        if request.status == S.RUNNING:
            set_status(request, S.CANCELLING)
            run.cancel_requested_at = now
            run.save(update_fields=["cancel_requested_at"])
            audit_record(actor=actor, action=AuditAction.RUN_CANCEL_REQUESTED, request=request, reason=reason,
                         ip=ip, task_id=run.task_id)
            append_run_event(run, status=request.status, message="cancel requested; aborting on the hypervisor")
        else:
            set_status(request, S.CANCELLED)
            if run is not None:
                run.finished_at = now
                run.explanation = "Cancelled before it started; the VM did not move."
                run.save(update_fields=["finished_at", "explanation"])
                append_run_event(run, status=request.status, message="cancelled before it started")
            audit_record(actor=actor, action=AuditAction.REQUEST_CANCELLED, request=request, reason=reason, ip=ip)
            notifications.notify(request, N.CANCELLED, actor=actor, detail=reason)
            _settle_plan_item_on_commit(request.pk)
        request.save(update_fields=["status", "updated_at"])
        notify_request_changed(request)
    return request


def _settle_plan_item_on_commit(request_id: int) -> None:
    """A move plan's item whose request ended: its plan records it (services.plans)."""
    from migrations_app.services.plans import plan_request_settled

    transaction.on_commit(lambda: plan_request_settled(request_id), robust=True)


def migration_request_expire_stale(*, now: datetime | None = None) -> int:
    """The scheduler expires what can no longer happen: requests nobody decided on within
    ``PORTAL["PENDING_EXPIRY_HOURS"]``, and pending, approved or queued requests whose change window
    closed before their run started. Returns how many expired."""
    now = now or timezone.now()
    hours = settings.PORTAL["PENDING_EXPIRY_HOURS"]
    cutoff = now - timedelta(hours=hours)
    candidates = MigrationRequest.objects.filter(
        Q(status=S.PENDING_APPROVAL, created_at__lt=cutoff) | Q(status__in=EXPIRABLE, window_end__lte=now)
    ).order_by("pk").values_list("pk", flat=True)
    count = 0
    for pk in candidates:
        with transaction.atomic():
            request = MigrationRequest.objects.select_for_update(of=("self",)).select_related("vm").get(pk=pk)
            if request.status not in EXPIRABLE:
                continue  # decided, started or withdrawn meanwhile
            reason = windows.window_closed(request, now)
            if not reason and request.status == S.PENDING_APPROVAL and request.created_at < cutoff:
                reason = f"no decision within {hours:g} hours"
            if not reason:
                continue
            run = MigrationRun.objects.select_for_update(of=("self",)).filter(request=request).first()
            expire_locked(request, reason=reason, now=now, run=run)
            count += 1
    return count


def kind_for(target_host: Host | None, target_datastore: Datastore | None) -> str:
    if target_host and target_datastore:
        return MigrationKind.BOTH
    return MigrationKind.COMPUTE if target_host else MigrationKind.STORAGE
