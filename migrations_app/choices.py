"""Declared vocabularies of the domain, and the one state machine of a migration request.

Every status change goes through ``RequestStatus.check_transition``; an illegal move raises
``IllegalTransition``. ``failed`` means the hypervisor said no (the VM stays on its source);
``errored`` means the portal's own code broke (a traceback is kept on the run).
"""

from __future__ import annotations

from django.db import models


class IllegalTransition(Exception):
    """A status change that the state machine does not allow."""

    def __init__(self, current: str, target: str):
        self.current, self.target = current, target
        super().__init__(f"a request that is {current.replace('_', ' ')} cannot become {target.replace('_', ' ')}")


class RequestStatus(models.TextChoices):
    # Waiting for an approver (or for the policy's remaining stages).
    PENDING_APPROVAL = "pending_approval", "Pending approval"
    # Approved; waits for its start time (a requested start in the future).
    APPROVED = "approved", "Approved"
    # Handed to the workers; waits for a free slot.
    QUEUED = "queued", "Queued"
    # A worker claimed it and the hypervisor is moving the VM.
    RUNNING = "running", "Running"
    # Cancel asked while running; the worker is aborting the hypervisor job.
    CANCELLING = "cancelling", "Cancelling"
    # The VM is on its target; placement verified.
    SUCCEEDED = "succeeded", "Succeeded"
    # The hypervisor refused or aborted the move; the VM stays where it was.
    FAILED = "failed", "Failed"
    # The portal itself broke (bug, lost worker with no hypervisor record); see the traceback.
    ERRORED = "errored", "Errored"
    # Withdrawn, dequeued or aborted on request; the VM stays where it was.
    CANCELLED = "cancelled", "Cancelled"
    # An approver said no, with a reason.
    REJECTED = "rejected", "Rejected"
    # Nobody decided in time, or its change window closed before the run started.
    EXPIRED = "expired", "Expired"

    @classmethod
    def check_transition(cls, current: str, target: str) -> None:
        if target not in TRANSITIONS.get(current, frozenset()):
            raise IllegalTransition(current, target)


S = RequestStatus

TRANSITIONS: dict[str, frozenset[str]] = {
    S.PENDING_APPROVAL: frozenset({S.APPROVED, S.REJECTED, S.CANCELLED, S.EXPIRED}),
    S.APPROVED: frozenset({S.QUEUED, S.CANCELLED, S.EXPIRED}),
    # Queued -> expired: its change window closed while it waited for a worker or a free slot.
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.ERRORED, S.FAILED, S.EXPIRED}),
    # Running -> queued: only the reconciler, for a run whose worker was lost before it handed the
    # move to the hypervisor (``MigrationRun.handed_at`` empty): nothing moved, it goes back in line.
    S.RUNNING: frozenset({S.QUEUED, S.SUCCEEDED, S.FAILED, S.ERRORED, S.CANCELLING, S.CANCELLED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.SUCCEEDED, S.FAILED, S.ERRORED}),
}

AWAITING_DECISION = frozenset({S.PENDING_APPROVAL})
ACTIVE = frozenset({S.QUEUED, S.RUNNING, S.CANCELLING})  # a worker owns or will own it
CANCELABLE = frozenset({S.PENDING_APPROVAL, S.APPROVED, S.QUEUED, S.RUNNING})
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.ERRORED, S.CANCELLED, S.REJECTED, S.EXPIRED})
OPEN = frozenset(S) - TERMINAL  # blocks another request for the same VM


class MigrationKind(models.TextChoices):
    COMPUTE = "compute", "Compute (move the running VM to another host)"
    STORAGE = "storage", "Storage (move its disks to another datastore)"
    BOTH = "both", "Compute and storage"


class Phase(models.TextChoices):
    """Mirrors drivers.base.Phase, plus the portal's own bookkeeping before the driver starts."""

    WAITING = "waiting", "Waiting for a worker"
    PRECHECK = "precheck", "Pre-check"
    DISK_COPY = "disk_copy", "Disk copy"
    MEMORY_PRECOPY = "memory_precopy", "Memory pre-copy"
    SWITCHOVER = "switchover", "Switchover"
    DONE = "done", "Done"


class PowerState(models.TextChoices):
    ON = "on", "Powered on"
    OFF = "off", "Powered off"
    SUSPENDED = "suspended", "Suspended"


class ConnectionKind(models.TextChoices):
    SIMULATOR = "simulator", "Simulator (demo)"
    VCENTER = "vcenter", "VMware vCenter"
    LIBVIRT = "libvirt", "KVM (libvirt)"


class Role(models.TextChoices):
    """Django groups that carry the portal's roles."""

    REQUESTER = "requester", "Requester"
    APPROVER = "approver", "Approver"
    AUDITOR = "auditor", "Auditor"
    ADMIN = "admin", "Admin"


class AuditAction(models.TextChoices):
    REQUEST_SUBMITTED = "request.submitted", "Request submitted"
    REQUEST_APPROVED = "request.approved", "Request approved"
    REQUEST_AUTO_APPROVED = "request.auto_approved", "Request approved by policy"
    REQUEST_REJECTED = "request.rejected", "Request rejected"
    REQUEST_CANCELLED = "request.cancelled", "Request cancelled"
    REQUEST_EXPIRED = "request.expired", "Request expired"
    RUN_QUEUED = "run.queued", "Run queued"
    RUN_STARTED = "run.started", "Run started"
    RUN_PHASE = "run.phase", "Run phase changed"
    RUN_CANCEL_REQUESTED = "run.cancel_requested", "Cancel requested"
    RUN_SUCCEEDED = "run.succeeded", "Run succeeded"
    RUN_FAILED = "run.failed", "Run failed"
    RUN_ERRORED = "run.errored", "Run errored"
    RUN_CANCELLED = "run.cancelled", "Run cancelled"
    RUN_RECONCILED = "run.reconciled", "Run reconciled after a lost worker"
    RUN_REQUEUED = "run.requeued", "Run back in line: worker lost before the move started, nothing was moved"
    INVENTORY_SYNCED = "inventory.synced", "Inventory synced"
    INVENTORY_SYNC_FAILED = "inventory.sync_failed", "Inventory sync failed"
    ACCESS_DENIED = "access.denied", "Access denied"
    CONFIG_CHANGED = "config.changed", "Configuration changed"
    CONFIG_DELETED = "config.deleted", "Configuration deleted"
    KEY_ROTATED = "config.key_rotated", "Encryption key rotated"
    USER_LOGIN = "user.login", "Logged in"
    USER_LOGIN_FAILED = "user.login_failed", "Login failed"
    USER_LOGOUT = "user.logout", "Logged out"
    NOTIFICATIONS_CHANGED = "user.notifications_changed", "Notification preferences changed"
    RUN_WATCHDOG_ABORT = "run.watchdog_abort", "Run aborted by the watchdog"
    PLAN_BUILT = "plan.built", "Move plan built"
    PLAN_FALLBACK_SET = "plan.fallback_set", "Move plan fallback chosen"
    PLAN_SUBMITTED = "plan.submitted", "Move plan submitted"
    PLAN_APPROVED = "plan.approved", "Move plan approved"
    PLAN_REJECTED = "plan.rejected", "Move plan rejected"
    PLAN_CANCELLED = "plan.cancelled", "Move plan cancelled"
    PLAN_STARTED = "plan.started", "Move plan started"
    PLAN_ITEM_RETRIED = "plan.item_retried", "Move plan item retried"
    PLAN_ITEM_SETTLED = "plan.item_settled", "Move plan item settled"
    PLAN_FINISHED = "plan.finished", "Move plan finished"
    PLAN_EXPIRED = "plan.expired", "Move plan expired"

    REQUEST_STAGE_APPROVED = "request.stage_approved", "Approval stage signed"
    REQUEST_AUTO_REJECTED = "request.auto_rejected", "Request rejected by policy"
    REQUEST_BYPASS_APPROVED = "request.bypass_approved", "Request approved by admin bypass"
    POLICY_IMPORTED = "policy.imported", "Approval policy imported"
    POLICY_ACTIVATED = "policy.activated", "Approval policy activated"
    PLAN_STAGE_APPROVED = "plan.stage_approved", "Move plan approval stage signed"
    PLAN_AUTO_APPROVED = "plan.auto_approved", "Move plan approved by policy"
    PLAN_BYPASS_APPROVED = "plan.bypass_approved", "Move plan approved by admin bypass"
    API_TOKEN_CREATED = "api_token.created", "API token created"
    API_TOKEN_REVOKED = "api_token.revoked", "API token revoked"
    API_TOKEN_REFUSED = "api_token.refused", "API token refused"


class NotificationCategory(models.TextChoices):
    """What a notification is about; each user can mute any of them (the preferences page)."""

    # A move plan's mails use the same categories (``notifications.notify_plan``): its final mail is
    # run_succeeded when the plan is done, run_failed when it is partially done or failed.
    APPROVAL_WAITING = "approval_waiting", "A request or plan waits for my approval"
    DECISION = "decision", "My request or plan was approved or rejected"
    RUN_STARTED = "run_started", "My migration started"
    RUN_SUCCEEDED = "run_succeeded", "My migration succeeded, or my plan is done"
    RUN_FAILED = "run_failed", "My migration failed or errored, or my plan did not move every VM"
    CANCELLED = "cancelled", "My request or plan was cancelled"
    EXPIRED = "expired", "My request or plan expired"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "Pending"  # recorded; the sender has not succeeded yet (retries included)
    SENT = "sent", "Sent"
    FAILED = "failed", "Failed"  # gave up after the last retry; last_error says why
    SKIPPED = "skipped", "Skipped"  # nowhere to send it (a user without an e-mail address)


class RuleAction(models.TextChoices):
    """What an approval-policy rule decides for the requests it matches."""

    AUTO_APPROVE = "auto_approve", "Approve automatically"
    AUTO_REJECT = "auto_reject", "Reject automatically, with a reason"
    STAGES = "stages", "Require ordered approval stages"


class ApprovalMode(models.TextChoices):
    """How many approvals complete one stage.

    ``any``: one approver from any of the stage's groups. ``n_distinct``: ``count`` different people,
    each in one of the stage's groups. ``all``: one approver from each named group, every one a
    different person (a person in two of the groups stands for only one of them).
    """

    ANY = "any", "Any one approver"
    N_DISTINCT = "n_distinct", "N distinct approvers"
    ALL = "all", "One approver from each group"


class AuditOutcome(models.TextChoices):
    SUCCESS = "success", "Success"
    FAILURE = "failure", "Failure"
    DENIED = "denied", "Denied"


# -- move plans (evacuate a host or a datastore, rebalance a cluster) --------------------------


class PlanKind(models.TextChoices):
    EVACUATE_HOST = "evacuate_host", "Evacuate host"
    EVACUATE_DATASTORE = "evacuate_datastore", "Evacuate datastore"
    REBALANCE_CLUSTER = "rebalance_cluster", "Rebalance cluster"


class PlanStatus(models.TextChoices):
    """The state machine of a move plan. Its items' requests follow ``RequestStatus``."""

    # Built; its requester reviews the targets and chooses a fallback for each VM that cannot move.
    DRAFT = "draft", "Draft"
    # Submitted; waits for an approver (never its requester).
    PENDING_APPROVAL = "pending_approval", "Pending approval"
    # Approved; its moves are about to be handed to the queue.
    APPROVED = "approved", "Approved"
    # Its moves are queued or running (admission control decides how many at once).
    RUNNING = "running", "Running"
    # Every movable VM moved; the VMs whose fallback was skip stayed where they were.
    DONE = "done", "Done"
    # Some VMs moved, others failed after their last attempt.
    PARTIALLY_DONE = "partially_done", "Partially done"
    # No VM moved: every attempt failed.
    FAILED = "failed", "Failed"
    # Withdrawn before approval, or stopped while running (moves already done stay done).
    CANCELLED = "cancelled", "Cancelled"
    # An approver said no, with a reason.
    REJECTED = "rejected", "Rejected"
    # Nobody decided in time.
    EXPIRED = "expired", "Expired"

    @classmethod
    def check_transition(cls, current: str, target: str) -> None:
        if target not in PLAN_TRANSITIONS.get(current, frozenset()):
            raise IllegalTransition(current, target)


P = PlanStatus

PLAN_TRANSITIONS: dict[str, frozenset[str]] = {
    P.DRAFT: frozenset({P.PENDING_APPROVAL, P.CANCELLED}),
    P.PENDING_APPROVAL: frozenset({P.APPROVED, P.REJECTED, P.CANCELLED, P.EXPIRED}),
    P.APPROVED: frozenset({P.RUNNING, P.CANCELLED}),
    P.RUNNING: frozenset({P.DONE, P.PARTIALLY_DONE, P.FAILED, P.CANCELLED}),
}

PLAN_EDITABLE = frozenset({P.DRAFT})
PLAN_CANCELABLE = frozenset({P.DRAFT, P.PENDING_APPROVAL, P.APPROVED, P.RUNNING})
PLAN_TERMINAL = frozenset({P.DONE, P.PARTIALLY_DONE, P.FAILED, P.CANCELLED, P.REJECTED, P.EXPIRED})


class PlanItemStatus(models.TextChoices):
    # Waiting for the plan's approval.
    PLANNED = "planned", "Planned"
    # Its current attempt (a migration request) is queued or running.
    MOVING = "moving", "Moving"
    SUCCEEDED = "succeeded", "Moved"
    # The last allowed attempt failed; the VM stays where it was.
    FAILED = "failed", "Failed"
    # Cannot move (or the requester chose to leave it): stays where it is, as agreed in the plan.
    SKIPPED = "skipped", "Skipped"
    CANCELLED = "cancelled", "Cancelled"


ITEM_TERMINAL = frozenset({PlanItemStatus.SUCCEEDED, PlanItemStatus.FAILED, PlanItemStatus.SKIPPED,
                           PlanItemStatus.CANCELLED})


class PlanFallback(models.TextChoices):
    """What happens to a VM that cannot move live."""

    SKIP = "skip", "Skip (leave it where it is)"
    # Power off, move, power on: offered only where the driver declares Capability.COLD_MOVE.
    COLD_MOVE = "cold_move", "Power off and cold-move"
