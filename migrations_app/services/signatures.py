"""Signing an approval stage: the one mechanism behind a request's and a move plan's approvals.

Both carry the stages frozen from the policy (``stages``), the stage that waits (``current_stage``)
and their signatures (``approvals``). The caller holds the subject's row lock, has asked
``access.can_decide``/``can_decide_plan`` (the verdict), and writes its own audit entry.
"""

from __future__ import annotations

from django.utils import timezone

from migrations_app import access
from migrations_app.policy.rules import Approval, StageSpec, stage_complete


def stage_sign(subject, *, actor, verdict: access.Verdict, comment: str) -> tuple[int, StageSpec, list[str]]:
    """Record the actor's signature on the subject's current stage and move it on: to the next
    stage when this one is complete, past the last one under the admin bypass. Returns the signed
    stage's index, the stage, and the stage's groups the actor signed for."""
    stages = subject.stages
    index = subject.current_stage
    stage = stages[index]
    groups = [] if verdict.bypass else list(access.stage_groups_of(actor, stage))
    subject.approvals.create(stage=index, approver=actor, at=timezone.now(), comment=comment, groups=groups,
                             bypass=verdict.bypass)
    if verdict.bypass:
        subject.current_stage = len(stages)
    else:
        signed = [Approval(a.approver_id, tuple(a.groups)) for a in subject.approvals.filter(stage=index)]
        if stage_complete(stage, signed):
            subject.current_stage = index + 1
    subject.save(update_fields=["current_stage", "updated_at"])
    return index, stage, groups


def stage_label(index: int, stages) -> str:
    """E.g. "stage 1 of 2 (First review)", as audit entries name a signed stage."""
    name = stages[index].name
    return f"stage {index + 1} of {len(stages)}{f' ({name})' if name else ''}"
