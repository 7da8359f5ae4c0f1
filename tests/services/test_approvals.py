"""Approval stages through the services: the shipped policy's outcomes, stage by stage signatures,
self-approval under every role combination, the admin bypass, frozen plans, import/export, and
concurrent approvals on PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import CommandError

from migrations_app import access, selectors
from migrations_app.choices import AuditAction, MigrationKind, RequestStatus, Role
from migrations_app.models import (
    ApprovalPolicy,
    AuditEntry,
    Datastore,
    MigrationRequest,
    MigrationRun,
    RequestApproval,
    VirtualDisk,
)
from migrations_app.policy.defaults import DEFAULT_POLICY_NAME
from migrations_app.policy.document import PolicyDocumentError
from migrations_app.services import requests as svc
from migrations_app.services.errors import ActionRefused
from migrations_app.services.policies import (
    approval_policy_activate,
    approval_policy_export,
    approval_policy_import,
    install_default_policy,
)
from migrations_app.services.runs import queueing
from tests.conftest import install_policy, make_user, other_host_same_cluster, running_vm

S = RequestStatus
GiB = 1024**3


def shape(vm, *, memory_gib: float = 4, disk_gib: float = 40, tags=("env:dev",)):
    """Give the VM the size and tags a test needs (one disk of ``disk_gib``)."""
    vm.memory_bytes, vm.tags = int(memory_gib * GiB), list(tags)
    vm.save()
    first = vm.disks.order_by("key").first()
    VirtualDisk.objects.filter(vm=vm).exclude(pk=first.pk).delete()
    VirtualDisk.objects.filter(pk=first.pk).update(capacity_bytes=int(disk_gib * GiB))
    return vm


def submit(user, vm, **kw):
    kw.setdefault("kind", MigrationKind.COMPUTE)
    if kw["kind"] == MigrationKind.COMPUTE:
        kw.setdefault("target_host", other_host_same_cluster(vm))
    return svc.migration_request_submit(requester=user, vm=vm, reason=kw.pop("reason", "patching"), **kw)


def storage_target(vm):
    return Datastore.objects.filter(hosts=vm.host).exclude(pk__in=vm.datastore_ids()).first()


@pytest.fixture
def shipped(db):
    """The risk-based defaults, active (migration 0006 installs them; this makes sure)."""
    ApprovalPolicy.objects.update(active=False)
    ApprovalPolicy.objects.filter(name=DEFAULT_POLICY_NAME).delete()
    install_default_policy()
    return ApprovalPolicy.objects.get(active=True)


TWO_STAGES = {
    "name": "Two stages",
    "rules": [{"name": "all", "when": {}, "action": "stages", "stages": [
        {"name": "Team lead", "groups": ["approver"], "mode": "any"},
        {"name": "Change board", "groups": ["change-board"], "mode": "n_distinct", "count": 2},
    ]}],
}


ONE_STAGE = {"name": "One stage", "rules": [{"name": "all", "when": {}, "action": "stages", "stages": [
    {"name": "Review", "groups": ["approver"], "mode": "any"}]}]}


@pytest.fixture
def two_stages(users):
    board = Group.objects.create(name="change-board")
    users["frank"] = make_user("frank", Role.APPROVER, teams=("change-board",))
    users["grace"] = make_user("grace", Role.APPROVER, teams=("change-board",))
    users["erin"].groups.add(board)  # erin may sign either stage, never both
    install_policy(TWO_STAGES)
    return users


# -- the shipped policy --------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_migration_installs_the_shipped_policy_as_the_active_one():
    policy = ApprovalPolicy.objects.get(active=True)
    assert policy.name == DEFAULT_POLICY_NAME
    assert [r.action for r in policy.rules.order_by("order")] == ["stages", "auto_approve", "stages"]


@pytest.mark.django_db
def test_installing_the_defaults_twice_changes_nothing(shipped):
    install_default_policy()
    assert ApprovalPolicy.objects.filter(name=DEFAULT_POLICY_NAME).count() == 1
    assert shipped.rules.count() == 3


@pytest.mark.django_db
def test_a_small_same_cluster_compute_move_is_approved_by_the_policy(shipped, datacenter, users):
    vm = shape(running_vm(datacenter), memory_gib=8, disk_gib=100)
    mr = submit(users["alice"], vm)
    assert mr.status == S.QUEUED and mr.decided_by is None
    assert mr.approval_plan["rule"] == "Small same-cluster compute moves are approved automatically"
    entry = AuditEntry.objects.get(request=mr, action=AuditAction.REQUEST_AUTO_APPROVED)
    assert entry.actor is None
    assert entry.data["policy"]["policy"] == DEFAULT_POLICY_NAME
    assert entry.data["policy"]["rule"] == mr.approval_plan["rule"]
    assert "8 GiB ≤ 8 GiB" in entry.data["policy"]["why"]
    assert MigrationRun.objects.filter(request=mr).count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("case", ["storage", "big memory", "big disk"])
def test_storage_moves_and_big_vms_wait_for_one_approver(shipped, datacenter, users, case):
    vm = running_vm(datacenter)
    if case == "storage":
        mr = submit(users["alice"], shape(vm), kind=MigrationKind.STORAGE, target_datastore=storage_target(vm))
    else:
        mr = submit(users["alice"], shape(vm, memory_gib=16) if case == "big memory" else shape(vm, disk_gib=101))
    assert mr.status == S.PENDING_APPROVAL
    assert mr.approval_plan["rule"] == "Everything else needs one approver"
    assert len(mr.stages) == 1
    svc.migration_request_approve(request=mr, actor=users["erin"])
    mr.refresh_from_db()
    assert mr.status == S.QUEUED


@pytest.mark.django_db
def test_a_production_vm_needs_two_distinct_approvers(shipped, datacenter, users):
    vm = shape(running_vm(datacenter), tags=("env:production",))
    mr = submit(users["alice"], vm)
    assert mr.status == S.PENDING_APPROVAL and len(mr.stages) == 2
    svc.migration_request_approve(request=mr, actor=users["erin"], comment="looks fine")
    mr.refresh_from_db()
    assert (mr.status, mr.current_stage) == (S.PENDING_APPROVAL, 1)
    with pytest.raises(ActionRefused, match="you signed stage 1; stage 2 needs someone else"):
        svc.migration_request_approve(request=mr, actor=users["erin"])
    svc.migration_request_approve(request=mr, actor=users["bob"])
    mr.refresh_from_db()
    assert mr.status == S.QUEUED and mr.decided_by == users["bob"]
    actions = list(AuditEntry.objects.filter(request=mr, outcome="success").values_list("action", flat=True)
                   .order_by("id"))
    assert actions == [AuditAction.REQUEST_SUBMITTED, AuditAction.REQUEST_STAGE_APPROVED,
                       AuditAction.REQUEST_APPROVED, AuditAction.RUN_QUEUED]
    signed = AuditEntry.objects.get(request=mr, action=AuditAction.REQUEST_STAGE_APPROVED)
    assert (signed.actor, signed.reason) == (users["erin"], "stage 1 of 2 (First review): looks fine")
    approved = AuditEntry.objects.get(request=mr, action=AuditAction.REQUEST_APPROVED, outcome="success")
    assert approved.data["rule"] == "Production VMs need two distinct approvers"
    assert (approved.data["stage"], approved.data["stages"]) == (2, 2)


@pytest.mark.django_db
def test_an_auto_reject_rule_rejects_at_submission_with_its_reason(datacenter, users):
    install_policy({"name": "No PCI", "rules": [
        {"name": "pci", "when": {"tags_any": ["pci"]}, "action": "auto_reject",
         "reject_reason": "PCI VMs move only in the quarterly window"},
        {"name": "rest", "when": {}, "action": "auto_approve"}]})
    mr = submit(users["alice"], shape(running_vm(datacenter), tags=("pci",)))
    assert mr.status == S.REJECTED and mr.decision_comment == "PCI VMs move only in the quarterly window"
    entry = AuditEntry.objects.get(request=mr, action=AuditAction.REQUEST_AUTO_REJECTED)
    assert entry.reason == mr.decision_comment and entry.data["policy"]["rule"] == "pci"
    assert not MigrationRun.objects.filter(request=mr).exists()


# -- stages and modes through the services -------------------------------------------------------


@pytest.mark.django_db
def test_two_stages_advance_in_order_and_show_who_signed(two_stages, datacenter):
    users = two_stages
    mr = submit(users["alice"], running_vm(datacenter))
    # Stage 1 is for the approver role: frank (change-board) may sign it too, but then not stage 2.
    assert {u.username for u in selectors.current_approvers(mr)} == {"bob", "erin", "frank", "grace"}
    svc.migration_request_approve(request=mr, actor=users["erin"])
    mr.refresh_from_db()
    assert mr.current_stage == 1
    # Stage 2: two distinct change-board members; erin signed stage 1, so frank and grace.
    assert {u.username for u in selectors.current_approvers(mr)} == {"frank", "grace"}
    verdict = access.can_decide(users["bob"], mr)
    assert not verdict and "you are not in change-board" in verdict.reason
    svc.migration_request_approve(request=mr, actor=users["frank"])
    mr.refresh_from_db()
    stages = selectors.approval_stages(mr)
    assert stages[1].summary == "Stage 2 of 2 (Change board): two distinct approvers from change-board (1 of 2: frank)"
    assert [s.state for s in stages] == ["done", "current"]
    with pytest.raises(ActionRefused, match="already approved stage 2") as err:
        svc.migration_request_approve(request=mr, actor=users["frank"])
    assert err.value.conflict
    svc.migration_request_approve(request=mr, actor=users["grace"])
    mr.refresh_from_db()
    assert mr.status == S.QUEUED
    assert list(RequestApproval.objects.filter(request=mr).values_list("stage", "approver__username")) == [
        (0, "erin"), (1, "frank"), (1, "grace")]


@pytest.mark.django_db
def test_all_mode_needs_a_different_person_for_each_group(datacenter, users):
    Group.objects.create(name="dba")
    Group.objects.create(name="network")
    users["erin"].groups.add(*Group.objects.filter(name__in=["dba", "network"]))
    users["frank"] = make_user("frank", Role.APPROVER, teams=("network",))
    install_policy({"name": "All", "rules": [{"name": "all", "when": {}, "action": "stages", "stages": [
        {"name": "DBA and network", "groups": ["dba", "network"], "mode": "all"}]}]})
    mr = submit(users["alice"], running_vm(datacenter))
    svc.migration_request_approve(request=mr, actor=users["erin"])  # stands for dba or network, not both
    mr.refresh_from_db()
    assert mr.status == S.PENDING_APPROVAL
    svc.migration_request_approve(request=mr, actor=users["frank"])  # network; erin is matched to dba
    mr.refresh_from_db()
    assert mr.status == S.QUEUED


@pytest.mark.django_db
def test_a_rejection_at_a_later_stage_ends_the_request_and_reaches_the_requester(two_stages, datacenter):
    users = two_stages
    mr = submit(users["alice"], running_vm(datacenter))
    svc.migration_request_approve(request=mr, actor=users["bob"])
    with pytest.raises(ActionRefused, match="reason"):
        svc.migration_request_reject(request=mr, actor=users["frank"], reason=" ")
    svc.migration_request_reject(request=mr, actor=users["frank"], reason="not during the freeze")
    mr.refresh_from_db()
    assert (mr.status, mr.decision_comment, mr.decided_by) == (S.REJECTED, "not during the freeze", users["frank"])
    entry = AuditEntry.objects.get(request=mr, action=AuditAction.REQUEST_REJECTED, outcome="success")
    assert entry.data["stage"] == 2 and entry.data["policy"] == "Two stages"
    with pytest.raises(ActionRefused, match="already rejected"):
        svc.migration_request_approve(request=mr, actor=users["grace"])


@pytest.mark.django_db
def test_editing_the_policy_never_changes_a_request_in_flight(two_stages, datacenter):
    users = two_stages
    mr = submit(users["alice"], running_vm(datacenter))
    approval_policy_import(actor=users["carol"], document={"name": "Two stages", "rules": [
        {"name": "all", "when": {}, "action": "auto_approve"}]}, activate=True)
    mr.refresh_from_db()
    assert mr.approval_plan["policy_version"] == 1 and len(mr.stages) == 2
    assert ApprovalPolicy.objects.get(name="Two stages").version == 2
    svc.migration_request_approve(request=mr, actor=users["bob"])
    mr.refresh_from_db()
    assert mr.status == S.PENDING_APPROVAL  # stage 2 still waits, as frozen
    other = submit(users["alice"], _another_vm(datacenter, mr.vm))
    assert other.status == S.QUEUED  # the new version approves new requests


def _another_vm(datacenter, vm):
    from migrations_app.models import VirtualMachine

    return (VirtualMachine.objects.filter(connection=datacenter, owner_group__name="team-web", power_state="on")
            .exclude(pk=vm.pk).exclude(tags__icontains="sim:").first())


# -- who may decide: self-approval and the admin bypass -------------------------------------------

# Each requester combination submits its own request; none of them may decide on it, bypass or not.
SELF_CASES = [
    ("requester+approver", (Role.REQUESTER, Role.APPROVER), False),
    ("requester+approver+admin", (Role.REQUESTER, Role.APPROVER, Role.ADMIN), False),
    ("admin", (Role.ADMIN,), False),
    ("admin+approver", (Role.ADMIN, Role.APPROVER), False),
    ("requester+admin", (Role.REQUESTER, Role.ADMIN), False),
    ("superuser", (), True),
]


@pytest.mark.django_db
@pytest.mark.parametrize("bypass", [False, True], ids=["bypass-off", "bypass-on"])
@pytest.mark.parametrize("label, roles, superuser", SELF_CASES, ids=[c[0] for c in SELF_CASES])
def test_the_requester_never_decides_on_their_own_request(datacenter, users, settings, label, roles, superuser,
                                                          bypass):
    settings.PORTAL = {**settings.PORTAL, "ADMIN_BYPASS_APPROVAL": bypass}
    install_policy(ONE_STAGE)
    me = make_user("me", *roles, teams=("team-web",))
    if superuser:
        me.is_superuser = True
        me.save()
    mr = submit(me, running_vm(datacenter))
    assert mr.status == S.PENDING_APPROVAL
    me = type(me).objects.get(pk=me.pk)  # fresh role cache
    for attempt in (lambda: svc.migration_request_approve(request=mr, actor=me),
                    lambda: svc.migration_request_reject(request=mr, actor=me, reason="mine")):
        with pytest.raises(ActionRefused, match="your own request") as err:
            attempt()
        assert err.value.denied
    assert me not in selectors.current_approvers(mr)
    mr.refresh_from_db()
    assert mr.status == S.PENDING_APPROVAL and not RequestApproval.objects.filter(request=mr).exists()
    assert AuditEntry.objects.filter(request=mr, actor=me, outcome="denied").count() == 2


@pytest.mark.django_db
def test_without_the_bypass_an_admin_outside_the_stage_groups_cannot_decide(two_stages, datacenter, settings):
    settings.PORTAL = {**settings.PORTAL, "ADMIN_BYPASS_APPROVAL": False}
    users = two_stages
    mr = submit(users["alice"], running_vm(datacenter))
    with pytest.raises(ActionRefused, match="you are not in approver") as err:
        svc.migration_request_approve(request=mr, actor=users["carol"])
    assert err.value.denied
    assert users["carol"] not in selectors.current_approvers(mr)


@pytest.mark.django_db
def test_with_the_bypass_an_admins_approval_completes_every_stage_and_is_audited(two_stages, datacenter, settings):
    settings.PORTAL = {**settings.PORTAL, "ADMIN_BYPASS_APPROVAL": True}
    users = two_stages
    mr = submit(users["alice"], running_vm(datacenter))
    svc.migration_request_approve(request=mr, actor=users["bob"])  # stage 1 signed normally
    assert users["carol"] in selectors.current_approvers(MigrationRequest.objects.get(pk=mr.pk))
    svc.migration_request_approve(request=mr, actor=users["carol"], comment="emergency fix")
    mr.refresh_from_db()
    assert mr.status == S.QUEUED and mr.decided_by == users["carol"]
    entry = AuditEntry.objects.get(request=mr, action=AuditAction.REQUEST_BYPASS_APPROVED)
    assert entry.actor == users["carol"] and entry.data["bypass"] is True and entry.data["stage"] == 2
    assert RequestApproval.objects.get(request=mr, approver=users["carol"]).bypass
    assert [s.state for s in selectors.approval_stages(mr)] == ["done", "skipped"]


@pytest.mark.django_db
@pytest.mark.parametrize("bypass", [False, True], ids=["bypass-off", "bypass-on"])
@pytest.mark.parametrize("in_group", [False, True], ids=["outside-the-group", "member-of-the-group"])
def test_a_superuser_signs_only_as_a_member_of_the_stage_group_or_through_the_bypass(datacenter, users, settings,
                                                                                     bypass, in_group):
    settings.PORTAL = {**settings.PORTAL, "ADMIN_BYPASS_APPROVAL": bypass}
    install_policy(ONE_STAGE)
    root = make_user("root", *([Role.APPROVER] if in_group else []))
    root.is_superuser = True
    root.save()
    mr = submit(users["alice"], running_vm(datacenter))
    if not (in_group or bypass):
        with pytest.raises(ActionRefused, match="you are not in approver"):
            svc.migration_request_approve(request=mr, actor=root)
        assert root not in selectors.current_approvers(mr)
        return
    assert root in selectors.current_approvers(mr)
    svc.migration_request_approve(request=mr, actor=root)
    mr.refresh_from_db()
    assert mr.status == S.QUEUED
    assert RequestApproval.objects.get(request=mr).bypass == (not in_group)


# -- import, export, activation --------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_export_then_import_through_the_command_round_trips(two_stages, tmp_path, suffix):
    policy = ApprovalPolicy.objects.get(name="Two stages")
    exported = approval_policy_export(policy=policy)
    path = tmp_path / f"policy.{suffix}"
    call_command("policy", "export", str(path), "--name", "Two stages")
    ApprovalPolicy.objects.filter(pk=policy.pk).delete()
    call_command("policy", "import", str(path), "--activate")
    again = ApprovalPolicy.objects.get(name="Two stages")
    assert again.active and approval_policy_export(policy=again) == exported
    assert AuditEntry.objects.filter(action=AuditAction.POLICY_IMPORTED, object_id=str(again.pk)).exists()


@pytest.mark.django_db
def test_a_bad_file_changes_nothing_and_names_every_error(shipped, users, tmp_path):
    before = approval_policy_export(policy=shipped)
    path = Path(tmp_path / "bad.yaml")
    path.write_text("name: Risk-based defaults\nrules:\n  - name: x\n    when: {colour: red}\n    action: stages\n"
                    "    stages: [{groups: [nobody], mode: most}]\n")
    entries = AuditEntry.objects.count()
    with pytest.raises(CommandError, match="4 error"):  # colour, nobody, most, and no catch-all
        call_command("policy", "import", str(path))
    with pytest.raises(PolicyDocumentError) as err:
        approval_policy_import(actor=users["carol"], document={"name": "Risk-based defaults", "rules": [
            {"name": "x", "when": {}, "action": "stages", "stages": [
                {"groups": ["approver"], "mode": "n_distinct", "count": 9}]}]})
    assert err.value.errors[0].startswith("rules[0].stages[0].count: nine distinct approvers from approver is more")
    shipped.refresh_from_db()
    assert approval_policy_export(policy=shipped) == before and shipped.version == 1
    assert AuditEntry.objects.count() == entries


@pytest.mark.django_db
def test_activation_leaves_exactly_one_active_policy_and_is_audited(shipped, two_stages):
    ApprovalPolicy.objects.filter(name="Two stages").update(active=False)
    approval_policy_activate(actor=two_stages["carol"], policy=shipped)
    other = ApprovalPolicy.objects.get(name="Two stages")
    approval_policy_activate(actor=two_stages["carol"], policy=other)
    assert list(ApprovalPolicy.objects.filter(active=True)) == [other]
    entry = AuditEntry.objects.filter(action=AuditAction.POLICY_ACTIVATED).latest("id")
    assert entry.before == {"active": [DEFAULT_POLICY_NAME]} and entry.after == {"active": ["Two stages"]}


# -- concurrency (PostgreSQL, real threads and connections) ---------------------------------------


@pytest.mark.django_db(transaction=True)
def test_concurrent_approvals_at_a_two_approver_stage_make_exactly_the_right_transitions(datacenter, users,
                                                                                          monkeypatch):
    from django.db import connection


    assert connection.vendor == "postgresql", "this test needs real row locks"
    for name in ("frank", "grace"):
        users[name] = make_user(name, Role.APPROVER)
    install_policy({"name": "Two approvers", "rules": [{"name": "all", "when": {}, "action": "stages", "stages": [
        {"name": "Pair", "groups": ["approver"], "mode": "n_distinct", "count": 2}]}]})
    dispatched: list[int] = []
    monkeypatch.setattr(queueing, "dispatch", lambda run_id, task_id: dispatched.append(run_id))
    mr = submit(users["alice"], running_vm(datacenter))
    names = ["erin", "frank", "grace"]  # three approvers race for a stage that needs two
    barrier = threading.Barrier(len(names))
    outcomes: dict[str, str] = {}

    def approve(name):
        from django.db import connection as conn

        barrier.wait()
        try:
            svc.migration_request_approve(request=mr, actor=users[name])
            outcomes[name] = "ok"
        except ActionRefused as exc:
            outcomes[name] = exc.message
        finally:
            conn.close()

    threads = [threading.Thread(target=approve, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()).count("ok") == 2, outcomes
    loser = next(v for v in outcomes.values() if v != "ok")
    assert loser == "this request is already queued", outcomes
    mr.refresh_from_db()
    assert mr.status == S.QUEUED and mr.current_stage == 1
    assert RequestApproval.objects.filter(request=mr).count() == 2
    assert MigrationRun.objects.filter(request=mr).count() == 1 and len(dispatched) == 1
    ok = AuditEntry.objects.filter(request=mr, outcome="success")
    assert ok.filter(action=AuditAction.REQUEST_STAGE_APPROVED).count() == 1
    assert ok.filter(action=AuditAction.REQUEST_APPROVED).count() == 1
    assert ok.filter(action=AuditAction.RUN_QUEUED).count() == 1
