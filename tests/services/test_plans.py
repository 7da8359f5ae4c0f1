"""Move-plan services: build, fallback, submit, approve into per-VM requests, bounded retries,
completion, cancel, reject, expiry; refusals change nothing and are audited."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from migrations_app.choices import (
    AuditAction,
    AuditOutcome,
    PlanItemStatus,
    PlanKind,
    PlanStatus,
    RequestStatus,
    Role,
)
from migrations_app.models import AuditEntry, Datastore, Host, MigrationRequest, MigrationRun, MovePlan, VirtualMachine
from migrations_app.services import plans as svc
from migrations_app.services.errors import ActionRefused
from migrations_app.services.preflight import check_move
from migrations_app.services.requests import migration_request_cancel
from migrations_app.services.runs import _claim, migration_run_execute
from tests.conftest import make_user
from tests.simdc import evacuation_state, simulated_connection

pytestmark = pytest.mark.django_db
P, Item, S = PlanStatus, PlanItemStatus, RequestStatus


@pytest.fixture(autouse=True)
def _one_approver(review_everything):
    """Plan mechanics under one approver for every move; the policy's part is in test_plan_approval.py."""


@pytest.fixture
def evac_dc(tmp_path):
    return simulated_connection(tmp_path / "evac.json", evacuation_state(6))


def build(conn, users, **kw):
    src = Host.objects.get(connection=conn, name="src.lab")
    return svc.move_plan_build(requester=users["carol"], kind=PlanKind.EVACUATE_HOST, host=src,
                               reason=kw.pop("reason", "firmware upgrade"), **kw)


def approved(conn, users, **kw):
    plan = build(conn, users, **kw)
    svc.move_plan_submit(plan=plan, actor=users["carol"])
    return svc.move_plan_approve(plan=plan, actor=users["erin"], comment="go")


def run_all(django_capture_on_commit_callbacks):
    """Execute queued runs one by one, as a worker would, with on-commit hooks (the plan's bookkeeping)."""
    while True:
        run = MigrationRun.objects.filter(request__status=S.QUEUED).order_by("pk").first()
        if run is None:
            return
        with django_capture_on_commit_callbacks(execute=True):
            migration_run_execute(run_id=run.pk, worker="w1")


def test_build_plans_every_vm_on_the_host_and_flags_the_one_that_cannot_move(evac_dc, users):
    plan = build(evac_dc, users)
    assert plan.status == P.DRAFT and plan.subject_name == "src.lab" and plan.estimated_duration_s > 0
    items = list(plan.items.select_related("vm", "target_host").order_by("order"))
    assert len(items) == 7 and [i.order for i in items] == list(range(1, 8))
    movable = [i for i in items if i.movable]
    assert len(movable) == 6 and all(i.target_host.name in {"a.lab", "b.lab", "c.lab"} for i in movable)
    # balanced: 6 equal VMs over 3 empty hosts -> 2 each
    assert sorted(i.target_host.name for i in movable) == ["a.lab", "a.lab", "b.lab", "b.lab", "c.lab", "c.lab"]
    assert all("most free memory" in i.why for i in movable)
    stuck = items[-1]
    assert stuck.vm.name == "pinned-local" and not stuck.movable
    assert "does not see its datastore" in stuck.blocker and stuck.fallback == "skip"
    # The simulator can cold-move: the planner found it a host and a datastore that host sees.
    assert stuck.target_host.name in {"a.lab", "b.lab", "c.lab"} and stuck.target_datastore.name == "shared-ds"
    assert stuck.kind == "both" and stuck.why.startswith("cold move to")
    entry = AuditEntry.objects.get(action=AuditAction.PLAN_BUILT, object_id=str(plan.pk))
    assert entry.data["moves"] == 6 and entry.data["unmovable"] == 1


def test_only_admins_build_plans_and_a_reason_is_required(evac_dc, users):
    with pytest.raises(ActionRefused) as exc:
        build(evac_dc, users | {"carol": users["erin"]})
    assert exc.value.denied and not MovePlan.objects.exists()
    assert AuditEntry.objects.filter(action=AuditAction.PLAN_BUILT, outcome=AuditOutcome.DENIED).exists()
    with pytest.raises(ActionRefused) as exc:
        build(evac_dc, users, reason="  ")
    assert exc.value.field == "reason" and not MovePlan.objects.exists()


def test_fallback_offers_skip_only_where_the_driver_cannot_cold_move(evac_dc, users, monkeypatch):
    from drivers.base import Capability
    from drivers.simulator import SimulatorDriver

    monkeypatch.setattr(SimulatorDriver, "capabilities", SimulatorDriver.capabilities & ~Capability.COLD_MOVE)
    plan = build(evac_dc, users)
    stuck = plan.items.get(movable=False)
    assert stuck.target_host is None and stuck.why == ""  # no cold target planned
    assert svc.fallback_choices(plan, stuck) == [("skip", "Skip (leave it where it is)")]
    with pytest.raises(ActionRefused, match="not a fallback this hypervisor offers"):
        svc.move_plan_set_fallback(plan=plan, actor=users["carol"], item=stuck, fallback="cold_move")
    with pytest.raises(ActionRefused, match="moves live"):
        svc.move_plan_set_fallback(plan=plan, actor=users["carol"], item=plan.items.filter(movable=True).first(),
                                   fallback="skip")
    with pytest.raises(ActionRefused) as exc:  # not the plan's requester
        svc.move_plan_set_fallback(plan=plan, actor=users["erin"], item=stuck, fallback="skip")
    assert exc.value.denied
    svc.move_plan_set_fallback(plan=plan, actor=users["carol"], item=stuck, fallback="skip")
    assert AuditEntry.objects.filter(action=AuditAction.PLAN_FALLBACK_SET, outcome=AuditOutcome.SUCCESS).count() == 1


def test_cold_move_fallback_powers_off_moves_and_powers_on(evac_dc, users, django_capture_on_commit_callbacks,
                                                           settings):
    from migrations_app.services.inventory import driver_for

    plan = build(evac_dc, users)
    stuck = plan.items.select_related("vm", "target_host", "target_datastore").get(movable=False)
    svc.move_plan_set_fallback(plan=plan, actor=users["carol"], item=stuck, fallback="cold_move")
    svc.move_plan_submit(plan=plan, actor=users["carol"])
    svc.move_plan_approve(plan=plan, actor=users["erin"])
    stuck.refresh_from_db()
    assert stuck.status == Item.MOVING and stuck.request.cold and stuck.request.kind == "both"
    assert stuck.request.run.timeout_s >= 120.0 + settings.PORTAL["COLD_POWER_S"]  # the power operations' time too
    assert "cold move" in stuck.request.policy_note
    run_all(django_capture_on_commit_callbacks)
    plan.refresh_from_db()
    assert plan.status == P.DONE and plan.summary == "7 moved, 0 skipped, 0 not moved."
    # The simulator's own word: on the target, disks on the shared datastore, running again.
    vm = next(v for v in driver_for(evac_dc).inventory().vms if v.name == "pinned-local")
    assert vm.host_ref == stuck.target_host.ref and set(vm.datastore_refs) == {stuck.target_datastore.ref}
    assert vm.power_state == "on"
    assert VirtualMachine.objects.get(pk=stuck.vm_id).host_id == stuck.target_host_id


def test_a_failed_cold_move_is_not_retried_by_itself(evac_dc, users, django_capture_on_commit_callbacks,
                                                     settings, monkeypatch):
    # Its first attempt may have left the VM powered off; a second would take it for a VM that was
    # off and leave it off, reporting success.
    from drivers.base import MigrationFailed
    from migrations_app.services.inventory import driver_for

    settings.PORTAL = {**settings.PORTAL, "PLAN_MAX_ATTEMPTS": 3}

    def fails(self, spec, **kwargs):
        raise MigrationFailed("the relocation failed after the power-off; VM pinned-local is left powered off")

    monkeypatch.setattr(type(driver_for(evac_dc)), "cold_move", fails)
    plan = build(evac_dc, users)
    stuck = plan.items.get(movable=False)
    svc.move_plan_set_fallback(plan=plan, actor=users["carol"], item=stuck, fallback="cold_move")
    svc.move_plan_submit(plan=plan, actor=users["carol"])
    svc.move_plan_approve(plan=plan, actor=users["erin"])
    run_all(django_capture_on_commit_callbacks)
    stuck.refresh_from_db()
    assert stuck.status == Item.FAILED and stuck.attempts == 1, (stuck.status, stuck.attempts)
    assert "not retried by itself" in stuck.explanation and "left powered off" in stuck.explanation
    assert MigrationRequest.objects.filter(vm=stuck.vm).count() == 1
    assert not AuditEntry.objects.filter(action=AuditAction.PLAN_ITEM_RETRIED, object_id=str(plan.pk)).exists()


def test_a_cold_moves_budget_counts_its_power_operations_and_no_memory(settings):
    from migrations_app.services.runs import completion_budget_s

    settings.PORTAL = {**settings.PORTAL, "TIMEOUT_MIN_S": 120.0, "TIMEOUT_S_PER_GIB": 800.0, "COLD_POWER_S": 300.0}
    gib = 1024**3
    assert completion_budget_s(memory_bytes=4 * gib, disk_bytes=gib, kind="compute") == 3200.0
    # Off, the VM's memory is not copied; its guest shutdown and power-on take their own time.
    assert completion_budget_s(memory_bytes=4 * gib, disk_bytes=gib, kind="compute", cold=True) == 120.0 + 300.0
    assert completion_budget_s(memory_bytes=4 * gib, disk_bytes=gib, kind="both", cold=True) == 800.0 + 300.0


def test_a_powered_off_vm_is_offered_a_cold_move_on_the_same_storage(tmp_path, users):
    state = evacuation_state(2, local_vm=False)
    state["vms"][0]["power"] = "off"
    conn = simulated_connection(tmp_path / "off.json", state)
    plan = build(conn, users)
    off = plan.items.select_related("vm").get(movable=False)
    assert off.vm.name == "app-00" and off.blocker.startswith("powered off")
    assert off.kind == "compute" and off.target_host is not None and off.target_datastore is None
    assert dict(svc.fallback_choices(plan, off)).keys() == {"skip", "cold_move"}


def test_the_requester_never_approves_their_own_plan(evac_dc, users):
    plan = build(evac_dc, users)
    with pytest.raises(ActionRefused):  # a draft is not yet for approvers
        svc.move_plan_approve(plan=plan, actor=users["erin"])
    svc.move_plan_submit(plan=plan, actor=users["carol"])
    with pytest.raises(ActionRefused, match="your own plan"):
        svc.move_plan_approve(plan=plan, actor=users["carol"])
    with pytest.raises(ActionRefused):
        svc.move_plan_approve(plan=plan, actor=users["alice"])  # a requester is no approver
    assert MovePlan.objects.get(pk=plan.pk).status == P.PENDING_APPROVAL and not MigrationRequest.objects.exists()


def test_approval_creates_one_approved_queued_request_per_movable_vm(evac_dc, users):
    plan = approved(evac_dc, users)
    assert plan.status == P.RUNNING
    items = list(plan.items.select_related("request", "vm").order_by("order"))
    moving = [i for i in items if i.movable]
    assert all(i.status == Item.MOVING and i.attempts == 1 for i in moving)
    for item in moving:
        req = item.request
        assert req.status == S.QUEUED and req.vm == item.vm and req.target_host_id == item.target_host_id
        assert req.requester == users["carol"] and req.decided_by == users["erin"]
        assert req.decision_comment == f"approved as part of plan #{plan.pk}, signed by erin (stage 1)"
        actions = set(AuditEntry.objects.filter(request=req).values_list("action", flat=True))
        assert {AuditAction.REQUEST_SUBMITTED, AuditAction.REQUEST_APPROVED, AuditAction.RUN_QUEUED} <= actions
    assert items[-1].status == Item.SKIPPED and items[-1].request is None
    assert MigrationRequest.objects.count() == 6
    actions = list(AuditEntry.objects.filter(object_type="move_plan", object_id=str(plan.pk))
                   .order_by("id").values_list("action", flat=True))
    assert actions == [AuditAction.PLAN_BUILT, AuditAction.PLAN_SUBMITTED, AuditAction.PLAN_APPROVED,
                       AuditAction.PLAN_STARTED]


def test_plan_finishes_done_with_the_host_empty_but_the_skipped_vm(evac_dc, users, django_capture_on_commit_callbacks):
    plan = approved(evac_dc, users)
    run_all(django_capture_on_commit_callbacks)
    plan.refresh_from_db()
    assert plan.status == P.DONE and plan.summary == "6 moved, 1 skipped, 0 not moved." and plan.finished_at
    assert list(VirtualMachine.objects.filter(host__name="src.lab").values_list("name", flat=True)) == ["pinned-local"]
    assert set(plan.items.values_list("status", flat=True)) == {Item.SUCCEEDED, Item.SKIPPED}
    assert AuditEntry.objects.filter(action=AuditAction.PLAN_FINISHED, object_id=str(plan.pk)).count() == 1


def test_the_estimate_learns_from_the_connections_past_moves(evac_dc, users, django_capture_on_commit_callbacks):
    first = approved(evac_dc, users)
    run_all(django_capture_on_commit_callbacks)
    again = svc.move_plan_build(requester=users["carol"], kind=PlanKind.EVACUATE_HOST,
                                host=Host.objects.get(connection=evac_dc, name="a.lab"), reason="next host")
    # Before any history: the default 5 s per move, 6 moves two at a time. The simulator at speed
    # 400 moves a VM in well under a second, and the next plan's estimate knows it.
    assert first.estimated_duration_s == pytest.approx(3 * 5.0, abs=0.1)
    moves = again.items.filter(movable=True).count()
    assert moves >= 2 and again.estimated_duration_s < moves / 2 * 2.0


def test_a_failed_move_is_retried_until_max_attempts(tmp_path, users, django_capture_on_commit_callbacks, settings):
    settings.PORTAL = {**settings.PORTAL, "PLAN_MAX_ATTEMPTS": 3}
    conn = simulated_connection(tmp_path / "f.json", evacuation_state(2, local_vm=False,
                                                                        tags={1: ["sim:fail-at-switchover"]}))
    plan = approved(conn, users)
    run_all(django_capture_on_commit_callbacks)
    plan.refresh_from_db()
    bad = plan.items.get(vm__name="app-01")
    assert bad.status == Item.FAILED and bad.attempts == 3 and "Gave up after 3 attempts" in bad.explanation
    requests = MigrationRequest.objects.filter(vm=bad.vm).order_by("pk")
    assert [r.status for r in requests] == [S.FAILED] * 3 and bad.request == requests.last()
    assert "attempt 3 of 3" in requests.last().decision_comment
    assert plan.items.get(vm__name="app-00").status == Item.SUCCEEDED
    assert plan.status == P.PARTIALLY_DONE and plan.summary == "1 moved, 0 skipped, 1 not moved."
    assert AuditEntry.objects.filter(action=AuditAction.PLAN_ITEM_RETRIED, object_id=str(plan.pk)).count() == 2


def test_settling_twice_changes_nothing(evac_dc, users, django_capture_on_commit_callbacks):
    plan = approved(evac_dc, users)
    run_all(django_capture_on_commit_callbacks)
    assert MovePlan.objects.get(pk=plan.pk).status == P.DONE
    entries = AuditEntry.objects.count()
    for req in MigrationRequest.objects.all():
        svc.plan_request_settled(req.pk)
    assert svc.move_plan_settle_stale() == 0 and AuditEntry.objects.count() == entries


def test_lost_bookkeeping_is_caught_up_by_the_scheduler(evac_dc, users):
    plan = approved(evac_dc, users)
    for run in MigrationRun.objects.order_by("pk"):
        migration_run_execute(run_id=run.pk, worker="w1")  # on-commit hooks never ran (a process died)
    assert MovePlan.objects.get(pk=plan.pk).status == P.RUNNING
    assert svc.move_plan_settle_stale() == 6
    assert MovePlan.objects.get(pk=plan.pk).status == P.DONE


def test_cancel_a_running_plan_cancels_its_queued_moves(evac_dc, users, django_capture_on_commit_callbacks):
    plan = approved(evac_dc, users)
    with pytest.raises(ActionRefused):
        svc.move_plan_cancel(plan=plan, actor=users["erin"])  # neither its requester nor an admin
    first = MigrationRun.objects.order_by("pk").first()
    with django_capture_on_commit_callbacks(execute=True):
        migration_run_execute(run_id=first.pk, worker="w1")
    with django_capture_on_commit_callbacks(execute=True):
        svc.move_plan_cancel(plan=plan, actor=users["carol"], reason="window closed")
    plan.refresh_from_db()
    assert plan.status == P.CANCELLED and plan.summary == "1 moved, 1 skipped, 5 not moved."
    assert MigrationRequest.objects.filter(status=S.CANCELLED).count() == 5
    assert not MigrationRequest.objects.exclude(status__in=[S.CANCELLED, S.SUCCEEDED]).exists()


def test_reject_needs_a_reason_and_expiry_closes_undecided_plans(evac_dc, users):
    plan = build(evac_dc, users)
    svc.move_plan_submit(plan=plan, actor=users["carol"])
    with pytest.raises(ActionRefused, match="needs a reason"):
        svc.move_plan_reject(plan=plan, actor=users["erin"], reason="")
    svc.move_plan_reject(plan=plan, actor=users["erin"], reason="not this week")
    plan.refresh_from_db()
    assert plan.status == P.REJECTED and set(plan.items.values_list("status", flat=True)) == {Item.CANCELLED}

    other = build(evac_dc, users)
    svc.move_plan_submit(plan=other, actor=users["carol"])
    assert svc.move_plan_expire_stale(now=timezone.now()) == 0
    assert svc.move_plan_expire_stale(now=timezone.now() + timedelta(hours=73)) == 1
    assert MovePlan.objects.get(pk=other.pk).status == P.EXPIRED


def test_an_item_whose_vm_got_another_request_fails_at_approval_and_the_rest_runs(evac_dc, users):
    from migrations_app.services.requests import migration_request_submit

    plan = build(evac_dc, users)
    svc.move_plan_submit(plan=plan, actor=users["carol"])
    item = plan.items.filter(movable=True).select_related("vm").first()
    migration_request_submit(requester=users["alice"], vm=item.vm, kind="compute", target_host=item.target_host,
                             reason="mine first")
    svc.move_plan_approve(plan=plan, actor=users["erin"])
    item.refresh_from_db()
    assert item.status == Item.FAILED and "already has an open request" in item.explanation and item.request is None
    assert plan.items.filter(status=Item.MOVING).count() == 5


def test_datastore_evacuation_and_rebalance_build_plans(evac_dc, users):
    local = Datastore.objects.get(connection=evac_dc, name="src-local")
    plan = svc.move_plan_build(requester=users["carol"], kind=PlanKind.EVACUATE_DATASTORE, datastore=local,
                               reason="array retirement")
    item = plan.items.select_related("vm").get()
    # src-local is seen by src only, and src sees shared-ds: the VM's disks can go there.
    assert item.vm.name == "pinned-local" and item.movable and item.target_datastore.name == "shared-ds"
    assert item.kind == "storage"

    cluster = Host.objects.get(connection=evac_dc, name="src.lab").cluster
    plan = svc.move_plan_build(requester=users["carol"], kind=PlanKind.REBALANCE_CLUSTER, cluster=cluster,
                               reason="even out")
    assert plan.imbalance_before > plan.imbalance_after >= 0
    assert plan.items.filter(movable=True).count() >= 2


def test_stopping_a_plan_cancels_its_moves_as_the_admin_who_stopped_it(evac_dc, users):
    other_admin = make_user("admin2", Role.ADMIN)
    plan = approved(evac_dc, users)
    svc.move_plan_cancel(plan=MovePlan.objects.get(pk=plan.pk), actor=other_admin, reason="stop")
    actors = set(AuditEntry.objects.filter(action=AuditAction.REQUEST_CANCELLED).values_list("actor_name", flat=True))
    assert actors == {"admin2"}
    assert MigrationRequest.objects.filter(status=S.CANCELLED).count() == 6


def test_stopping_a_plan_leaves_a_move_already_being_cancelled_to_abort(evac_dc, users,
                                                                         django_capture_on_commit_callbacks):
    plan = approved(evac_dc, users)
    first = MigrationRequest.objects.filter(status=S.QUEUED).order_by("pk").first()
    assert _claim(first.run.pk, "w1") is not None  # it runs
    migration_request_cancel(request=first, actor=users["carol"], reason="this one only")
    with django_capture_on_commit_callbacks(execute=True):
        svc.move_plan_cancel(plan=MovePlan.objects.get(pk=plan.pk), actor=users["carol"], reason="stop all")
    plan.refresh_from_db()
    assert plan.cancel_requested_at is not None and plan.status == P.RUNNING  # waits for the aborting move
    statuses = dict(MigrationRequest.objects.values_list("pk", "status"))
    assert statuses.pop(first.pk) == S.CANCELLING
    assert set(statuses.values()) == {S.CANCELLED}
    assert AuditEntry.objects.filter(action=AuditAction.PLAN_CANCELLED, outcome=AuditOutcome.SUCCESS).count() == 1


def test_a_plan_of_only_cold_moves_can_be_submitted_and_counts_them_as_moving(tmp_path, users, client):
    state = evacuation_state(2, local_vm=False)
    for vm in state["vms"]:
        vm["power"] = "off"
    conn = simulated_connection(tmp_path / "cold.json", state)
    plan = build(conn, users)
    items = list(plan.items.all())
    assert items and not any(i.movable for i in items)
    for item in items:
        svc.move_plan_set_fallback(plan=plan, actor=users["carol"], item=item, fallback="cold_move")
    client.force_login(users["carol"])
    assert "2 of 2 VMs move" in client.get(f"/plans/{plan.pk}/").content.decode()
    svc.move_plan_submit(plan=plan, actor=users["carol"])
    assert MovePlan.objects.get(pk=plan.pk).status != P.DRAFT


def test_a_cold_move_refuses_a_suspended_vm(tmp_path, users):
    state = evacuation_state(1, local_vm=False)
    state["vms"][0]["power"] = "suspended"
    conn = simulated_connection(tmp_path / "susp.json", state)
    vm = VirtualMachine.objects.select_related("host__cluster", "connection").get(connection=conn, name="app-00")
    target = Host.objects.get(connection=conn, name="a.lab")
    with pytest.raises(ActionRefused, match="suspended"):
        check_move(vm, "compute", target, None, cold=True)
    state["vms"][0]["power"] = "off"
    conn2 = simulated_connection(tmp_path / "off.json", state, name="off")
    vm = VirtualMachine.objects.select_related("host__cluster", "connection").get(connection=conn2, name="app-00")
    check_move(vm, "compute", Host.objects.get(connection=conn2, name="a.lab"), None, cold=True)  # no refusal
