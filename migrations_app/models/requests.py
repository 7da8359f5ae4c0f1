"""A migration request: who wants which VM moved where, why, and when."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from migrations_app.choices import MigrationKind, RequestStatus


class MigrationRequest(models.Model):
    """What a VM owner asked for, and its place in the state machine (``choices.RequestStatus``).

    Source placement is captured at submission so the record reads true after the VM moved.
    """

    requester = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="migration_requests")
    vm = models.ForeignKey("migrations_app.VirtualMachine", on_delete=models.PROTECT, related_name="requests")
    kind = models.CharField(max_length=10, choices=MigrationKind.choices)
    target_host = models.ForeignKey(
        "migrations_app.Host", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    target_datastore = models.ForeignKey(
        "migrations_app.Datastore", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    reason = models.TextField()
    # The change window: the run starts no earlier than ``start_after`` and never after
    # ``window_end``; both empty: as soon as approved. A request whose window closes before its
    # run starts expires (``services.requests.migration_request_expire_stale``).
    start_after = models.DateTimeField(null=True, blank=True, help_text="Window start. Empty: as soon as approved.")
    window_end = models.DateTimeField(null=True, blank=True, help_text="Window end. Empty: no deadline.")
    cold = models.BooleanField(default=False, help_text="Power off, move, power on (a move plan's fallback).")
    status = models.CharField(
        max_length=20, choices=RequestStatus.choices, default=RequestStatus.PENDING_APPROVAL, db_index=True
    )
    source_placement = models.JSONField(default=dict)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_comment = models.TextField(blank=True)
    policy_note = models.CharField(max_length=300, blank=True, help_text="Why the policy decided as it did.")
    # Frozen at submission: policy name and version, rule, why it matched, and the stages to sign.
    approval_plan = models.JSONField(default=dict, blank=True)
    current_stage = models.PositiveIntegerField(default=0, help_text="Index of the stage waiting for signatures.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["requester", "status"])]

    def __str__(self) -> str:
        return f"#{self.pk} {self.get_kind_display().split(' (')[0]} of {self.vm.name}"

    @property
    def stages(self):
        """The frozen stages (``policy.rules.StageSpec``) of this request's approval plan."""
        from migrations_app.policy.rules import frozen_stages

        return frozen_stages(self.approval_plan)

    @property
    def kind_label(self) -> str:
        label = {"compute": "compute", "storage": "storage", "both": "compute and storage"}[self.kind]
        return f"cold {label}" if self.cold else label

    @property
    def window_text(self) -> str:
        """The change window in words, as pages and messages show it."""
        from migrations_app.windows import utc_text

        if self.start_after and self.window_end:
            return f"between {utc_text(self.start_after)} and {utc_text(self.window_end)}"
        if self.window_end:
            return f"as soon as approved, until {utc_text(self.window_end)}"
        if self.start_after:
            return f"not before {utc_text(self.start_after)}"
        return "as soon as approved"

    @property
    def target_summary(self) -> str:
        parts = []
        if self.target_host_id:
            parts.append(f"host {self.target_host.name}")
        if self.target_datastore_id:
            parts.append(f"datastore {self.target_datastore.name}")
        return " and ".join(parts)
