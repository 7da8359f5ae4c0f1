"""vCenter driver (pyvmomi): inventory, placement, pre-flight checks, live migration by
``RelocateVM_Task`` (vMotion, Storage vMotion, or both at once), and the cold move of a VM that
cannot move live (guest shutdown or power-off, ``RelocateVM_Task``, power-on).

How it talks to vCenter:

- **One session per driver instance**, opened on first use and reused; the registry keeps one
  driver per process and connection. When vCenter says the session expired (``NotAuthenticated``)
  the driver logs in once more and repeats the operation. ``close()`` logs out.
- **TLS is verified** against the system trust store or ``ConnectionConfig.ca_bundle`` (PEM text
  or a path). Plain http and unverified TLS are accepted only for lab connections (``is_lab``).
- **Reads are bulk**: the whole inventory is one ``RetrievePropertiesEx`` over a container view
  (continued with ``ContinueRetrievePropertiesEx`` while vCenter pages), never a call per object.
  ``round_trips`` counts every SOAP request, for the benchmarks.
- **Waiting uses the SDK's own primitive**: a property filter per task and
  ``WaitForUpdatesEx`` with a short ``maxWaitSeconds``, so a cancel request or a timeout is
  noticed between waits without polling loops.
- **Faults are translated in one place** (``domain_error``) into the portal's errors, keeping
  vCenter's own message as ``hypervisor_message``.

Managed object ids (``vm-42``, ``host-21``, ...) are the refs; the portal treats them as opaque.

The package, by concern:

- ``driver``: ``VCenterDriver``, the Driver contract's operations on one session;
- ``session``: endpoint and TLS rules, the counting SOAP stub, login and login again;
- ``inventory``: bulk PropertyCollector reads and their mapping to Inventory, Placement, Disks;
- ``moves``: the facts a move is judged on, the rules, the ``RelocateSpec``;
- ``batch``: moves in batches (one read of every move's facts, the tasks side by side);
- ``cold``: the cold move (power off, relocate, power on; the VM never left off unsaid);
- ``tasks``: following a task (WaitForUpdatesEx, cancel, timeout) and its outcome;
- ``faults``: vCenter faults and connection errors as the portal's errors.
"""

from drivers.vmware.driver import VCenterDriver
from drivers.vmware.faults import domain_error, fault_text
from drivers.vmware.inventory import OWNER_FIELD, disks_of
from drivers.vmware.moves import (
    DatastoreFacts,
    HostFacts,
    MoveCheck,
    MoveFacts,
    VmFacts,
    assess_move,
    relocate_spec,
)
from drivers.vmware.session import DEFAULT_API_VERSION, Endpoint, _Session, parse_endpoint, ssl_context
from drivers.vmware.tasks import TASK_PATHS, abort_reason, progress_percent, task_state

__all__ = [
    "DEFAULT_API_VERSION",
    "OWNER_FIELD",
    "TASK_PATHS",
    "DatastoreFacts",
    "Endpoint",
    "HostFacts",
    "MoveCheck",
    "MoveFacts",
    "VCenterDriver",
    "VmFacts",
    "_Session",
    "abort_reason",
    "assess_move",
    "disks_of",
    "domain_error",
    "fault_text",
    "parse_endpoint",
    "progress_percent",
    "relocate_spec",
    "ssl_context",
    "task_state",
]
