"""Move-plan pages and the plan websocket stream: who may read, build, submit, decide and watch;
the pages drive the same services, and bad input gets a clear error with nothing changed."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from migrations_app.choices import AuditAction, PlanKind, PlanStatus
from migrations_app.models import AuditEntry, Host, MigrationRequest, MovePlan
from migrations_app.services import plans as svc
from tests.simdc import evacuation_state, simulated_connection

ROLES = ("anonymous", "alice", "mallory", "erin", "dave", "carol")


def client(users, role) -> Client:
    c = Client()
    if role != "anonymous":
        c.force_login(users[role])
    return c


@pytest.fixture
def evac_dc(tmp_path, db):
    return simulated_connection(tmp_path / "evac.json", evacuation_state(4))


def built(conn, users) -> MovePlan:
    src = Host.objects.get(connection=conn, name="src.lab")
    return svc.move_plan_build(requester=users["carol"], kind=PlanKind.EVACUATE_HOST, host=src, reason="bios")


@pytest.mark.django_db
def test_plan_pages_against_every_role(users, evac_dc):
    plan = built(evac_dc, users)
    allowed = {"erin", "dave", "carol"}
    for path in ("/plans/", f"/plans/{plan.pk}/"):
        for role in ROLES:
            response = client(users, role).get(path)
            if role in allowed:
                assert response.status_code == 200, (role, path)
            else:
                assert response.status_code in (302, 403), (role, path, response.status_code)
    for role in ROLES:
        code = client(users, role).get("/plans/queue/").status_code
        assert (code == 200) == (role in {"erin", "carol"}), (role, code)
    page = client(users, "carol").get(f"/plans/{plan.pk}/").content.decode()
    assert "pinned-local" in page and "cannot move" in page and 'name="fallback"' in page
    assert "Submit for approval" in page and "Approve plan" not in page
    assert f'data-watch-plan="{plan.pk}"' in page


@pytest.mark.django_db
def test_only_admins_build_from_the_page_and_bad_input_builds_nothing(users, evac_dc):
    src = Host.objects.get(connection=evac_dc, name="src.lab")
    for role in ("alice", "erin", "dave"):
        client(users, role).post("/plans/new/", {"kind": "evacuate_host", "host": src.pk, "reason": "x"})
    assert not MovePlan.objects.exists()
    c = client(users, "carol")
    c.post("/plans/new/", {"kind": "evacuate_host", "host": "nope", "reason": "x"})
    c.post("/plans/new/", {"kind": "evacuate_host", "reason": "x"})  # no host chosen
    c.post("/plans/new/", {"kind": "teleport", "host": src.pk, "reason": "x"})
    assert not MovePlan.objects.exists()
    response = c.post("/plans/new/", {"kind": "evacuate_host", "host": src.pk, "reason": "firmware"})
    plan = MovePlan.objects.get()
    assert response["Location"] == f"/plans/{plan.pk}/" and plan.items.count() == 5


@pytest.mark.django_db
def test_review_submit_and_decide_through_the_pages(users, evac_dc):
    plan = built(evac_dc, users)
    stuck = plan.items.get(movable=False)
    carol, erin = client(users, "carol"), client(users, "erin")
    assert '<option value="cold_move">' in carol.get(f"/plans/{plan.pk}/").content.decode()
    carol.post(f"/plans/{plan.pk}/items/{stuck.pk}/fallback/", {"fallback": "teleport"})  # no such fallback
    erin.post(f"/plans/{plan.pk}/items/{stuck.pk}/fallback/", {"fallback": "cold_move"})  # not her plan
    stuck.refresh_from_db()
    assert stuck.fallback == "skip"
    carol.post(f"/plans/{plan.pk}/items/{stuck.pk}/fallback/", {"fallback": "cold_move"})
    stuck.refresh_from_db()
    assert stuck.fallback == "cold_move"
    erin.post(f"/plans/{plan.pk}/submit/")  # not hers
    assert MovePlan.objects.get(pk=plan.pk).status == PlanStatus.DRAFT
    carol.post(f"/plans/{plan.pk}/submit/")
    assert MovePlan.objects.get(pk=plan.pk).status == PlanStatus.PENDING_APPROVAL
    card = f'data-plan-id="{plan.pk}"'
    assert card in erin.get("/approvals/").content.decode()
    assert card not in carol.get("/approvals/").content.decode()  # never one's own
    carol.post(f"/plans/{plan.pk}/approve/")
    client(users, "alice").post(f"/plans/{plan.pk}/approve/")
    assert MovePlan.objects.get(pk=plan.pk).status == PlanStatus.PENDING_APPROVAL
    erin.post(f"/plans/{plan.pk}/reject/", {"reason": ""})
    assert MovePlan.objects.get(pk=plan.pk).status == PlanStatus.PENDING_APPROVAL
    erin.post(f"/plans/{plan.pk}/approve/", {"comment": "ok"})
    assert MovePlan.objects.get(pk=plan.pk).status == PlanStatus.RUNNING
    assert MigrationRequest.objects.filter(plan_items__plan=plan).count() == 5  # 4 live, 1 cold
    assert MigrationRequest.objects.get(plan_items=stuck).cold
    assert AuditEntry.objects.filter(action=AuditAction.PLAN_APPROVED, actor=users["erin"]).exists()


@pytest.mark.django_db(transaction=True)
def test_plan_stream_against_every_role(users, tmp_path):
    from tests.consumers.test_live import connect

    plan = built(simulated_connection(tmp_path / "ws.json", evacuation_state(2)), users)
    allowed = {"erin", "dave", "carol"}

    async def check():
        for role in ROLES[1:]:
            comm, connected, _ = await connect(users[role])
            assert connected
            await comm.send_json_to({"action": "subscribe", "stream": "plan", "id": plan.pk})
            reply = await comm.receive_json_from(timeout=5)
            assert (reply["type"] == "subscribed") == (role in allowed), (role, reply)
            if role in allowed:
                assert reply["status"] == "draft"
            await comm.send_json_to({"action": "subscribe", "stream": "plan", "id": "1"})
            assert (await comm.receive_json_from(timeout=5))["type"] == "error"
            await comm.disconnect()

    async_to_sync(check)()


@pytest.mark.django_db
def test_admins_reach_the_plan_forms_from_the_vm_page_with_the_subject_chosen(users, evac_dc):
    from migrations_app.models import VirtualMachine

    vm = VirtualMachine.objects.get(connection=evac_dc, name="app-00")
    page = client(users, "carol").get(f"/vms/{vm.pk}/").content.decode()
    link = f"/plans/?host={vm.host_id}#plan-build"
    assert link in page and "Evacuate datastore…" in page and "Rebalance cluster…" in page
    assert "Evacuate host…" not in client(users, "erin").get(f"/vms/{vm.pk}/").content.decode()
    form = client(users, "carol").get(f"/plans/?host={vm.host_id}").content.decode()
    assert f'<option value="{vm.host_id}" selected>' in form
