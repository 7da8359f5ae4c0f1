"""Batch submission and approval: many moves in one call, judged, audited and notified as one at a
time would be, all or nothing, at a cost that does not grow a query per move."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from migrations_app.choices import (
    AuditAction,
    AuditOutcome,
    MigrationKind,
    NotificationCategory,
    RequestStatus,
    Role,
)
from migrations_app.models import (
    AuditEntry,
    HypervisorConnection,
    MigrationRequest,
    MigrationRun,
    NotificationDelivery,
    RequestApproval,
    RunEvent,
    VirtualMachine,
)
from migrations_app.services import requests as svc
from migrations_app.services.errors import BatchRefused
from migrations_app.services.inventory import inventory_sync
from migrations_app.services.runs import queueing
from tests.conftest import FAST_SIM, install_policy, make_user, other_cluster_host, other_host_same_cluster
from tests.services.test_approvals import TWO_STAGES, shape

S = RequestStatus
N = NotificationCategory
pytestmark = pytest.mark.django_db


def movable_vms(conn, n: int) -> list[VirtualMachine]:
    """``n`` running VMs without simulator fault tags, each with a valid target host."""
    vms = [vm for vm in VirtualMachine.objects.filter(connection=conn, power_state="on").order_by("pk")
           if not any(t.startswith("sim:") for t in vm.tags)]
    assert len(vms) >= n, f"the simulated datacenter has {len(vms)} movable VMs, the test needs {n}"
    return vms[:n]


def compute(vm) -> svc.RequestedMove:
    return svc.RequestedMove(vm, MigrationKind.COMPUTE, target_host=other_host_same_cluster(vm))


def test_a_batch_creates_one_request_per_move_audited_as_single_submissions(datacenter, users, review_everything):
    a, b, c = movable_vms(datacenter, 3)
    batch = svc.migration_requests_submit_many(requester=users["alice"], items=[compute(a), compute(b)],
                                               reason="rack maintenance", ip="10.0.0.7")
    single = svc.migration_request_submit(requester=users["alice"], vm=c, kind=MigrationKind.COMPUTE,
                                          target_host=other_host_same_cluster(c), reason="rack maintenance",
                                          ip="10.0.0.7")
    assert [mr.vm for mr in batch] == [a, b]
    assert all(mr.status == S.PENDING_APPROVAL and mr.pk for mr in batch)
    submitted = {e.request_id: e for e in AuditEntry.objects.filter(action=AuditAction.REQUEST_SUBMITTED)}
    assert len(submitted) == 3
    reference = submitted[single.pk]
    for mr in batch:
        entry = submitted[mr.pk]
        assert (entry.actor, entry.ip, entry.vm_name, entry.reason) == (users["alice"], "10.0.0.7", mr.vm.name,
                                                                         "rack maintenance")
        assert entry.before == mr.source_placement and entry.before["host"] == mr.vm.host.name
        assert entry.after == {"host": mr.target_host.name}
        assert entry.data == reference.data  # same kind, window and policy decision as the single one
    # One "waiting for your approval" per request, to each approver who may sign it.
    waiting = NotificationDelivery.objects.filter(category=N.APPROVAL_WAITING)
    assert {(d.request_id, d.recipient) for d in waiting} == {
        (mr.pk, f"user:{users[name].pk}") for mr in [*batch, single] for name in ("bob", "erin")}


def test_one_refused_move_refuses_the_batch_and_names_every_refused_vm(datacenter, users, review_everything):
    a, b, c = movable_vms(datacenter, 3)
    elsewhere = Group.objects.get(name="team-elsewhere")  # mallory's team
    VirtualMachine.objects.filter(pk=c.pk).update(owner_group=elsewhere)
    c.refresh_from_db()
    moves = [compute(a), svc.RequestedMove(b, MigrationKind.COMPUTE, target_host=other_cluster_host(b)), compute(c)]
    with pytest.raises(BatchRefused) as err:
        svc.migration_requests_submit_many(requester=users["alice"], items=moves, reason="patching")
    refusals = err.value.refusals
    assert [(r.index, r.label) for r in refusals] == [(1, b.name), (2, c.name)]
    assert "in cluster" in refusals[0].error.message and refusals[0].error.field == "target_host"
    assert "not in the group that owns" in refusals[1].error.message and refusals[1].error.denied
    assert b.name in err.value.message and c.name in err.value.message and a.name not in err.value.message
    assert err.value.denied  # one refusal is about rights: the API answers 403
    assert not MigrationRequest.objects.exists()
    assert not NotificationDelivery.objects.exists()
    # Only the access refusal is audited, as the single path audits it: denied, about the VM.
    denied = AuditEntry.objects.get(action=AuditAction.REQUEST_SUBMITTED)
    assert (denied.outcome, denied.action, denied.object_type, denied.object_id) == (
        AuditOutcome.DENIED, AuditAction.REQUEST_SUBMITTED, "vm", str(c.pk))


def test_the_same_vm_twice_in_a_batch_is_refused(datacenter, users, review_everything):
    a, b = movable_vms(datacenter, 2)
    with pytest.raises(BatchRefused, match="listed twice") as err:
        svc.migration_requests_submit_many(requester=users["alice"], items=[compute(a), compute(b), compute(a)],
                                           reason="patching")
    assert [r.index for r in err.value.refusals] == [2]
    assert "moves 1 and 3" in err.value.refusals[0].error.message
    assert not MigrationRequest.objects.exists()


def test_a_vm_with_an_open_request_refuses_the_batch(datacenter, users, review_everything):
    a, b = movable_vms(datacenter, 2)
    first = svc.migration_requests_submit_many(requester=users["alice"], items=[compute(a)], reason="patching")[0]
    with pytest.raises(BatchRefused, match=f"#{first.pk}"):
        svc.migration_requests_submit_many(requester=users["alice"], items=[compute(b), compute(a)], reason="again")
    assert list(MigrationRequest.objects.values_list("pk", flat=True)) == [first.pk]


def test_batch_wide_input_is_judged_once(datacenter, users, review_everything):
    a, b = movable_vms(datacenter, 2)
    with pytest.raises(svc.ActionRefused, match="say why these VMs should move") as err:
        svc.migration_requests_submit_many(requester=users["alice"], items=[compute(a), compute(b)], reason=" ")
    assert err.value.field == "reason"
    with pytest.raises(svc.ActionRefused, match="past"):
        svc.migration_requests_submit_many(requester=users["alice"], items=[compute(a), compute(b)], reason="x",
                                           start_after=timezone.now() - timedelta(hours=1),
                                           window_end=timezone.now() + timedelta(hours=2))
    with pytest.raises(svc.ActionRefused, match="at least one"):
        svc.migration_requests_submit_many(requester=users["alice"], items=[], reason="x")
    assert not MigrationRequest.objects.exists()


def test_each_move_of_a_batch_gets_its_own_policy_decision(datacenter, users, people):
    install_policy({"name": "Mixed", "rules": [
        {"name": "pci", "when": {"tags_any": ["pci"]}, "action": "auto_reject", "reject_reason": "no PCI moves"},
        {"name": "dev", "when": {"tags_any": ["env:dev"]}, "action": "auto_approve"},
        {"name": "rest", "when": {}, "action": "stages", "stages": [{"groups": ["approver"], "mode": "any"}]}]})
    a, b, c = movable_vms(datacenter, 3)
    shape(a, tags=("pci",))
    shape(b, tags=("env:dev",))
    shape(c, tags=("env:production",))
    rejected, approved, waiting = svc.migration_requests_submit_many(
        requester=users["alice"], items=[compute(a), compute(b), compute(c)], reason="patching")
    assert (rejected.status, rejected.decision_comment) == (S.REJECTED, "no PCI moves")
    assert approved.status == S.QUEUED and approved.decided_by is None
    assert waiting.status == S.PENDING_APPROVAL and len(waiting.stages) == 1

    def actions(mr):
        return list(AuditEntry.objects.filter(request=mr).order_by("id").values_list("action", flat=True))

    assert actions(rejected) == [AuditAction.REQUEST_SUBMITTED, AuditAction.REQUEST_AUTO_REJECTED]
    assert actions(approved) == [AuditAction.REQUEST_SUBMITTED, AuditAction.REQUEST_AUTO_APPROVED,
                                 AuditAction.RUN_QUEUED]
    assert actions(waiting) == [AuditAction.REQUEST_SUBMITTED]
    assert list(MigrationRun.objects.values_list("request", flat=True)) == [approved.pk]
    assert RunEvent.objects.get(run__request=approved).seq == 1
    sent = set(NotificationDelivery.objects.values_list("request", "category", "occasion", "recipient"))
    alice, bob, erin = (f"user:{people[n].pk}" for n in ("alice", "bob", "erin"))
    assert sent == {(rejected.pk, N.DECISION, "rejected", alice), (approved.pk, N.DECISION, "approved", alice),
                    (waiting.pk, N.APPROVAL_WAITING, "stage-1", bob), (waiting.pk, N.APPROVAL_WAITING, "stage-1", erin)}


def test_approve_selected_queues_every_run_together(datacenter, users, review_everything, monkeypatch,
                                                     django_capture_on_commit_callbacks):
    handed: list[list[int]] = []
    monkeypatch.setattr(queueing, "dispatch_many", lambda runs: handed.append([pk for pk, _, _ in runs]))
    mrs = svc.migration_requests_submit_many(requester=users["alice"], items=[compute(v) for v in
                                                                              movable_vms(datacenter, 3)],
                                             reason="patching")
    with django_capture_on_commit_callbacks(execute=True):
        approved = svc.migration_requests_approve_many(requests=mrs, actor=users["erin"], comment="go", ip="10.0.0.9")
    assert [mr.status for mr in approved] == [S.QUEUED] * 3
    runs = list(MigrationRun.objects.filter(request__in=mrs).order_by("pk"))
    assert handed == [[run.pk for run in runs]]  # one hand-over, on commit, of all three
    assert all(run.last_seq == 1 for run in runs)
    for mr in mrs:
        entries = AuditEntry.objects.filter(request=mr).order_by("id")
        assert [e.action for e in entries] == [AuditAction.REQUEST_SUBMITTED, AuditAction.REQUEST_APPROVED,
                                               AuditAction.RUN_QUEUED]
        approval = entries[1]
        assert (approval.actor, approval.reason, approval.ip, approval.data["stage"]) == (users["erin"], "go",
                                                                                         "10.0.0.9", 1)
    assert RequestApproval.objects.filter(approver=users["erin"]).count() == 3


def test_approve_selected_refuses_the_whole_batch_for_the_approvers_own_request(datacenter, users, review_everything):
    a, b, c = movable_vms(datacenter, 3)
    mine = svc.migration_request_submit(requester=users["bob"], vm=a, kind=MigrationKind.COMPUTE,
                                        target_host=other_host_same_cluster(a), reason="mine")
    others = svc.migration_requests_submit_many(requester=users["alice"], items=[compute(b), compute(c)],
                                                reason="theirs")
    with pytest.raises(BatchRefused, match="your own request") as err:
        svc.migration_requests_approve_many(requests=[others[0], mine, others[1]], actor=users["bob"])
    assert [(r.index, r.label) for r in err.value.refusals] == [(1, f"#{mine.pk} {a.name}")]
    assert err.value.denied
    assert set(MigrationRequest.objects.values_list("status", flat=True)) == {S.PENDING_APPROVAL}
    assert not RequestApproval.objects.exists() and not MigrationRun.objects.exists()
    denied = AuditEntry.objects.get(outcome=AuditOutcome.DENIED)
    assert (denied.actor, denied.request, denied.action) == (users["bob"], mine, AuditAction.REQUEST_APPROVED)


def test_two_stage_requests_move_one_stage_per_batch_call(datacenter, users):
    Group.objects.create(name="change-board")
    frank = make_user("frank", Role.APPROVER, teams=("change-board",))
    grace = make_user("grace", Role.APPROVER, teams=("change-board",))
    install_policy(TWO_STAGES)
    mrs = svc.migration_requests_submit_many(requester=users["alice"], items=[compute(v) for v in
                                                                              movable_vms(datacenter, 2)],
                                             reason="patching")
    svc.migration_requests_approve_many(requests=mrs, actor=users["erin"])
    assert {(mr.status, mr.current_stage) for mr in MigrationRequest.objects.all()} == {(S.PENDING_APPROVAL, 1)}
    assert AuditEntry.objects.filter(action=AuditAction.REQUEST_STAGE_APPROVED).count() == 2
    # Stage 2 opened for each: its approvers (not erin, who signed stage 1) were told.
    opened = NotificationDelivery.objects.filter(category=N.APPROVAL_WAITING, occasion="stage-2")
    assert {(d.request_id, d.user_id) for d in opened} == {(mr.pk, u.pk) for mr in mrs for u in (frank, grace)}
    svc.migration_requests_approve_many(requests=mrs, actor=frank)
    assert {(mr.status, mr.current_stage) for mr in MigrationRequest.objects.all()} == {(S.PENDING_APPROVAL, 1)}
    with pytest.raises(BatchRefused, match="already approved stage 2"):
        svc.migration_requests_approve_many(requests=mrs, actor=frank)
    svc.migration_requests_approve_many(requests=mrs, actor=grace)
    assert set(MigrationRequest.objects.values_list("status", flat=True)) == {S.QUEUED}
    assert MigrationRun.objects.count() == 2


def test_a_request_whose_window_closed_is_refused_and_expires_in_a_batch(datacenter, users, review_everything):
    a, b = movable_vms(datacenter, 2)
    start = timezone.now() + timedelta(minutes=30)
    late, fine = svc.migration_requests_submit_many(requester=users["alice"], items=[compute(a), compute(b)],
                                                    reason="x", start_after=start,
                                                    window_end=start + timedelta(hours=2))
    MigrationRequest.objects.filter(pk=late.pk).update(start_after=timezone.now() - timedelta(hours=3),
                                                       window_end=timezone.now() - timedelta(minutes=1))
    with pytest.raises(BatchRefused, match="has expired") as err:
        svc.migration_requests_approve_many(requests=[late, fine], actor=users["erin"])
    assert err.value.conflict and [r.index for r in err.value.refusals] == [0]
    late.refresh_from_db()
    fine.refresh_from_db()
    assert (late.status, fine.status) == (S.EXPIRED, S.PENDING_APPROVAL)  # the expiry committed, nothing signed
    assert not RequestApproval.objects.exists()


def test_a_batch_of_twenty_costs_a_bounded_number_of_queries(users, review_everything, django_assert_max_num_queries):
    conn = HypervisorConnection.objects.create(name="big", kind="simulator", options={**FAST_SIM, "vms": 48})
    inventory_sync(connection=conn)
    vms = movable_vms(conn, 22)
    moves = [compute(vm) for vm in vms]  # the form's choices, read before the call
    one = moves.pop()
    with CaptureQueriesContext(connection) as single:
        mr = svc.migration_request_submit(requester=users["alice"], vm=one.vm, kind=one.kind,
                                          target_host=one.target_host, reason="one")
        mr = svc.migration_request_approve(request=mr, actor=users["erin"])
    assert mr.status == S.QUEUED
    moves = moves[:20]
    # The single path costs ~50 queries a move (1000 for twenty); a batch costs a constant.
    with django_assert_max_num_queries(30):
        mrs = svc.migration_requests_submit_many(requester=users["alice"], items=moves, reason="twenty")
    with django_assert_max_num_queries(30):
        svc.migration_requests_approve_many(requests=mrs, actor=users["erin"])
    assert len(single) > 30  # so the bounds above are far below twenty single moves
    assert MigrationRun.objects.filter(request__in=mrs).count() == 20
    assert AuditEntry.objects.filter(request__in=mrs, action=AuditAction.RUN_QUEUED).count() == 20
