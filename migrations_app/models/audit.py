"""The audit log: one row per action, written in the same transaction as the change it records.

Entries form a hash chain (``migrations_app.audit_chain``): each carries the SHA-256 of the one
before it, so an edited, removed, reordered or inserted row breaks the chain. On PostgreSQL a
trigger refuses UPDATE and DELETE on the table; signed checkpoints kept outside the database catch
a truncated tail.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from migrations_app.choices import AuditAction, AuditOutcome


class AuditEntry(models.Model):
    """Who did what to which object, from where, why, and what changed (before/after placement)."""

    created_at = models.DateTimeField(db_index=True)
    # PROTECT: the log is append-only, so a user or request it names can be deactivated, not deleted.
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    actor_name = models.CharField(max_length=150, help_text="Kept when the user is deleted; 'system' for workers.")
    action = models.CharField(max_length=40, choices=AuditAction.choices, db_index=True)
    outcome = models.CharField(max_length=10, choices=AuditOutcome.choices, default=AuditOutcome.SUCCESS)
    object_type = models.CharField(max_length=50)
    object_id = models.CharField(max_length=50, blank=True)
    request = models.ForeignKey(
        "migrations_app.MigrationRequest", null=True, blank=True, on_delete=models.PROTECT, related_name="audit"
    )
    vm_name = models.CharField(max_length=200, blank=True, db_index=True)
    reason = models.TextField(blank=True)
    before = models.JSONField(default=dict, blank=True)
    after = models.JSONField(default=dict, blank=True)
    task_id = models.CharField(max_length=200, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    data = models.JSONField(default=dict, blank=True)
    prev_hash = models.CharField(max_length=64, help_text="entry_hash of the entry before this one.")
    entry_hash = models.CharField(max_length=64, unique=True, help_text="SHA-256 over this entry's content.")

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_name} {self.action}"
