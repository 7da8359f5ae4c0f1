"""Notifications: e-mail to the people a change concerns, and signed JSON to webhooks.

Services call ``notify`` inside the transaction of the change: it records one
``NotificationDelivery`` per recipient (the unique constraint makes a repeat for the same occasion
impossible) and, on commit, hands each new one to the ``deliver_notification`` task, which calls
``deliver``. A mail server or webhook that is down never breaks the request's own flow: the task
retries with backoff and records the failure on the delivery.

Who gets what: ``approval_waiting`` goes to ``selectors.current_approvers(request)``; every other
category goes to the requester. Nobody is told about their own action, and muted categories
(``NotificationPreference``) are not mailed. Webhooks get every category they subscribe to.

Move plans (``notify_plan``) follow the same rules: ``approval_waiting`` to
``selectors.current_plan_approvers(plan)`` once per stage that opens (occasion "plan-stage-N");
to the plan's requester ``decision`` (approved, by people or by the policy, or rejected),
``cancelled``, ``expired``, and one final mail when the plan finishes: ``run_succeeded`` when it is
done, ``run_failed`` when it is partially done or failed, listing the VMs that did not move. The
per-VM requests of a plan mail nobody (the plan's mails replace them, one per VM would flood the
requester); webhooks still receive their events, marked with the plan's id, so a ticketing tool can
follow each VM.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import smtplib
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.utils import timezone

from migrations_app import selectors
from migrations_app.choices import DeliveryStatus, NotificationCategory, PlanItemStatus, PlanStatus
from migrations_app.models import MigrationRequest, MovePlan, NotificationDelivery, NotificationPreference, Webhook

log = logging.getLogger(__name__)
C = NotificationCategory

SIGNATURE_HEADER = "X-Portal-Signature"
TIMESTAMP_HEADER = "X-Portal-Timestamp"


class DeliveryFailed(Exception):
    """Sending failed this time (mail server or webhook down, non-2xx answer); worth a retry."""


def _subject(request: MigrationRequest, category: str) -> str:
    what = f"#{request.pk} {request.kind_label} move of {request.vm.name}"
    return {
        C.APPROVAL_WAITING: f"Waiting for your approval: {what}",
        C.DECISION: f"{request.get_status_display()}: {what}",
        C.RUN_STARTED: f"Started: {what}",
        C.RUN_SUCCEEDED: f"Succeeded: {what}",
        C.RUN_FAILED: f"{request.get_status_display()}: {what}",
        C.CANCELLED: f"Cancelled: {what}",
        C.EXPIRED: f"Expired: {what}",
    }[category]


def request_url(request: MigrationRequest) -> str:
    return f"{settings.PORTAL['BASE_URL']}/requests/{request.pk}/"


def _body(request: MigrationRequest, category: str, detail: str) -> str:
    lines = [
        _subject(request, category),
        "",
        f"VM: {request.vm.name}",
        f"Move: {request.source_placement.get('host', '?')} -> {request.target_summary}",
        f"When: {request.window_text}",
        f"Requested by: {request.requester.username}",
        f"Reason: {request.reason}",
        f"Status: {request.get_status_display()}",
    ]
    if detail:
        lines.append(f"Details: {detail}")
    lines += ["", f"Open it: {request_url(request)}", "",
              "You can mute categories of these mails under Notifications in the portal."]
    return "\n".join(lines)


def payload(request: MigrationRequest, category: str, detail: str) -> dict:
    """What a webhook receives (JSON)."""
    return {
        "category": category,
        "request": {
            "id": request.pk,
            "status": request.status,
            "kind": request.kind,
            "vm": request.vm.name,
            "requester": request.requester.username,
            "target": request.target_summary,
            "window": request.window_text,
            "url": request_url(request),
            "plan": plan_id_of(request),
        },
        "detail": detail,
        "at": timezone.now().isoformat(),
    }


def muted_categories(user) -> set[str]:
    pref = NotificationPreference.objects.filter(user=user).values_list("muted", flat=True).first()
    return set(pref or [])


def plan_id_of(request: MigrationRequest) -> int | None:
    """The move plan this request is a per-VM attempt of, or None. Every attempt carries it from
    its creation (``services.plans.approval.copy_signatures``), before the item links to it."""
    plan_id = (request.approval_plan or {}).get("plan")
    return int(plan_id) if plan_id else None


def notify(request: MigrationRequest, category: str, *, occasion: str = "", actor=None, detail: str = "") -> list[int]:
    """Record who must hear about this change (call inside the service's transaction) and send on
    commit. Returns the ids of the deliveries recorded now (a repeat of an occasion records none).
    A plan's per-VM request mails nobody (its plan tells the people); webhooks still get it."""
    return notify_many([Notice(request, category, occasion, detail)], actor=actor)


@dataclass(frozen=True)
class Notice:
    """One ``notify`` call's arguments, for ``notify_many``."""

    request: MigrationRequest
    category: str
    occasion: str = ""
    detail: str = ""


def notify_many(notices: list[Notice], *, actor=None) -> list[int]:
    """``notify`` for many requests at once (a batch of runs starting or ending): the webhooks,
    the mutes and the deliveries already recorded are read once for all, and the new deliveries
    are written by one INSERT."""
    if not notices:
        return []
    for notice in notices:
        if notice.category not in C.values:
            raise ValueError(f"unknown notification category {notice.category!r}")
    hooks = list(Webhook.objects.filter(active=True))
    mine = [n for n in notices if plan_id_of(n.request) is None]  # a plan's per-VM requests mail nobody
    approvers = selectors.current_approvers_many([n.request for n in mine if n.category == C.APPROVAL_WAITING])
    recipients = {id(n): approvers[n.request.pk] if n.category == C.APPROVAL_WAITING else [n.request.requester]
                  for n in mine}
    muted = _muted_of({user.pk for users in recipients.values() for user in users})
    wanted: list[NotificationDelivery] = []
    for notice in notices:
        request, category = notice.request, notice.category
        wanted += _deliveries(recipients.get(id(notice), []), category, about={"request": request},
                              occasion=notice.occasion, actor=actor, subject=_subject(request, category),
                              body=_body(request, category, notice.detail),
                              data=payload(request, category, notice.detail), hooks=hooks, muted=muted)
    return _save_new(wanted)


def _muted_of(user_ids) -> dict[int, set[str]]:
    """``muted_categories`` of many users in one query."""
    muted: dict[int, set[str]] = {pk: set() for pk in user_ids}
    if muted:
        for user_id, categories in NotificationPreference.objects.filter(user_id__in=list(muted)).values_list(
                "user_id", "muted"):
            muted[user_id] = set(categories or [])
    return muted


def notify_plan(plan: MovePlan, category: str, *, occasion: str = "", actor=None, detail: str = "") -> list[int]:
    """``notify`` for a move plan: its current approvers for ``approval_waiting``, its requester
    for every other category."""
    if category not in C.values:
        raise ValueError(f"unknown notification category {category!r}")
    users = selectors.current_plan_approvers(plan) if category == C.APPROVAL_WAITING else [plan.requester]
    return _record(users, category, about={"plan": plan}, occasion=occasion, actor=actor,
                   subject=_plan_subject(plan, category), body=_plan_body(plan, category, detail),
                   data=plan_payload(plan, category, detail))


def _record(users, category: str, *, about: dict, occasion: str, actor, subject: str, body: str,
            data: dict) -> list[int]:
    """One delivery per recipient (users, then the webhooks that want the category) about the
    request or plan in ``about``; the new pending ones are sent on commit."""
    muted = _muted_of({user.pk for user in users})
    hooks = list(Webhook.objects.filter(active=True))
    return _save_new(_deliveries(users, category, about=about, occasion=occasion, actor=actor, subject=subject,
                                 body=body, data=data, hooks=hooks, muted=muted))


def _deliveries(users, category: str, *, about: dict, occasion: str, actor, subject: str, body: str, data: dict,
                hooks: list[Webhook], muted: dict[int, set[str]]) -> list[NotificationDelivery]:
    """The deliveries one occasion calls for (not saved): each user not muting the category and
    not the actor, then each webhook that wants it."""
    actor_id = getattr(actor, "pk", None)
    common = {**about, "category": category, "occasion": occasion, "subject": subject[:200], "body": body,
              "payload": data}
    out = []
    for user in users:
        if user.pk == actor_id or category in muted[user.pk]:
            continue
        out.append(NotificationDelivery(
            **common, recipient=f"user:{user.pk}", channel=NotificationDelivery.EMAIL, user=user,
            address=user.email, status=DeliveryStatus.PENDING if user.email else DeliveryStatus.SKIPPED,
            last_error="" if user.email else "the user has no e-mail address"))
    for hook in hooks:
        if hook.wants(category):
            out.append(NotificationDelivery(**common, recipient=f"webhook:{hook.pk}",
                                            channel=NotificationDelivery.WEBHOOK, webhook=hook, address=hook.url))
    return out


def _save_new(wanted: list[NotificationDelivery]) -> list[int]:
    """Save the deliveries not recorded before (one per request or plan, category, recipient and
    occasion: the unique constraints) and send the pending ones on commit; their ids."""
    if not wanted:
        return []

    def key(d: NotificationDelivery) -> tuple:
        return d.request_id, d.plan_id, d.category, d.recipient, d.occasion

    seen: set[tuple] = set()
    for about in ("request", "plan"):
        ids = {getattr(d, f"{about}_id") for d in wanted if getattr(d, f"{about}_id")}
        if ids:
            rows = NotificationDelivery.objects.filter(**{f"{about}_id__in": ids},
                                                       occasion__in={d.occasion for d in wanted})
            seen.update(rows.values_list("request_id", "plan_id", "category", "recipient", "occasion"))
    new = []
    for delivery in wanted:
        if key(delivery) not in seen:
            seen.add(key(delivery))
            new.append(delivery)
    if len(new) == 1:
        new[0].save(force_insert=True)
    elif new:
        NotificationDelivery.objects.bulk_create(new)
    pending = [d.pk for d in new if d.status == DeliveryStatus.PENDING]
    if pending:
        transaction.on_commit(lambda: _enqueue(pending), robust=True)
    return pending


# -- move plans -------------------------------------------------------------------------------

# The plan statuses its final mail is about, and the category that mail belongs to.
PLAN_FINISHED_CATEGORY = {PlanStatus.DONE: C.RUN_SUCCEEDED, PlanStatus.PARTIALLY_DONE: C.RUN_FAILED,
                          PlanStatus.FAILED: C.RUN_FAILED}
_NOT_MOVED = (PlanItemStatus.FAILED, PlanItemStatus.CANCELLED)


def plan_url(plan: MovePlan) -> str:
    return f"{settings.PORTAL['BASE_URL']}/plans/{plan.pk}/"


def _plan_what(plan: MovePlan) -> str:
    return f"plan #{plan.pk}: {plan.get_kind_display().lower()} {plan.subject_name}"


def _plan_subject(plan: MovePlan, category: str) -> str:
    what = _plan_what(plan)
    return {
        C.APPROVAL_WAITING: f"Waiting for your approval: {what}",
        C.DECISION: f"{plan.get_status_display()}: {what}",
        C.RUN_STARTED: f"Started: {what}",
        C.RUN_SUCCEEDED: f"{plan.get_status_display()}: {what}",
        C.RUN_FAILED: f"{plan.get_status_display()}: {what}",
        C.CANCELLED: f"Cancelled: {what}",
        C.EXPIRED: f"Expired: {what}",
    }[category]


def _plan_subject_data(plan: MovePlan) -> dict:
    return {kind: getattr(plan, f"subject_{kind}").name
            for kind in ("host", "datastore", "cluster") if getattr(plan, f"subject_{kind}_id")}


def _plan_body(plan: MovePlan, category: str, detail: str) -> str:
    items = list(plan.items.select_related("vm").order_by("order"))
    moving = sum(item.moves for item in items)
    lines = [
        _plan_subject(plan, category),
        "",
        f"Plan: {plan.get_kind_display()} {plan.subject_name}",
        f"VMs: {len(items)} in the plan, {moving} to move",
        f"Requested by: {plan.requester.username}",
        f"Reason: {plan.reason}",
        f"Status: {plan.get_status_display()}",
    ]
    if category in PLAN_FINISHED_CATEGORY.values() and plan.summary:
        lines.append(f"Outcome: {plan.summary}")
        not_moved = [item for item in items if item.status in _NOT_MOVED]
        if not_moved:
            lines += ["", "Not moved:"] + [f"- {item.vm.name}: {item.explanation}" for item in not_moved]
    if detail:
        lines.append(f"Details: {detail}")
    lines += ["", f"Open it: {plan_url(plan)}", "",
              "You can mute categories of these mails under Notifications in the portal."]
    return "\n".join(lines)


def plan_payload(plan: MovePlan, category: str, detail: str) -> dict:
    """What a webhook receives (JSON) about a plan."""
    items = list(plan.items.select_related("vm").order_by("order"))
    return {
        "category": category,
        "plan": {
            "id": plan.pk,
            "status": plan.status,
            "kind": plan.kind,
            "subject": _plan_subject_data(plan),
            "items": len(items),
            "requester": plan.requester.username,
            "summary": plan.summary,
            "not_moved": [item.vm.name for item in items if item.status in _NOT_MOVED],
            "url": plan_url(plan),
        },
        "detail": detail,
        "at": timezone.now().isoformat(),
    }


def _enqueue(delivery_ids: list[int]) -> None:
    from migrations_app.tasks import deliver_notification

    for pk in delivery_ids:
        deliver_notification.delay(pk)


# -- sending ----------------------------------------------------------------------------------


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 over "<timestamp>." + the raw body."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect is an answer we do not follow: the signed body goes where it was configured


_opener = urllib.request.build_opener(_NoRedirects)


def _post_webhook(delivery: NotificationDelivery) -> None:
    hook = delivery.webhook
    body = json.dumps({**delivery.payload, "delivery": delivery.pk}, sort_keys=True).encode()
    timestamp = str(int(time.time()))
    req = urllib.request.Request(hook.url, data=body, method="POST", headers={
        "Content-Type": "application/json",
        "User-Agent": "migration-portal",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(hook.get_secret(), timestamp, body),
    })
    try:
        with _opener.open(req, timeout=settings.PORTAL["WEBHOOK_TIMEOUT_S"]) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        raise DeliveryFailed(f"{hook.url} answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DeliveryFailed(f"{hook.url} unreachable: {getattr(exc, 'reason', exc)}") from None
    if not 200 <= status < 300:
        raise DeliveryFailed(f"{hook.url} answered {status}")


def _send_mail(delivery: NotificationDelivery) -> None:
    try:
        send_mail(delivery.subject, delivery.body, None, [delivery.address])
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryFailed(f"mail to {delivery.address} failed: {exc}") from None


def claim_attempt(delivery: NotificationDelivery) -> bool:
    """Count one attempt, compare-and-set on the count as read: of two task messages for one
    delivery (a resend racing the original), only one sends."""
    return bool(NotificationDelivery.objects.filter(
        pk=delivery.pk, status=DeliveryStatus.PENDING, attempts=delivery.attempts).update(attempts=delivery.attempts + 1))


def deliver(delivery_id: int) -> bool:
    """Send one recorded delivery once. True when sent (or already sent); raises DeliveryFailed
    (recorded on the delivery) when this attempt failed."""
    delivery = NotificationDelivery.objects.select_related("webhook").filter(pk=delivery_id).first()
    if delivery is None or delivery.status != DeliveryStatus.PENDING:
        return delivery is not None and delivery.status == DeliveryStatus.SENT
    if not claim_attempt(delivery):
        return False  # another message for this delivery is sending it
    try:
        if delivery.channel == NotificationDelivery.WEBHOOK:
            _post_webhook(delivery)
        else:
            _send_mail(delivery)
    except DeliveryFailed as exc:
        NotificationDelivery.objects.filter(pk=delivery.pk).update(last_error=str(exc)[:500])
        log.warning("notification %s: %s", delivery.pk, exc)
        raise
    NotificationDelivery.objects.filter(pk=delivery.pk).update(status=DeliveryStatus.SENT, sent_at=timezone.now(),
                                                              last_error="")
    return True


def resend_unsent(*, older_than_s: float = 600.0) -> list[int]:
    """Hand again to the workers the deliveries never tried (their message was lost with the
    broker); beat runs this. Returns their ids."""
    cutoff = timezone.now() - timedelta(seconds=older_than_s)
    ids = list(NotificationDelivery.objects.filter(status=DeliveryStatus.PENDING, attempts=0, created_at__lt=cutoff)
               .order_by("pk").values_list("pk", flat=True)[:500])
    _enqueue(ids)
    return ids


def give_up(delivery_id: int) -> None:
    """The last retry failed: the delivery is failed for good (its last_error says why)."""
    NotificationDelivery.objects.filter(pk=delivery_id, status=DeliveryStatus.PENDING).update(
        status=DeliveryStatus.FAILED)
