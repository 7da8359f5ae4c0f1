"""Services for the execution of a migration, by step: ``queueing`` (queue within admission
control, re-send what the broker lost), ``execute`` (claim, check again), ``drive`` (the driver's
batch: progress, heartbeats, cancel and budget; each run finished as its move ends), ``finish``
(the outcome with the placement read back), ``events`` (numbered progress events)."""

from migrations_app.services.runs.events import append_run_event
from migrations_app.services.runs.execute import _claim, migration_run_execute, migration_runs_execute
from migrations_app.services.runs.finish import _Outcome, migration_run_finish, migration_runs_finish
from migrations_app.services.runs.queueing import (
    ActiveRun,
    admission_decision,
    completion_budget_s,
    dispatch,
    dispatch_admissible,
    dispatch_all_admissible,
    dispatch_many,
    migration_request_start_due,
    migration_run_enqueue,
    migration_run_redispatch_stale,
    migration_runs_enqueue,
)

__all__ = [
    "ActiveRun",
    "_Outcome",
    "_claim",
    "admission_decision",
    "append_run_event",
    "completion_budget_s",
    "dispatch",
    "dispatch_admissible",
    "dispatch_many",
    "dispatch_all_admissible",
    "dispatch_many",
    "migration_request_start_due",
    "migration_run_enqueue",
    "migration_run_execute",
    "migration_run_finish",
    "migration_run_redispatch_stale",
    "migration_runs_execute",
    "migration_runs_finish",
    "migration_runs_enqueue",
]
