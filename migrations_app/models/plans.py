"""Move plans: evacuate a host or a datastore, or rebalance a cluster, as one reviewable request.

A plan is built by ``placement`` (a target per VM, the order, an estimated duration), reviewed by
its requester (a fallback for every VM that cannot move), approved as a whole, and then executed
as one ordinary ``MigrationRequest`` per movable item, so admission control, cancel, audit and
live progress work exactly as for a single request. State changes live in ``services.plans``.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from migrations_app.choices import MigrationKind, PlanFallback, PlanItemStatus, PlanKind, PlanStatus

# The items that move when the plan is approved: live, or cold where the requester chose it.
MOVES = models.Q(movable=True) | models.Q(fallback=PlanFallback.COLD_MOVE)


class MovePlan(models.Model):
    """One evacuation or rebalance: what it empties (or balances), why, and its decision."""

    kind = models.CharField(max_length=30, choices=PlanKind.choices)
    connection = models.ForeignKey("migrations_app.HypervisorConnection", on_delete=models.PROTECT, related_name="+")
    subject_host = models.ForeignKey("migrations_app.Host", null=True, blank=True, on_delete=models.PROTECT,
                                     related_name="+")
    subject_datastore = models.ForeignKey("migrations_app.Datastore", null=True, blank=True,
                                          on_delete=models.PROTECT, related_name="+")
    subject_cluster = models.ForeignKey("migrations_app.Cluster", null=True, blank=True, on_delete=models.PROTECT,
                                        related_name="+")
    requester = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="move_plans")
    reason = models.TextField()
    status = models.CharField(max_length=20, choices=PlanStatus.choices, default=PlanStatus.DRAFT, db_index=True)
    estimated_duration_s = models.FloatField(default=0.0)
    imbalance_before = models.FloatField(null=True, blank=True, help_text="Std-dev of host memory use, in %.")
    imbalance_after = models.FloatField(null=True, blank=True)
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
                                   related_name="+")
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_comment = models.TextField(blank=True)
    # Frozen at submission, as on a request: the approval policy's decision for the plan's strictest
    # item (the one whose rule asks for the most stages), with the stages to sign.
    approval_plan = models.JSONField(default=dict, blank=True)
    current_stage = models.PositiveIntegerField(default=0, help_text="Index of the stage waiting for signatures.")
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    summary = models.TextField(blank=True, help_text="The outcome, in words.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"plan #{self.pk}: {self.get_kind_display().lower()} {self.subject_name}"

    @property
    def stages(self):
        """The frozen stages (``policy.rules.StageSpec``) the plan's approvers sign."""
        from migrations_app.policy.rules import frozen_stages

        return frozen_stages(self.approval_plan)

    @property
    def subject_name(self) -> str:
        subject = self.subject_host or self.subject_datastore or self.subject_cluster
        return subject.name if subject else ""


class PlanItem(models.Model):
    """One VM of a plan: where it goes and why, or why it cannot go and what to do instead.

    ``request`` is the migration request of its current attempt; a failed attempt is retried with
    a new request until ``max_attempts``.
    """

    plan = models.ForeignKey(MovePlan, on_delete=models.CASCADE, related_name="items")
    vm = models.ForeignKey("migrations_app.VirtualMachine", on_delete=models.PROTECT, related_name="plan_items")
    order = models.PositiveIntegerField()
    kind = models.CharField(max_length=10, choices=MigrationKind.choices)
    source_host = models.ForeignKey("migrations_app.Host", on_delete=models.PROTECT, related_name="+")
    target_host = models.ForeignKey("migrations_app.Host", null=True, blank=True, on_delete=models.PROTECT,
                                    related_name="+")
    target_datastore = models.ForeignKey("migrations_app.Datastore", null=True, blank=True,
                                         on_delete=models.PROTECT, related_name="+")
    why = models.CharField(max_length=300, blank=True, help_text="Why this target.")
    movable = models.BooleanField(default=True)
    blocker = models.CharField(max_length=500, blank=True, help_text="Why it cannot move live.")
    fallback = models.CharField(max_length=20, choices=PlanFallback.choices, blank=True)
    status = models.CharField(max_length=20, choices=PlanItemStatus.choices, default=PlanItemStatus.PLANNED)
    attempts = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=2)
    request = models.ForeignKey("migrations_app.MigrationRequest", null=True, blank=True, on_delete=models.PROTECT,
                                related_name="plan_items")
    explanation = models.TextField(blank=True)
    policy_note = models.CharField(max_length=300, blank=True,
                                   help_text="What the approval policy decided for this VM's move, at submission.")

    class Meta:
        ordering = ["plan", "order"]
        constraints = [models.UniqueConstraint(fields=["plan", "vm"], name="one_item_per_vm_per_plan")]

    def __str__(self) -> str:
        return f"{self.plan_id}/{self.order} {self.vm.name}"

    @property
    def moves(self) -> bool:
        """Whether this VM moves once the plan is approved (live, or cold as its fallback)."""
        return self.movable or self.fallback == PlanFallback.COLD_MOVE

    @property
    def target_summary(self) -> str:
        parts = []
        if self.target_host_id:
            parts.append(self.target_host.name)
        if self.target_datastore_id:
            parts.append(self.target_datastore.name)
        return " / ".join(parts)
