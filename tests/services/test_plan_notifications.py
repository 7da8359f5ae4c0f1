"""Move-plan notifications: the approvers of each stage that opens, the requester's decision and
final mails (with the VMs that did not move), never twice, mutes respected, no mail per VM, and a
plan's webhook payload signed and verified by a real HTTP server."""

from __future__ import annotations

import pytest
from django.core import mail
from django.db import transaction

from migrations_app import notifications
from migrations_app.choices import DeliveryStatus, NotificationCategory, PlanKind, PlanStatus, Role
from migrations_app.models import Host, MigrationRequest, MovePlan, NotificationDelivery, Webhook
from migrations_app.policy.defaults import DEFAULT_POLICY
from migrations_app.services import plans as svc
from migrations_app.services.notifications import notification_preferences_set
from tests.conftest import install_policy, make_user
from tests.services.test_notifications import send_recorded
from tests.services.test_plans import run_all
from tests.simdc import evacuation_state, simulated_connection

pytestmark = pytest.mark.django_db
N, P = NotificationCategory, PlanStatus
PROD = "env:production"


def built(tmp_path, users, *, tags=None, n=3, name="evac"):
    conn = simulated_connection(tmp_path / f"{name}.json", evacuation_state(n, local_vm=False, tags=tags or {}),
                                name=name)
    src = Host.objects.get(connection=conn, name="src.lab")
    return svc.move_plan_build(requester=users["carol"], kind=PlanKind.EVACUATE_HOST, host=src, reason="firmware")


def what(plan) -> str:
    return f"plan #{plan.pk}: evacuate host src.lab"


def fresh(plan) -> MovePlan:
    return MovePlan.objects.get(pk=plan.pk)


def test_a_plans_life_tells_each_stages_approvers_then_the_requester_once_per_event(
        tmp_path, people, django_capture_on_commit_callbacks):
    install_policy(DEFAULT_POLICY)  # a production VM: two stages, never the same approver
    plan = built(tmp_path, people, tags={0: [PROD]})
    svc.move_plan_submit(plan=plan, actor=people["carol"])
    waiting = f"Waiting for your approval: {what(plan)}"
    assert sorted(send_recorded()) == [("bob@example.test", waiting), ("erin@example.test", waiting)]
    body = mail.outbox[-1].body
    assert f"/plans/{plan.pk}/" in body and "VMs: 3 in the plan, 3 to move" in body and "Requested by: carol" in body

    svc.move_plan_approve(plan=plan, actor=people["erin"], comment="first look")
    # Stage 2 opens: erin signed stage 1 and cannot sign it, so only bob is told; nobody else hears.
    assert send_recorded() == [("bob@example.test", waiting)]
    assert NotificationDelivery.objects.get(plan=plan, user=people["bob"], occasion="plan-stage-2")

    svc.move_plan_approve(plan=plan, actor=people["bob"], comment="second look")
    assert send_recorded() == [("carol@example.test", f"Approved: {what(plan)}")]
    assert "second look" in mail.outbox[-1].body

    run_all(django_capture_on_commit_callbacks)
    assert fresh(plan).status == P.DONE
    # One final mail for the plan; none per VM (decision, start, success of three requests).
    assert send_recorded() == [("carol@example.test", f"Done: {what(plan)}")]
    assert "Outcome: 3 moved, 0 skipped, 0 not moved." in mail.outbox[-1].body
    assert MigrationRequest.objects.filter(status="succeeded").count() == 3
    assert not NotificationDelivery.objects.filter(request__isnull=False).exists()
    to_carol = NotificationDelivery.objects.filter(user=people["carol"])
    assert sorted(to_carol.values_list("category", "occasion")) == [(N.DECISION, "approved"),
                                                                    (N.RUN_SUCCEEDED, "finished")]


def test_a_vm_that_exhausts_its_retries_is_listed_in_the_final_mail_and_never_mailed_alone(
        tmp_path, people, review_everything, django_capture_on_commit_callbacks, settings):
    settings.PORTAL = {**settings.PORTAL, "PLAN_MAX_ATTEMPTS": 2}
    plan = built(tmp_path, people, n=2, tags={1: ["sim:fail-at-switchover"]})
    svc.move_plan_submit(plan=plan, actor=people["carol"])
    svc.move_plan_approve(plan=plan, actor=people["erin"])
    run_all(django_capture_on_commit_callbacks)
    plan = fresh(plan)
    assert plan.status == P.PARTIALLY_DONE and MigrationRequest.objects.filter(status="failed").count() == 2
    to_carol = [s for to, s in send_recorded() if to == "carol@example.test"]
    assert to_carol == [f"Approved: {what(plan)}", f"Partially done: {what(plan)}"]
    body = mail.outbox[-1].body
    assert "Not moved:\n- app-01: Gave up after 2 attempts" in body and "app-00" not in body.split("Not moved:")[1]
    final = NotificationDelivery.objects.get(plan=plan, category=N.RUN_FAILED, user=people["carol"])
    assert final.occasion == "finished" and final.payload["plan"]["not_moved"] == ["app-01"]


def test_decisions_cancel_and_expiry_reach_the_requester_but_never_about_their_own_action(tmp_path, people,
                                                                                          review_everything):
    rejected = built(tmp_path, people, name="r")
    svc.move_plan_submit(plan=rejected, actor=people["carol"])
    svc.move_plan_reject(plan=rejected, actor=people["erin"], reason="not this week")
    to_carol = [s for to, s in send_recorded() if to == "carol@example.test"]
    assert to_carol == [f"Rejected: {what(rejected)}"] and "not this week" in mail.outbox[-1].body

    expired = built(tmp_path, people, name="e")
    svc.move_plan_submit(plan=expired, actor=people["carol"])
    later = fresh(expired).updated_at.replace(year=fresh(expired).updated_at.year + 1)
    assert svc.move_plan_expire_stale(now=later) == 1
    assert ("carol@example.test", f"Expired: {what(expired)}") in send_recorded()

    own = built(tmp_path, people, name="o")
    svc.move_plan_submit(plan=own, actor=people["carol"])
    svc.move_plan_cancel(plan=own, actor=people["carol"], reason="changed my mind")
    assert not NotificationDelivery.objects.filter(plan=own, category=N.CANCELLED).exists()

    other_admin = make_user("dan", Role.ADMIN)
    by_other = built(tmp_path, people, name="x")
    svc.move_plan_submit(plan=by_other, actor=people["carol"])
    send_recorded()
    svc.move_plan_cancel(plan=by_other, actor=other_admin, reason="host retired")
    assert send_recorded() == [("carol@example.test", f"Cancelled: {what(by_other)}")]


def test_a_plan_the_policy_approves_tells_its_requester_though_they_submitted_it(tmp_path, people):
    plan = built(tmp_path, people)  # the shipped policy approves these small moves by itself
    svc.move_plan_submit(plan=plan, actor=people["carol"])
    assert fresh(plan).status == P.RUNNING
    assert send_recorded() == [("carol@example.test", f"Approved: {what(plan)}")]
    assert "approved by policy" in mail.outbox[-1].body
    assert not NotificationDelivery.objects.filter(plan=plan, category=N.APPROVAL_WAITING).exists()


def test_a_repeated_occasion_records_nothing_and_mutes_are_respected(tmp_path, people, review_everything,
                                                                     django_capture_on_commit_callbacks):
    notification_preferences_set(user=people["bob"], muted=[N.APPROVAL_WAITING])
    notification_preferences_set(user=people["carol"], muted=[N.DECISION])
    plan = built(tmp_path, people)
    svc.move_plan_submit(plan=plan, actor=people["carol"])
    waiting = f"Waiting for your approval: {what(plan)}"
    assert send_recorded() == [("erin@example.test", waiting)]  # bob muted it
    with transaction.atomic():
        assert notifications.notify_plan(fresh(plan), N.APPROVAL_WAITING, occasion="plan-stage-1") == []
    assert NotificationDelivery.objects.filter(plan=plan, category=N.APPROVAL_WAITING).count() == 1
    svc.move_plan_approve(plan=plan, actor=people["erin"])
    run_all(django_capture_on_commit_callbacks)
    # carol muted decisions: only the final mail reaches her.
    assert send_recorded() == [("carol@example.test", f"Done: {what(plan)}")]
    with transaction.atomic():
        assert notifications.notify_plan(fresh(plan), N.RUN_SUCCEEDED, occasion="finished") == []
    assert NotificationDelivery.objects.filter(plan=plan).count() == 2


def test_a_delivery_is_about_exactly_one_request_or_plan(tmp_path, people, review_everything):
    from django.db import IntegrityError

    plan = built(tmp_path, people)
    with pytest.raises(IntegrityError), transaction.atomic():
        NotificationDelivery.objects.create(category=N.DECISION, channel="email", recipient="user:1",
                                            address="a@example.test", subject="s", body="b")
    assert not NotificationDelivery.objects.filter(plan=plan).exists()


def test_a_plans_webhook_payload_is_signed_and_verified_by_a_real_server(
        tmp_path, people, receiver, review_everything, django_capture_on_commit_callbacks):
    handler, url = receiver
    hook = Webhook(name="chat", url=url, categories=[N.APPROVAL_WAITING, N.DECISION, N.RUN_SUCCEEDED])
    hook.set_secret(handler.secret)
    hook.save()
    plan = built(tmp_path, people, n=2)
    svc.move_plan_submit(plan=plan, actor=people["carol"])
    svc.move_plan_approve(plan=plan, actor=people["erin"])
    run_all(django_capture_on_commit_callbacks)
    send_recorded()
    assert all(r["valid"] and r["fresh"] for r in handler.received)
    about_plan = [r["json"] for r in handler.received if "plan" in r["json"]]
    assert [(j["category"], j["plan"]["status"]) for j in about_plan] == [
        (N.APPROVAL_WAITING, P.PENDING_APPROVAL), (N.DECISION, P.APPROVED), (N.RUN_SUCCEEDED, P.DONE)]
    first = about_plan[0]["plan"]
    assert first == {"id": plan.pk, "status": P.PENDING_APPROVAL, "kind": PlanKind.EVACUATE_HOST,
                     "subject": {"host": "src.lab"}, "items": 2, "requester": "carol", "summary": "",
                     "not_moved": [], "url": first["url"]}
    assert first["url"].endswith(f"/plans/{plan.pk}/")
    # Per-VM events still reach the webhook (a ticketing tool may follow each VM), marked with the plan.
    per_vm = [r["json"] for r in handler.received if "request" in r["json"]]
    assert [j["category"] for j in per_vm] == [N.DECISION, N.DECISION, N.RUN_SUCCEEDED, N.RUN_SUCCEEDED]
    assert {j["request"]["plan"] for j in per_vm} == {plan.pk}
    assert NotificationDelivery.objects.filter(webhook=hook, status=DeliveryStatus.SENT).count() == 7


def test_a_running_plan_cancelled_by_an_admin_is_told_once_and_not_again_when_it_ends(
        tmp_path, people, review_everything, django_capture_on_commit_callbacks):
    plan = built(tmp_path, people)
    svc.move_plan_submit(plan=plan, actor=people["carol"])
    svc.move_plan_approve(plan=plan, actor=people["erin"])
    send_recorded()
    with django_capture_on_commit_callbacks(execute=True):
        svc.move_plan_cancel(plan=plan, actor=make_user("dan", Role.ADMIN), reason="freeze")
    assert fresh(plan).status == P.CANCELLED
    assert send_recorded() == [("carol@example.test", f"Cancelled: {what(plan)}")]
    assert "freeze; the open moves are being stopped, the moves already done stay done" in mail.outbox[-1].body
    assert not NotificationDelivery.objects.filter(request__isnull=False, channel="email").exists()
