"""The request state machine: every pair of states is either an allowed move or refused."""

from __future__ import annotations

import itertools

import pytest

from migrations_app.choices import (
    ACTIVE,
    CANCELABLE,
    OPEN,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    RequestStatus,
)

S = RequestStatus

ALLOWED = {
    (S.PENDING_APPROVAL, S.APPROVED), (S.PENDING_APPROVAL, S.REJECTED), (S.PENDING_APPROVAL, S.CANCELLED),
    (S.PENDING_APPROVAL, S.EXPIRED),
    (S.APPROVED, S.QUEUED), (S.APPROVED, S.CANCELLED), (S.APPROVED, S.EXPIRED),
    (S.QUEUED, S.RUNNING), (S.QUEUED, S.CANCELLED), (S.QUEUED, S.ERRORED), (S.QUEUED, S.FAILED),
    (S.QUEUED, S.EXPIRED),
    (S.RUNNING, S.SUCCEEDED), (S.RUNNING, S.FAILED), (S.RUNNING, S.ERRORED), (S.RUNNING, S.CANCELLING),
    (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.QUEUED),  # only the reconciler: its worker was lost before the move was handed over
    (S.CANCELLING, S.CANCELLED), (S.CANCELLING, S.SUCCEEDED), (S.CANCELLING, S.FAILED), (S.CANCELLING, S.ERRORED),
}


@pytest.mark.parametrize("current,target", sorted(itertools.product(S, S)))
def test_each_transition_is_allowed_or_refused_as_declared(current, target):
    if (current, target) in ALLOWED:
        RequestStatus.check_transition(current, target)
    else:
        with pytest.raises(IllegalTransition):
            RequestStatus.check_transition(current, target)


def test_terminal_states_have_no_way_out():
    for state in TERMINAL:
        assert not TRANSITIONS.get(state), state


def test_groups_are_consistent():
    assert ACTIVE <= OPEN and CANCELABLE <= OPEN
    assert not (TERMINAL & OPEN)
    assert set(S) == TERMINAL | OPEN
    assert S.CANCELLING not in CANCELABLE  # a second cancel while aborting changes nothing


def test_refusal_message_names_both_states():
    with pytest.raises(IllegalTransition, match="succeeded cannot become running"):
        RequestStatus.check_transition(S.SUCCEEDED, S.RUNNING)
