"""A simulated datacenter, the portal's demo driver.

It is a full driver, not a mock: it owns an inventory (datacenters, clusters, hosts, datastores that
only some hosts see, VMs of varied sizes), validates moves the way a hypervisor would, and runs
compute and storage migrations whose duration follows the VM's memory and disk size and the link
bandwidth: pre-check, disk copy, memory pre-copy passes that converge (or not) against a dirty
rate, switchover, done. ``speed`` compresses time (speed 50 = fifty times faster than real) so tests
run quickly. It fails on cue, driven by VM tags:

- ``sim:fail-at-switchover``: the switchover step fails (as when the target cannot resume the VM);
- ``sim:never-converge``: memory is dirtied faster than the link copies it, so pre-copy never ends
  and the run must be cancelled or time out.

A cold move (``cold_move``) powers the VM off, copies its disks if the datastore changes, registers
it on the target host and powers it on again if it ran: it works for powered-off VMs and for hosts
that do not see the VM's datastore (with a datastore they do see).

Options (ConnectionConfig.options): seed, datacenters, clusters, hosts_per_cluster, datastores, vms,
speed, bandwidth_bytes_per_s, state_file. With ``state_file`` the state lives in a JSON file shared
by every process (the web server and the workers see the same placements); without it, in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from drivers.base import (
    Capability,
    Cluster,
    ConnectionConfig,
    Datacenter,
    Datastore,
    Disk,
    Driver,
    Host,
    InsufficientResources,
    InvalidState,
    Inventory,
    MigrationCancelled,
    MigrationFailed,
    MigrationResult,
    MigrationSpec,
    MigrationTimedOut,
    Network,
    NotFound,
    Phase,
    Placement,
    PowerState,
    ProgressCallback,
    ProgressUpdate,
    TaskInfo,
    TaskState,
    VirtualMachine,
)

GiB = 1024**3
TAG_FAIL_AT_SWITCHOVER = "sim:fail-at-switchover"
TAG_NEVER_CONVERGE = "sim:never-converge"
_ABORT_CHECK_S = 0.25  # real seconds between two looks for an abort asked by another process

_OWNERS = ("team-web", "team-data", "team-ops")
_MEMORY_GIB = (1, 2, 4, 8, 16)
_DISK_GIB = (10, 20, 40, 80)
_ROLES = ("web", "db", "app", "cache", "batch")


@dataclass(frozen=True)
class _Timing:
    """Simulated physics of one move; pure numbers so it can be reasoned about in tests."""

    bandwidth: float  # bytes per simulated second
    dirty_rate: float  # bytes dirtied per simulated second during pre-copy
    switchover_budget: float  # remaining bytes that fit in the allowed downtime


def _default_state(opts: dict) -> dict:
    """Generate a deterministic datacenter from the options."""
    rnd = random.Random(int(opts.get("seed", 42)))
    n_dc = int(opts.get("datacenters", 1))
    n_clusters = int(opts.get("clusters", 2))
    per_cluster = int(opts.get("hosts_per_cluster", 3))
    n_ds = int(opts.get("datastores", 3))
    n_vms = int(opts.get("vms", 30))
    if n_clusters < 1 or per_cluster < 1 or n_ds < 1:
        raise ValueError("the simulator needs at least one cluster, one host and one datastore")

    datacenters = [{"ref": f"dc-{d}", "name": f"DC{d}"} for d in range(n_dc)]
    clusters, hosts = [], []
    for c in range(n_clusters):
        dc = datacenters[c % n_dc]
        clusters.append({"ref": f"cluster-{c}", "name": f"Cluster-{c}", "dc": dc["ref"]})
        for h in range(per_cluster):
            hosts.append(
                {
                    "ref": f"host-{c}-{h}",
                    "name": f"esx-{c:02d}-{h:02d}.lab",
                    "cluster": f"cluster-{c}",
                    "connected": True,
                    "maintenance": False,
                    "memory": 512 * GiB,
                }
            )
    if len(hosts) > 3:
        hosts[-1]["maintenance"] = True  # one host in maintenance, to show why it is not offered

    # Datastore 0 is shared by every host; the others are seen by one cluster each.
    datastores = []
    for i in range(n_ds):
        if i == 0:
            seen = [h["ref"] for h in hosts]
            name = "shared-ds"
        else:
            cl = f"cluster-{(i - 1) % n_clusters}"
            seen = [h["ref"] for h in hosts if h["cluster"] == cl]
            name = f"{cl}-ds-{i}"
        capacity = (4096 if i == 0 else 2048) * GiB
        datastores.append({"ref": f"ds-{i}", "name": name, "capacity": capacity, "used": 0, "hosts": seen})

    vms = []
    active_hosts = [h for h in hosts if not h["maintenance"]]
    for i in range(n_vms):
        host = active_hosts[i % len(active_hosts)]
        visible = [d for d in datastores if host["ref"] in d["hosts"]]
        ds = visible[(i // len(active_hosts)) % len(visible)]
        disks = []
        for k in range(1 if i % 3 else 2):
            size = rnd.choice(_DISK_GIB) * GiB
            disks.append({"key": f"disk-{k}", "label": f"Hard disk {k + 1}", "ds": ds["ref"], "size": size})
            ds["used"] += size
        tags = ["env:production" if i % 4 == 0 else "env:dev"]
        if i == n_vms - 1:
            tags.append(TAG_FAIL_AT_SWITCHOVER)
        if i == n_vms - 2:
            tags.append(TAG_NEVER_CONVERGE)
        role = _ROLES[i % len(_ROLES)]
        vms.append(
            {
                "ref": f"vm-{i}",
                "name": f"{role}-{i:02d}",
                "host": host["ref"],
                "power": "off" if i == 7 else "on",
                "memory": rnd.choice(_MEMORY_GIB) * GiB,
                "vcpus": rnd.choice((1, 2, 4, 8)),
                "disks": disks,
                "owner": _OWNERS[i % len(_OWNERS)],
                "tags": tags,
                "folder": f"/{_OWNERS[i % len(_OWNERS)]}",
            }
        )
    return {
        "datacenters": datacenters,
        "clusters": clusters,
        "hosts": hosts,
        "datastores": datastores,
        "vms": vms,
        "tasks": {},
        "task_counter": 0,
    }


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SimulatorDriver(Driver):
    """The demo driver: a simulated datacenter in this process (or shared through a state file)."""

    kind = "simulator"
    capabilities = (
        Capability.COMPUTE_MIGRATION
        | Capability.STORAGE_MIGRATION
        | Capability.COMBINED_MIGRATION
        | Capability.CANCEL
        | Capability.PROGRESS
        | Capability.TASK_LOOKUP
        | Capability.TASKS_BY_VM
        | Capability.TASK_ABORT
        | Capability.COLD_MOVE
    )

    def __init__(self, config: ConnectionConfig):
        super().__init__(config)
        opts = dict(config.options)
        self.speed = float(opts.get("speed", 1.0))
        if self.speed <= 0:
            raise ValueError("speed must be positive")
        self.bandwidth = float(opts.get("bandwidth_bytes_per_s", 1.0 * GiB))
        self.tick = float(opts.get("tick_s", 0.1))  # real seconds between progress reports
        self.state_file = str(opts.get("state_file") or "")
        self._lock = threading.RLock()
        self._opts = opts
        self._memory_state: dict | None = None
        if self.state_file and not os.path.exists(self.state_file):
            with self._state() as state:
                state.update(_default_state(opts))

    # -- state ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _state(self) -> Iterator[dict]:
        """The state, locked for this block, and written back after it."""
        with self._lock:
            if not self.state_file:
                if self._memory_state is None:
                    self._memory_state = _default_state(self._opts)
                yield self._memory_state
                return
            with open(self.state_file + ".lock", "a") as lock_fh:
                fcntl.flock(lock_fh, fcntl.LOCK_EX)
                try:
                    try:
                        with open(self.state_file) as fh:
                            state = json.load(fh)
                    except (FileNotFoundError, json.JSONDecodeError):
                        state = {}
                    yield state
                    tmp = f"{self.state_file}.{os.getpid()}.tmp"
                    with open(tmp, "w") as fh:
                        json.dump(state, fh)
                    os.replace(tmp, self.state_file)
                finally:
                    fcntl.flock(lock_fh, fcntl.LOCK_UN)

    @staticmethod
    def _find(items: list[dict], ref: str | None, what: str) -> dict:
        for item in items:
            if item["ref"] == ref:
                return item
        raise NotFound(f"{what} {ref!r} does not exist")

    # -- read side --------------------------------------------------------------------------
    def describe(self) -> str:
        return f"Simulated datacenter (speed x{self.speed:g})"

    def inventory(self) -> Inventory:
        with self._state() as s:
            return Inventory(
                datacenters=tuple(Datacenter(d["ref"], d["name"]) for d in s["datacenters"]),
                clusters=tuple(Cluster(c["ref"], c["name"], c["dc"]) for c in s["clusters"]),
                hosts=tuple(
                    Host(
                        ref=h["ref"],
                        name=h["name"],
                        cluster_ref=h["cluster"],
                        connected=h["connected"],
                        maintenance=h["maintenance"],
                        memory_bytes=h["memory"],
                        cpu_model="Simulated Xeon",
                    )
                    for h in s["hosts"]
                ),
                datastores=tuple(
                    Datastore(
                        ref=d["ref"],
                        name=d["name"],
                        capacity_bytes=d["capacity"],
                        free_bytes=d["capacity"] - d["used"],
                        host_refs=tuple(d["hosts"]),
                    )
                    for d in s["datastores"]
                ),
                networks=(Network("net-0", "VM Network", tuple(h["ref"] for h in s["hosts"])),),
                vms=tuple(self._vm(v) for v in s["vms"]),
            )

    @staticmethod
    def _vm(v: dict) -> VirtualMachine:
        return VirtualMachine(
            ref=v["ref"],
            name=v["name"],
            host_ref=v["host"],
            power_state=PowerState(v["power"]),
            memory_bytes=v["memory"],
            vcpus=v["vcpus"],
            disks=tuple(
                Disk(d["key"], d["label"], d["ds"], d["size"], f"[{d['ds']}] {v['name']}/{d['key']}.vmdk")
                for d in v["disks"]
            ),
            owner=v["owner"],
            tags=tuple(v["tags"]),
            folder=v["folder"],
        )

    def placement(self, vm_ref: str) -> Placement:
        with self._state() as s:
            vm = self._find(s["vms"], vm_ref, "VM")
            return Placement(vm["host"], {d["key"]: d["ds"] for d in vm["disks"]})

    def task_info(self, task_id: str) -> TaskInfo:
        with self._state() as s:
            task = s["tasks"].get(task_id)
        if task is None:
            return TaskInfo(task_id, TaskState.UNKNOWN, "no such task")
        return self._task_info(task_id, task)

    @staticmethod
    def _task_info(task_id: str, task: dict) -> TaskInfo:
        if task["state"] == TaskState.RUNNING.value and not _process_alive(task.get("pid")):
            return TaskInfo(task_id, TaskState.FAILED, "the process running this migration died before it completed")
        return TaskInfo(task_id, TaskState(task["state"]), task.get("message", ""))

    def migration_tasks(self, vm_ref: str, *, since: float) -> tuple[TaskInfo, ...]:
        """Every migration task started on the VM since ``since``: the simulated hypervisor keeps
        them all (``tasks`` in the state, with the VM and the start time of each)."""
        with self._state() as s:
            mine = [(t.get("started", 0.0), tid, t) for tid, t in s["tasks"].items()
                    if t.get("vm") == vm_ref and t.get("started", 0.0) >= since]
        return tuple(self._task_info(tid, t) for _, tid, t in sorted(mine, key=lambda x: (x[0], x[1])))

    def cancel_task(self, task_id: str) -> TaskInfo:
        """Flag the task for abort; its migration loop stops at its next abort check. Waits up to
        two seconds (real time) for the task to end and returns its state then."""
        with self._state() as s:
            task = s["tasks"].get(task_id)
            if task is not None and task["state"] == TaskState.RUNNING.value:
                task["abort"] = True
        deadline = time.monotonic() + 2.0
        while True:
            info = self.task_info(task_id)
            if info.state != TaskState.RUNNING or time.monotonic() > deadline:
                return info
            threading.Event().wait(self.tick)  # the simulated hypervisor's own clock

    def _abort_requested(self, task_id: str) -> bool:
        with self._state() as s:
            return bool(s["tasks"].get(task_id, {}).get("abort"))

    # -- write side -------------------------------------------------------------------------
    def _targets(self, s: dict, spec: MigrationSpec) -> tuple[dict, dict | None, dict | None]:
        """The VM, target host and target datastore a spec names (NotFound for an unknown one)."""
        vm = self._find(s["vms"], spec.vm_ref, "VM")
        host = self._find(s["hosts"], spec.target_host_ref, "host") if spec.target_host_ref else None
        ds = self._find(s["datastores"], spec.target_datastore_ref, "datastore") if spec.target_datastore_ref else None
        return vm, host, ds

    @staticmethod
    def _check_usable(host: dict) -> None:
        if not host["connected"]:
            raise InvalidState(f"host {host['name']} is not connected")
        if host["maintenance"]:
            raise InvalidState(f"host {host['name']} is in maintenance mode")

    def _validate(self, s: dict, spec: MigrationSpec) -> tuple[dict, dict | None, dict | None]:
        vm, host, ds = self._targets(s, spec)
        if vm["power"] != "on":
            raise InvalidState(f"VM {vm['name']} is powered {vm['power']}; a live migration needs it running")
        if host is not None:
            if host["ref"] == vm["host"]:
                raise InvalidState(f"VM {vm['name']} already runs on {host['name']}")
            source = self._find(s["hosts"], vm["host"], "host")
            if host["cluster"] != source["cluster"]:
                raise InvalidState(f"{host['name']} is in another cluster than {source['name']}")
            self._check_usable(host)
        final_host = host["ref"] if host else vm["host"]
        if ds is not None:
            if all(d["ds"] == ds["ref"] for d in vm["disks"]):
                raise InvalidState(f"every disk of {vm['name']} is already on {ds['name']}")
            if final_host not in ds["hosts"]:
                raise InvalidState(f"datastore {ds['name']} is not mounted on the target host")
            moving = sum(d["size"] for d in vm["disks"] if d["ds"] != ds["ref"])
            if ds["capacity"] - ds["used"] < moving:
                raise InsufficientResources(
                    f"datastore {ds['name']} has {(ds['capacity'] - ds['used']) / GiB:.0f} GiB free; "
                    f"{vm['name']} needs {moving / GiB:.0f} GiB"
                )
        else:
            for disk in vm["disks"]:
                if final_host not in self._find(s["datastores"], disk["ds"], "datastore")["hosts"]:
                    raise InvalidState(
                        f"the target host does not see datastore {disk['ds']}; move the storage too"
                    )
        return vm, host, ds

    def _place(self, s: dict, vm_ref: str, host: dict | None, ds: dict | None) -> dict:
        """Put the VM on its new host and/or its disks on the new datastore (moving the space used)."""
        live = self._find(s["vms"], vm_ref, "VM")
        if host is not None:
            live["host"] = host["ref"]
        if ds is not None:
            for disk in live["disks"]:
                if disk["ds"] != ds["ref"]:
                    self._find(s["datastores"], disk["ds"], "datastore")["used"] -= disk["size"]
                    self._find(s["datastores"], ds["ref"], "datastore")["used"] += disk["size"]
                    disk["ds"] = ds["ref"]
        return live

    def _new_task(self, s: dict, vm_ref: str) -> str:
        s["task_counter"] = int(s.get("task_counter", 0)) + 1
        task_id = f"sim-task-{s['task_counter']}"
        # The simulated hypervisor job lives in this process: record which one, so that a lookup
        # after this process died reports the truth (the move never completed).
        # The VM and the start time are the hypervisor's own record of every start (crash recovery
        # looks a task up by VM when the worker died before it stored the task id).
        s["tasks"][task_id] = {"state": TaskState.RUNNING.value, "pid": os.getpid(), "vm": vm_ref,
                               "started": time.time()}
        return task_id

    def _finish_task(self, task_id: str, state: TaskState, message: str = "") -> None:
        with self._state() as s:
            s["tasks"][task_id].update(state=state.value, message=message)

    def migrate(
        self,
        spec: MigrationSpec,
        *,
        on_progress: ProgressCallback,
        cancel: threading.Event,
    ) -> MigrationResult:
        started = time.monotonic()
        with self._state() as s:
            vm, host, ds = self._validate(s, spec)
            task_id = self._new_task(s, spec.vm_ref)
        on_progress(ProgressUpdate(Phase.PRECHECK, 0.0, task_id=task_id, message="checking the move"))

        disk_bytes = sum(d["size"] for d in vm["disks"]) if ds is not None else 0
        mem_bytes = vm["memory"] if host is not None else 0
        total = disk_bytes + mem_bytes
        tags = set(vm["tags"])
        dirty_rate = self.bandwidth * (1.5 if TAG_NEVER_CONVERGE in tags else 0.12)
        timing = _Timing(self.bandwidth, dirty_rate, switchover_budget=self.bandwidth * 0.05)
        state = {"percent": 0.0}

        def report(phase: Phase, done: float, rate: float, **extra) -> None:
            # Data phases span 2..97 %; percent never goes back.
            pct = 2.0 + 95.0 * (min(done, total) / total if total else 1.0)
            state["percent"] = max(state["percent"], min(pct, 97.0))
            remaining = max(total - done, 0)
            on_progress(
                ProgressUpdate(
                    phase,
                    round(state["percent"], 2),
                    bytes_done=int(min(done, total)),
                    bytes_total=total,
                    rate_bytes_per_s=rate,
                    eta_s=remaining / rate if rate else None,
                    task_id=task_id,
                    **extra,
                )
            )

        next_abort_check = [time.monotonic() + _ABORT_CHECK_S]

        def wait_tick() -> float:
            """Let one tick of real time pass (or a cancel arrive); returns simulated seconds."""
            if cancel.wait(self.tick):
                self._finish_task(task_id, TaskState.CANCELLED, "cancelled by the portal")
                raise MigrationCancelled(f"migration of {vm['name']} cancelled; it stays where it was")
            if time.monotonic() >= next_abort_check[0]:
                # An abort asked by another process (cancel_task: the portal's watchdog).
                next_abort_check[0] = time.monotonic() + _ABORT_CHECK_S
                if self._abort_requested(task_id):
                    self._finish_task(task_id, TaskState.CANCELLED, "aborted on request")
                    raise MigrationCancelled(f"migration of {vm['name']} aborted; it stays where it was")
            if spec.timeout_s is not None and time.monotonic() - started > spec.timeout_s:
                self._finish_task(task_id, TaskState.FAILED, "timed out")
                raise MigrationTimedOut(
                    f"migration of {vm['name']} did not finish within {spec.timeout_s:.0f} s and was aborted"
                )
            return self.tick * self.speed

        rate = timing.bandwidth
        if spec.bandwidth_bytes_per_s:
            rate = min(rate, float(spec.bandwidth_bytes_per_s))
        jitter = random.Random(hash(task_id))

        done = 0.0
        # Pre-check takes a moment of simulated time too.
        wait_tick()
        if disk_bytes:
            copied = 0.0
            while copied < disk_bytes:
                r = rate * jitter.uniform(0.9, 1.05)
                copied += r * wait_tick()
                done = min(copied, disk_bytes)
                report(Phase.DISK_COPY, done, r)
        if mem_bytes:
            remaining = float(mem_bytes)
            sent_total = 0.0
            for iteration in itertools.count(1):
                pass_bytes = remaining
                pass_sent = 0.0
                pass_time = 0.0
                while pass_sent < pass_bytes:
                    r = rate * jitter.uniform(0.9, 1.05)
                    # A tick may hold more simulated time than this pass needs: count only that.
                    dt = min(wait_tick(), (pass_bytes - pass_sent) / r)
                    pass_sent += r * dt
                    pass_time += dt
                    sent_total += r * dt
                    report(
                        Phase.MEMORY_PRECOPY,
                        disk_bytes + min(sent_total, mem_bytes),
                        r,
                        iteration=iteration,
                        remaining_bytes=int(max(pass_bytes - pass_sent, 0)),
                    )
                remaining = min(float(mem_bytes), timing.dirty_rate * pass_time)
                if remaining <= timing.switchover_budget:
                    break
            done = total
        on_progress(
            ProgressUpdate(
                Phase.SWITCHOVER,
                max(state["percent"], 98.0),
                bytes_done=total,
                bytes_total=total,
                task_id=task_id,
                message="switching over",
            )
        )
        wait_tick()
        if TAG_FAIL_AT_SWITCHOVER in tags:
            self._finish_task(task_id, TaskState.FAILED, "switchover failed")
            raise MigrationFailed(
                f"switchover of {vm['name']} failed; the VM keeps running on its source",
                hypervisor_message="Failed to resume the virtual machine on the destination host",
            )

        with self._state() as s:
            live = self._place(s, spec.vm_ref, host, ds)
            s["tasks"][task_id].update(state=TaskState.SUCCEEDED.value, message="")
            placement = Placement(live["host"], {d["key"]: d["ds"] for d in live["disks"]})
        on_progress(
            ProgressUpdate(Phase.DONE, 100.0, bytes_done=total, bytes_total=total, task_id=task_id, message="done")
        )
        downtime = 1000.0 * timing.switchover_budget / timing.bandwidth if mem_bytes else 0.0
        return MigrationResult(
            placement=placement,
            task_id=task_id,
            downtime_ms=round(downtime, 1),
            duration_s=time.monotonic() - started,
            message=f"{vm['name']} moved",
        )

    # -- cold move ---------------------------------------------------------------------------
    def _validate_cold(self, s: dict, spec: MigrationSpec) -> tuple[dict, dict | None, dict | None]:
        vm, host, ds = self._targets(s, spec)
        if host is not None:
            if host["ref"] == vm["host"] and ds is None:
                raise InvalidState(f"VM {vm['name']} already runs on {host['name']}")
            self._check_usable(host)
        final_host = host["ref"] if host else vm["host"]
        if ds is not None:
            if final_host not in ds["hosts"]:
                raise InvalidState(f"datastore {ds['name']} is not mounted on the target host")
            moving = sum(d["size"] for d in vm["disks"] if d["ds"] != ds["ref"])
            if ds["capacity"] - ds["used"] < moving:
                raise InsufficientResources(
                    f"datastore {ds['name']} has {(ds['capacity'] - ds['used']) / GiB:.0f} GiB free; "
                    f"{vm['name']} needs {moving / GiB:.0f} GiB"
                )
        elif any(final_host not in self._find(s["datastores"], d["ds"], "datastore")["hosts"] for d in vm["disks"]):
            raise InvalidState("the target host does not see the VM's datastore; move the storage too")
        return vm, host, ds

    def cold_move(
        self,
        spec: MigrationSpec,
        *,
        on_progress: ProgressCallback,
        cancel: threading.Event,
    ) -> MigrationResult:
        """Power off, copy the disks (if the datastore changes), register on the target, power on
        again if it ran. Cancelled or timed out before the switch, the VM is back as it was."""
        started = time.monotonic()
        with self._state() as s:
            vm, host, ds = self._validate_cold(s, spec)
            task_id = self._new_task(s, spec.vm_ref)
            was_on = vm["power"] == "on"
            self._find(s["vms"], spec.vm_ref, "VM")["power"] = "off"
        moving = sum(d["size"] for d in vm["disks"] if ds is not None and d["ds"] != ds["ref"])
        rate = min(self.bandwidth, float(spec.bandwidth_bytes_per_s or self.bandwidth))
        on_progress(ProgressUpdate(Phase.PRECHECK, 0.0, bytes_total=moving, task_id=task_id,
                                   message="powered off for a cold move" if was_on else "checking the move"))

        def give_back(state: TaskState, message: str) -> None:
            with self._state() as st:
                if was_on:
                    self._find(st["vms"], spec.vm_ref, "VM")["power"] = "on"
                st["tasks"][task_id].update(state=state.value, message=message)

        copied = 0.0
        while True:
            if cancel.wait(self.tick):
                give_back(TaskState.CANCELLED, "cancelled by the portal")
                raise MigrationCancelled(f"cold move of {vm['name']} cancelled; it is back where it was")
            if spec.timeout_s is not None and time.monotonic() - started > spec.timeout_s:
                give_back(TaskState.FAILED, "timed out")
                raise MigrationTimedOut(f"cold move of {vm['name']} did not finish within {spec.timeout_s:.0f} s")
            if copied >= moving:
                break
            copied = min(float(moving), copied + rate * self.tick * self.speed)
            on_progress(ProgressUpdate(Phase.DISK_COPY, 2.0 + 95.0 * copied / moving, bytes_done=int(copied),
                                       bytes_total=moving, rate_bytes_per_s=rate, task_id=task_id,
                                       eta_s=(moving - copied) / rate))
        with self._state() as s:
            live = self._place(s, spec.vm_ref, host, ds)
            live["power"] = "on" if was_on else "off"
            s["tasks"][task_id].update(state=TaskState.SUCCEEDED.value, message="")
            placement = Placement(live["host"], {d["key"]: d["ds"] for d in live["disks"]})
        on_progress(ProgressUpdate(Phase.DONE, 100.0, bytes_done=moving, bytes_total=moving, task_id=task_id,
                                   message="powered on at the target" if was_on else "moved (it stays powered off)"))
        took = time.monotonic() - started
        return MigrationResult(placement=placement, task_id=task_id, downtime_ms=1000.0 * took if was_on else None,
                               duration_s=took, message=f"{vm['name']} cold-moved")
