"""Request services: submit, approve, reject, cancel, expire; refusals change nothing and are audited."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from migrations_app.choices import AuditAction, AuditOutcome, MigrationKind, RequestStatus
from migrations_app.models import AuditEntry, Datastore, MigrationRequest, MigrationRun
from migrations_app.services import requests as svc
from migrations_app.services.errors import ActionRefused
from tests.conftest import other_cluster_host, other_host_same_cluster, running_vm

S = RequestStatus
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("review_everything")]


def submit(user, vm, **kw):
    kw.setdefault("kind", MigrationKind.COMPUTE)
    if kw["kind"] == MigrationKind.COMPUTE:
        kw.setdefault("target_host", other_host_same_cluster(vm))
    return svc.migration_request_submit(requester=user, vm=vm, reason=kw.pop("reason", "patching"), **kw)


def test_submit_records_source_placement_and_audits(datacenter, users):
    vm = running_vm(datacenter)
    mr = submit(users["alice"], vm, ip="10.1.2.3")
    assert mr.status == S.PENDING_APPROVAL
    assert mr.source_placement["host"] == vm.host.name
    entry = AuditEntry.objects.get(action=AuditAction.REQUEST_SUBMITTED)
    assert (entry.actor, entry.request, entry.ip, entry.vm_name) == (users["alice"], mr, "10.1.2.3", vm.name)
    assert entry.after == {"host": mr.target_host.name}


def test_requester_outside_the_owner_group_is_refused_and_it_is_audited(datacenter, users):
    vm = running_vm(datacenter)
    with pytest.raises(ActionRefused, match="not in the group that owns"):
        submit(users["mallory"], vm)
    assert not MigrationRequest.objects.exists()
    assert AuditEntry.objects.filter(actor=users["mallory"], outcome=AuditOutcome.DENIED).count() == 1


def test_target_in_another_cluster_is_refused(datacenter, users):
    vm = running_vm(datacenter)
    with pytest.raises(ActionRefused, match="in cluster") as err:
        submit(users["alice"], vm, target_host=other_cluster_host(vm))
    assert err.value.field == "target_host"
    assert not MigrationRequest.objects.exists()


def test_datastore_not_visible_to_the_host_is_refused(datacenter, users):
    vm = running_vm(datacenter)
    foreign = Datastore.objects.filter(connection=datacenter).exclude(hosts=vm.host).first()
    with pytest.raises(ActionRefused, match="not mounted on"):
        submit(users["alice"], vm, kind=MigrationKind.STORAGE, target_datastore=foreign)


def test_datastore_too_small_is_refused(datacenter, users):
    vm = running_vm(datacenter)
    target = Datastore.objects.filter(hosts=vm.host).exclude(pk__in=vm.datastore_ids()).first()
    Datastore.objects.filter(pk=target.pk).update(free_bytes=1024**3)
    with pytest.raises(ActionRefused, match="GiB free"):
        submit(users["alice"], vm, kind=MigrationKind.STORAGE, target_datastore=target)
    assert not MigrationRequest.objects.exists()


def test_missing_reason_and_past_start_are_refused(datacenter, users):
    vm = running_vm(datacenter)
    with pytest.raises(ActionRefused, match="why"):
        submit(users["alice"], vm, reason="  ")
    with pytest.raises(ActionRefused, match="past"):
        submit(users["alice"], vm, start_after=timezone.now() - timedelta(hours=1))


def test_a_second_open_request_for_the_same_vm_is_refused(datacenter, users):
    vm = running_vm(datacenter)
    first = submit(users["alice"], vm)
    with pytest.raises(ActionRefused, match=f"#{first.pk}"):
        submit(users["alice"], vm)


def test_approve_queues_a_run_and_audits(datacenter, users):
    mr = submit(users["alice"], running_vm(datacenter))
    svc.migration_request_approve(request=mr, actor=users["erin"], comment="ok")
    mr.refresh_from_db()
    assert mr.status == S.QUEUED and mr.decided_by == users["erin"]
    run = MigrationRun.objects.get(request=mr)
    assert run.worker_task_id and run.last_seq == 1
    assert list(AuditEntry.objects.filter(request=mr).order_by("id").values_list("action", flat=True)) == [
        AuditAction.REQUEST_SUBMITTED, AuditAction.REQUEST_APPROVED, AuditAction.RUN_QUEUED,
    ]


def test_approval_with_a_later_start_waits_until_the_scheduler_queues_it(datacenter, users):
    from migrations_app.services.runs import migration_request_start_due

    start = timezone.now() + timedelta(hours=2)
    mr = submit(users["alice"], running_vm(datacenter), start_after=start)
    svc.migration_request_approve(request=mr, actor=users["erin"])
    mr.refresh_from_db()
    assert mr.status == S.APPROVED and not MigrationRun.objects.exists()
    assert migration_request_start_due(now=start - timedelta(minutes=1)) == 0
    assert migration_request_start_due(now=start + timedelta(seconds=1)) == 1
    mr.refresh_from_db()
    assert mr.status == S.QUEUED


def test_self_approval_is_refused_even_for_an_approver(datacenter, users):
    bob = users["bob"]  # approver and requester
    mr = submit(bob, running_vm(datacenter))
    with pytest.raises(ActionRefused, match="your own request"):
        svc.migration_request_approve(request=mr, actor=bob)
    with pytest.raises(ActionRefused, match="your own request"):
        svc.migration_request_reject(request=mr, actor=bob, reason="no")
    mr.refresh_from_db()
    assert mr.status == S.PENDING_APPROVAL
    assert AuditEntry.objects.filter(actor=bob, outcome=AuditOutcome.DENIED).count() == 2


def test_approving_twice_is_refused(datacenter, users):
    mr = submit(users["alice"], running_vm(datacenter))
    svc.migration_request_approve(request=mr, actor=users["erin"])
    with pytest.raises(ActionRefused, match="already queued"):
        svc.migration_request_approve(request=mr, actor=users["bob"])
    assert MigrationRun.objects.count() == 1


def test_requesters_and_auditors_cannot_approve(datacenter, users):
    mr = submit(users["alice"], running_vm(datacenter))
    for name in ("mallory", "dave"):
        with pytest.raises(ActionRefused, match="only approvers"):
            svc.migration_request_approve(request=mr, actor=users[name])
    mr.refresh_from_db()
    assert mr.status == S.PENDING_APPROVAL


def test_reject_needs_a_reason_and_records_it(datacenter, users):
    mr = submit(users["alice"], running_vm(datacenter))
    with pytest.raises(ActionRefused, match="reason"):
        svc.migration_request_reject(request=mr, actor=users["erin"], reason=" ")
    svc.migration_request_reject(request=mr, actor=users["erin"], reason="change freeze this week")
    mr.refresh_from_db()
    assert (mr.status, mr.decision_comment) == (S.REJECTED, "change freeze this week")


def test_cancel_while_pending_withdraws_and_only_the_requester_or_admin_may(datacenter, users):
    mr = submit(users["alice"], running_vm(datacenter))
    with pytest.raises(ActionRefused, match="only the requester"):
        svc.migration_request_cancel(request=mr, actor=users["erin"])
    svc.migration_request_cancel(request=mr, actor=users["alice"], reason="not needed")
    mr.refresh_from_db()
    assert mr.status == S.CANCELLED
    with pytest.raises(ActionRefused, match="already cancelled"):
        svc.migration_request_cancel(request=mr, actor=users["alice"])


def test_cancel_while_queued_dequeues_and_the_worker_then_does_nothing(datacenter, users):
    from migrations_app.services.runs import migration_run_execute

    mr = submit(users["alice"], running_vm(datacenter))
    svc.migration_request_approve(request=mr, actor=users["erin"])
    svc.migration_request_cancel(request=mr, actor=users["carol"])
    run = MigrationRun.objects.get(request=mr)
    migration_run_execute(run_id=run.pk, worker="test")
    run.refresh_from_db()
    mr.refresh_from_db()
    assert mr.status == S.CANCELLED and run.started_at is None


def test_pending_requests_expire_after_the_configured_time(datacenter, users, settings):
    mr = submit(users["alice"], running_vm(datacenter))
    later = timezone.now() + timedelta(hours=settings.PORTAL["PENDING_EXPIRY_HOURS"] + 1)
    assert svc.migration_request_expire_stale(now=timezone.now()) == 0
    assert svc.migration_request_expire_stale(now=later) == 1
    mr.refresh_from_db()
    assert mr.status == S.EXPIRED
    with pytest.raises(ActionRefused, match="already expired"):
        svc.migration_request_approve(request=mr, actor=users["erin"])

