"""Building a plan: read the cluster from the portal's inventory, ask the planner
(``migrations_app.placement``), and store the draft with a target (or a blocker) per VM."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction

from drivers.base import Capability
from migrations_app import access, admission, placement
from migrations_app.choices import (
    TERMINAL,
    AuditAction,
    MigrationKind,
    PlanFallback,
    PlanKind,
    PowerState,
    RequestStatus,
)
from migrations_app.models import (
    Cluster,
    Datastore,
    Host,
    MigrationRequest,
    MigrationRun,
    MovePlan,
    PlanItem,
    VirtualMachine,
)
from migrations_app.services.audit import audit_denied
from migrations_app.services.errors import ActionRefused
from migrations_app.services.plans._common import audit_plan


def _vm_blocker(vm: VirtualMachine, open_vm_ids: set[int]) -> str:
    """What keeps a VM from any move, live or cold ('' when nothing does)."""
    if vm.pk in open_vm_ids:
        return "it already has an open migration request"
    if vm.power_state == PowerState.SUSPENDED:
        return "suspended; resume or power it off first"
    return ""


def _kind(target_host_id: int | None, target_datastore_id: int | None) -> str:
    if target_host_id and target_datastore_id:
        return MigrationKind.BOTH
    return MigrationKind.STORAGE if target_datastore_id else MigrationKind.COMPUTE


def _capacities(connection, cluster: Cluster, *, compute: bool) -> tuple[list[placement.HostCap], list[placement.StoreCap],
                                                         list[placement.VMInfo]]:
    """The cluster as the planner sees it, read from the portal's inventory."""
    hosts = list(Host.objects.filter(connection=connection, cluster=cluster, present=True)
                 .prefetch_related("datastores").order_by("pk"))
    copies_local = connection.supports(Capability.COMPUTE_COPIES_LOCAL_DISKS)
    host_caps = [placement.HostCap(id=h.pk, name=h.name, cluster_id=h.cluster_id, memory_bytes=h.memory_bytes,
                                   usable=h.usable, unusable_reason=h.unusable_reason(),
                                   datastore_ids=frozenset(d.pk for d in h.datastores.all()))
                 for h in hosts]
    stores = list(Datastore.objects.filter(connection=connection, present=True).prefetch_related("hosts")
                  .order_by("pk"))
    store_caps = [placement.StoreCap(id=d.pk, name=d.name, free_bytes=d.free_bytes,
                                     host_ids=frozenset(h.pk for h in d.hosts.all()), usable=d.accessible)
                  for d in stores]
    vms = list(VirtualMachine.objects.filter(connection=connection, host__in=hosts, present=True)
               .prefetch_related("disks").order_by("pk"))
    open_ids = set(MigrationRequest.objects.filter(vm__in=vms).exclude(status__in=TERMINAL)
                   .values_list("vm_id", flat=True))
    vm_infos = []
    for vm in vms:
        by_store: dict[int, int] = {}
        for disk in vm.disks.all():
            by_store[disk.datastore_id] = by_store.get(disk.datastore_id, 0) + disk.capacity_bytes
        vm_infos.append(placement.VMInfo(
            id=vm.pk, name=vm.name, host_id=vm.host_id, memory_bytes=vm.memory_bytes,
            disk_bytes=sum(by_store.values()),
            # A driver that copies local disks along (libvirt) needs no shared datastore for a compute move.
            datastore_ids=frozenset() if compute and copies_local else frozenset(by_store),
            tags=tuple(vm.tags or ()), blocker=_vm_blocker(vm, open_ids), powered_on=vm.power_state == PowerState.ON,
            disk_bytes_by_store=tuple(sorted(by_store.items()))))
    return host_caps, store_caps, vm_infos


def _estimator(connection, kind: str) -> placement.Estimator:
    """Link speed from the connection's options (the simulator's speed compresses time); as many
    moves at once as admission control lets leave one host (or datastore); the fixed cost of a
    move calibrated on this connection's recent successful moves of the same kind."""
    options = connection.options or {}
    bandwidth = float(options.get("bandwidth_bytes_per_s") or placement.GiB) * float(options.get("speed") or 1.0)
    limits = admission.Limits.for_connection(connection.kind, options)
    if kind == PlanKind.EVACUATE_DATASTORE:
        parallel = min(limits.datastore_max // max(1, limits.datastore_storage),
                       limits.host_max // max(1, limits.host_storage))
    else:
        parallel = min(limits.host_max // max(1, limits.host_compute), limits.network_max)
    move_kind = MigrationKind.STORAGE if kind == PlanKind.EVACUATE_DATASTORE else MigrationKind.COMPUTE
    recent = (MigrationRun.objects.filter(request__vm__connection=connection, request__kind=move_kind,
                                          request__status=RequestStatus.SUCCEEDED, started_at__isnull=False,
                                          finished_at__isnull=False)
              .order_by("-finished_at").values_list("started_at", "finished_at", "bytes_total")[:50])
    history = [((end - start).total_seconds(), copied) for start, end, copied in recent]
    return placement.Estimator(bandwidth_bytes_per_s=bandwidth, parallel=max(1, parallel)).calibrated(history)


def move_plan_build(*, requester, kind: str, reason: str, host: Host | None = None, datastore: Datastore | None = None,
                    cluster: Cluster | None = None, ip: str | None = None) -> MovePlan:
    """Plan an evacuation (of ``host`` or ``datastore``) or a rebalance (of ``cluster``): a draft
    with a target per VM, the VMs that cannot move (fallback: skip), the order and the duration."""
    verdict = access.can_build_plan(requester)
    if not verdict:
        audit_denied(actor=requester, action=AuditAction.PLAN_BUILT, reason=verdict.reason, ip=ip,
                     object_type="move_plan")
        raise ActionRefused(verdict.reason, denied=True)
    reason = (reason or "").strip()
    if not reason:
        raise ActionRefused("say why (maintenance, storage upgrade...)", field="reason")
    subject = {PlanKind.EVACUATE_HOST: host, PlanKind.EVACUATE_DATASTORE: datastore,
               PlanKind.REBALANCE_CLUSTER: cluster}.get(kind, "unknown")
    if subject == "unknown":
        raise ActionRefused(f"unknown plan kind {kind!r}", field="kind")
    if subject is None:
        raise ActionRefused("choose what to evacuate or rebalance", field="subject")
    headroom = settings.PORTAL["PLAN_HOST_HEADROOM"]

    with transaction.atomic():
        if kind == PlanKind.EVACUATE_HOST:
            host = Host.objects.select_related("connection", "cluster").get(pk=host.pk)
            connection, clusters = host.connection, [host.cluster]
        elif kind == PlanKind.EVACUATE_DATASTORE:
            datastore = Datastore.objects.select_related("connection").get(pk=datastore.pk)
            connection = datastore.connection
            clusters = list(Cluster.objects.filter(hosts__datastores=datastore).distinct())
        else:
            cluster = Cluster.objects.select_related("datacenter__connection").get(pk=cluster.pk)
            connection, clusters = cluster.datacenter.connection, [cluster]
        estimator = _estimator(connection, kind)
        host_caps, store_caps, vms = [], [], []
        for c in clusters:
            h, s, v = _capacities(connection, c, compute=kind != PlanKind.EVACUATE_DATASTORE)
            host_caps += h
            store_caps, vms = s, vms + v
        cold = connection.supports(Capability.COLD_MOVE)
        if kind == PlanKind.EVACUATE_HOST:
            result = placement.plan_host_evacuation(source_host_id=host.pk, hosts=host_caps, vms=vms,
                                                    headroom=headroom, estimator=estimator,
                                                    cold_stores=store_caps if cold else None)
        elif kind == PlanKind.EVACUATE_DATASTORE:
            capacity = dict(Datastore.objects.filter(connection=connection).values_list("pk", "capacity_bytes"))
            result = placement.plan_datastore_evacuation(source_datastore_id=datastore.pk, stores=store_caps,
                                                         vms=vms, capacities=capacity, estimator=estimator,
                                                         cold=cold)
        else:
            result = placement.recommend_rebalance(hosts=host_caps, vms=vms, headroom=headroom,
                                                   estimator=estimator)
        plan = MovePlan.objects.create(
            kind=kind, connection=connection, requester=requester, reason=reason,
            subject_host=host if kind == PlanKind.EVACUATE_HOST else None,
            subject_datastore=datastore if kind == PlanKind.EVACUATE_DATASTORE else None,
            subject_cluster=cluster if kind == PlanKind.REBALANCE_CLUSTER else None,
            estimated_duration_s=round(result.estimated_duration_s, 1),
            imbalance_before=result.imbalance_before, imbalance_after=result.imbalance_after,
        )
        source_of = {v.id: v.host_id for v in vms}
        max_attempts = max(1, settings.PORTAL["PLAN_MAX_ATTEMPTS"])
        items = [
            PlanItem(plan=plan, vm_id=m.vm_id, order=m.order, source_host_id=source_of[m.vm_id],
                     kind=_kind(m.target_host_id, m.target_datastore_id),
                     target_host_id=m.target_host_id, target_datastore_id=m.target_datastore_id, why=m.why,
                     max_attempts=max_attempts)
            for m in result.moves
        ]
        stuck = sorted(result.unmovable.items(), key=lambda kv: next(v.name for v in vms if v.id == kv[0]))
        # A VM that cannot move live keeps its cold-move target (if any) for the fallback; skip by default.
        no_cold = placement.PlannedMove(vm_id=0, order=0)
        items += [
            PlanItem(plan=plan, vm_id=vm_id, order=len(result.moves) + n, source_host_id=source_of[vm_id],
                     kind=_kind(c.target_host_id, c.target_datastore_id) if c.why else (
                         MigrationKind.STORAGE if kind == PlanKind.EVACUATE_DATASTORE else MigrationKind.COMPUTE),
                     target_host_id=c.target_host_id, target_datastore_id=c.target_datastore_id, why=c.why,
                     movable=False, blocker=why[:500], fallback=PlanFallback.SKIP, max_attempts=max_attempts)
            for n, (vm_id, why) in enumerate(stuck, start=1)
            for c in [result.cold_moves.get(vm_id, no_cold)]
        ]
        PlanItem.objects.bulk_create(items)
        audit_plan(plan, actor=requester, action=AuditAction.PLAN_BUILT, reason=reason, ip=ip,
               data={"subject": plan.subject_name, "moves": len(result.moves), "unmovable": len(stuck),
                     "estimated_duration_s": plan.estimated_duration_s,
                     "imbalance": [result.imbalance_before, result.imbalance_after]})
    return plan


def fallback_choices(plan: MovePlan, item: PlanItem | None = None) -> list[tuple[str, str]]:
    """The fallbacks for a VM that cannot move live: skip, and a cold move where the plan's driver
    can cold-move and the planner found the VM a cold target (``item`` None: the plan's driver)."""
    out = [(PlanFallback.SKIP.value, PlanFallback.SKIP.label)]
    has_target = item is None or bool(item.target_host_id or item.target_datastore_id)
    if plan.connection.supports(Capability.COLD_MOVE) and has_target:
        out.append((PlanFallback.COLD_MOVE.value, PlanFallback.COLD_MOVE.label))
    return out
