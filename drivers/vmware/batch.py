"""Moves in batches (``Driver.preflight_many``, ``Driver.migrate_many``) for the vCenter driver:
one read of every move's facts, the moves' checks and starts side by side, one read of all the
started tasks with their VMs, and the tasks that had not ended followed each in its own thread.
A mixin of ``VCenterDriver``, whose one-move steps (``_start_move``, ``_end_move``,
``_ended_at_once``, ``_checks``) it reuses."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pyVmomi import vmodl

from drivers.base import (
    DriverError,
    MigrationFailed,
    MigrationResult,
    MigrationSpec,
    Placement,
    PreflightCheck,
    ProgressUpdate,
)
from drivers.vmware.faults import _translated
from drivers.vmware.moves import MoveFacts, read_moves_facts
from drivers.vmware.tasks import _ProgressReporter, _TaskEnd


def _in_threads(work: Callable[[int], None], indexes, *, name: str) -> None:
    """Call ``work(i)`` for every index, each in its own thread (inline for one); wait for all."""
    indexes = list(indexes)
    if len(indexes) == 1:
        work(indexes[0])
        return
    threads = [threading.Thread(target=work, args=(i,), name=f"{name}-{i}", daemon=True) for i in indexes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class BatchMoves:
    """The batch half of ``VCenterDriver`` (see the module)."""

    @_translated(context="checking the moves")
    def preflight_many(self, specs: Sequence[MigrationSpec], *,
                       cold: frozenset[int] = frozenset()) -> list[tuple[PreflightCheck, ...] | Exception]:
        """The moves' checks from one read of their facts; a cold move's by the cold rules (any
        power state) and, where vCenter has it and the VM is already off, CheckRelocate_Task."""
        facts = self._facts_many(specs)
        if facts is None:
            return self._preflight_each(specs, cold)
        out: list[tuple[PreflightCheck, ...] | Exception | None] = list(facts)

        def check(i: int) -> None:
            try:
                out[i] = self._checks_one(specs[i], facts[i], cold=i in cold)
            except Exception as exc:  # noqa: BLE001 - that move alone
                out[i] = exc

        # Each move's checks in its own thread (CheckRelocate_Task is a task to follow, where vCenter
        # has it): the batch's pre-flight lasts about as long as one move's.
        _in_threads(check, [i for i, fact in enumerate(facts) if not isinstance(fact, DriverError)], name="check")
        return out

    @_translated(context="checking the move")
    def _checks_one(self, spec: MigrationSpec, facts: MoveFacts, *, cold: bool = False) -> tuple[PreflightCheck, ...]:
        return self._checks(spec, facts, cold=cold)

    def _preflight_each(self, specs: Sequence[MigrationSpec], cold: frozenset[int]) -> list:
        """Each move's checks from its own read (a batch read failed on an object that is gone)."""
        out: list[tuple[PreflightCheck, ...] | Exception] = []
        for i, spec in enumerate(specs):
            try:
                out.append(self._checks_one(spec, self._translated_facts(spec), cold=i in cold))
            except Exception as exc:  # noqa: BLE001 - that move alone
                out.append(exc)
        return out

    @_translated(context="checking the move")
    def _translated_facts(self, spec: MigrationSpec) -> MoveFacts:
        return self._run(lambda s: self._move_facts(s, spec))

    def _facts_many(self, specs: Sequence[MigrationSpec]) -> list[MoveFacts | DriverError] | None:
        """The facts of every move in one RetrievePropertiesEx; None when vCenter refused the batch
        because one of its objects is gone (then each move is read alone and gets its own error)."""
        try:
            return self._run(lambda s: read_moves_facts(s, specs, stub=self._stub, page_size=self.page_size))
        except vmodl.fault.ManagedObjectNotFound:
            return None

    @_translated(MigrationFailed, context="migrating the VM")
    def _migrate_one(self, spec: MigrationSpec, facts: MoveFacts | None, task: Any, progress: _ProgressReporter, *,
                     started: float, cancel: threading.Event,
                     at_once: tuple[_TaskEnd, Placement | None] | None) -> MigrationResult:
        return self._end_move(spec, facts, task, progress, started=started, cancel=cancel, at_once=at_once)

    @_translated(MigrationFailed, context="migrating the VM")
    def _start_one(self, spec: MigrationSpec, facts: MoveFacts | DriverError | None,
                   progress: _ProgressReporter) -> tuple[MoveFacts, Any]:
        if isinstance(facts, DriverError):
            raise facts
        if facts is None:
            facts = self._run(lambda s: self._move_facts(s, spec))
        return facts, self._start_move(spec, facts, progress)

    def migrate_many(
        self,
        specs: Sequence[MigrationSpec],
        *,
        on_progress: Callable[[int, ProgressUpdate], None],
        cancels: Sequence[threading.Event],
        cold: frozenset[int] = frozenset(),
        on_done: Callable[[int, MigrationResult | BaseException], None] | None = None,
    ) -> list[MigrationResult | BaseException]:
        """Start every move (one read of all their facts first), read every task and VM in one
        retrieval, and follow the tasks that had not ended, each in its own thread. A batch of
        moves that end at once (vcsim's, small ones on vCenter) costs one round trip per move
        plus two for the batch."""
        if cold or len(specs) <= 1 or len(cancels) != len(specs):
            return super().migrate_many(specs, on_progress=on_progress, cancels=cancels, cold=cold, on_done=on_done)
        started = time.monotonic()
        results: list[MigrationResult | BaseException | None] = [None] * len(specs)

        def ended(i: int, result: MigrationResult | BaseException) -> None:
            results[i] = result
            if on_done is not None:
                on_done(i, result)

        try:
            facts: list = self._translated_facts_many(specs)
        except DriverError as exc:
            for i in range(len(specs)):
                ended(i, exc)
            return [exc] * len(specs)
        reporters = [_ProgressReporter(lambda u, i=i: on_progress(i, u)) for i in range(len(specs))]
        begun: dict[int, tuple[MoveFacts, Any]] = {}

        def start(i: int) -> None:
            try:
                begun[i] = self._start_one(specs[i], facts[i], reporters[i])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                ended(i, exc)

        # Each start in its own thread: RelocateVM_Task answers once vCenter has queued the task,
        # which may take a while on a busy vCenter (and vcsim runs the whole move inside the call).
        _in_threads(start, range(len(specs)), name="relocate")
        begun = dict(sorted(begun.items()))
        try:
            at_once_ends = self._translated_ended_at_once(
                [(task, specs[i]) for i, (_, task) in begun.items()], started, [cancels[i] for i in begun])
        except DriverError:
            at_once_ends = [None] * len(begun)  # follow each task on its own

        def finish(i: int, at_once) -> None:
            fact, task = begun[i]
            try:
                result: MigrationResult | BaseException = self._migrate_one(
                    specs[i], fact, task, reporters[i], started=started, cancel=cancels[i], at_once=at_once)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result = exc
            ended(i, result)

        following = []
        for i, at_once in zip(begun, at_once_ends, strict=True):
            if at_once is not None:
                finish(i, at_once)
            else:
                following.append(i)
        _in_threads(lambda i: finish(i, None), following, name="follow")
        return [r if r is not None else MigrationFailed("the move ended without a result") for r in results]

    @_translated(context="reading the moves")
    def _translated_facts_many(self, specs: Sequence[MigrationSpec]) -> list:
        facts = self._facts_many(specs)
        return facts if facts is not None else [None] * len(specs)

    @_translated(context="reading the started tasks")
    def _translated_ended_at_once(self, started_tasks: list[tuple[Any, MigrationSpec]], started: float,
                                  cancels: list[threading.Event]) -> list:
        if not started_tasks:
            return []
        return self._run(lambda s: self._ended_at_once(s, started_tasks, started=started, cancels=cancels))

