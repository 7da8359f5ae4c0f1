"""Notifications: each user's muted categories, webhooks for chat and ITSM tools, and one delivery
record per (request or plan, category, recipient, occasion) so that nothing is ever sent twice."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import URLValidator
from django.db import models

from migrations_app.choices import DeliveryStatus, NotificationCategory


class NotificationPreference(models.Model):
    """Which notification categories a user does not want by e-mail (none muted by default)."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                                related_name="notification_preference")
    muted = models.JSONField(default=list, blank=True, help_text="NotificationCategory values not mailed.")
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"notification preferences of {self.user}"


class Webhook(models.Model):
    """A chat or ITSM endpoint that receives notifications as signed JSON POSTs.

    The body is signed with HMAC-SHA256 under ``secret`` (encrypted at rest, ``migrations_app.secrets``):
    ``X-Portal-Signature: sha256=<hex of HMAC(secret, "<X-Portal-Timestamp>." + raw body)>``; a
    receiver refuses old timestamps, so a captured delivery cannot be replayed later.
    """

    name = models.CharField(max_length=100, unique=True)
    url = models.CharField(max_length=500, validators=[URLValidator(schemes=["http", "https"])])
    secret_encrypted = models.TextField(blank=True, editable=False, help_text="Fernet token; see secrets.py.")
    categories = models.JSONField(default=list, blank=True, help_text="NotificationCategory values; empty: all.")
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    AUDITED_FIELDS = ("name", "url", "secret_encrypted", "categories", "active")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def wants(self, category: str) -> bool:
        return self.active and (not self.categories or category in self.categories)

    def set_secret(self, plain: str) -> None:
        from migrations_app.secrets import encrypt

        self.secret_encrypted = encrypt(plain)

    def get_secret(self) -> str:
        from migrations_app.secrets import decrypt

        return decrypt(self.secret_encrypted)


class NotificationDelivery(models.Model):
    """One notification to one recipient (a user's mailbox or a webhook), recorded in the transaction
    of the change it tells about and sent after commit by a Celery task.

    It is about either a migration request or a move plan (exactly one of ``request`` and ``plan``).
    ``occasion`` separates legitimate repeats (an approval stage, a run); the unique constraints make
    a second delivery for the same subject, category, recipient and occasion impossible.
    """

    EMAIL, WEBHOOK = "email", "webhook"

    request = models.ForeignKey("migrations_app.MigrationRequest", null=True, blank=True, on_delete=models.CASCADE,
                                related_name="notifications")
    plan = models.ForeignKey("migrations_app.MovePlan", null=True, blank=True, on_delete=models.CASCADE,
                             related_name="notifications")
    category = models.CharField(max_length=30, choices=NotificationCategory.choices)
    occasion = models.CharField(max_length=50, blank=True)
    channel = models.CharField(max_length=10, choices=[(EMAIL, "E-mail"), (WEBHOOK, "Webhook")])
    recipient = models.CharField(max_length=50, help_text="user:<id> or webhook:<id>")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                             related_name="+")
    webhook = models.ForeignKey(Webhook, null=True, blank=True, on_delete=models.CASCADE, related_name="deliveries")
    address = models.CharField(max_length=500, help_text="E-mail address or URL at the time it was recorded.")
    subject = models.CharField(max_length=200)
    body = models.TextField()
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "notification deliveries"
        constraints = [
            models.CheckConstraint(
                condition=models.Q(request__isnull=False, plan__isnull=True)
                | models.Q(request__isnull=True, plan__isnull=False),
                name="notification_about_request_or_plan"),
            # Two partial indexes: a NULL never equals a NULL in a plain unique index.
            models.UniqueConstraint(fields=["request", "category", "recipient", "occasion"],
                                    condition=models.Q(request__isnull=False),
                                    name="unique_notification_per_occasion"),
            models.UniqueConstraint(fields=["plan", "category", "recipient", "occasion"],
                                    condition=models.Q(plan__isnull=False),
                                    name="unique_plan_notification_per_occasion"),
        ]

    def __str__(self) -> str:
        return f"{self.category} to {self.address} ({self.status})"
