"""Services for notification settings: a user's muted categories."""

from __future__ import annotations

from django.db import transaction

from migrations_app.choices import AuditAction, NotificationCategory
from migrations_app.models import NotificationPreference
from migrations_app.services.audit import audit_record
from migrations_app.services.errors import ActionRefused


def notification_preferences_set(*, user, muted: set[str] | list[str], ip: str | None = None) -> NotificationPreference:
    """Set which categories ``user`` does not want mailed; the change and its audit entry commit together."""
    muted = sorted(set(muted))
    unknown = [m for m in muted if m not in NotificationCategory.values]
    if unknown:
        raise ActionRefused(f"unknown notification categories: {', '.join(unknown)}", field="muted")
    with transaction.atomic():
        pref, _ = NotificationPreference.objects.select_for_update().get_or_create(user=user)
        before = sorted(pref.muted)
        if before != muted:
            pref.muted = muted
            pref.save(update_fields=["muted", "updated_at"])
            audit_record(actor=user, action=AuditAction.NOTIFICATIONS_CHANGED, object_type="user",
                         object_id=str(user.pk), ip=ip, before={"muted": before}, after={"muted": muted})
    return pref
