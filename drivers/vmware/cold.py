"""The cold move (``Driver.cold_move``) for the vCenter driver: what an admin does by hand for a VM
that cannot move live (powered off, or on storage the target host does not see).

1. A running VM goes down: a clean guest shutdown (``ShutdownGuest``) where VMware Tools runs,
   waited for at most ``guest_shutdown_s``; else, or after that, ``PowerOffVM_Task``.
2. ``RelocateVM_Task`` with the live path's ``RelocateSpec`` (host + pool, datastore, a locator per
   disk): its task id is the move's task id (crash recovery looks it up, by id and by VM).
3. ``PowerOnVM_Task`` at the target if the VM ran. A VM that was off, or suspended, stays so.

A VM this driver powered off is never left off without saying so: when the move fails, or is
cancelled or times out before the relocation starts, it is powered on again on its source and the
error says it was off for a while; when that fails too, the error says where it is left powered
off. A cancel during the power-off takes effect once the VM is off (a guest asked to shut down is
let finish), during the relocation as for a live move (CancelTask where vCenter allows it).

A mixin of ``VCenterDriver``, whose steps (``judge_move``, ``_relocate``, ``_follow_move``,
``_ended_at_once``) it shares with the live move."""

from __future__ import annotations

import logging
import threading
import time

from pyVmomi import vim, vmodl

from drivers.base import (
    DriverError,
    MigrationCancelled,
    MigrationFailed,
    MigrationResult,
    MigrationSpec,
    MigrationTimedOut,
    Phase,
    ProgressCallback,
)
from drivers.vmware.faults import _CONNECTION_ERRORS, _translated, domain_error, fault_text, translate
from drivers.vmware.inventory import PC, props_of, retrieve
from drivers.vmware.moves import MoveFacts, judge_move
from drivers.vmware.tasks import _ProgressReporter, abort_reason, wait_for_power_state

log = logging.getLogger(__name__)

# Where each step sits in the whole move's percent: the relocation between these two.
RELOCATION_SPAN = (10.0, 90.0)
_CALL_ERRORS = (vmodl.MethodFault, DriverError, *_CONNECTION_ERRORS)


class ColdMoves:
    """The cold half of ``VCenterDriver`` (see the module)."""

    @_translated(MigrationFailed, context="cold-moving the VM")
    def cold_move(
        self, spec: MigrationSpec, *, on_progress: ProgressCallback, cancel: threading.Event
    ) -> MigrationResult:
        started = time.monotonic()
        facts = self._run(lambda s: self._move_facts(s, spec))
        judge_move(facts, spec, cold=True)
        progress = _ProgressReporter(on_progress)
        vm, was_on = facts.vm, facts.vm.power == "poweredOn"
        source = self._host_name(vm.host_ref)
        if was_on:
            try:
                self._power_off(facts, progress, source)
            except _CALL_ERRORS as exc:
                # The shutdown or power-off may have been sent: say where the VM is, running
                # again if it went down (a refusal says it keeps running; so does this, then).
                error = exc if isinstance(exc, DriverError) else translate(
                    exc, endpoint=self.endpoint, default=MigrationFailed,
                    context=f"vCenter did not power VM {vm.name} off for the cold move")
                if error is None:  # not a vCenter or connection error: the portal's bug
                    raise
                raise self._given_back(error, facts, source, was_on=True, off_at=time.monotonic()) from None
        else:
            progress(Phase.PRECHECK, 0.0, message=f"moving {vm.name} (it stays {vm.power})")
        off_at = time.monotonic()
        # The last moment to stop before anything moves: a VM we powered off runs again at once.
        reason = abort_reason(cancel_requested=cancel.is_set(), elapsed_s=time.monotonic() - started,
                              timeout_s=spec.timeout_s)
        if reason is not None:
            stopped: DriverError = (
                MigrationCancelled(f"cold move of VM {vm.name} cancelled before it moved")
                if reason == "cancel" else
                MigrationTimedOut(f"cold move of VM {vm.name} did not move within {spec.timeout_s:g} s")
            )
            raise self._given_back(stopped, facts, source, was_on=was_on, off_at=off_at) from None
        try:
            task = self._relocate(spec, facts)
            task_id = task._moId
            steps = ([f"registering it on {facts.host.name}"] if facts.host is not None else []) + (
                [f"copying its disks to {facts.datastore.name}"] if facts.datastore is not None else [])
            progress(Phase.DISK_COPY, RELOCATION_SPAN[0], task_id=task_id,
                     message=f"relocating {vm.name} while it is {'suspended' if vm.power == 'suspended' else 'off'}: "
                             + ", ".join(steps))
            at_once = self._run(lambda s: self._ended_at_once(s, [(task, spec)], started=started,
                                                              cancels=[cancel]))[0]
            end, placement = self._follow_move(spec, facts, task, progress, phase=Phase.DISK_COPY, started=started,
                                               cancel=cancel, at_once=at_once, span=RELOCATION_SPAN)
        except _CALL_ERRORS as exc:
            error = translate(exc, endpoint=self.endpoint, default=MigrationFailed,
                              context=f"vCenter did not move VM {vm.name}")
            if error is None:  # not a vCenter or connection error: the portal's bug
                raise
            if error.code == "abort-unconfirmed":  # the task may still move it: powering it on now would race it
                raise type(error)(f"{error.message}; VM {vm.name} is powered off meanwhile", code=error.code) from None
            raise self._given_back(error, facts, source, was_on=was_on, off_at=off_at) from None

        target = facts.host.name if facts.host is not None else source
        if was_on:
            progress(Phase.SWITCHOVER, RELOCATION_SPAN[1], task_id=task_id, message=f"powering {vm.name} on at {target}")
            failure = self._power_on(vm.ref)
            if failure is not None:
                raise MigrationFailed(
                    f"VM {vm.name} moved to {target} but did not power on there ({fault_text(failure)}): "
                    f"it is left powered off on {target}",
                    hypervisor_message=fault_text(failure), code="power-on-failed") from None
        if placement is None:
            placement = self._run(lambda s: self._placement(s, spec.vm_ref))
        message = (f"VM {vm.name} cold-moved to {target} and running again" if was_on
                   else f"VM {vm.name} moved to {target}; it stays {vm.power}")
        if end.aborted:
            message += f" (the {end.aborted} came too late: vCenter no longer allowed cancelling the task)"
        progress(Phase.DONE, 100.0, task_id=task_id, message=message)
        took = time.monotonic() - started
        return MigrationResult(placement=placement, task_id=task_id, duration_s=took, message=message,
                               downtime_ms=1000.0 * (time.monotonic() - off_at) if was_on else None)

    # -- steps ------------------------------------------------------------------------------
    def _power_off(self, facts: MoveFacts, progress: _ProgressReporter, source: str) -> None:
        """Bring a running VM down: the guest shuts itself down where VMware Tools runs (bounded
        by guest_shutdown_s), else (or then) a power-off. Raises, the VM still running, when
        vCenter refuses the power-off."""
        vm = facts.vm
        obj = vim.VirtualMachine(vm.ref, self._stub)
        if vm.tools_running:
            progress(Phase.PRECHECK, 0.0, message=f"shutting down the guest of {vm.name} (VMware Tools)")
            try:
                self._run(lambda s: obj.ShutdownGuest())
            except vmodl.MethodFault as fault:  # Tools stopped answering, the method is disabled...
                why = f"vCenter could not ask its guest to shut down ({fault_text(fault)})"
            else:
                state = self._run(lambda s: wait_for_power_state(s, obj, "poweredOff", task_wait_s=self.task_wait_s,
                                                                 bound_s=self.guest_shutdown_s))
                if state == "poweredOff":
                    progress(Phase.PRECHECK, 5.0, message=f"the guest of {vm.name} shut down on {source}")
                    return
                why = f"its guest did not shut down within {self.guest_shutdown_s:g} s"
            log.info("powering %s off: %s", vm.name, why)
            progress(Phase.PRECHECK, 1.0, message=f"powering {vm.name} off: {why}")
        else:
            progress(Phase.PRECHECK, 0.0, message=f"powering {vm.name} off for a cold move (VMware Tools not running)")
        refused = f"VM {vm.name} could not be powered off for the cold move; it keeps running on {source}"
        try:
            end = self._run(lambda s: self._follow(s, obj.PowerOffVM_Task()))
        except vmodl.MethodFault as fault:
            raise domain_error(fault, default=MigrationFailed, context=refused) from None
        if end.state != "success" and not self._is_off(vm.ref):  # off meanwhile (a slow guest shutdown): fine
            if end.error is not None:
                raise domain_error(end.error, default=MigrationFailed, context=refused)
            raise MigrationFailed(f"{refused} (the power-off task ended {end.state})")
        progress(Phase.PRECHECK, 5.0, message=f"{vm.name} powered off on {source}")

    def _power_on(self, vm_ref: str) -> BaseException | None:
        """PowerOnVM_Task where the VM is now; None when it runs, else what kept it off."""
        try:
            end = self._run(lambda s: self._follow(s, vim.VirtualMachine(vm_ref, self._stub).PowerOnVM_Task()))
        except _CALL_ERRORS as exc:
            return exc
        if end.state == "success":
            return None
        return end.error or MigrationFailed(f"the power-on ended in state {end.state}")

    def _given_back(self, error: DriverError, facts: MoveFacts, source: str, *, was_on: bool,
                    off_at: float) -> DriverError:
        """``error`` (of the same class) saying what became of the VM: a VM this move powered off
        is powered on again on its source first, and the owner learns it was off, or is still."""
        vm = facts.vm
        try:
            off = self._is_off(vm.ref) if was_on else True
        except _CALL_ERRORS:
            off = None
        if not was_on:
            note = f"VM {vm.name} stays {vm.power} on {source}"
        elif off is False:
            note = f"VM {vm.name} keeps running on its source host {source}"
        elif off is None:
            note = (f"vCenter could not say whether VM {vm.name} still runs: it may be left powered off on its "
                    f"source host {source}")
        else:
            failure = self._power_on(vm.ref)
            if failure is None:
                note = (f"VM {vm.name} was powered off for {time.monotonic() - off_at:.0f} s and runs again "
                        f"on its source host {source}")
            else:
                note = (f"powering it on again failed ({fault_text(failure)}): VM {vm.name} is left powered off "
                        f"on its source host {source}")
        log.warning("cold move of %s did not happen: %s; %s", vm.name, error.explanation(), note)
        return type(error)(f"{error.message}; {note}", hypervisor_message=error.hypervisor_message, code=error.code)

    def _is_off(self, vm_ref: str) -> bool:
        return self._run(lambda s: wait_for_power_state(s, vim.VirtualMachine(vm_ref, self._stub), "poweredOff",
                                                        task_wait_s=1, bound_s=0)) == "poweredOff"

    def _host_name(self, host_ref: str) -> str:
        """A host's name for the messages a VM's owner reads (its ref if vCenter cannot say)."""
        try:
            objects = self._run(lambda s: retrieve(s, [PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=vim.HostSystem(host_ref, self._stub))],
                propSet=[PC.PropertySpec(type=vim.HostSystem, pathSet=["name"])])], page_size=1))
        except _CALL_ERRORS as exc:
            log.info("could not read the name of host %s: %s", host_ref, exc)
            return host_ref
        return str(props_of(objects[0]).get("name", host_ref)) if objects else host_ref
