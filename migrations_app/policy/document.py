"""Approval policies as documents (YAML or JSON): validation with a path for every error, and export.

A document reads::

    name: Risk-based defaults
    description: ...
    rules:
      - name: Production VMs need two distinct approvers
        when: {tags_any: [env:production]}
        action: stages
        stages:
          - {name: First review, groups: [approver], mode: any}
          - {name: Second review, groups: [approver], mode: any}
      - name: Everything else needs one approver
        when: {}
        action: stages
        stages: [{name: Review, groups: [approver], mode: any}]

``validate`` reports every problem at once (``rules[2].stages[0].mode: ...``); nothing is written
unless the document is free of errors. Pure: the caller passes the groups and their members.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import PurePath

from migrations_app.choices import ApprovalMode, RuleAction
from migrations_app.policy.rules import CONDITION_CHOICES, CONDITIONS, PolicySpec, RuleSpec, StageSpec, possible


class PolicyDocumentError(Exception):
    """A policy document that cannot be imported; ``errors`` lists every problem with its path."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


POLICY_KEYS = {"name", "description", "rules"}
RULE_KEYS = {"name", "when", "action", "reject_reason", "stages"}
STAGE_KEYS = {"name", "groups", "mode", "count"}


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v >= 0


def condition_errors(conditions, path: str) -> list[str]:
    """Problems with one rule's conditions (also used by the admin's form)."""
    if not isinstance(conditions, dict):
        return [f"{path}: must be a mapping of condition name to value"]
    errors = []
    for name, value in conditions.items():
        where = f"{path}.{name}"
        cond = CONDITIONS.get(name)
        if cond is None:
            errors.append(f"{where}: unknown condition (known: {', '.join(sorted(CONDITIONS))})")
        elif cond.kind == "names":
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                errors.append(f"{where}: must be a non-empty list of names")
            elif name in CONDITION_CHOICES and set(value) - CONDITION_CHOICES[name]:
                bad = sorted(set(value) - CONDITION_CHOICES[name])
                errors.append(f"{where}: unknown value {', '.join(bad)} "
                              f"(known: {', '.join(sorted(CONDITION_CHOICES[name]))})")
        elif cond.kind == "text" and (not isinstance(value, str) or not value):
            errors.append(f"{where}: must be a non-empty string")
        elif cond.kind == "bool" and not isinstance(value, bool):
            errors.append(f"{where}: must be true or false")
        elif cond.kind == "number" and not _is_number(value):
            errors.append(f"{where}: must be a number ≥ 0")
    return errors


def _stage(data, path: str, members: Mapping[str, Iterable[int]], errors: list[str]) -> StageSpec | None:
    if not isinstance(data, dict):
        errors.append(f"{path}: must be a mapping")
        return None
    before = len(errors)
    errors.extend(f"{path}.{k}: unknown key" for k in sorted(set(data) - STAGE_KEYS))
    name = data.get("name", "")
    if not isinstance(name, str):
        errors.append(f"{path}.name: must be a string")
    groups = data.get("groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, str) and g for g in groups):
        errors.append(f"{path}.groups: must be a non-empty list of group names")
        groups = []
    else:
        errors.extend(f"{path}.groups: unknown group {g!r}" for g in groups if g not in members)
        if len(set(groups)) != len(groups):
            errors.append(f"{path}.groups: a group is named twice")
    mode = data.get("mode", ApprovalMode.ANY)
    if mode not in ApprovalMode.values:
        errors.append(f"{path}.mode: {mode!r} is not a mode (known: {', '.join(ApprovalMode.values)})")
    count = data.get("count", 2 if mode == ApprovalMode.N_DISTINCT else 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        errors.append(f"{path}.count: must be a whole number ≥ 1")
    elif mode != ApprovalMode.N_DISTINCT and "count" in data and count != 1:
        errors.append(f"{path}.count: only an n_distinct stage takes a count")
    if len(errors) > before:
        return None
    stage = StageSpec(name=name or "", groups=tuple(groups), mode=mode,
                      count=count if mode == ApprovalMode.N_DISTINCT else 1)
    if not possible(stage, members):
        people = len({u for g in groups for u in members.get(g, ())})
        errors.append(f"{path}.count: {stage.describe()} is more than possible: "
                      f"{', '.join(groups)} have {people} approver(s) who could sign")
        return None
    return stage


def _rule(data, path: str, members, errors: list[str]) -> RuleSpec | None:
    if not isinstance(data, dict):
        errors.append(f"{path}: must be a mapping")
        return None
    before = len(errors)
    errors.extend(f"{path}.{k}: unknown key" for k in sorted(set(data) - RULE_KEYS))
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"{path}.name: every rule needs a name")
    conditions = data.get("when", {})
    errors.extend(condition_errors(conditions, f"{path}.when"))
    action = data.get("action")
    if action not in RuleAction.values:
        errors.append(f"{path}.action: {action!r} is not an action (known: {', '.join(RuleAction.values)})")
    reason = data.get("reject_reason", "")
    if not isinstance(reason, str):
        errors.append(f"{path}.reject_reason: must be a string")
    elif action == RuleAction.AUTO_REJECT and not reason.strip():
        errors.append(f"{path}.reject_reason: an auto_reject rule needs the reason the requester will read")
    raw_stages = data.get("stages", [])
    stages: list[StageSpec] = []
    if not isinstance(raw_stages, list):
        errors.append(f"{path}.stages: must be a list")
    elif action == RuleAction.STAGES and not raw_stages:
        errors.append(f"{path}.stages: a stages rule needs at least one stage")
    elif action in (RuleAction.AUTO_APPROVE, RuleAction.AUTO_REJECT) and raw_stages:
        errors.append(f"{path}.stages: only a stages rule has stages")
    else:
        for i, raw in enumerate(raw_stages):
            stage = _stage(raw, f"{path}.stages[{i}]", members, errors)
            if stage is not None:
                stages.append(stage)
    if len(errors) > before:
        return None
    return RuleSpec(name=name.strip(), conditions=dict(conditions), action=action,
                    reject_reason=reason.strip(), stages=tuple(stages))


def validate(document, *, members: Mapping[str, Iterable[int]]) -> PolicySpec:
    """The policy a document describes, or PolicyDocumentError listing every problem.

    ``members``: every existing group name -> ids of the users who could sign a stage for it.
    """
    errors: list[str] = []
    if not isinstance(document, dict):
        raise PolicyDocumentError(["(document): must be a mapping with name, description and rules"])
    errors.extend(f"{k}: unknown key" for k in sorted(set(document) - POLICY_KEYS))
    name = document.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append("name: the policy needs a name")
    elif len(name) > 100:
        errors.append("name: at most 100 characters")
    description = document.get("description", "")
    if not isinstance(description, str):
        errors.append("description: must be a string")
    raw_rules = document.get("rules")
    rules: list[RuleSpec] = []
    if not isinstance(raw_rules, list) or not raw_rules:
        errors.append("rules: must be a non-empty list")
    else:
        for i, raw in enumerate(raw_rules):
            rule = _rule(raw, f"rules[{i}]", members, errors)
            if rule is not None:
                rules.append(rule)
        last = raw_rules[-1]
        if isinstance(last, dict) and last.get("when"):
            errors.append(f"rules[{len(raw_rules) - 1}].when: the last rule must be a catch-all without "
                          "conditions, so that every request gets an outcome")
        names = [r.get("name") for r in raw_rules if isinstance(r, dict)]
        errors.extend(f"rules[{i}].name: {n!r} is used by an earlier rule" for i, n in enumerate(names)
                      if n in names[:i])
    if errors:
        raise PolicyDocumentError(errors)
    return PolicySpec(name=name.strip(), description=description, rules=tuple(rules))


def to_document(policy: PolicySpec) -> dict:
    """The document that ``validate`` turns back into this policy."""
    rules = []
    for rule in policy.rules:
        out: dict = {"name": rule.name, "when": dict(rule.conditions), "action": str(rule.action)}
        if rule.action == RuleAction.AUTO_REJECT:
            out["reject_reason"] = rule.reject_reason
        if rule.action == RuleAction.STAGES:
            out["stages"] = []
            for s in rule.stages:
                stage = {"name": s.name, "groups": list(s.groups), "mode": str(s.mode)}
                if s.mode == ApprovalMode.N_DISTINCT:
                    stage["count"] = s.count
                out["stages"].append(stage)
        rules.append(out)
    return {"name": policy.name, "description": policy.description, "rules": rules}


def loads(text: str, filename: str):
    """Parse a YAML (.yaml, .yml) or JSON (.json) file's text; PolicyDocumentError when unreadable."""
    suffix = PurePath(filename).suffix.lower()
    if suffix == ".json":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise PolicyDocumentError([f"(document): not valid JSON: {exc}"]) from None
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PolicyDocumentError([f"(document): not valid YAML: {exc}"]) from None
    raise PolicyDocumentError([f"(document): unknown format {suffix or '(none)'}; use .yaml, .yml or .json"])


def dumps(document: dict, filename: str) -> str:
    suffix = PurePath(filename).suffix.lower()
    if suffix == ".json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    raise PolicyDocumentError([f"(document): unknown format {suffix or '(none)'}; use .yaml, .yml or .json"])
