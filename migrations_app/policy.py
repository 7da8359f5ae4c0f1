"""Approval policy: decides whether a new request needs an approver.

The foundation ships one rule set, readable here: nothing is approved automatically unless the
admin turns on ``PORTAL["AUTO_APPROVE_SMALL_COMPUTE"]``, in which case a same-cluster compute move of
a non-production VM with at most 8 GiB of memory goes through without an approver.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from migrations_app.choices import MigrationKind

GiB = 1024**3


@dataclass(frozen=True)
class PolicyDecision:
    auto_approve: bool
    note: str  # which rule matched and why, shown to approvers and kept in the audit log


def evaluate(request) -> PolicyDecision:
    vm = request.vm
    small_compute = (
        request.kind == MigrationKind.COMPUTE
        and vm.memory_bytes <= 8 * GiB
        and "env:production" not in (vm.tags or [])
    )
    if small_compute and settings.PORTAL.get("AUTO_APPROVE_SMALL_COMPUTE", False):
        return PolicyDecision(True, "auto-approved: small same-cluster compute move of a non-production VM")
    return PolicyDecision(False, "needs one approver (default policy: every move is reviewed)")
