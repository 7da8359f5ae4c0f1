"""Approval policies as plain data, and their evaluation: pure functions, no database.

A policy is an ordered list of rules. Each rule has conditions (all must hold; a rule without
conditions is the catch-all) and an action: approve automatically, reject automatically with a
reason, or require ordered stages. The first rule whose conditions hold decides.

Each stage names approver groups and a mode (``choices.ApprovalMode``):
- ``any``: one approval by a member of any of the groups;
- ``n_distinct``: ``count`` approvals by different people, each a member of one of the groups;
- ``all``: one approval from each named group, by different people: a person who belongs to two
  of the groups stands for one of them only (the groups are matched to distinct approvers).

Across stages, a person who approved an earlier stage of a request never approves a later one:
every stage asks for fresh eyes. The requester never approves at all (``access.can_decide``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from migrations_app.choices import ApprovalMode, MigrationKind, RuleAction

GiB = 1024**3


@dataclass(frozen=True)
class Facts:
    """What a rule may look at: the request and its pre-flight result, flattened."""

    owner_group: str
    tags: frozenset[str]
    folder: str
    environment: str  # the label of the VM's "env:<label>" tag; "" when it has none
    memory_bytes: int
    disk_bytes: int
    kind: str
    cross_cluster: bool
    duration_s: float  # estimated (``migrations_app.estimates``)
    downtime_ms: float  # estimated


@dataclass(frozen=True)
class StageSpec:
    name: str
    groups: tuple[str, ...]
    mode: str = ApprovalMode.ANY
    count: int = 1  # only for n_distinct

    @property
    def needed(self) -> int:
        """How many distinct approvers complete this stage."""
        if self.mode == ApprovalMode.N_DISTINCT:
            return self.count
        if self.mode == ApprovalMode.ALL:
            return len(self.groups)
        return 1

    def describe(self) -> str:
        """E.g. "two distinct approvers from change-board"."""
        groups = ", ".join(self.groups)
        if self.mode == ApprovalMode.N_DISTINCT:
            return f"{_words(self.count)} distinct approvers from {groups}"
        if self.mode == ApprovalMode.ALL:
            return f"one approver from each of {groups}"
        return f"one approver from {groups}"

    def as_dict(self) -> dict:
        return {"name": self.name, "groups": list(self.groups), "mode": str(self.mode), "count": self.count}

    @classmethod
    def from_dict(cls, data: Mapping) -> StageSpec:
        return cls(name=data.get("name", ""), groups=tuple(data["groups"]), mode=data.get("mode", ApprovalMode.ANY),
                   count=int(data.get("count", 1)))


@dataclass(frozen=True)
class RuleSpec:
    name: str
    conditions: Mapping[str, Any] = field(default_factory=dict)
    action: str = RuleAction.STAGES
    reject_reason: str = ""
    stages: tuple[StageSpec, ...] = ()


@dataclass(frozen=True)
class PolicySpec:
    name: str
    rules: tuple[RuleSpec, ...]
    description: str = ""
    version: int = 1


@dataclass(frozen=True)
class Decision:
    """The outcome of evaluation, with which policy and rule decided and why (kept on the request
    and in the audit entry)."""

    action: str
    policy: str
    rule: str
    why: str
    stages: tuple[StageSpec, ...] = ()
    reject_reason: str = ""
    policy_version: int = 0
    fallback: bool = False

    @property
    def note(self) -> str:
        """One line for the request's policy note (and the approval card)."""
        if self.fallback:
            return self.why[:300]
        return f"{self.policy} v{self.policy_version}, rule “{self.rule}”: {self.why}"[:300]

    def audit_data(self) -> dict:
        """What an audit entry records of the decision: which policy and rule, and why."""
        return {"policy": self.policy, "version": self.policy_version, "rule": self.rule, "why": self.why,
                "action": str(self.action), "fallback": self.fallback}

    def snapshot(self) -> dict:
        """What is frozen onto the request at submission: editing the policy later changes nothing."""
        return {
            "policy": self.policy, "policy_version": self.policy_version, "rule": self.rule, "why": self.why,
            "action": str(self.action), "fallback": self.fallback, "reject_reason": self.reject_reason,
            "stages": [s.as_dict() for s in self.stages],
        }


# The role whose members approve when no policy decides (no active policy, or no rule matched).
FALLBACK_GROUP = "approver"
FALLBACK_STAGES = (StageSpec("Approval", (FALLBACK_GROUP,), ApprovalMode.ANY),)


def merged_stages(decisions: Sequence[Decision]) -> tuple[StageSpec, ...]:
    """The stages that satisfy every one of several decisions (a move plan's moves): each distinct
    stage (groups, mode, count) as many times as the most demanding decision asks for it, in the
    order it first appears. E.g. [approver, approver] and [security] need [approver, approver,
    security]: never fewer approvers, nor other groups, than any one move's rule names."""
    wanted: dict[tuple, int] = {}
    first: dict[tuple, StageSpec] = {}
    order: list[tuple] = []
    for decision in decisions:
        seen: dict[tuple, int] = {}
        for stage in decision.stages:
            key = (tuple(sorted(stage.groups)), str(stage.mode), stage.needed)
            seen[key] = seen.get(key, 0) + 1
            if key not in first:
                first[key] = stage
                order.append(key)
        for key, n in seen.items():
            wanted[key] = max(wanted.get(key, 0), n)
    return tuple(first[key] for key in order for _ in range(wanted[key]))


def frozen_stages(approval_plan: Mapping | None) -> list[StageSpec]:
    """The stages frozen in a request's or a plan's ``approval_plan`` (``Decision.snapshot``).
    One submitted before approval policies existed has none recorded: one approver."""
    plan = approval_plan or {}
    if "stages" not in plan:
        return list(FALLBACK_STAGES)
    return [StageSpec.from_dict(s) for s in plan["stages"]]


# -- conditions --------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:,.1f}".rstrip("0").rstrip(".") + " GiB"


@dataclass(frozen=True)
class Condition:
    """One condition a rule may use: the type of its value, how it tests the facts, how it reads."""

    kind: str  # "names" (a list of strings), "text", "bool", "number"
    test: Callable[[Any, Facts], bool]
    explain: Callable[[Any, Facts], str]


def _number(fact: Callable[[Facts], float], unit: Callable[[float], str], scale: float, over: bool) -> Condition:
    if over:
        return Condition("number", lambda v, f: fact(f) > v * scale,
                         lambda v, f: f"{unit(fact(f))} > {unit(v * scale)}")
    return Condition("number", lambda v, f: fact(f) <= v * scale,
                     lambda v, f: f"{unit(fact(f))} ≤ {unit(v * scale)}")


def _seconds(n: float) -> str:
    return f"{n:,.0f} s"


def _ms(n: float) -> str:
    return f"{n:,.0f} ms"


CONDITIONS: dict[str, Condition] = {
    "owner_group": Condition("names", lambda v, f: f.owner_group in v,
                             lambda v, f: f"owner group {f.owner_group or '(none)'} is one of {', '.join(v)}"),
    "tags_any": Condition("names", lambda v, f: bool(f.tags & set(v)),
                          lambda v, f: f"tagged {', '.join(sorted(f.tags & set(v)))}"),
    "tags_none": Condition("names", lambda v, f: not f.tags & set(v),
                           lambda v, f: f"tagged none of {', '.join(v)}"),
    "environment": Condition("names", lambda v, f: f.environment in v,
                             lambda v, f: f"environment {f.environment or '(none)'}"),
    "folder_prefix": Condition("text", lambda v, f: f.folder.startswith(v),
                               lambda v, f: f"folder {f.folder} is under {v}"),
    "kind": Condition("names", lambda v, f: f.kind in v, lambda v, f: f"a {f.kind} move"),
    "cross_cluster": Condition("bool", lambda v, f: f.cross_cluster == v,
                               lambda v, f: "across clusters" if f.cross_cluster else "within its cluster"),
    "memory_gib_at_most": _number(lambda f: f.memory_bytes, _gib, GiB, over=False),
    "memory_gib_over": _number(lambda f: f.memory_bytes, _gib, GiB, over=True),
    "disk_gib_at_most": _number(lambda f: f.disk_bytes, _gib, GiB, over=False),
    "disk_gib_over": _number(lambda f: f.disk_bytes, _gib, GiB, over=True),
    "duration_s_at_most": _number(lambda f: f.duration_s, _seconds, 1, over=False),
    "duration_s_over": _number(lambda f: f.duration_s, _seconds, 1, over=True),
    "downtime_ms_at_most": _number(lambda f: f.downtime_ms, _ms, 1, over=False),
    "downtime_ms_over": _number(lambda f: f.downtime_ms, _ms, 1, over=True),
}

# Values a "names" condition may take are free text, except for these.
CONDITION_CHOICES: dict[str, frozenset[str]] = {"kind": frozenset(MigrationKind.values)}


def rule_matches(rule: RuleSpec, facts: Facts) -> bool:
    return all(CONDITIONS[name].test(value, facts) for name, value in rule.conditions.items())


def explain(rule: RuleSpec, facts: Facts) -> str:
    if not rule.conditions:
        return "no earlier rule matched (catch-all)"
    return "; ".join(CONDITIONS[name].explain(value, facts) for name, value in rule.conditions.items())


def evaluate(policy: PolicySpec | None, facts: Facts) -> Decision:
    """First matching rule wins. Without a policy, or when no rule matches (a policy edited in the
    admin may lack its catch-all), the request needs one approver, and the decision says so."""
    if policy is None:
        return Decision(RuleAction.STAGES, policy="", rule="", fallback=True, stages=FALLBACK_STAGES,
                        why="no active approval policy: one approver required (built-in fallback)")
    for rule in policy.rules:
        if rule_matches(rule, facts) and rule.action == RuleAction.STAGES and not _usable(rule.stages):
            # Only a policy edited in the admin can get here (imports refuse it): never a request
            # that nobody may sign.
            return Decision(RuleAction.STAGES, policy=policy.name, policy_version=policy.version, rule=rule.name,
                            fallback=True, stages=FALLBACK_STAGES,
                            why=f"rule {rule.name} of policy {policy.name} has no stage with approver groups: "
                                "one approver required (built-in fallback)")
        if rule_matches(rule, facts):
            return Decision(rule.action, policy=policy.name, policy_version=policy.version, rule=rule.name,
                            why=explain(rule, facts), stages=rule.stages if rule.action == RuleAction.STAGES else (),
                            reject_reason=rule.reject_reason)
    return Decision(RuleAction.STAGES, policy=policy.name, policy_version=policy.version, rule="", fallback=True,
                    stages=FALLBACK_STAGES,
                    why=f"no rule of policy {policy.name} matched: one approver required (built-in fallback)")


def _usable(stages: tuple[StageSpec, ...]) -> bool:
    return bool(stages) and all(s.groups for s in stages)


# -- stages --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Approval:
    """One recorded approval of a stage: who, and which of the stage's groups they belonged to."""

    approver_id: int
    groups: tuple[str, ...]
    approver_name: str = ""


def _matching(groups: Iterable[str], approvals: Iterable[Approval]) -> int:
    """How many of the groups can each be given a different approver (a bipartite matching)."""
    people: list[Approval] = list({a.approver_id: a for a in approvals}.values())
    owner: dict[int, str] = {}  # approver id -> group it stands for

    def place(group: str, seen: set[int]) -> bool:
        for person in people:
            if group in person.groups and person.approver_id not in seen:
                seen.add(person.approver_id)
                if person.approver_id not in owner or place(owner[person.approver_id], seen):
                    owner[person.approver_id] = group
                    return True
        return False

    return sum(1 for group in groups if place(group, set()))


def stage_progress(stage: StageSpec, approvals: Iterable[Approval]) -> int:
    """How many of the ``stage.needed`` approvals this stage has (never more than needed)."""
    approvals = [a for a in approvals if set(a.groups) & set(stage.groups)]
    if stage.mode == ApprovalMode.ALL:
        return _matching(stage.groups, approvals)
    return min(len({a.approver_id for a in approvals}), stage.needed)


def stage_complete(stage: StageSpec, approvals: Iterable[Approval]) -> bool:
    return stage_progress(stage, approvals) >= stage.needed


def approval_helps(stage: StageSpec, approvals: Iterable[Approval], candidate: Approval) -> bool:
    """Whether one more approval by ``candidate`` advances the stage (for ``all``: covers a group
    nobody covers yet, after re-matching)."""
    approvals = list(approvals)
    if not set(candidate.groups) & set(stage.groups):
        return False
    if any(a.approver_id == candidate.approver_id for a in approvals):
        return False
    return stage_progress(stage, [*approvals, candidate]) > stage_progress(stage, approvals)


def possible(stage: StageSpec, members: Mapping[str, Iterable[int]]) -> bool:
    """Whether the groups' current members could complete the stage at all."""
    approvals = [Approval(uid, tuple(g for g in stage.groups if uid in set(members.get(g, ()))))
                 for uid in {u for g in stage.groups for u in members.get(g, ())}]
    return stage_complete(stage, approvals)


_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


def _words(n: int) -> str:
    return _WORDS.get(n, str(n))
