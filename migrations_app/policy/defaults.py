"""The risk-based approval policy shipped with the product (installed by migration 0006).

Thresholds: a VM is *small* with at most 8 GiB of memory and at most 100 GiB of disk.

1. Production VMs (tagged ``env:production``) need two distinct approvers, as two stages: a first
   and a second review, each by one member of the ``approver`` role, never the same person.
2. A small VM's compute move within its cluster is approved automatically.
3. Everything else (storage moves, compute-and-storage moves, big VMs) needs one approver.
"""

from __future__ import annotations

SMALL_MEMORY_GIB = 8
SMALL_DISK_GIB = 100

DEFAULT_POLICY_NAME = "Risk-based defaults"

DEFAULT_POLICY: dict = {
    "name": DEFAULT_POLICY_NAME,
    "description": "Shipped with the portal: production needs two approvers, small same-cluster compute moves "
                   "go through, everything else needs one approver.",
    "rules": [
        {
            "name": "Production VMs need two distinct approvers",
            "when": {"tags_any": ["env:production"]},
            "action": "stages",
            "stages": [
                {"name": "First review", "groups": ["approver"], "mode": "any"},
                {"name": "Second review", "groups": ["approver"], "mode": "any"},
            ],
        },
        {
            "name": "Small same-cluster compute moves are approved automatically",
            "when": {"kind": ["compute"], "cross_cluster": False, "memory_gib_at_most": SMALL_MEMORY_GIB,
                     "disk_gib_at_most": SMALL_DISK_GIB},
            "action": "auto_approve",
        },
        {
            "name": "Everything else needs one approver",
            "when": {},
            "action": "stages",
            "stages": [{"name": "Review", "groups": ["approver"], "mode": "any"}],
        },
    ],
}
