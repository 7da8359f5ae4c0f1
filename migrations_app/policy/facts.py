"""The facts a policy rule looks at, read from a request whose pre-flight checks passed."""

from __future__ import annotations

from migrations_app.choices import PowerState
from migrations_app.estimates import estimate
from migrations_app.policy.rules import Facts


def environment_of(tags) -> str:
    """The label of the VM's first ``env:<label>`` tag, or ""."""
    return next((t.split(":", 1)[1] for t in tags or () if t.startswith("env:")), "")


def facts_for(request) -> Facts:
    """Facts of a (saved or unsaved) MigrationRequest with its VM, host and targets loaded."""
    vm = request.vm
    disk_bytes = vm.disk_bytes
    est = estimate(memory_bytes=vm.memory_bytes, disk_bytes=disk_bytes, kind=request.kind)
    target_host = request.target_host if request.target_host_id else None
    # A cold move powers a running VM off for the whole move: its downtime is the move, not a switchover.
    cold_and_running = getattr(request, "cold", False) and vm.power_state == PowerState.ON
    downtime_ms = 1000.0 * est.duration_s if cold_and_running else est.downtime_ms
    return Facts(
        owner_group=vm.owner_group.name if vm.owner_group_id else "",
        tags=frozenset(vm.tags or ()),
        folder=vm.folder or "",
        environment=environment_of(vm.tags),
        memory_bytes=vm.memory_bytes,
        disk_bytes=disk_bytes,
        kind=request.kind,
        cross_cluster=target_host is not None and target_host.cluster_id != vm.host.cluster_id,
        duration_s=est.duration_s,
        downtime_ms=downtime_ms,
    )
