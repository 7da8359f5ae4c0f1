"""Signing an approval stage: the one mechanism behind a request's and a move plan's approvals.

Both carry the stages frozen from the policy (``stages``), the stage that waits (``current_stage``)
and their signatures (``approvals``). The caller holds the subject's row lock, has asked
``access.can_decide``/``can_decide_plan`` (the verdict), and writes its own audit entry.
"""

from __future__ import annotations

from django.utils import timezone

from migrations_app import access
from migrations_app.bulk import update_objects
from migrations_app.policy.rules import Approval, StageSpec, stage_complete


def stage_sign(subject, *, actor, verdict: access.Verdict, comment: str) -> tuple[int, StageSpec, list[str]]:
    """Record the actor's signature on the subject's current stage and move it on: to the next
    stage when this one is complete, past the last one under the admin bypass. Returns the signed
    stage's index, the stage, and the stage's groups the actor signed for."""
    return stage_sign_many([(subject, verdict)], actor=actor, comment=comment)[0]


def stage_sign_many(signed: list[tuple[object, access.Verdict]], *, actor,
                    comment: str) -> list[tuple[int, StageSpec, list[str]]]:
    """``stage_sign`` for many subjects of one kind (all requests, or all plans), locked by the
    caller: one read of their signatures, one INSERT of the new ones, one UPDATE of their stages."""
    if not signed:
        return []
    subjects = [subject for subject, _ in signed]
    manager = subjects[0].approvals
    model, link = manager.model, manager.field.name
    now = timezone.now()
    # Their signatures as committed before this call (the caller holds the rows' locks).
    earlier: dict[tuple[int, int], list[Approval]] = {}
    rows = model.objects.filter(**{f"{link}_id__in": [s.pk for s in subjects]}).values_list(
        f"{link}_id", "stage", "approver_id", "groups")
    for subject_id, stage_index, approver_id, groups in rows:
        earlier.setdefault((subject_id, stage_index), []).append(Approval(approver_id, tuple(groups)))
    new, out = [], []
    for subject, verdict in signed:
        stages = subject.stages
        index = subject.current_stage
        stage = stages[index]
        groups = [] if verdict.bypass else list(access.stage_groups_of(actor, stage))
        new.append(model(**{link: subject}, stage=index, approver=actor, at=now, comment=comment, groups=groups,
                         bypass=verdict.bypass))
        if verdict.bypass:
            subject.current_stage = len(stages)
        elif stage_complete(stage, [*earlier.get((subject.pk, index), []), Approval(actor.pk, tuple(groups))]):
            subject.current_stage = index + 1
        subject.updated_at = now
        getattr(subject, "_prefetched_objects_cache", {}).pop("approvals", None)  # stale now
        out.append((index, stage, groups))
    if len(new) == 1:
        new[0].save(force_insert=True)
        subjects[0].save(update_fields=["current_stage", "updated_at"])
    else:
        model.objects.bulk_create(new)
        now = timezone.now()
        for subject in subjects:
            subject.updated_at = now
        update_objects(subjects, ["current_stage", "updated_at"])
    return out


def stage_label(index: int, stages) -> str:
    """E.g. "stage 1 of 2 (First review)", as audit entries name a signed stage."""
    name = stages[index].name
    return f"stage {index + 1} of {len(stages)}{f' ({name})' if name else ''}"
