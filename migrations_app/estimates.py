"""Estimated duration and downtime of a live migration, from the VM's size and the kind of move.

A pure function: the policy's conditions and the approval card use the same numbers. The assumed
rates are deliberately plain and conservative (a 10 GbE migration network, shared datastores on
a SAN), so an approver reads them as an order of magnitude, not as a promise:

- memory pre-copy moves about 1 GiB/s, and copies memory 1.3 times over on average (pages dirtied
  during a pass are sent again);
- a disk copy moves about 200 MiB/s;
- every move pays 15 s of fixed work (pre-checks, set-up on the target, clean-up);
- switchover pauses the VM for about 300 ms, plus 20 ms per GiB of memory (the last dirty pages
  and the device state); a storage-only move switches disks in about 50 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
MiB = 1024**2

MEMORY_RATE_BYTES_PER_S = 1 * GiB
MEMORY_DIRTY_FACTOR = 1.3
DISK_RATE_BYTES_PER_S = 200 * MiB
FIXED_OVERHEAD_S = 15.0
SWITCHOVER_BASE_MS = 300.0
SWITCHOVER_MS_PER_GIB = 20.0
STORAGE_SWITCHOVER_MS = 50.0


@dataclass(frozen=True)
class Estimate:
    """How long the move should take end to end, and how long the VM pauses at switchover."""

    duration_s: float
    downtime_ms: float


def estimate(*, memory_bytes: int, disk_bytes: int, kind: str) -> Estimate:
    """The estimate for a ``compute``, ``storage`` or ``both`` move of a VM of this size."""
    moves_memory = kind in ("compute", "both")
    moves_disks = kind in ("storage", "both")
    if not (moves_memory or moves_disks):
        raise ValueError(f"unknown migration kind {kind!r}")
    seconds = FIXED_OVERHEAD_S
    if moves_disks:
        seconds += max(disk_bytes, 0) / DISK_RATE_BYTES_PER_S
    if moves_memory:
        seconds += max(memory_bytes, 0) * MEMORY_DIRTY_FACTOR / MEMORY_RATE_BYTES_PER_S
        downtime = SWITCHOVER_BASE_MS + SWITCHOVER_MS_PER_GIB * max(memory_bytes, 0) / GiB
    else:
        downtime = STORAGE_SWITCHOVER_MS
    return Estimate(duration_s=round(seconds, 1), downtime_ms=round(downtime, 1))
