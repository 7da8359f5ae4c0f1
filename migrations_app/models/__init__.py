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
from migrations_app.models.policy import ApprovalPolicy, PolicyRule, PolicyStage, RequestApproval
from migrations_app.models.requests import MigrationRequest
from migrations_app.models.runs import MigrationRun, RunEvent

__all__ = [
    "ApprovalPolicy",
    "AuditEntry",
    "Cluster",
    "Datacenter",
    "Datastore",
    "Host",
    "HypervisorConnection",
    "MigrationRequest",
    "MigrationRun",
    "Network",
    "PolicyRule",
    "PolicyStage",
    "RequestApproval",
    "RunEvent",
    "VirtualDisk",
    "VirtualMachine",
]
