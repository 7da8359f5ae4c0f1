"""The watchdog's decisions: what becomes of a run whose worker went silent.

Pure functions over what the hypervisor said (the task's state, where the VM is now) and the run's
clock, unit-tested without an SDK or a database (as openstack/nova ``nova/virt/libvirt/migration.py``
keeps its abort decisions). ``services.recovery`` gathers the observation and applies the verdict.

What the rules guarantee:

- a move the hypervisor still runs is followed (adopted) until it ends, unless it is past its
  completion budget or a cancel was asked: then it is aborted where the hypervisor allows it;
- a move the hypervisor cannot abort is given the abort grace on top of its budget, then settled
  as errored with the reason (the portal can no longer vouch for the outcome; a sync re-reads it);
- a run is settled only with what the hypervisor confirms: succeeded when the VM sits on its target,
  failed or cancelled when it does not, and never while its placement cannot be read;
- nothing here starts a migration: a run that died is settled, never retried.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from drivers.base import TaskState


class Where(enum.StrEnum):
    """Where the hypervisor says the VM is, against the run's source and target."""

    SOURCE = "source"
    TARGET = "target"
    ELSEWHERE = "elsewhere"  # neither: someone else moved it meanwhile
    GONE = "gone"  # the hypervisor no longer knows the VM
    UNKNOWN = "unknown"  # could not be read this time


class Verdict(enum.StrEnum):
    WAIT = "wait"  # ask again at the next pass
    ADOPT = "adopt"  # the hypervisor still runs the move: follow it
    ABORT = "abort"  # ask the hypervisor to stop the move, then decide again
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ERRORED = "errored"


SETTLING = frozenset({Verdict.SUCCEEDED, Verdict.FAILED, Verdict.CANCELLED, Verdict.ERRORED})


@dataclass(frozen=True)
class Observation:
    """What the reconciler learnt about one stale run.

    ``task_state`` is None when the hypervisor knows no migration task of this run (none stored
    and none found on the VM since the claim): the move never started there.
    """

    cancelling: bool  # a cancel was asked before the worker was lost
    task_state: TaskState | None
    where: Where
    elapsed_s: float  # since the run was claimed
    budget_s: float  # its completion budget
    can_abort: bool = True  # False once the driver said it cannot abort another process's task
    abort_grace_s: float = 60.0  # how long past the budget an unabortable move is still followed
    hypervisor_message: str = ""


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str


def worker_overdue(*, elapsed_s: float, budget_s: float | None, grace_s: float) -> bool:
    """The live worker's backstop: a driver aborts at its budget itself; past the budget and the
    grace the worker aborts the move (a driver that ignores its budget keeps no run open forever)."""
    return budget_s is not None and elapsed_s > budget_s + grace_s


def timed_out_text(budget_s: float) -> str:
    return f"timed out after {budget_s:.0f} s"


def decide(o: Observation) -> Decision:
    """The verdict for one stale run, with the reason the run and the audit entry will carry."""
    over = o.elapsed_s > o.budget_s
    said = f" (hypervisor: {o.hypervisor_message})" if o.hypervisor_message else ""
    if o.task_state == TaskState.RUNNING:
        if o.cancelling or over:
            why = "cancel asked" if o.cancelling else timed_out_text(o.budget_s)
            if o.can_abort:
                return Decision(Verdict.ABORT, f"{why}; the worker is lost: aborting the hypervisor task")
            if o.elapsed_s > o.budget_s + o.abort_grace_s:
                return Decision(Verdict.ERRORED, f"{why}; the hypervisor cannot abort the task and still runs it "
                                                 f"after {o.elapsed_s:.0f} s: the next inventory sync shows where the VM ends")
        return Decision(Verdict.ADOPT, "the hypervisor still runs the task: followed by the reconciler")
    if o.where == Where.UNKNOWN:
        return Decision(Verdict.WAIT, "the VM's placement cannot be read now")
    if o.task_state == TaskState.SUCCEEDED or o.where == Where.TARGET:
        if o.where != Where.TARGET:
            return Decision(Verdict.ERRORED, f"the hypervisor reports the task succeeded but the VM is {o.where.value}, "
                                             "not on its target")
        late = "; the abort came too late" if over else ""
        return Decision(Verdict.SUCCEEDED, f"the hypervisor confirms the VM on its target{late}")
    # The move ended (or never began) and the VM is not on its target.
    if o.where == Where.GONE:
        return Decision(Verdict.FAILED, "the VM no longer exists on the hypervisor")
    stays = "the VM stays on its source" if o.where == Where.SOURCE else "the VM is neither on its source nor on its target"
    if o.cancelling:
        # Asked to stop, and the VM did not move: that is what was asked, whatever ended the task.
        ended = "never started" if o.task_state is None else f"ended {o.task_state.value}"
        return Decision(Verdict.CANCELLED, f"cancel asked; the hypervisor task {ended}; {stays}")
    if over:
        return Decision(Verdict.FAILED, f"{timed_out_text(o.budget_s)}; the move was aborted{said}; {stays}")
    if o.task_state is None:
        return Decision(Verdict.FAILED, f"the move never started on the hypervisor; {stays}")
    if o.task_state == TaskState.UNKNOWN:
        return Decision(Verdict.FAILED, f"the hypervisor no longer knows the task{said}; {stays}")
    return Decision(Verdict.FAILED, f"the hypervisor task ended {o.task_state.value}{said}; {stays}")
