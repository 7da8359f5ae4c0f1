"""Change windows with controlled time (time-machine, no sleeps): a window is validated at submission,
late approval is refused and expires the request, the run starts only inside its window, a window
that closes while pending, approved or queued expires the request, and a pre-flight failure at start
stops the run with the reason on the page and in the audit log."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.test import Client
from django.utils import timezone

from drivers.simulator import SimulatorDriver
from migrations_app.choices import AuditAction, AuditOutcome, MigrationKind, RequestStatus
from migrations_app.models import AuditEntry, Host, MigrationRequest, MigrationRun, RunEvent, VirtualMachine
from migrations_app.services import requests as svc
from migrations_app.services.errors import ActionRefused
from migrations_app.services.runs import migration_request_start_due, migration_run_execute
from tests.conftest import other_host_same_cluster, running_vm

S = RequestStatus
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("review_everything")]

# A fixed "now" for every test: the window's times and the messages that name them are exact.
T0 = datetime(2031, 3, 3, 9, 0, tzinfo=UTC)


@pytest.fixture
def clock():
    with time_machine.travel(T0, tick=False) as traveller:
        yield traveller


def submit(user, vm, *, start=None, end=None, **kw):
    return svc.migration_request_submit(
        requester=user, vm=vm, kind=MigrationKind.COMPUTE, target_host=other_host_same_cluster(vm),
        reason="patch window", start_after=start, window_end=end, **kw)


def second_vm(datacenter, first):
    return VirtualMachine.objects.filter(connection=datacenter, power_state="on", owner_group__name="team-web").exclude(
        pk=first.pk).exclude(tags__icontains="sim:").order_by("pk").first()


@pytest.mark.parametrize("start, end, field, message", [
    (T0 + timedelta(hours=2), T0 + timedelta(hours=1), "window_end", "must end after it starts"),
    (None, T0 - timedelta(minutes=5), "window_end", "end is in the past"),
    (T0 - timedelta(hours=1), T0 + timedelta(hours=1), "start_after", "start time is in the past"),
    (T0 + timedelta(hours=1), T0 + timedelta(hours=1, minutes=5), "window_end", "at least 15 minutes"),
    (T0 + timedelta(hours=1), T0 + timedelta(days=31), "window_end", "within 30 days"),
])
def test_a_window_is_judged_at_submission_and_a_bad_one_creates_nothing(datacenter, users, clock, start, end, field,
                                                                          message):
    with pytest.raises(ActionRefused, match=message) as err:
        submit(users["alice"], running_vm(datacenter), start=start, end=end)
    assert err.value.field == field
    assert not MigrationRequest.objects.exists()


def test_the_window_is_recorded_and_audited(datacenter, users, clock):
    mr = submit(users["alice"], running_vm(datacenter), start=T0 + timedelta(hours=1), end=T0 + timedelta(hours=3))
    mr.refresh_from_db()
    assert (mr.start_after, mr.window_end) == (T0 + timedelta(hours=1), T0 + timedelta(hours=3))
    assert mr.window_text == "between 2031-03-03 10:00 UTC and 2031-03-03 12:00 UTC"
    entry = AuditEntry.objects.get(request=mr, action=AuditAction.REQUEST_SUBMITTED)
    assert entry.data["window_end"] == "2031-03-03T12:00:00+00:00"


def test_late_approval_is_refused_and_expires_the_request_in_the_same_call(datacenter, users, clock):
    mr = submit(users["alice"], running_vm(datacenter), start=T0 + timedelta(hours=1), end=T0 + timedelta(hours=2))
    clock.move_to(T0 + timedelta(hours=2))  # the very end: closed
    with pytest.raises(ActionRefused, match="its window closed at 2031-03-03 11:00 UTC") as err:
        svc.migration_request_approve(request=mr, actor=users["erin"], comment="ok")
    assert err.value.conflict
    mr.refresh_from_db()
    assert mr.status == S.EXPIRED and mr.decided_by is None
    assert not MigrationRun.objects.exists()
    expired = AuditEntry.objects.get(request=mr, action=AuditAction.REQUEST_EXPIRED)
    assert (expired.actor, expired.reason) == (None, "its window closed at 2031-03-03 11:00 UTC")
    refused = AuditEntry.objects.get(request=mr, action=AuditAction.REQUEST_APPROVED)
    assert refused.outcome == AuditOutcome.DENIED and refused.actor == users["erin"]
    # An expired request offers nothing again, in the service.
    for action, kwargs in ((svc.migration_request_approve, {}), (svc.migration_request_reject, {"reason": "no"}),
                           (svc.migration_request_cancel, {})):
        actor = users["alice"] if action is svc.migration_request_cancel else users["erin"]
        with pytest.raises(ActionRefused, match="already expired") as err:
            action(request=mr, actor=actor, **kwargs)
        assert err.value.conflict
    mr.refresh_from_db()
    assert mr.status == S.EXPIRED


def test_a_late_rejection_also_expires_instead(datacenter, users, clock):
    mr = submit(users["alice"], running_vm(datacenter), end=T0 + timedelta(hours=1))
    clock.move_to(T0 + timedelta(hours=1, seconds=1))
    with pytest.raises(ActionRefused, match="window closed"):
        svc.migration_request_reject(request=mr, actor=users["erin"], reason="freeze")
    mr.refresh_from_db()
    assert mr.status == S.EXPIRED and mr.decision_comment == ""


def test_a_stranger_cannot_expire_a_request_by_trying_to_approve_it(datacenter, users, clock):
    mr = submit(users["alice"], running_vm(datacenter), end=T0 + timedelta(hours=1))
    clock.move_to(T0 + timedelta(hours=2))
    with pytest.raises(ActionRefused, match="only approvers") as err:
        svc.migration_request_approve(request=mr, actor=users["mallory"])
    assert err.value.denied
    mr.refresh_from_db()
    assert mr.status == S.PENDING_APPROVAL  # the expiry pass ends it, not a refused stranger


def test_approval_before_the_window_waits_and_the_run_starts_inside_it(datacenter, users, clock):
    start, end = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    mr = submit(users["alice"], running_vm(datacenter), start=start, end=end)
    svc.migration_request_approve(request=mr, actor=users["erin"])
    mr.refresh_from_db()
    assert mr.status == S.APPROVED and not MigrationRun.objects.exists()
    clock.move_to(start - timedelta(minutes=1))
    assert migration_request_start_due() == 0
    clock.move_to(start + timedelta(minutes=1))
    assert migration_request_start_due() == 1
    run = MigrationRun.objects.get(request=mr)
    clock.move_to(start + timedelta(minutes=2))
    migration_run_execute(run_id=run.pk, worker="w1")
    run.refresh_from_db()
    mr.refresh_from_db()
    assert mr.status == S.SUCCEEDED
    assert start <= run.started_at < end


def test_a_queued_run_whose_window_closed_is_never_started_by_the_worker(datacenter, users, clock):
    mr = submit(users["alice"], running_vm(datacenter), end=T0 + timedelta(hours=1))
    svc.migration_request_approve(request=mr, actor=users["erin"])  # inside the window: queued at once
    run = MigrationRun.objects.get(request=mr)
    clock.move_to(T0 + timedelta(hours=1, minutes=1))  # the message waited too long in the queue
    migration_run_execute(run_id=run.pk, worker="w1")
    run.refresh_from_db()
    mr.refresh_from_db()
    assert mr.status == S.EXPIRED and run.started_at is None
    assert run.explanation == "Not started: its window closed at 2031-03-03 10:00 UTC. The VM did not move."
    assert RunEvent.objects.filter(run=run, status=S.EXPIRED, message__startswith="expired: its window").exists()
    assert AuditEntry.objects.filter(request=mr, action=AuditAction.REQUEST_EXPIRED).count() == 1
    assert not AuditEntry.objects.filter(request=mr, action=AuditAction.RUN_STARTED).exists()


def test_a_worker_whose_clock_is_before_the_window_holds_the_run(datacenter, users, clock):
    start = T0 + timedelta(hours=1)
    mr = submit(users["alice"], running_vm(datacenter), start=start, end=start + timedelta(hours=1))
    svc.migration_request_approve(request=mr, actor=users["erin"])
    clock.move_to(start)
    migration_request_start_due()
    run = MigrationRun.objects.get(request=mr)
    clock.move_to(start - timedelta(minutes=5))  # claimed early: it must wait for the window
    migration_run_execute(run_id=run.pk, worker="w1")
    run.refresh_from_db()
    mr.refresh_from_db()
    assert mr.status == S.QUEUED and run.started_at is None
    assert run.wait_reason == "its window opens at 2031-03-03 10:00 UTC" and run.dispatched_at is None


def test_the_expiry_pass_ends_pending_approved_and_queued_requests_whose_window_closed(datacenter, users, clock):
    vm = running_vm(datacenter)
    end = T0 + timedelta(hours=1)
    pending = submit(users["alice"], vm, end=end)
    approved = submit(users["alice"], second_vm(datacenter, vm), start=T0 + timedelta(minutes=30), end=end)
    svc.migration_request_approve(request=approved, actor=users["erin"])
    third = VirtualMachine.objects.filter(connection=datacenter, power_state="on", owner_group__name="team-web").exclude(
        pk__in=[vm.pk, approved.vm_id]).exclude(tags__icontains="sim:").order_by("pk").first()
    queued = submit(users["alice"], third, end=end)
    svc.migration_request_approve(request=queued, actor=users["erin"])
    untouched = submit(users["bob"], VirtualMachine.objects.filter(
        connection=datacenter, power_state="on").exclude(pk__in=[vm.pk, approved.vm_id, third.pk]).filter(
        owner_group__name="team-web").exclude(tags__icontains="sim:").order_by("pk").first())

    assert svc.migration_request_expire_stale(now=end - timedelta(seconds=1)) == 0
    assert svc.migration_request_expire_stale(now=end) == 3
    statuses = dict(MigrationRequest.objects.values_list("pk", "status"))
    assert statuses == {pending.pk: S.EXPIRED, approved.pk: S.EXPIRED, queued.pk: S.EXPIRED,
                        untouched.pk: S.PENDING_APPROVAL}
    reasons = set(AuditEntry.objects.filter(action=AuditAction.REQUEST_EXPIRED).values_list("reason", flat=True))
    assert reasons == {"its window closed at 2031-03-03 10:00 UTC"}
    assert MigrationRun.objects.get(request=queued).finished_at == end
    assert svc.migration_request_expire_stale(now=end + timedelta(hours=1)) == 0  # nothing twice


def test_pre_flight_failure_at_start_stops_the_run_with_the_reason_on_the_page_and_in_the_audit(
        datacenter, users, monkeypatch):
    migrate_calls = []
    real_migrate = SimulatorDriver.migrate

    def counting_migrate(self, *args, **kwargs):
        migrate_calls.append(args)
        return real_migrate(self, *args, **kwargs)

    monkeypatch.setattr(SimulatorDriver, "migrate", counting_migrate)
    mr = submit(users["alice"], running_vm(datacenter))
    svc.migration_request_approve(request=mr, actor=users["erin"])
    run = MigrationRun.objects.get(request=mr)
    Host.objects.filter(pk=mr.target_host_id).update(maintenance=True)  # the world changed after approval
    migration_run_execute(run_id=run.pk, worker="w1")
    run.refresh_from_db()
    mr.refresh_from_db()
    why = f"Pre-flight at start failed, the world changed: {mr.target_host.name} is in maintenance mode. Nothing was moved."
    assert mr.status == S.FAILED and run.explanation == why
    assert migrate_calls == []  # stopped before the driver's migrate
    failed = AuditEntry.objects.get(request=mr, action=AuditAction.RUN_FAILED)
    assert failed.reason == why and failed.outcome == AuditOutcome.FAILURE
    c = Client()
    c.force_login(users["alice"])
    page = c.get(f"/requests/{mr.pk}/").content.decode()
    assert why in page


def test_the_pages_show_the_window_and_no_actions_once_it_closed(datacenter, users, clock):
    mr = submit(users["alice"], running_vm(datacenter), start=T0 + timedelta(hours=1), end=T0 + timedelta(hours=2))
    erin, alice = Client(), Client()
    erin.force_login(users["erin"])
    alice.force_login(users["alice"])
    page = erin.get(f"/requests/{mr.pk}/").content.decode()
    assert "between 2031-03-03 10:00 UTC and 2031-03-03 11:00 UTC" in page and ">Approve</button>" in page
    assert f"Approve #{mr.pk}" in erin.get("/approvals/").content.decode()
    clock.move_to(T0 + timedelta(hours=2, minutes=1))
    page = erin.get(f"/requests/{mr.pk}/").content.decode()
    assert "its window closed at 2031-03-03 11:00 UTC" in page and ">Approve</button>" not in page
    assert f"Approve #{mr.pk}" not in erin.get("/approvals/").content.decode()
    # A forged POST changes nothing but the expiry, and says why.
    response = erin.post(f"/api/requests/{mr.pk}/approve/", data=json.dumps({}), content_type="application/json")
    assert response.status_code == 409 and "window closed" in response.json()["error"]
    mr.refresh_from_db()
    assert mr.status == S.EXPIRED
    page = alice.get(f"/requests/{mr.pk}/").content.decode()
    assert "Withdraw request" not in page and "Expired" in page


def test_the_form_and_the_api_take_a_window_or_neither(datacenter, users, clock):
    vm = running_vm(datacenter)
    alice = Client()
    alice.force_login(users["alice"])
    target = other_host_same_cluster(vm)
    base = {"kind": "compute", "target_host": target.pk, "reason": "patch window"}
    response = alice.post(f"/vms/{vm.pk}/migrate/", {**base, "start_mode": "window", "start_after": "2031-03-03T10:00"})
    assert response.status_code == 400 and "give both ends of the window" in response.content.decode()
    response = alice.post(f"/vms/{vm.pk}/migrate/", {**base, "start_mode": "window", "start_after": "2031-03-03T10:00",
                                                     "window_end": "2031-03-03T10:05"})
    assert response.status_code == 400 and "at least 15 minutes" in response.content.decode()
    assert not MigrationRequest.objects.exists()
    payload = {"vm_id": vm.pk, "target_host_id": target.pk, "reason": "api", "start_after": "2031-03-03T10:00:00Z"}
    response = alice.post("/api/requests/", data=json.dumps(payload), content_type="application/json")
    assert response.status_code == 400 and response.json()["field"] == "window_end"
    payload["window_end"] = "2031-03-03T11:30:00+00:00"
    response = alice.post("/api/requests/", data=json.dumps(payload), content_type="application/json")
    assert response.status_code == 201, response.content
    assert response.json()["window_end"] == "2031-03-03T11:30:00+00:00"
    response = alice.post(f"/vms/{second_vm(datacenter, vm).pk}/migrate/", {
        **base, "target_host": other_host_same_cluster(second_vm(datacenter, vm)).pk, "start_mode": "window",
        "start_after": "2031-03-03T12:00", "window_end": "2031-03-03T14:00"})
    assert response.status_code == 302
    mr = MigrationRequest.objects.get(vm=second_vm(datacenter, vm))
    assert mr.window_end == datetime(2031, 3, 3, 14, 0, tzinfo=UTC) and timezone.is_aware(mr.start_after)
