"""The watchdog's decisions, without an SDK or a database: every observation of a stale run gets a
verdict, and every settling verdict carries the reason the run and the audit entry will show."""

from __future__ import annotations

import itertools

import pytest

from drivers.base import TaskState
from migrations_app.watchdog import SETTLING, Observation, Verdict, Where, decide, worker_overdue

RUNNING, SUCCEEDED, FAILED, CANCELLED, UNKNOWN = (TaskState.RUNNING, TaskState.SUCCEEDED, TaskState.FAILED,
                                                  TaskState.CANCELLED, TaskState.UNKNOWN)


def seen(task_state, where=Where.SOURCE, *, elapsed=10.0, budget=120.0, cancelling=False, can_abort=True, grace=60.0,
         said=""):
    return Observation(cancelling=cancelling, task_state=task_state, where=where, elapsed_s=elapsed, budget_s=budget,
                       can_abort=can_abort, abort_grace_s=grace, hypervisor_message=said)


def test_a_task_still_running_within_its_budget_is_adopted():
    assert decide(seen(RUNNING)).verdict == Verdict.ADOPT


def test_a_task_still_running_past_its_budget_is_aborted_with_the_budget_in_the_reason():
    decision = decide(seen(RUNNING, elapsed=121, budget=120))
    assert decision.verdict == Verdict.ABORT and "timed out after 120 s" in decision.reason


def test_a_cancel_asked_before_the_worker_died_aborts_a_running_task_at_once():
    decision = decide(seen(RUNNING, cancelling=True, elapsed=1))
    assert decision.verdict == Verdict.ABORT and "cancel asked" in decision.reason


def test_an_unabortable_task_is_followed_through_the_grace_then_errored_with_the_reason():
    assert decide(seen(RUNNING, elapsed=150, budget=120, grace=60, can_abort=False)).verdict == Verdict.ADOPT
    decision = decide(seen(RUNNING, elapsed=181, budget=120, grace=60, can_abort=False))
    assert decision.verdict == Verdict.ERRORED
    assert "timed out after 120 s" in decision.reason and "cannot abort" in decision.reason


def test_after_an_abort_the_outcome_is_the_hypervisors():
    # The abort worked: the VM stayed; the reason names the budget.
    decision = decide(seen(CANCELLED, Where.SOURCE, elapsed=130, budget=120))
    assert decision.verdict == Verdict.FAILED and decision.reason.startswith("timed out after 120 s")
    assert "stays on its source" in decision.reason
    # The abort came too late: the move completed, and that is what is recorded.
    decision = decide(seen(SUCCEEDED, Where.TARGET, elapsed=130, budget=120))
    assert decision.verdict == Verdict.SUCCEEDED and "too late" in decision.reason


def test_success_is_recorded_only_when_the_vm_is_on_its_target():
    assert decide(seen(SUCCEEDED, Where.TARGET)).verdict == Verdict.SUCCEEDED
    # The VM on its target settles it even without a task record (the worker died before storing it).
    assert decide(seen(None, Where.TARGET)).verdict == Verdict.SUCCEEDED
    assert decide(seen(SUCCEEDED, Where.UNKNOWN)).verdict == Verdict.WAIT
    assert decide(seen(SUCCEEDED, Where.ELSEWHERE)).verdict == Verdict.ERRORED


def test_a_move_that_never_started_is_failed_and_says_so():
    decision = decide(seen(None, Where.SOURCE))
    assert decision.verdict == Verdict.FAILED and "never started" in decision.reason


def test_a_failed_task_keeps_the_hypervisors_words():
    decision = decide(seen(FAILED, Where.SOURCE, said="the process running this migration died"))
    assert decision.verdict == Verdict.FAILED and "the process running this migration died" in decision.reason


def test_a_forgotten_task_with_the_vm_on_its_source_is_failed():
    decision = decide(seen(UNKNOWN, Where.SOURCE))
    assert decision.verdict == Verdict.FAILED and "no longer knows the task" in decision.reason


def test_a_cancelling_run_whose_vm_did_not_move_is_cancelled_whatever_ended_the_task():
    for state in (CANCELLED, FAILED, None):
        assert decide(seen(state, Where.SOURCE, cancelling=True)).verdict == Verdict.CANCELLED


def test_a_vm_gone_from_the_hypervisor_fails_the_run_instead_of_waiting_forever():
    assert decide(seen(None, Where.GONE)).verdict == Verdict.FAILED


def test_only_an_unreadable_placement_waits():
    assert decide(seen(FAILED, Where.UNKNOWN)).verdict == Verdict.WAIT


@pytest.mark.parametrize("cancelling,can_abort", list(itertools.product((False, True), repeat=2)))
def test_every_observation_gets_a_verdict_and_every_settlement_a_reason(cancelling, can_abort):
    for state, where, elapsed in itertools.product((None, *TaskState), Where, (0.0, 119.0, 121.0, 1000.0)):
        decision = decide(seen(state, where, elapsed=elapsed, cancelling=cancelling, can_abort=can_abort))
        assert decision.verdict in Verdict and decision.reason
        if decision.verdict == Verdict.SUCCEEDED:
            assert where == Where.TARGET  # never a success the hypervisor does not show
        if decision.verdict in SETTLING and state == RUNNING:
            assert not can_abort and elapsed > 180  # a running task is settled only past budget + grace
        if state != RUNNING and where != Where.UNKNOWN:
            assert decision.verdict in SETTLING  # an ended task is always settled


def test_a_live_worker_aborts_only_past_the_budget_and_the_grace():
    assert not worker_overdue(elapsed_s=150, budget_s=120, grace_s=60)
    assert worker_overdue(elapsed_s=181, budget_s=120, grace_s=60)
    assert not worker_overdue(elapsed_s=10_000, budget_s=None, grace_s=60)
