from migrations_app.models.audit import AuditEntry
from migrations_app.models.inventory import (
    Cluster,
    Datacenter,
    Datastore,
    Host,
    HypervisorConnection,
    Network,
    VirtualDisk,
    VirtualMachine,
)
from migrations_app.models.notifications import NotificationDelivery, NotificationPreference, Webhook
from migrations_app.models.plans import MovePlan, PlanItem
from migrations_app.models.policy import ApprovalPolicy, PlanApproval, PolicyRule, PolicyStage, RequestApproval
from migrations_app.models.requests import MigrationRequest
from migrations_app.models.runs import MigrationRun, RunEvent
from migrations_app.models.tokens import ApiToken

__all__ = [
    "ApiToken",
    "ApprovalPolicy",
    "AuditEntry",
    "Cluster",
    "Datacenter",
    "Datastore",
    "Host",
    "HypervisorConnection",
    "MigrationRequest",
    "MigrationRun",
    "MovePlan",
    "PlanApproval",
    "PlanItem",
    "Network",
    "NotificationDelivery",
    "NotificationPreference",
    "PolicyRule",
    "PolicyStage",
    "RequestApproval",
    "RunEvent",
    "VirtualDisk",
    "VirtualMachine",
    "Webhook",
]
