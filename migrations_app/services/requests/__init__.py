"""Services for migration requests, by step: ``submit`` (one move or many, judged by access,
pre-flight checks and the approval policy), ``decide`` (approvers sign stages, approve or reject;
a closed window expires the request), ``lifecycle`` (cancel, and the scheduler's expiry of what can
no longer happen), ``_common`` (the state-machine move, the after-commit push, locking, expiry of a
request that has not started, the batch limit).

``services.runs`` imports from here at module level; every module here imports ``services.runs``
(and ``services.plans``) only inside functions, so neither package needs the other to load first."""

from migrations_app.services.errors import ActionRefused
from migrations_app.services.requests._common import (
    EXPIRABLE,
    MAX_BATCH,
    expire_locked,
    kind_for,
    notify_request_changed,
    notify_requests_changed,
    set_status,
)
from migrations_app.services.requests.decide import (
    _approve_locked,
    migration_request_approve,
    migration_request_reject,
    migration_requests_approve_many,
)
from migrations_app.services.requests.lifecycle import migration_request_cancel, migration_request_expire_stale
from migrations_app.services.requests.submit import (
    RequestedMove,
    migration_request_submit,
    migration_requests_submit_many,
)

__all__ = [
    "EXPIRABLE",
    "MAX_BATCH",
    "ActionRefused",
    "RequestedMove",
    "_approve_locked",
    "expire_locked",
    "kind_for",
    "migration_request_approve",
    "migration_request_cancel",
    "migration_request_expire_stale",
    "migration_request_reject",
    "migration_request_submit",
    "migration_requests_approve_many",
    "migration_requests_submit_many",
    "notify_request_changed",
    "notify_requests_changed",
    "set_status",
]
