"""Notifications: who gets what, muted categories, never twice, webhooks signed and verified by a
real HTTP server, and a webhook that is down never breaks the request."""

from __future__ import annotations

import json
import socket
import urllib.request
from datetime import timedelta

import pytest
import time_machine
from django.core import mail
from django.test import Client
from django.utils import timezone

from migrations_app import notifications
from migrations_app.choices import AuditAction, DeliveryStatus, MigrationKind, NotificationCategory, RequestStatus
from migrations_app.models import AuditEntry, Host, MigrationRun, NotificationDelivery, Webhook
from migrations_app.services import requests as svc
from migrations_app.services.runs import migration_run_execute
from migrations_app.tasks import deliver_notification
from tests.conftest import other_host_same_cluster, running_vm

N = NotificationCategory
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("review_everything")]


def submit(user, vm):
    return svc.migration_request_submit(requester=user, vm=vm, kind=MigrationKind.COMPUTE,
                                        target_host=other_host_same_cluster(vm), reason="kernel update")


def send_recorded() -> list[tuple[str, str]]:
    """Run the sending task for every recorded delivery not yet tried; returns (to, subject) of new mails."""
    before = len(mail.outbox)
    for pk in NotificationDelivery.objects.filter(status=DeliveryStatus.PENDING, attempts=0).order_by("pk").values_list(
            "pk", flat=True):
        deliver_notification.apply(args=[pk])
    return [(m.to[0], m.subject) for m in mail.outbox[before:]]


def test_a_requests_life_notifies_approvers_then_the_requester(datacenter, people):
    vm = running_vm(datacenter)
    mr = submit(people["alice"], vm)
    sent = send_recorded()
    # Approvers who can act now (bob and erin hold the approver role), never the requester.
    assert sorted(sent) == [("bob@example.test", f"Waiting for your approval: #{mr.pk} compute move of {vm.name}"),
                            ("erin@example.test", f"Waiting for your approval: #{mr.pk} compute move of {vm.name}")]
    svc.migration_request_approve(request=mr, actor=people["erin"], comment="go ahead")
    assert send_recorded() == [("alice@example.test", f"Approved: #{mr.pk} compute move of {vm.name}")]
    body = mail.outbox[-1].body
    assert "go ahead" in body and f"/requests/{mr.pk}/" in body and "as soon as approved" in body
    migration_run_execute(run_id=MigrationRun.objects.get(request=mr).pk, worker="w1")
    assert send_recorded() == [("alice@example.test", f"Started: #{mr.pk} compute move of {vm.name}"),
                               ("alice@example.test", f"Succeeded: #{mr.pk} compute move of {vm.name}")]


def test_rejection_failure_and_expiry_reach_the_requester(datacenter, people, settings):
    vm = running_vm(datacenter)
    mr = submit(people["alice"], vm)
    svc.migration_request_reject(request=mr, actor=people["erin"], reason="change freeze")
    to_alice = [s for to, s in send_recorded() if to == "alice@example.test"]
    assert to_alice == [f"Rejected: #{mr.pk} compute move of {vm.name}"]
    assert "change freeze" in next(m.body for m in mail.outbox if m.subject == to_alice[0])

    failing = submit(people["alice"], vm)
    svc.migration_request_approve(request=failing, actor=people["erin"])
    Host.objects.filter(pk=failing.target_host_id).update(maintenance=True)
    migration_run_execute(run_id=MigrationRun.objects.get(request=failing).pk, worker="w1")
    sent = send_recorded()
    assert ("alice@example.test", f"Failed: #{failing.pk} compute move of {vm.name}") in sent
    assert "the world changed" in mail.outbox[-1].body

    late = submit(people["alice"], vm)
    svc.migration_request_expire_stale(now=late.created_at.replace(year=late.created_at.year + 1))
    assert ("alice@example.test", f"Expired: #{late.pk} compute move of {vm.name}") in send_recorded()


def test_nobody_is_told_about_their_own_action(datacenter, people):
    vm = running_vm(datacenter)
    own = submit(people["alice"], vm)
    svc.migration_request_cancel(request=own, actor=people["alice"])
    assert not NotificationDelivery.objects.filter(request=own, category=N.CANCELLED).exists()
    by_admin = submit(people["alice"], vm)
    svc.migration_request_cancel(request=by_admin, actor=people["carol"], reason="host retired")
    sent = send_recorded()
    assert ("alice@example.test", f"Cancelled: #{by_admin.pk} compute move of {vm.name}") in sent


def test_muted_categories_are_not_mailed_and_the_change_is_audited(datacenter, people):
    alice = Client()
    alice.force_login(people["alice"])
    page = alice.get("/notifications/").content.decode()
    assert page.count('type="checkbox"') == len(N.values) and page.count("checked") == len(N.values)
    wanted = [c for c in N.values if c != N.RUN_STARTED]
    assert alice.post("/notifications/", {"wanted": wanted}).status_code == 302
    entry = AuditEntry.objects.get(action=AuditAction.NOTIFICATIONS_CHANGED)
    assert (entry.actor, entry.before, entry.after) == (people["alice"], {"muted": []}, {"muted": [N.RUN_STARTED]})
    assert alice.post("/notifications/", {"wanted": wanted + ["bogus"]}).status_code == 400  # nothing changes
    assert AuditEntry.objects.filter(action=AuditAction.NOTIFICATIONS_CHANGED).count() == 1

    vm = running_vm(datacenter)
    mr = submit(people["alice"], vm)
    svc.migration_request_approve(request=mr, actor=people["erin"])
    migration_run_execute(run_id=MigrationRun.objects.get(request=mr).pk, worker="w1")
    subjects = [s for to, s in send_recorded() if to == "alice@example.test"]
    assert subjects == [f"Approved: #{mr.pk} compute move of {vm.name}",
                        f"Succeeded: #{mr.pk} compute move of {vm.name}"]


def test_each_approval_stage_that_opens_tells_the_approvers_who_can_sign_it(datacenter, people):
    from migrations_app.policy.defaults import DEFAULT_POLICY
    from tests.conftest import install_policy

    install_policy(DEFAULT_POLICY)  # production VMs: two stages, never the same approver
    vm = running_vm(datacenter)
    vm.tags = [*vm.tags, "env:production"]
    vm.save(update_fields=["tags"])
    mr = submit(people["alice"], vm)
    subject = f"Waiting for your approval: #{mr.pk} compute move of {vm.name}"
    assert sorted(send_recorded()) == [("bob@example.test", subject), ("erin@example.test", subject)]
    svc.migration_request_approve(request=mr, actor=people["erin"])
    # Stage 2 opens: erin signed stage 1 and cannot sign it, so only bob is told.
    assert send_recorded() == [("bob@example.test", subject)]
    svc.migration_request_approve(request=mr, actor=people["bob"])
    assert send_recorded() == [("alice@example.test", f"Approved: #{mr.pk} compute move of {vm.name}")]


def test_the_same_notification_is_never_recorded_or_sent_twice(datacenter, people):
    from django.db import transaction

    mr = submit(people["alice"], running_vm(datacenter))
    first = NotificationDelivery.objects.filter(request=mr, category=N.APPROVAL_WAITING).count()
    with transaction.atomic():
        assert notifications.notify(mr, N.APPROVAL_WAITING, occasion="stage-1") == []  # the same occasion again: nothing new
    assert NotificationDelivery.objects.filter(request=mr, category=N.APPROVAL_WAITING).count() == first == 2
    pk = NotificationDelivery.objects.filter(request=mr).first().pk
    deliver_notification.apply(args=[pk])
    deliver_notification.apply(args=[pk])  # a redelivered task message
    assert len(mail.outbox) == 1


def test_users_without_an_address_are_recorded_as_skipped(datacenter, users):
    mr = submit(users["alice"], running_vm(datacenter))
    rows = NotificationDelivery.objects.filter(request=mr)
    assert {r.status for r in rows} == {DeliveryStatus.SKIPPED} and rows.count() == 2
    assert send_recorded() == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_webhooks_are_signed_and_a_real_server_verifies_them(datacenter, people, receiver):
    handler, url = receiver
    hook = Webhook(name="chat", url=url, categories=[N.APPROVAL_WAITING, N.DECISION])
    hook.set_secret(handler.secret)
    hook.save()
    assert handler.secret not in Webhook.objects.values_list("secret_encrypted", flat=True).get()
    mr = submit(people["alice"], running_vm(datacenter))
    svc.migration_request_approve(request=mr, actor=people["erin"])
    migration_run_execute(run_id=MigrationRun.objects.get(request=mr).pk, worker="w1")
    send_recorded()
    assert [r["json"]["category"] for r in handler.received] == [N.APPROVAL_WAITING, N.DECISION]  # only its own
    assert all(r["valid"] and r["fresh"] for r in handler.received)
    first = handler.received[0]["json"]
    assert first["request"]["id"] == mr.pk and first["request"]["url"].endswith(f"/requests/{mr.pk}/")
    assert NotificationDelivery.objects.filter(webhook=hook, status=DeliveryStatus.SENT).count() == 2
    # A tampered body replayed with a captured signature does not verify at the receiver.
    forged = json.dumps({**first, "category": "run_succeeded"}).encode()
    request = urllib.request.Request(url, data=forged, method="POST", headers=handler.received[0]["headers"])
    urllib.request.urlopen(request, timeout=5).close()
    assert handler.received[-1]["json"]["category"] == "run_succeeded" and not handler.received[-1]["valid"]


@pytest.mark.parametrize("answer", [500, None], ids=["server-error", "unreachable"])
def test_a_webhook_that_is_down_is_retried_then_recorded_and_never_breaks_the_request(
        datacenter, people, receiver, settings, answer, django_capture_on_commit_callbacks):
    handler, url = receiver
    settings.PORTAL = {**settings.PORTAL, "WEBHOOK_MAX_RETRIES": 2, "WEBHOOK_TIMEOUT_S": 2}
    handler.answer = answer or 204
    if answer is None:
        url = f"http://127.0.0.1:{closed_port()}/hook"
    hook = Webhook(name="itsm", url=url)
    hook.set_secret("k")
    hook.save()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        mr = submit(people["alice"], running_vm(datacenter))
    for callback in callbacks:
        callback()  # the commit hooks (live push, enqueue) run and none of them raises
    send_recorded()
    delivery = NotificationDelivery.objects.get(webhook=hook)
    assert delivery.status == DeliveryStatus.FAILED and delivery.attempts == 3  # first try + 2 retries
    assert ("answered 500" if answer else "unreachable") in delivery.last_error
    assert len(handler.received) == (3 if answer else 0)
    # The request went on as if nothing happened, and mail still went out.
    mr.refresh_from_db()
    assert mr.status == RequestStatus.PENDING_APPROVAL
    assert sorted(m.to[0] for m in mail.outbox) == ["bob@example.test", "erin@example.test"]
    svc.migration_request_approve(request=mr, actor=people["erin"])
    mr.refresh_from_db()
    assert mr.status == RequestStatus.QUEUED


def test_webhooks_are_added_in_the_admin_audited_with_the_secret_redacted(people):
    carol = people["carol"]
    carol.is_staff = carol.is_superuser = True
    carol.save()
    admin = Client()
    admin.force_login(carol)
    fields = {"name": "chat", "url": "https://chat.example/hook", "categories": [N.DECISION], "active": "on"}
    response = admin.post("/admin/migrations_app/webhook/add/", fields)
    assert response.status_code == 200 and "needs a secret" in response.content.decode()  # refused: nothing saved
    assert not Webhook.objects.exists()
    response = admin.post("/admin/migrations_app/webhook/add/", {**fields, "secret": "canary-Webhook-Secret"})
    assert response.status_code == 302, response.content[:500]
    hook = Webhook.objects.get()
    assert hook.get_secret() == "canary-Webhook-Secret" and hook.categories == [N.DECISION]
    entry = AuditEntry.objects.get(action=AuditAction.CONFIG_CHANGED, object_type="webhook")
    assert entry.actor == carol and entry.after["secret_encrypted"] == "(set)"
    assert "canary-Webhook-Secret" not in json.dumps([entry.before, entry.after, entry.reason])


def test_rotating_the_field_key_keeps_webhook_secrets_readable(db, tmp_path, settings, monkeypatch):
    from django.core.management import call_command

    from migrations_app import secrets

    monkeypatch.delenv("PORTAL_FIELD_KEY", raising=False)
    settings.DATA_DIR = tmp_path
    secrets._fernet.cache_clear()
    hook = Webhook(name="chat", url="https://chat.example/hook")
    hook.set_secret("before-rotation")
    hook.save()
    old_token = hook.secret_encrypted
    call_command("rotate_field_key")
    hook.refresh_from_db()
    assert hook.secret_encrypted != old_token and hook.get_secret() == "before-rotation"
    secrets._fernet.cache_clear()


def test_deliveries_never_tried_are_handed_out_again_and_two_messages_send_once(datacenter, people, monkeypatch):
    sent_to_queue = []
    monkeypatch.setattr(notifications, "_enqueue", sent_to_queue.extend)
    mr = submit(people["alice"], running_vm(datacenter))
    waiting = list(NotificationDelivery.objects.filter(request=mr).order_by("pk").values_list("pk", flat=True))
    assert notifications.resend_unsent() == []  # fresh: their first message may still be in the queue
    deliver_notification.apply(args=[waiting[0]])
    with time_machine.travel(timezone.now() + timedelta(minutes=11)):
        assert notifications.resend_unsent() == waiting[1:]  # the one already tried is not sent again
    assert sent_to_queue == waiting[1:]
    # Two messages for the same delivery racing: both read it untried, only one claims the attempt.
    seen_by_first = NotificationDelivery.objects.get(pk=waiting[1])
    seen_by_second = NotificationDelivery.objects.get(pk=waiting[1])
    assert notifications.claim_attempt(seen_by_first) is True
    assert notifications.claim_attempt(seen_by_second) is False
    assert NotificationDelivery.objects.get(pk=waiting[1]).attempts == 1
