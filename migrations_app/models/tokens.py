"""Personal API tokens: how scripts and automation (AWX, Ansible, CI jobs) call the JSON API as a
user, without a browser session.

The secret is shown once, when the token is made, and stored only as its SHA-256: a copy of the
database holds no usable token. Secrets start with ``mvp_`` so that one pasted into a repository,
a ticket or a log is easy to find (grep, secret scanners).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

PREFIX = "mvp_"


class ApiToken(models.Model):
    """One user's token: what it is for (``name``), until when it works, and when it was last used.

    A token acts as its user with exactly that user's rights. It stops working when it expires,
    when it is revoked (by its user or an admin: ``services.api_tokens.api_token_revoke``), or
    when its user is deactivated. Tokens are revoked, never deleted, so the audit log's
    references to them stay readable.
    """

    ACTIVE, EXPIRED, REVOKED = "active", "expired", "revoked"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="What the token is for (an AWX credential, a CI job).")
    digest = models.CharField(max_length=64, unique=True, editable=False,
                              help_text="SHA-256 of the secret, in hex; the secret itself is never stored.")
    last4 = models.CharField(max_length=4, editable=False, help_text="The secret's last four characters.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField()
    # Written at most once a minute per token (``services.api_tokens``), not on every call.
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_ip = models.GenericIPAddressField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
                                   related_name="+", editable=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.user}, {self.hint})"

    @property
    def hint(self) -> str:
        """How the token is shown once made: its prefix and last four characters."""
        return f"{PREFIX}…{self.last4}"

    def state(self, now=None) -> str:
        if self.revoked_at is not None:
            return self.REVOKED
        return self.EXPIRED if self.expires_at <= (now or timezone.now()) else self.ACTIVE
