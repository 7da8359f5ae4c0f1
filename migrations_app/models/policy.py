"""Approval policies as admins edit them, and the approvals recorded against a request's stages.

Exactly one policy is active at a time (a partial unique constraint). At submission the matched
rule's stages are frozen onto the request (``MigrationRequest.approval_plan``), so editing a policy
never changes a request in flight; ``RequestApproval`` rows record who signed which stage.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

from migrations_app.choices import ApprovalMode, RuleAction


class ApprovalPolicy(models.Model):
    """A named, ordered set of rules; the active one decides every new request."""

    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    active = models.BooleanField(default=False, help_text="Exactly one policy is active; use the Activate action.")
    version = models.PositiveIntegerField(default=1, help_text="Raised by every change; frozen onto requests.")
    updated_at = models.DateTimeField(auto_now=True)

    # What an audit entry records of an admin's change, the rules and their stages included.
    AUDITED_FIELDS = ("name", "description", "active", "version", "rules_summary")

    class Meta:
        ordering = ["-active", "name"]
        verbose_name_plural = "approval policies"
        constraints = [models.UniqueConstraint(fields=["active"], condition=Q(active=True), name="one_active_policy")]

    def __str__(self) -> str:
        return f"{self.name}{' (active)' if self.active else ''}"

    @property
    def rules_summary(self) -> list[dict]:
        return [rule.summary for rule in self.rules.order_by("order")] if self.pk else []

    def clean(self):
        if self.active and ApprovalPolicy.objects.filter(active=True).exclude(pk=self.pk).exists():
            raise ValidationError({"active": "another policy is active: use the Activate action to switch"})


class PolicyRule(models.Model):
    """One rule: all its conditions must hold (none: the catch-all); the first matching rule decides."""

    policy = models.ForeignKey(ApprovalPolicy, on_delete=models.CASCADE, related_name="rules")
    order = models.PositiveIntegerField()
    name = models.CharField(max_length=200)
    conditions = models.JSONField(default=dict, blank=True,
                                  help_text="e.g. {\"tags_any\": [\"env:production\"], \"memory_gib_over\": 8}")
    action = models.CharField(max_length=20, choices=RuleAction.choices, default=RuleAction.STAGES)
    reject_reason = models.CharField(max_length=300, blank=True, help_text="What the requester reads (auto_reject).")

    class Meta:
        ordering = ["policy", "order"]
        constraints = [models.UniqueConstraint(fields=["policy", "order"], name="unique_rule_order")]

    def __str__(self) -> str:
        return f"{self.order}. {self.name}"

    @property
    def summary(self) -> dict:
        """The rule and its stages as plain data (for audit entries)."""
        return {"order": self.order, "name": self.name, "conditions": self.conditions, "action": self.action,
                "reject_reason": self.reject_reason,
                "stages": [s.summary for s in self.stages.order_by("order")] if self.pk else []}

    def clean(self):
        from migrations_app.policy.document import condition_errors

        errors = condition_errors(self.conditions, "conditions")
        if self.action == RuleAction.AUTO_REJECT and not self.reject_reason.strip():
            errors.append("reject_reason: an auto_reject rule needs the reason the requester will read")
        if errors:
            raise ValidationError(errors)


class PolicyStage(models.Model):
    """One ordered stage of a ``stages`` rule: who may sign it and how many must."""

    rule = models.ForeignKey(PolicyRule, on_delete=models.CASCADE, related_name="stages")
    order = models.PositiveIntegerField()
    name = models.CharField(max_length=100, blank=True)
    groups = models.ManyToManyField(Group, related_name="+")
    mode = models.CharField(max_length=20, choices=ApprovalMode.choices, default=ApprovalMode.ANY)
    count = models.PositiveIntegerField(default=1, help_text="Distinct approvers needed (n_distinct only).")

    class Meta:
        ordering = ["rule", "order"]
        constraints = [models.UniqueConstraint(fields=["rule", "order"], name="unique_stage_order")]

    def __str__(self) -> str:
        return self.name or f"stage {self.order}"

    @property
    def summary(self) -> dict:
        return {"order": self.order, "name": self.name, "groups": sorted(g.name for g in self.groups.all()),
                "mode": self.mode, "count": self.count}

    def clean(self):
        if self.mode == ApprovalMode.N_DISTINCT and self.count < 1:
            raise ValidationError({"count": "at least one approver"})
        if self.mode != ApprovalMode.N_DISTINCT and self.count != 1:
            raise ValidationError({"count": "only an n_distinct stage takes a count"})


class StageSignature(models.Model):
    """What one approver's signature on one approval stage records (of a request or a move plan)."""

    stage = models.PositiveIntegerField(help_text="Index into the approval_plan stages.")
    approver = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    at = models.DateTimeField()
    comment = models.TextField(blank=True)
    groups = models.JSONField(default=list, blank=True, help_text="The stage's groups the approver was in.")
    bypass = models.BooleanField(default=False, help_text="An admin's approval under ADMIN_BYPASS_APPROVAL.")

    class Meta:
        abstract = True


class RequestApproval(StageSignature):
    """One approver's signature on one stage of a request (a person signs a stage once)."""

    request = models.ForeignKey("migrations_app.MigrationRequest", on_delete=models.PROTECT, related_name="approvals")

    class Meta:
        ordering = ["request", "stage", "at", "id"]
        constraints = [models.UniqueConstraint(fields=["request", "stage", "approver"],
                                               name="one_approval_per_stage_and_person")]

    def __str__(self) -> str:
        return f"#{self.request_id} stage {self.stage + 1} by {self.approver}"


class PlanApproval(StageSignature):
    """One approver's signature on one stage of a move plan (as ``RequestApproval`` for a request).
    When the plan's last stage is signed, each of its moves' requests gets a copy of these rows."""

    plan = models.ForeignKey("migrations_app.MovePlan", on_delete=models.PROTECT, related_name="approvals")

    class Meta:
        ordering = ["plan", "stage", "at", "id"]
        constraints = [models.UniqueConstraint(fields=["plan", "stage", "approver"],
                                               name="one_plan_approval_per_stage_and_person")]

    def __str__(self) -> str:
        return f"plan #{self.plan_id} stage {self.stage + 1} by {self.approver}"
