"""Services for approval policies: read the active one, import, export, activate, install defaults.

Import validates the whole document first (``policy.document.validate``, every error with its
path); a document with any error changes nothing. Each import or activation writes its audit entry
in the same transaction.
"""

from __future__ import annotations

from django.contrib.auth.models import Group, User
from django.db import transaction
from django.db.models import Q

from migrations_app.choices import AuditAction, Role, RuleAction
from migrations_app.models import ApprovalPolicy, PolicyRule, PolicyStage
from migrations_app.policy.defaults import DEFAULT_POLICY
from migrations_app.policy.document import to_document, validate
from migrations_app.policy.rules import PolicySpec, RuleSpec, StageSpec
from migrations_app.services.audit import audit_record

# Stand-in signers where the "more than possible" check does not apply (no user ever has these ids).
_ANYONE = frozenset(range(-100, 0))


def policy_spec(policy: ApprovalPolicy) -> PolicySpec:
    """The pure form of a stored policy (what evaluation and export read)."""
    rules = []
    for rule in policy.rules.order_by("order").prefetch_related("stages__groups"):
        stages = tuple(
            StageSpec(name=s.name, groups=tuple(sorted(g.name for g in s.groups.all())), mode=s.mode, count=s.count)
            for s in sorted(rule.stages.all(), key=lambda s: s.order)
        ) if rule.action == RuleAction.STAGES else ()
        rules.append(RuleSpec(name=rule.name, conditions=rule.conditions or {}, action=rule.action,
                              reject_reason=rule.reject_reason, stages=stages))
    return PolicySpec(name=policy.name, description=policy.description, rules=tuple(rules), version=policy.version)


def active_policy() -> PolicySpec | None:
    policy = ApprovalPolicy.objects.filter(active=True).first()
    return policy_spec(policy) if policy else None


def group_signers() -> dict[str, set[int]]:
    """Every group name -> the active users in it who could sign a stage (they hold the approver
    role: members of the ``approver`` group, or superusers)."""
    signers = set(User.objects.filter(is_active=True).filter(
        Q(is_superuser=True) | Q(groups__name=Role.APPROVER)).values_list("pk", flat=True))
    members: dict[str, set[int]] = {name: set() for name in Group.objects.values_list("name", flat=True)}
    for name, uid in Group.objects.filter(user__in=signers).values_list("name", "user"):
        members[name].add(uid)
    return members


def approval_policy_export(*, policy: ApprovalPolicy) -> dict:
    return to_document(policy_spec(policy))


def _write(policy: ApprovalPolicy, spec: PolicySpec, groups: dict[str, Group]) -> None:
    policy.rules.all().delete()
    for i, rule in enumerate(spec.rules):
        row = PolicyRule.objects.create(policy=policy, order=i + 1, name=rule.name, conditions=dict(rule.conditions),
                                        action=rule.action, reject_reason=rule.reject_reason)
        for j, stage in enumerate(rule.stages):
            srow = PolicyStage.objects.create(rule=row, order=j + 1, name=stage.name, mode=stage.mode,
                                              count=stage.count)
            srow.groups.set([groups[g] for g in stage.groups])


def approval_policy_import(*, actor, document, activate: bool = False, ip: str | None = None,
                           require_signers: bool = True) -> ApprovalPolicy:
    """Create or replace (by name) the policy a document describes; raises PolicyDocumentError
    listing every problem, in which case nothing changed.

    ``require_signers`` (on for admins' imports): each stage must be completable by the groups'
    current signers. Off only where users come later (fresh installs, test fixtures)."""
    members = group_signers()
    if not require_signers:
        members = {name: _ANYONE | ids for name, ids in members.items()}
    spec = validate(document, members=members)
    with transaction.atomic():
        policy = ApprovalPolicy.objects.select_for_update().filter(name=spec.name).first()
        before = approval_policy_export(policy=policy) if policy else {}
        if policy is None:
            policy = ApprovalPolicy.objects.create(name=spec.name, description=spec.description)
        else:
            policy.version += 1
            policy.description = spec.description
        _write(policy, spec, {g.name: g for g in Group.objects.all()})
        if activate and not policy.active:
            ApprovalPolicy.objects.filter(active=True).exclude(pk=policy.pk).update(active=False)
            policy.active = True
        policy.save()
        audit_record(actor=actor, action=AuditAction.POLICY_IMPORTED, object_type="approvalpolicy",
                     object_id=str(policy.pk), ip=ip, before=before, after=approval_policy_export(policy=policy),
                     reason=f"{policy.name} v{policy.version}{' (active)' if policy.active else ''}",
                     data={"version": policy.version, "active": policy.active})
    return policy


def approval_policy_activate(*, actor, policy: ApprovalPolicy, ip: str | None = None) -> ApprovalPolicy:
    """Make this the one active policy (the previous one is deactivated in the same transaction)."""
    with transaction.atomic():
        previous = list(ApprovalPolicy.objects.select_for_update().filter(active=True).exclude(pk=policy.pk))
        ApprovalPolicy.objects.filter(pk__in=[p.pk for p in previous]).update(active=False)
        policy = ApprovalPolicy.objects.select_for_update().get(pk=policy.pk)
        policy.active = True
        policy.save(update_fields=["active", "updated_at"])
        audit_record(actor=actor, action=AuditAction.POLICY_ACTIVATED, object_type="approvalpolicy",
                     object_id=str(policy.pk), ip=ip, reason=f"{policy.name} v{policy.version} is now active",
                     before={"active": [p.name for p in previous]}, after={"active": [policy.name]})
    return policy


def install_default_policy(apps=None) -> None:
    """Install the shipped risk-based policy (``policy.defaults``) unless it exists, and make it
    active when no policy is. Idempotent; migration 0006 calls it with its historical ``apps``.

    The role groups it names are created if missing; no signers are required yet (a fresh install
    has no users), so the "more than possible" check of an import does not apply here.
    """
    get = apps.get_model if apps else _current_model
    policy_model, rule_model, stage_model = (get("migrations_app", n) for n in ("ApprovalPolicy", "PolicyRule",
                                                                                "PolicyStage"))
    group_model = get("auth", "Group")
    groups = {r.value: group_model.objects.get_or_create(name=r.value)[0] for r in Role}
    spec = validate(DEFAULT_POLICY, members={name: _ANYONE for name in groups})
    with transaction.atomic():
        if policy_model.objects.filter(name=spec.name).exists():
            policy = policy_model.objects.get(name=spec.name)
        else:
            policy = policy_model.objects.create(name=spec.name, description=spec.description)
            for i, rule in enumerate(spec.rules):
                row = rule_model.objects.create(policy=policy, order=i + 1, name=rule.name,
                                                conditions=dict(rule.conditions), action=rule.action,
                                                reject_reason=rule.reject_reason)
                for j, stage in enumerate(rule.stages):
                    srow = stage_model.objects.create(rule=row, order=j + 1, name=stage.name, mode=stage.mode,
                                                      count=stage.count)
                    srow.groups.set([groups[g] for g in stage.groups])
        if not policy_model.objects.filter(active=True).exists():
            policy_model.objects.filter(pk=policy.pk).update(active=True)


def _current_model(app_label: str, name: str):
    from django.apps import apps

    return apps.get_model(app_label, name)
