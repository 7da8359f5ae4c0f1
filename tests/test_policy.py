"""Approval-policy evaluation, stage modes, document validation and the estimator: pure, table-driven."""

from __future__ import annotations

from dataclasses import replace

import pytest

from migrations_app.estimates import estimate
from migrations_app.policy.defaults import DEFAULT_POLICY
from migrations_app.policy.document import PolicyDocumentError, dumps, loads, to_document, validate
from migrations_app.policy.facts import environment_of
from migrations_app.policy.rules import (
    CONDITIONS,
    Approval,
    Facts,
    PolicySpec,
    RuleSpec,
    StageSpec,
    approval_helps,
    evaluate,
    merged_stages,
    possible,
    stage_complete,
    stage_progress,
)

GiB = 1024**3

BASE = Facts(owner_group="team-web", tags=frozenset({"env:dev", "app:shop"}), folder="/team-web/shop",
             environment="dev", memory_bytes=4 * GiB, disk_bytes=40 * GiB, kind="compute", cross_cluster=False,
             duration_s=30.0, downtime_ms=380.0)

# (condition, value, changes to BASE, matches?) -- every condition, on both sides and at its boundary.
CONDITION_CASES = [
    ("owner_group", ["team-web", "team-ops"], {}, True),
    ("owner_group", ["team-data"], {}, False),
    ("owner_group", ["team-web"], {"owner_group": ""}, False),
    ("tags_any", ["env:production", "pci"], {"tags": frozenset({"pci"})}, True),
    ("tags_any", ["env:production"], {}, False),
    ("tags_none", ["pci"], {}, True),
    ("tags_none", ["app:shop", "pci"], {}, False),
    ("environment", ["dev", "test"], {}, True),
    ("environment", ["production"], {}, False),
    ("environment", ["production"], {"environment": ""}, False),
    ("folder_prefix", "/team-web", {}, True),
    ("folder_prefix", "/team-data", {}, False),
    ("kind", ["compute", "both"], {}, True),
    ("kind", ["storage"], {}, False),
    ("kind", ["storage"], {"kind": "storage"}, True),
    ("cross_cluster", True, {"cross_cluster": True}, True),
    ("cross_cluster", False, {"cross_cluster": True}, False),
    ("cross_cluster", False, {}, True),
    ("memory_gib_at_most", 4, {}, True),  # boundary: at most includes equal
    ("memory_gib_at_most", 3.5, {}, False),
    ("memory_gib_over", 4, {}, False),  # boundary: over excludes equal
    ("memory_gib_over", 3, {}, True),
    ("disk_gib_at_most", 40, {}, True),
    ("disk_gib_at_most", 39, {}, False),
    ("disk_gib_over", 40, {}, False),
    ("disk_gib_over", 39.5, {}, True),
    ("duration_s_at_most", 30, {}, True),
    ("duration_s_at_most", 29, {}, False),
    ("duration_s_over", 30, {}, False),
    ("duration_s_over", 10, {}, True),
    ("downtime_ms_at_most", 380, {}, True),
    ("downtime_ms_at_most", 379, {}, False),
    ("downtime_ms_over", 380, {}, False),
    ("downtime_ms_over", 300, {}, True),
]

REVIEW = StageSpec("Review", ("approver",))
SPECIAL = StageSpec("Special", ("dba",))


def policy(*rules: RuleSpec) -> PolicySpec:
    return PolicySpec(name="P", rules=rules, version=7)


def test_the_table_covers_every_condition():
    assert {case[0] for case in CONDITION_CASES} == set(CONDITIONS)


@pytest.mark.parametrize("name, value, changes, matches", CONDITION_CASES,
                         ids=[f"{c[0]}={c[1]}{'+' + ','.join(c[2]) if c[2] else ''}" for c in CONDITION_CASES])
def test_each_condition(name, value, changes, matches):
    facts = replace(BASE, **changes)
    p = policy(RuleSpec("R", {name: value}, "auto_approve"), RuleSpec("catch-all", {}, "stages", stages=(REVIEW,)))
    decision = evaluate(p, facts)
    assert (decision.rule == "R") == matches
    if matches:
        assert decision.action == "auto_approve" and decision.why  # says why, in words
        assert decision.note.startswith("P v7, rule “R”: ")


# (facts changes, the rule that must decide) for one ordered policy
ORDERED = policy(
    RuleSpec("reject pci", {"tags_any": ["pci"]}, "auto_reject", reject_reason="PCI VMs move in change windows only"),
    RuleSpec("production", {"environment": ["production"]}, "stages", stages=(REVIEW, SPECIAL)),
    RuleSpec("small compute", {"kind": ["compute"], "memory_gib_at_most": 8, "disk_gib_at_most": 100},
             "auto_approve"),
    RuleSpec("everything else", {}, "stages", stages=(REVIEW,)),
)
ORDER_CASES = [
    ({}, "small compute", "auto_approve"),
    ({"tags": frozenset({"pci"}), "environment": "production"}, "reject pci", "auto_reject"),  # first wins
    ({"environment": "production"}, "production", "stages"),  # before the small-compute rule
    ({"kind": "storage"}, "everything else", "stages"),
    ({"memory_bytes": 9 * GiB}, "everything else", "stages"),  # every condition of a rule must hold
]


@pytest.mark.parametrize("changes, rule, action", ORDER_CASES, ids=[c[1] + str(i) for i, c in enumerate(ORDER_CASES)])
def test_the_first_matching_rule_decides(changes, rule, action):
    decision = evaluate(ORDERED, replace(BASE, **changes))
    assert (decision.rule, decision.action, decision.fallback) == (rule, action, False)
    if action == "auto_reject":
        assert decision.reject_reason == "PCI VMs move in change windows only"
    if rule == "production":
        assert [s.name for s in decision.stages] == ["Review", "Special"]
        assert decision.snapshot()["stages"][1] == {"name": "Special", "groups": ["dba"], "mode": "any", "count": 1}


def test_without_a_policy_or_a_matching_rule_one_approver_is_needed_and_it_says_so():
    none = evaluate(None, BASE)
    assert none.fallback and none.stages == (StageSpec("Approval", ("approver",)),)
    assert "no active approval policy" in none.note
    unmatched = evaluate(policy(RuleSpec("only storage", {"kind": ["storage"]}, "auto_approve")), BASE)
    assert unmatched.fallback and unmatched.action == "stages" and "no rule of policy P matched" in unmatched.why


@pytest.mark.parametrize("stages", [(), (StageSpec("nobody", ()),)], ids=["no stages", "a stage without groups"])
def test_a_stages_rule_nobody_could_sign_falls_back_to_one_approver(stages):
    decision = evaluate(policy(RuleSpec("broken", {}, "stages", stages=stages)), BASE)
    assert decision.fallback and decision.stages == (StageSpec("Approval", ("approver",)),)
    assert decision.rule == "broken" and "has no stage with approver groups" in decision.why


def test_the_shipped_policy_routes_the_three_risk_classes():
    shipped = validate(DEFAULT_POLICY, members={"approver": {1, 2}})
    small = evaluate(shipped, BASE)
    assert small.action == "auto_approve"
    storage = evaluate(shipped, replace(BASE, kind="storage"))
    big = evaluate(shipped, replace(BASE, memory_bytes=16 * GiB))
    big_disk = evaluate(shipped, replace(BASE, disk_bytes=101 * GiB))
    for decision in (storage, big, big_disk):
        assert decision.rule == "Everything else needs one approver" and len(decision.stages) == 1
    production = evaluate(shipped, replace(BASE, tags=frozenset({"env:production"})))
    assert production.rule == "Production VMs need two distinct approvers" and len(production.stages) == 2


# -- stage modes ---------------------------------------------------------------------------------

ANY = StageSpec("s", ("a", "b"), "any")
TWO = StageSpec("s", ("a",), "n_distinct", 2)
ALL = StageSpec("s", ("a", "b"), "all")


def ap(uid, *groups):
    return Approval(uid, tuple(groups))


# (stage, approvals, progress, complete)
STAGE_CASES = [
    (ANY, [], 0, False),
    (ANY, [ap(1, "b")], 1, True),
    (TWO, [ap(1, "a")], 1, False),
    (TWO, [ap(1, "a"), ap(1, "a")], 1, False),  # the same person twice counts once
    (TWO, [ap(1, "a"), ap(2, "a")], 2, True),
    (TWO, [ap(1, "a"), ap(2, "zz")], 1, False),  # only approvals from the stage's groups count
    (ALL, [ap(1, "a")], 1, False),
    (ALL, [ap(1, "a", "b")], 1, False),  # a person in both groups stands for one of them
    (ALL, [ap(1, "a"), ap(2, "a")], 1, False),  # nobody from b
    (ALL, [ap(1, "a", "b"), ap(2, "a")], 2, True),  # 1 is matched to b, 2 to a
]


@pytest.mark.parametrize("stage, approvals, progress, complete", STAGE_CASES)
def test_stage_modes(stage, approvals, progress, complete):
    assert stage_progress(stage, approvals) == progress
    assert stage_complete(stage, approvals) == complete


@pytest.mark.parametrize("stage, signed, candidate, helps", [
    (ALL, [ap(1, "a", "b")], ap(2, "a"), True),  # re-matching frees b for 1
    (ALL, [ap(1, "a")], ap(2, "a"), False),  # a is covered; b still waits
    (ALL, [ap(1, "a")], ap(2, "b"), True),
    (TWO, [ap(1, "a")], ap(1, "a"), False),  # signs a stage once
    (TWO, [ap(1, "a")], ap(3, "a"), True),
    (ANY, [], ap(5), False),  # in none of the stage's groups
])
def test_whether_one_more_approval_helps(stage, signed, candidate, helps):
    assert approval_helps(stage, signed, candidate) == helps


@pytest.mark.parametrize("stage, members, ok", [
    (TWO, {"a": {1, 2}}, True),
    (StageSpec("s", ("a",), "n_distinct", 3), {"a": {1, 2}}, False),
    (ALL, {"a": {1}, "b": {1}}, False),  # one person cannot stand for both groups
    (ALL, {"a": {1}, "b": {1, 2}}, True),
    (ANY, {"a": set(), "b": set()}, False),
])
def test_whether_a_stage_is_possible_with_these_members(stage, members, ok):
    assert possible(stage, members) == ok


def test_stages_describe_themselves():
    assert StageSpec("x", ("change-board",), "n_distinct", 2).describe() == "two distinct approvers from change-board"
    assert ALL.describe() == "one approver from each of a, b"
    assert ANY.describe() == "one approver from a, b"


# -- documents -----------------------------------------------------------------------------------

MEMBERS = {"approver": {1, 2, 3}, "dba": {4}, "empty": set()}


def good_document() -> dict:
    return {
        "name": "Ops", "description": "test",
        "rules": [
            {"name": "pci", "when": {"tags_any": ["pci"]}, "action": "auto_reject", "reject_reason": "not here"},
            {"name": "prod", "when": {"environment": ["production"], "memory_gib_over": 8}, "action": "stages",
             "stages": [{"name": "one", "groups": ["approver"], "mode": "n_distinct", "count": 2},
                        {"name": "two", "groups": ["approver", "dba"], "mode": "all"}]},
            {"name": "small", "when": {"kind": ["compute"]}, "action": "auto_approve"},
            {"name": "rest", "when": {}, "action": "stages", "stages": [{"groups": ["approver"], "mode": "any"}]},
        ],
    }


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_a_document_round_trips_through_both_formats(suffix):
    spec = validate(good_document(), members=MEMBERS)
    text = dumps(to_document(spec), f"p.{suffix}")
    assert validate(loads(text, f"p.{suffix}"), members=MEMBERS) == spec
    assert to_document(spec) == {**good_document(), "rules": [
        *good_document()["rules"][:3], {"name": "rest", "when": {}, "action": "stages",
                                        "stages": [{"name": "", "groups": ["approver"], "mode": "any"}]}]}


def test_every_error_is_reported_with_its_path():
    doc = good_document()
    doc["colour"] = "blue"
    doc["rules"][0]["reject_reason"] = " "
    doc["rules"][1]["when"]["size"] = 3
    doc["rules"][1]["when"]["memory_gib_over"] = "big"
    doc["rules"][1]["stages"][0]["count"] = 4  # three approvers exist
    doc["rules"][1]["stages"][1]["mode"] = "most"
    doc["rules"][1]["stages"].append({"groups": ["nobody"], "mode": "any"})
    doc["rules"][2]["when"]["kind"] = ["teleport"]
    doc["rules"][3]["when"] = {"kind": ["storage"]}
    with pytest.raises(PolicyDocumentError) as err:
        validate(doc, members=MEMBERS)
    errors = err.value.errors
    expected = [
        "colour: unknown key",
        "rules[0].reject_reason: an auto_reject rule needs",
        "rules[1].when.size: unknown condition",
        "rules[1].when.memory_gib_over: must be a number",
        "rules[1].stages[0].count: four distinct approvers from approver is more than possible",
        "rules[1].stages[1].mode: 'most' is not a mode",
        "rules[1].stages[2].groups: unknown group 'nobody'",
        "rules[2].when.kind: unknown value teleport",
        "rules[3].when: the last rule must be a catch-all",
    ]
    for prefix in expected:
        assert any(e.startswith(prefix) for e in errors), (prefix, errors)
    assert len(errors) == len(expected), errors


@pytest.mark.parametrize("document, message", [
    ([], "(document): must be a mapping"),
    ({"name": "x", "rules": []}, "rules: must be a non-empty list"),
    ({"rules": [{"name": "r", "action": "auto_approve"}]}, "name: the policy needs a name"),
    ({"name": "x", "rules": [{"name": "r", "action": "stages", "stages": []}]}, "rules[0].stages: a stages rule"),
    ({"name": "x", "rules": [{"name": "r", "action": "auto_approve", "stages": [{"groups": ["approver"]}]}]},
     "rules[0].stages: only a stages rule"),
    ({"name": "x", "rules": [{"name": "r", "action": "stages",
                               "stages": [{"groups": ["empty"], "mode": "any"}]}]}, "rules[0].stages[0].count"),
    ({"name": "x", "rules": [{"name": "r", "action": "stages",
                               "stages": [{"groups": ["approver"], "mode": "any", "count": 2}]}]},
     "rules[0].stages[0].count: only an n_distinct stage"),
    ({"name": "x", "rules": [{"name": "r", "action": "fly"}]}, "rules[0].action: 'fly' is not an action"),
    ({"name": "x", "rules": [{"name": "r", "action": "auto_approve"}, {"name": "r", "action": "auto_approve"}]},
     "rules[1].name: 'r' is used by an earlier rule"),
])
def test_bad_documents(document, message):
    with pytest.raises(PolicyDocumentError) as err:
        validate(document, members=MEMBERS)
    assert any(e.startswith(message) for e in err.value.errors), err.value.errors


@pytest.mark.parametrize("text, name, message", [
    ("{not json", "p.json", "(document): not valid JSON"),
    ("a: [b", "p.yaml", "(document): not valid YAML"),
    ("name: x", "p.toml", "(document): unknown format .toml"),
])
def test_unreadable_files(text, name, message):
    with pytest.raises(PolicyDocumentError) as err:
        loads(text, name)
    assert err.value.errors[0].startswith(message)


# -- estimator and facts ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind, memory_gib, disk_gib, duration_s, downtime_ms", [
    ("compute", 8, 100, 15 + 8 * 1.3, 300 + 8 * 20),  # disks stay: only memory is copied
    ("storage", 8, 100, 15 + 100 * 1024 / 200, 50),  # memory stays: only disks, a short switch
    ("both", 8, 100, 15 + 8 * 1.3 + 100 * 1024 / 200, 300 + 8 * 20),
    ("compute", 0, 0, 15, 300),
])
def test_the_estimator(kind, memory_gib, disk_gib, duration_s, downtime_ms):
    e = estimate(memory_bytes=memory_gib * GiB, disk_bytes=disk_gib * GiB, kind=kind)
    assert e.duration_s == pytest.approx(duration_s, abs=0.1) and e.downtime_ms == pytest.approx(downtime_ms, abs=0.1)


def test_the_estimator_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="teleport"):
        estimate(memory_bytes=1, disk_bytes=1, kind="teleport")


def test_environment_comes_from_the_env_tag():
    assert environment_of(["app:x", "env:production"]) == "production"
    assert environment_of(["app:x"]) == ""


def _staged(*stages: StageSpec):
    from migrations_app.policy.rules import Decision

    return Decision("stages", "p", "r", "why", stages=stages)


A, A2 = StageSpec("A", ("approver",)), StageSpec("again", ("approver",))
SEC, BOARD2 = StageSpec("S", ("security",)), StageSpec("B", ("board",), "n_distinct", 2)


@pytest.mark.parametrize("decisions, expected", [
    ([(A, A2), (SEC,)], [A, A, SEC]),  # every group named, each as often as the most demanding rule
    ([(A,), (A, A2)], [A, A]),  # the same stage is not asked twice over
    ([(SEC,), (A,), (SEC, BOARD2)], [SEC, A, BOARD2]),  # in the order stages first appear
    ([(BOARD2,), (StageSpec("B1", ("board",)),)], [BOARD2, StageSpec("B1", ("board",))]),  # 2 of board is not 1
    ([], []),
])
def test_merged_stages_satisfy_every_decision(decisions, expected):
    assert list(merged_stages([_staged(*d) for d in decisions])) == expected
