"""Services for move plans: build, choose fallbacks, submit, approve, reject, cancel, and the
bookkeeping as their moves finish (retry a failed VM, finish the plan).

The approval policy judges every move at submission and the plan's approvers sign the stages of
its strictest move (``approval``). A plan runs as ordinary migration requests, one per moving VM,
created already approved ("approved as part of plan #N", with the plan's stages and signatures)
and queued through ``migration_run_enqueue``, so admission control, cancel,
reconciliation, audit and live progress treat them like any other. When a request of a plan ends,
``plan_request_settled`` (called on commit by the run's finish and by cancel) records the item's
outcome, retries a failed move up to ``max_attempts``, and finishes the plan once every item ended.
"""

from migrations_app.services.plans._common import notify_plan_changed, plan_progress
from migrations_app.services.plans.build import fallback_choices, move_plan_build
from migrations_app.services.plans.decisions import (
    move_plan_approve,
    move_plan_cancel,
    move_plan_expire_stale,
    move_plan_reject,
    move_plan_set_fallback,
    move_plan_submit,
)
from migrations_app.services.plans.execution import move_plan_settle_stale, plan_request_settled

__all__ = [
    "fallback_choices",
    "move_plan_approve",
    "move_plan_build",
    "move_plan_cancel",
    "move_plan_expire_stale",
    "move_plan_reject",
    "move_plan_set_fallback",
    "move_plan_settle_stale",
    "move_plan_submit",
    "notify_plan_changed",
    "plan_progress",
    "plan_request_settled",
]
