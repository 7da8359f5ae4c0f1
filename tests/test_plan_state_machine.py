"""The move-plan state machine: every pair of states is either an allowed move or refused."""

from __future__ import annotations

import itertools

import pytest

from migrations_app.choices import PLAN_CANCELABLE, PLAN_TERMINAL, PLAN_TRANSITIONS, IllegalTransition, PlanStatus

P = PlanStatus

ALLOWED = {
    (P.DRAFT, P.PENDING_APPROVAL), (P.DRAFT, P.CANCELLED),
    (P.PENDING_APPROVAL, P.APPROVED), (P.PENDING_APPROVAL, P.REJECTED), (P.PENDING_APPROVAL, P.CANCELLED),
    (P.PENDING_APPROVAL, P.EXPIRED),
    (P.APPROVED, P.RUNNING), (P.APPROVED, P.CANCELLED),
    (P.RUNNING, P.DONE), (P.RUNNING, P.PARTIALLY_DONE), (P.RUNNING, P.FAILED), (P.RUNNING, P.CANCELLED),
}


@pytest.mark.parametrize("current,target", sorted(itertools.product(P, P)))
def test_each_plan_transition_is_allowed_or_refused_as_declared(current, target):
    if (current, target) in ALLOWED:
        PlanStatus.check_transition(current, target)
    else:
        with pytest.raises(IllegalTransition):
            PlanStatus.check_transition(current, target)


def test_terminal_plans_go_nowhere_and_groups_are_consistent():
    assert all(not PLAN_TRANSITIONS.get(s) for s in PLAN_TERMINAL)
    assert not PLAN_CANCELABLE & PLAN_TERMINAL
    assert set(P) == PLAN_TERMINAL | set(PLAN_TRANSITIONS)
