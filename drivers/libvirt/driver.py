"""LibvirtDriver: a set of libvirt/QEMU hosts managed as one endpoint (see the package docstring)."""

from __future__ import annotations

from drivers.base import Capability, ConnectionConfig, ConnectionFailed, Driver
from drivers.libvirt import jobs, sdk
from drivers.libvirt.connections import Connections, parse_hosts
from drivers.libvirt.inventory import InventoryMixin
from drivers.libvirt.moves import MovesMixin
from drivers.libvirt.planning import PlanningMixin
from drivers.libvirt.progress import ProgressMixin
from drivers.libvirt.sdk import ensure_event_loop, errors


class LibvirtDriver(MovesMixin, ProgressMixin, PlanningMixin, InventoryMixin, Driver):
    """A set of libvirt/QEMU hosts managed as one endpoint (see the package docstring).

    The session (settings, connections) lives here; each mixin holds one side of the work:
    reading hosts (inventory), planning a move, following its progress, running it (moves).
    """

    kind = "libvirt"
    capabilities = (
        Capability.COMPUTE_MIGRATION
        | Capability.STORAGE_MIGRATION
        | Capability.COMBINED_MIGRATION
        | Capability.CANCEL
        | Capability.PROGRESS
        | Capability.TASK_LOOKUP
        | Capability.TASK_ABORT
        | Capability.COMPUTE_COPIES_LOCAL_DISKS
    )

    def __init__(self, config: ConnectionConfig):
        super().__init__(config)
        opts = dict(config.options)
        self.hosts = parse_hosts(opts)
        self.shared_pools = frozenset(str(p) for p in opts.get("shared_pools", ()) or ())
        self.datacenter = str(opts.get("datacenter") or "libvirt")
        self.poll_interval = float(opts.get("poll_interval_s", 0.25))
        self.per_gib_s = float(opts.get("completion_timeout_per_gib_s", jobs.COMPLETION_TIMEOUT_PER_GIB_S))
        self.auto_converge = bool(opts.get("auto_converge", False))
        self.post_copy = bool(opts.get("post_copy", False))
        self.post_copy_after = int(opts.get("post_copy_after_iterations", 2))
        ensure_event_loop()  # before the first connection opens
        self._conns = Connections(
            self.hosts, int(opts.get("keepalive_interval_s", 5)), int(opts.get("keepalive_count", 3))
        )

    # -- session ---------------------------------------------------------------------------
    def conn(self, host: str) -> sdk.libvirt.virConnect:
        """The open connection to one host (reopened if it died). Raises ConnectionFailed."""
        return self._conns.get(host)

    def describe(self) -> str:
        for name in self.hosts:
            try:
                conn = self.conn(name)
            except ConnectionFailed:
                continue
            with errors(f"cannot read the version of {name}", ConnectionFailed):
                lib = conn.getLibVersion()
                hv = conn.getVersion()
            return (
                f"libvirt {lib // 1000000}.{lib // 1000 % 1000}.{lib % 1000}, "
                f"QEMU {hv // 1000000}.{hv // 1000 % 1000}.{hv % 1000}; hosts {', '.join(self.hosts)}"
            )
        raise ConnectionFailed(f"no libvirt host is reachable ({', '.join(self.hosts)})")

    def close(self) -> None:
        self._conns.close()
