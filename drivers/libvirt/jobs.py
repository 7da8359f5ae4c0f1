"""Pure decisions about libvirt jobs, kept apart from the SDK so they are unit-tested without it.

The driver (``drivers/libvirt/``) feeds these functions the numbers libvirt reports (``jobStats()``,
``blockJobInfo()``, error codes) and acts on what they return. Nothing here imports libvirt: the
few libvirt constants needed are copied below as plain ints/strings (they are part of libvirt's
stable ABI), and a lab test checks them against the real module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from drivers.base import (
    PHASE_ORDER,
    AuthenticationFailed,
    ConnectionFailed,
    DriverError,
    InsufficientResources,
    InvalidState,
    MigrationCancelled,
    NotFound,
    PermissionDenied,
    Phase,
    ProgressUpdate,
    Unsupported,
)

GiB = 1024**3
MiB = 1024**2

# Percent shown while the hypervisor call has not returned: 100 only once it has.
MAX_RUNNING_PERCENT = 99.0

# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


def migration_percent(disk_processed: int, disk_total: int, mem_processed: int, mem_total: int) -> float:
    """Percent of a live migration from one ``jobStats()`` sample, 0..MAX_RUNNING_PERCENT.

    libvirt reports the disk mirror first, then memory; ``data_total`` jumps from the disk size to
    disk + RAM when the RAM phase starts, and ``memory_processed`` passes ``memory_total`` once
    pages are sent again in later passes. So count memory at most once over the fixed sum of both.
    """
    total = max(disk_total, 0) + max(mem_total, 0)
    if total <= 0:
        return 0.0
    done = min(max(disk_processed, 0), max(disk_total, 0)) + min(max(mem_processed, 0), max(mem_total, 0))
    return min(100.0 * done / total, MAX_RUNNING_PERCENT)


def block_copy_percent(jobs: Iterable[tuple[int, int]]) -> float:
    """Percent of a set of block copies from ``blockJobInfo()`` (cur, end) pairs."""
    pairs = list(jobs)
    end = sum(max(e, 0) for _, e in pairs)
    if end <= 0:
        return 0.0
    cur = sum(min(max(c, 0), max(e, 0)) for c, e in pairs)
    return min(100.0 * cur / end, MAX_RUNNING_PERCENT)


def migration_phase(stats: Mapping[str, int], *, copies_disks: bool, switching_over: bool) -> Phase:
    """Which phase a ``jobStats()`` sample shows. The caller keeps phases from going back."""
    if switching_over:
        return Phase.SWITCHOVER
    if int(stats.get("memory_processed", 0)) > 0 or int(stats.get("memory_iteration", 0)) > 0:
        return Phase.MEMORY_PRECOPY
    if copies_disks:
        return Phase.DISK_COPY
    return Phase.MEMORY_PRECOPY


@dataclass
class ProgressTracker:
    """Turns successive samples into ``ProgressUpdate``s whose percent and phase never go back.

    ``mem_total_hint`` / ``disk_total_hint`` (from ``dom.info()`` and the disk sizes) stand in
    until libvirt reports its own totals, so early samples are not measured against zero.
    """

    task_id: str
    mem_total_hint: int = 0
    disk_total_hint: int = 0
    percent: float = 0.0
    phase: Phase = Phase.PRECHECK
    _last: tuple[float, int] | None = field(default=None, repr=False)
    _rate: float = field(default=0.0, repr=False)
    _bytes: tuple[int, int] = field(default=(0, 0), repr=False)  # last (done, total) reported

    def _advance(self, phase: Phase, percent: float) -> tuple[Phase, float]:
        if PHASE_ORDER.index(phase) > PHASE_ORDER.index(self.phase):
            self.phase = phase
        self.percent = max(self.percent, min(percent, MAX_RUNNING_PERCENT))
        return self.phase, round(self.percent, 2)

    def _rate_from(self, now: float, done: int, reported: float) -> float:
        """The hypervisor's own rate when it gives one, else a smoothed delta of bytes over time."""
        if reported > 0:
            self._rate = reported
        elif self._last is not None and now > self._last[0] and done >= self._last[1]:
            instant = (done - self._last[1]) / (now - self._last[0])
            self._rate = instant if self._rate == 0 else 0.5 * self._rate + 0.5 * instant
        self._last = (now, done)
        return self._rate

    def migration(
        self, stats: Mapping[str, int], now: float, *, copies_disks: bool, switching_over: bool = False
    ) -> ProgressUpdate:
        """An update from one ``jobStats()`` sample of a live migration."""
        mem_total = int(stats.get("memory_total", 0)) or self.mem_total_hint
        disk_total = int(stats.get("disk_total", 0)) or (self.disk_total_hint if copies_disks else 0)
        disk_done = min(int(stats.get("disk_processed", 0)), disk_total)
        mem_done = min(int(stats.get("memory_processed", 0)), mem_total)
        phase, percent = self._advance(
            migration_phase(stats, copies_disks=copies_disks, switching_over=switching_over),
            migration_percent(disk_done, disk_total, mem_done, mem_total),
        )
        total = disk_total + mem_total
        done = disk_done + mem_done
        self._bytes = (done, total)
        rate = self._rate_from(now, done, float(stats.get("memory_bps", 0)) + float(stats.get("disk_bps", 0)))
        iteration = int(stats.get("memory_iteration", 0)) or None
        remaining = stats.get("memory_remaining")
        left = int(stats.get("data_remaining", max(total - done, 0)))
        return ProgressUpdate(
            phase,
            percent,
            bytes_done=done,
            bytes_total=total,
            rate_bytes_per_s=rate,
            eta_s=eta_seconds(left, rate),
            iteration=iteration,
            remaining_bytes=int(remaining) if remaining is not None and phase != Phase.DISK_COPY else None,
            task_id=self.task_id,
        )

    def block_copy(self, jobs: Iterable[tuple[int, int]], now: float) -> ProgressUpdate:
        """An update from the ``blockJobInfo()`` (cur, end) pairs of a storage migration."""
        pairs = list(jobs)
        done = sum(min(c, e) for c, e in pairs)
        total = sum(e for _, e in pairs) or self.disk_total_hint
        self._bytes = (done, total)
        phase, percent = self._advance(Phase.DISK_COPY, block_copy_percent(pairs))
        rate = self._rate_from(now, done, 0.0)
        return ProgressUpdate(
            phase,
            percent,
            bytes_done=done,
            bytes_total=total,
            rate_bytes_per_s=rate,
            eta_s=eta_seconds(max(total - done, 0), rate),
            task_id=self.task_id,
        )

    def switchover(self, message: str = "switching over") -> ProgressUpdate:
        phase, percent = self._advance(Phase.SWITCHOVER, self.percent)
        done, total = self._bytes
        return ProgressUpdate(phase, percent, bytes_done=done, bytes_total=total, task_id=self.task_id, message=message)

    def done(self, bytes_total: int, message: str = "done") -> ProgressUpdate:
        self.phase, self.percent = Phase.DONE, 100.0
        return ProgressUpdate(
            Phase.DONE, 100.0, bytes_done=bytes_total, bytes_total=bytes_total, task_id=self.task_id, message=message
        )


def eta_seconds(remaining_bytes: int, rate_bytes_per_s: float) -> float | None:
    if rate_bytes_per_s <= 0:
        return None
    return round(max(remaining_bytes, 0) / rate_bytes_per_s, 1)


# --------------------------------------------------------------------------------------------
# Time budget, abort and convergence decisions
# --------------------------------------------------------------------------------------------

COMPLETION_TIMEOUT_PER_GIB_S = 800.0  # Nova's live_migration_completion_timeout default


def completion_budget_s(memory_bytes: int, disk_bytes: int, per_gib_s: float = COMPLETION_TIMEOUT_PER_GIB_S) -> float:
    """Seconds a migration may take before it is aborted, as Nova computes it: ``per_gib_s`` per
    GiB of data to move, RAM counted as at least 2 GiB (small guests still get a sane budget)."""
    data_gib = max(memory_bytes / GiB, 2.0) + max(disk_bytes, 0) / GiB
    return per_gib_s * data_gib


def effective_timeout_s(spec_timeout_s: float | None, budget_s: float) -> float:
    """The spec's own timeout wins; without one the completion budget applies."""
    if spec_timeout_s is not None and spec_timeout_s > 0:
        return float(spec_timeout_s)
    return budget_s


def timed_out(elapsed_s: float, timeout_s: float) -> bool:
    return elapsed_s > timeout_s


def postcopy_due(iteration: int, after_iterations: int) -> bool:
    """Switch a post-copy-enabled migration to post-copy once pre-copy has had its passes:
    past ``after_iterations`` passes it is not converging by itself (Nova waits the same way)."""
    return after_iterations >= 0 and iteration > after_iterations


def bandwidth_mib_s(bytes_per_s: int | None) -> int | None:
    """VIR_MIGRATE_PARAM_BANDWIDTH is in MiB/s: round up so a cap never becomes 0 (= unlimited)."""
    if not bytes_per_s:
        return None
    return max(1, math.ceil(bytes_per_s / MiB))


def migration_flag_names(
    *, copies_disks: bool, shared_disks: bool, auto_converge: bool, post_copy: bool
) -> tuple[str, ...]:
    """Names of the VIR_MIGRATE_* flags for one live migration (the driver maps them to ints).

    Peer-to-peer, so the source daemon drives the move and survives our process dying; the
    definition goes with the guest. UNSAFE only when a disk stays on a shared directory: libvirt
    cannot tell a plain directory is shared and refuses (code 81) without it.
    """
    names = ["LIVE", "PEER2PEER", "PERSIST_DEST", "UNDEFINE_SOURCE"]
    if copies_disks:
        names.append("NON_SHARED_DISK")
    if shared_disks:
        names.append("UNSAFE")
    if auto_converge:
        names.append("AUTO_CONVERGE")
    if post_copy:
        names.append("POSTCOPY")
    return tuple(names)


# --------------------------------------------------------------------------------------------
# Errors: libvirt's codes, in the portal's words
# --------------------------------------------------------------------------------------------

# virErrorNumber / virErrorDomain values (libvirt's stable ABI; checked by a lab test).
ERR_NO_SUPPORT = 3
ERR_NO_CONNECT = 5
ERR_INVALID_CONN = 6
ERR_INVALID_DOMAIN = 7
ERR_INVALID_ARG = 8
ERR_SYSTEM_ERROR = 38
ERR_RPC = 39
ERR_NO_DOMAIN = 42
ERR_AUTH_FAILED = 45
ERR_NO_STORAGE_POOL = 49
ERR_NO_STORAGE_VOL = 50
ERR_OPERATION_INVALID = 55
ERR_CONFIG_UNSUPPORTED = 67
ERR_OPERATION_TIMEOUT = 68
ERR_OPERATION_ABORTED = 78
ERR_AUTH_CANCELLED = 79
ERR_MIGRATE_UNSAFE = 81
ERR_OPERATION_UNSUPPORTED = 84
ERR_RESOURCE_BUSY = 87
ERR_ACCESS_DENIED = 88
ERR_STORAGE_VOL_EXIST = 90
ERR_CPU_INCOMPATIBLE = 91
ERR_AUTH_UNAVAILABLE = 94
FROM_RPC = 7
FROM_REMOTE = 13
# virDomainJobType values of a job still running.
JOB_BOUNDED = 1
JOB_UNBOUNDED = 2

_BY_CODE: dict[int, type[DriverError]] = {
    ERR_OPERATION_ABORTED: MigrationCancelled,
    ERR_MIGRATE_UNSAFE: InvalidState,
    ERR_NO_DOMAIN: NotFound,
    ERR_INVALID_DOMAIN: NotFound,
    ERR_NO_STORAGE_POOL: NotFound,
    ERR_NO_STORAGE_VOL: NotFound,
    ERR_OPERATION_INVALID: InvalidState,
    ERR_OPERATION_TIMEOUT: InvalidState,  # "cannot acquire state change lock": another job runs
    ERR_RESOURCE_BUSY: InvalidState,
    ERR_STORAGE_VOL_EXIST: InvalidState,
    ERR_CPU_INCOMPATIBLE: InvalidState,
    ERR_NO_CONNECT: ConnectionFailed,
    ERR_INVALID_CONN: ConnectionFailed,
    ERR_RPC: ConnectionFailed,
    ERR_AUTH_FAILED: AuthenticationFailed,
    ERR_AUTH_CANCELLED: AuthenticationFailed,
    ERR_AUTH_UNAVAILABLE: AuthenticationFailed,
    ERR_ACCESS_DENIED: PermissionDenied,
    ERR_NO_SUPPORT: Unsupported,
    ERR_OPERATION_UNSUPPORTED: Unsupported,
    ERR_CONFIG_UNSUPPORTED: Unsupported,
}

# Messages that say more than their code (libvirt reports these under generic codes).
_BY_MESSAGE: tuple[tuple[str, type[DriverError]], ...] = (
    ("no space left on device", InsufficientResources),
    ("not enough space", InsufficientResources),
    ("cannot allocate memory", InsufficientResources),
    ("migrate guest to the same host", InvalidState),
    ("domain is not running", InvalidState),
    ("end of file while reading data", ConnectionFailed),
    ("cannot recv data", ConnectionFailed),
    ("cannot write data", ConnectionFailed),
    ("connection closed", ConnectionFailed),
    ("keepalive timeout", ConnectionFailed),
    ("failed to connect socket", ConnectionFailed),
    ("unable to connect to server", ConnectionFailed),
    ("no route to host", ConnectionFailed),
    ("connection refused", ConnectionFailed),
)


def classify_error(code: int, domain: int, message: str, default: type[DriverError]) -> type[DriverError]:
    """The DriverError class for a libvirt error: message patterns first (they are more precise
    than the generic codes libvirt often uses), then the code, then the RPC layer, else ``default``."""
    text = (message or "").lower()
    for pattern, cls in _BY_MESSAGE:
        if pattern in text:
            return cls
    if code in _BY_CODE:
        return _BY_CODE[code]
    if domain in (FROM_RPC, FROM_REMOTE) and code == ERR_SYSTEM_ERROR:
        return ConnectionFailed
    return default
